from medfold import step
from medfold.index import build_index, write_index
from medfold.privacy import Pseudonyms


def main(s):
    pseudonyms = Pseudonyms.for_results(s.params.results, s.params.identifiers)
    table, report = build_index(s.params.dataset, threads=s.threads, pseudonyms=pseudonyms)
    write_index(table, report, s.output.table, s.output.report)


step.run(snakemake, main)
