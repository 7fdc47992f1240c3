import pandas as pd

from medfold import step
from medfold.aggregate import compare_experiments, cv_t_tests
from medfold.clinical import paired_comparisons, pairs_to_compare


def main(s):
    names = s.params.experiments
    table = compare_experiments(dict(zip(names, s.input.summaries)), dict(zip(names, s.input.ensembles)))
    table.to_csv(s.output.table, index=False)
    predictions = {name: pd.read_parquet(path) for name, path in zip(names, s.input.test_predictions)}
    best = table.loc[table["best"], "experiment"].tolist()
    comparisons = paired_comparisons(
        predictions,
        s.input.summaries[0],
        s.params.comparisons,
        best[0] if best else None,
        s.params.bootstrap,
        s.params.seed,
    )
    comparisons.to_csv(s.output.comparisons, index=False)
    per_fold = {name: pd.read_csv(path) for name, path in zip(names, s.input.per_fold)}
    pairs = pairs_to_compare(names, s.params.comparisons, best[0] if best else None)
    cv_t_tests(per_fold, pairs, s.params.comparisons["cv_metric"]).to_csv(s.output.cv_tests, index=False)


step.run(snakemake, main)
