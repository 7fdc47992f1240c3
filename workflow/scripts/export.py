from pathlib import Path

from medfold.core import step
from medfold.deploy.export import ExportOutputs, export_job

# the experiment's folder: its fold ensemble, thresholds from its cv/
step.run(
    snakemake,
    lambda s: export_job(Path(s.input.ensemble).parents[1], s.params.card, ExportOutputs.from_rule(s.output)),
)
