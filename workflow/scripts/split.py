from medfold import step
from medfold.index import read_index
from medfold.privacy import index_scrubber
from medfold.split import make_splits, split_manifest, write_json, write_manifest


def main(s):
    index, meta = read_index(s.input.index)
    splits, summary = make_splits(index, meta["classes"], s.params.split)
    splits.to_parquet(s.output.splits, index=False)
    write_json(index_scrubber(index).record(summary), s.output.summary)
    write_manifest(split_manifest(index, splits), s.output.manifest, meta["dataset"])


step.run(snakemake, main)
