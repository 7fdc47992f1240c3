from medfold.core import step
from medfold.evaluation.aggregate import ExperimentEnsembleFoldOutputs, experiment_ensemble_fold_job


def main(s):
    outputs = ExperimentEnsembleFoldOutputs.from_rule(s.output)  # each file where the rule says
    experiment_ensemble_fold_job(
        s.params.experiments, s.input.predictions, s.input.metrics, s.params.weights, int(s.wildcards.fold), outputs
    )


step.run(snakemake, main)
