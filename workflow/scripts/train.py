from pathlib import Path

from medfold import step
from medfold.train import FoldOutputs, train_fold_job


def main(s):
    train_fold_job(
        s.params.settings,
        s.input.index,
        s.input.splits,
        Path(s.input.cache[0]).parent,
        int(s.wildcards.fold),
        FoldOutputs(  # the paths the rule declares, each written where the rule says
            Path(s.output.model),
            Path(s.output.history),
            Path(s.output.predictions),
            Path(s.output.metrics),
            Path(s.output.tensorboard),
        ),
        s.threads,
        s.log[0] if len(s.log) else None,
    )


step.run(snakemake, main)
