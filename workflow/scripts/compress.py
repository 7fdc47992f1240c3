from pathlib import Path

from medfold import step
from medfold.compress import compress_fold


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
        Path(s.output.model).parent,
        s.threads,
    )


step.run(snakemake, main)
