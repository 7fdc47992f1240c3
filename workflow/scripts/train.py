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
        FoldOutputs.from_rule(s.output),  # each file where the rule says
        s.threads,
        s.log[0] if len(s.log) else None,
    )


step.run(snakemake, main)
