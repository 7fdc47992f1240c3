from medfold.core import step
from medfold.split import SplitOutputs, split_job


def main(s):
    split_job(s.input.index, s.params.split, SplitOutputs.from_rule(s.output), s.params.refused)


step.run(snakemake, main)
