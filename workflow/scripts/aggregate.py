from medfold.core import step
from medfold.evaluation.aggregate import AggregateOutputs, aggregate_job
from medfold.training import tracking


def main(s):
    outputs = AggregateOutputs.from_rule(s.output)  # its clinical and label-audit files where the rule has them
    name = s.wildcards.get("experiment") or s.wildcards.get("ensemble")
    p = s.params
    aggregate_job(name, s.input.metrics, s.input.predictions, s.input.index, outputs, p.evaluation, p.bootstrap, p.seed)
    if s.rule == "aggregate":  # an experiment's own (not an ensemble's): its parent run gets the summary
        tracking.log_experiment(p.tracking, p.results, s.wildcards.dataset, name, outputs)


step.run(snakemake, main)
