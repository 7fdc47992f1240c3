from pathlib import Path

from medfold.core import step
from medfold.deploy.external import ExternalOutputs, validate


def main(s):
    i, p = s.input, s.params
    experiment = Path(i.ensemble).parent.parent
    outputs = ExternalOutputs.from_rule(s.output)  # each file where the rule says
    validate(
        s.wildcards.external,
        p.settings,
        experiment,
        i.index,
        i.splits,
        i.cache,
        i.external_index,
        i.external_cache,
        outputs,
        p.bootstrap,
        p.seed,
        p.bins,
        s.threads,
    )


step.run(snakemake, main)
