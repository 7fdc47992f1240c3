from medfold.core import step
from medfold.split import CheckOutputs, check_split_job

step.run(
    snakemake,
    lambda s: check_split_job(s.input.index, s.input.report, s.input.splits, CheckOutputs.from_rule(s.output)),
)
