from pathlib import Path

from medfold import clinical, step, tracking
from medfold.aggregate import aggregate_experiment, write_experiment
from medfold.index import read_index
from medfold.labels import audit
from medfold.privacy import shareable_view


def main(s):
    agg = aggregate_experiment(s.input.metrics, s.input.predictions, s.params.bootstrap, s.params.seed)
    out = s.output
    write_experiment(agg, out.per_fold, out.summary_table, out.summary, out.ensemble, out.ensemble_predictions)
    if hasattr(s.output, "label_issues"):  # an experiment's own folds (not variants or ensembles)
        audit(agg["predictions"], agg["classes"], agg["task"]).to_csv(s.output.label_issues, index=False)
    if not hasattr(s.output, "clinical"):  # compressed variants: cross-validation only
        return
    predictions = agg["predictions"]  # with repeats, each validation image once (its seeds averaged)
    index = shareable_view(read_index(s.input.index)[0])  # as the predictions name images and patients
    name = s.wildcards.get("experiment") or s.wildcards.get("ensemble")
    result = clinical.evaluate_experiment(
        predictions, index, agg["task"], agg["classes"], s.params.evaluation, s.params.bootstrap, s.params.seed
    )
    clinical.write(result, name, s.output)
    if s.rule == "aggregate":  # an experiment's own (not an ensemble's): its parent run gets the summary
        tracking.log_summary(
            s.params.tracking,
            s.params.results,
            s.wildcards.dataset,
            name,
            Path(s.output.summary).parent.parent,
            [out.summary, out.per_fold, out.ensemble, out.label_issues],
        )


step.run(snakemake, main)
