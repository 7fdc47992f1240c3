from pathlib import Path

from medfold import step
from medfold.export import ExportOutputs, export_job

# the experiment's folder: its fold ensemble, thresholds from its cv/
step.run(
    snakemake,
    lambda s: export_job(Path(s.input.ensemble).parents[1], s.params.card, ExportOutputs.from_rule(s.output)),
)
