from pathlib import Path

from medfold import step
from medfold.aggregate import aggregate_experiment, write_experiment


def main(s):
    agg = aggregate_experiment(s.input.metrics, s.input.predictions, s.params.bootstrap, s.params.seed)
    write_experiment(agg, Path(s.output.summary).parent)
    agg["ensemble_predictions"].to_parquet(s.output.ensemble_predictions, index=False)


step.run(snakemake, main)
