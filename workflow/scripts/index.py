from medfold import step
from medfold.index import build_index, write_index


def main(s):
    table, report = build_index(s.params.dataset, threads=s.threads)
    write_index(table, report, s.output.table, s.output.report)


step.run(snakemake, main)
