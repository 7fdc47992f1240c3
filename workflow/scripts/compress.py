from pathlib import Path

from medfold.compression.compress import VariantOutputs, compress_fold
from medfold.core import step


def main(s):
    compress_fold(
        s.wildcards.variant,
        s.params.variant,
        s.params.settings,
        s.params.compression,
        s.input.index,
        s.input.splits,
        Path(s.input.cache[0]).parent,
        int(s.wildcards.fold),
        s.input.base,
        VariantOutputs.from_rule(s.output),  # each file where the rule says
        s.threads,
    )


step.run(snakemake, main)
