from pathlib import Path

from medfold.core import step
from medfold.training import tracking
from medfold.training.fold import FoldOutputs
from medfold.training.train import train_fold_job


def main(s):
    outputs = FoldOutputs.from_rule(s.output)  # each file where the rule says
    with tracking.fold_run(
        s.params.tracking,
        s.params.results,
        s.wildcards.dataset,
        s.wildcards.experiment,
        int(s.wildcards.fold),
        s.params.settings,
        outputs.work,
    ):
        train_fold_job(
            s.params.settings,
            s.input.index,
            s.input.splits,
            Path(s.input.cache[0]).parent,
            int(s.wildcards.fold),
            outputs,
            s.threads,
            s.log[0] if len(s.log) else None,
        )


step.run(snakemake, main)
