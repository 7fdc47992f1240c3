from pathlib import Path

from medfold.core import step
from medfold.explain import ExplainOutputs, explain_fold


def main(s):
    explain_fold(
        s.input.model,
        s.input.index,
        s.input.splits,
        Path(s.input.cache[0]).parent,
        int(s.wildcards.fold),
        ExplainOutputs.from_rule(s.output),  # each file where the rule says
        s.params.explain,
        s.threads,
    )


step.run(snakemake, main)
