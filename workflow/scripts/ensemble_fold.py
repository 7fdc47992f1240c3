import json
from pathlib import Path

from medfold import step
from medfold.aggregate import ensemble_fold


def main(s):
    names = s.params.experiments
    result, predictions = ensemble_fold(
        dict(zip(names, s.input.predictions)),
        dict(zip(names, s.input.metrics)),
        s.params.weights,
        int(s.wildcards.fold),
    )
    predictions.to_parquet(s.output.predictions, index=False)
    Path(s.output.metrics).write_text(json.dumps(result, indent=2) + "\n")


step.run(snakemake, main)
