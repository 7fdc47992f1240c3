from pathlib import Path

from medfold import step
from medfold.predict import PredictOutputs, predict_job

# the experiment's folder: its fold ensemble, thresholds from its cv/
step.run(
    snakemake,
    lambda s: predict_job(s.params.predict, Path(s.input.ensemble).parents[1], PredictOutputs.from_rule(s.output)),
)
