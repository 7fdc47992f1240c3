from pathlib import Path

from medfold import step
from medfold.train import train_fold_job


def main(s):
    train_fold_job(
        s.params.settings,
        s.input.index,
        s.input.splits,
        Path(s.input.cache[0]).parent,
        int(s.wildcards.fold),
        Path(s.output.model).parent,
        s.threads,
        s.log[0] if len(s.log) else None,
    )


step.run(snakemake, main)
