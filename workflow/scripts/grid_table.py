from medfold.core import step
from medfold.evaluation.aggregate import GridOutputs, grid_job

step.run(
    snakemake,
    lambda s: grid_job(s.params.combinations, s.input.summaries, s.params.rank_by, GridOutputs.from_rule(s.output)),
)
