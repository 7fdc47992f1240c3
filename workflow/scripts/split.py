from medfold import step
from medfold.index import read_index
from medfold.privacy import index_scrubber
from medfold.split import make_splits, write_json


def main(s):
    index, meta = read_index(s.input.index)
    splits, summary = make_splits(index, meta["classes"], s.params.split)
    splits.to_parquet(s.output.splits, index=False)
    write_json(index_scrubber(index).record(summary), s.output.summary)


step.run(snakemake, main)
