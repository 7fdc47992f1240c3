from medfold import step
from medfold.aggregate import GridOutputs, grid_job

step.run(
    snakemake,
    lambda s: grid_job(s.params.combinations, s.input.summaries, s.params.rank_by, GridOutputs.from_rule(s.output)),
)
