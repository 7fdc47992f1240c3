# Helpers: every result file the report reads, from the rules' own output patterns.
from medfold.report.inputs import ExperimentFiles, ExternalFiles, ReportInputs


def report_inputs():
    """Every result file the report reads (medfold.report.inputs.ReportInputs): its paths are
    the report rule's inputs, the object its script's parameter."""
    experiments = {
        name: ExperimentFiles(
            per_fold=cv_file(name, "per_fold"),
            summary=cv_file(name, "summary"),
            ensemble=cv_file(name, "ensemble"),
            ensemble_predictions=cv_file(name, "ensemble_predictions"),
            predictions=fold_files(name, "predictions"),
            # fold -> its history (the report never reads a fold number from a path)
            histories=dict(zip(EXPERIMENT_FOLDS[name], fold_files(name, "history"))),
            metrics=dict(zip(EXPERIMENT_FOLDS[name], fold_files(name, "metrics"))),
            clinical=cv_file(name, "clinical"),
            forest=cv_file(name, "forest"),
            reliability=cv_file(name, "reliability"),
            label_issues=cv_file(name, "label_issues"),
            explanations=(
                explanation_files(name, "record") if name in EXPLAINED else []
            ),
            model_card=(
                expand(rules.export.output.card, dataset=DATASET, experiment=name)[0]
                if name in EXPORTED
                else None
            ),
            variants=(
                {
                    "table": expand(
                        rules.variants_table.output.table,
                        dataset=DATASET,
                        experiment=name,
                    )[0],
                    "summary": expand(
                        rules.variants_table.output.summary,
                        dataset=DATASET,
                        experiment=name,
                    )[0],
                }
                if name in COMPRESSED
                else None
            ),
        )
        for name in EXPERIMENTS
    }
    ensembles = {
        name: ExperimentFiles(
            per_fold=ensemble_cv_file(name, "per_fold"),
            summary=ensemble_cv_file(name, "summary"),
            ensemble=ensemble_cv_file(name, "ensemble"),
            ensemble_predictions=ensemble_cv_file(name, "ensemble_predictions"),
            predictions=ensemble_files(name, "predictions"),
            histories={},
            metrics=dict(zip(FOLDS, ensemble_files(name, "metrics"))),
            clinical=ensemble_cv_file(name, "clinical"),
            forest=ensemble_cv_file(name, "forest"),
            reliability=ensemble_cv_file(name, "reliability"),
            label_issues=ensemble_cv_file(name, "label_issues"),
        )
        for name in ENSEMBLES
    }
    sizes = sorted({TRAINING[name].image_size for name in EXPERIMENTS})
    benchmarks = [
        *expand(rules.index.benchmark, dataset=DATASET),
        *expand(rules.split.benchmark, dataset=DATASET),
        *expand(rules.check_split.benchmark, dataset=DATASET),
        *expand(rules.cache.benchmark, dataset=DATASET, size=sizes),
        *[
            path
            for name in EXPERIMENTS
            for path in expand(
                rules.train.benchmark,
                dataset=DATASET,
                experiment=name,
                fold=EXPERIMENT_FOLDS[name],
            )
        ],
        *expand(rules.aggregate.benchmark, dataset=DATASET, experiment=EXPERIMENTS),
        *expand(
            rules.explain.benchmark,
            dataset=DATASET,
            experiment=EXPLAINED,
            fold=EXPLAINED_FOLDS,
        ),
        *[
            path
            for name in COMPRESSED
            for path in expand(
                rules.compress.benchmark,
                dataset=DATASET,
                experiment=name,
                variant=list(VARIANTS),
                fold=COMPRESSED_FOLDS,
            )
        ],
    ]
    return ReportInputs(
        index=expand(rules.index.output.table, dataset=DATASET)[0],
        index_report=expand(rules.index.output.report, dataset=DATASET)[0],
        split_summary=expand(rules.split.output.summary, dataset=DATASET)[0],
        split_check=expand(rules.check_split.output.check, dataset=DATASET)[0],
        cache=cache_of(min(EXPERIMENTS, key=lambda n: TRAINING[n].image_size))[0],
        comparison=expand(rules.compare_experiments.output.table, dataset=DATASET)[0],
        comparisons=expand(
            rules.compare_experiments.output.comparisons, dataset=DATASET
        )[0],
        cv_tests=expand(rules.compare_experiments.output.cv_tests, dataset=DATASET)[0],
        experiments=experiments,
        ensembles=ensembles,
        grids={
            name: expand(rules.grid_table.output.table, dataset=DATASET, grid=name)[0]
            for name in GRIDS
        },
        benchmarks=benchmarks,
        externals={
            name: ExternalFiles(
                record=expand(
                    rules.external_validate.output.record,
                    dataset=DATASET,
                    external=name,
                )[0],
                reliability=expand(
                    rules.external_validate.output.reliability,
                    dataset=DATASET,
                    external=name,
                )[0],
            )
            for name in EXTERNALS
        },
        plan=STUDY.config["plan"],
    )
