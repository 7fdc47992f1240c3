from medfold import step
from medfold.aggregate import grid_table


def main(s):
    names = list(s.params.combinations)
    table = grid_table(s.params.combinations, dict(zip(names, s.input.summaries)), s.params.rank_by)
    table.to_csv(s.output.table, index=False)


step.run(snakemake, main)
