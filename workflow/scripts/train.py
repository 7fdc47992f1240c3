from pathlib import Path

from medfold import step
from medfold.train import run_fold


def main(s):
    run_fold(s.params.settings, s.input.index, s.input.splits, Path(s.input.cache[0]).parent,
             int(s.wildcards.fold), Path(s.output.model).parent, s.threads)


step.run(snakemake, main)
