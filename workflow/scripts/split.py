from medfold.core import step
from medfold.split import SplitOutputs, split_job

step.run(snakemake, lambda s: split_job(s.input.index, s.params.split, SplitOutputs.from_rule(s.output)))
