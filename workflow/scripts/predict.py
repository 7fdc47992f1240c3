from pathlib import Path

from medfold.core import step
from medfold.deploy.predict import PredictOutputs, predict_job

# the experiment's folder: its fold ensemble, thresholds from its cv/
step.run(
    snakemake,
    lambda s: predict_job(s.params.predict, Path(s.input.ensemble).parents[1], PredictOutputs.from_rule(s.output)),
)
