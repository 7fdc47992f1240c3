from pathlib import Path

from medfold import step
from medfold.explain import explain_fold


def main(s):
    explain_fold(
        s.input.model,
        s.input.index,
        s.input.splits,
        Path(s.input.cache[0]).parent,
        int(s.wildcards.fold),
        Path(s.output.record).parent,
        s.params.explain,
        s.threads,
    )


step.run(snakemake, main)
