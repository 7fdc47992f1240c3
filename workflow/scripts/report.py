from pathlib import Path

from medfold import step
from medfold.report import render


def main(s):
    Path(s.output.html).write_text(render(s.params.files, s.params.config, Path(s.params.repo)))


step.run(snakemake, main)
