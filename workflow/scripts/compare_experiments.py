from medfold import step
from medfold.aggregate import compare_experiments


def main(s):
    names = s.params.experiments
    table = compare_experiments(dict(zip(names, s.input.summaries)), dict(zip(names, s.input.ensembles)))
    table.to_csv(s.output.table, index=False)


step.run(snakemake, main)
