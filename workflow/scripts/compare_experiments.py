from medfold.core import step
from medfold.evaluation.aggregate import ComparisonOutputs, compare_job


def main(s):
    i, p = s.input, s.params
    outputs = ComparisonOutputs.from_rule(s.output)  # each file where the rule says
    compare_job(
        p.experiments,
        i.summaries,
        i.ensembles,
        i.test_predictions,
        i.per_fold,
        p.comparisons,
        p.bootstrap,
        p.seed,
        outputs,
    )


step.run(snakemake, main)
