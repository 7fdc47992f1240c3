# Cross-validation aggregation per experiment, and the comparison of experiments.


rule aggregate:
    input:
        metrics=lambda w: model_files(w.experiment, "metrics"),
        predictions=lambda w: model_files(w.experiment, "predictions"),
        index=rules.index.output.table,
    output:
        per_fold=report(
            f"{CV_DIR}/per_fold.csv",
            caption="../report/per_fold.rst",
            category="Cross-validation",
            labels={"experiment": "{experiment}", "table": "per fold"},
        ),
        summary_table=report(
            f"{CV_DIR}/summary.csv",
            caption="../report/summary.rst",
            category="Cross-validation",
            labels={"experiment": "{experiment}", "table": "summary"},
        ),
        summary=f"{CV_DIR}/summary.json",
        ensemble=f"{CV_DIR}/ensemble_test.json",
        ensemble_predictions=f"{CV_DIR}/ensemble_test_predictions.parquet",
        # the clinical evaluation of the held-out test predictions (medfold.evaluation.clinical)
        test_predictions=f"{CV_DIR}/test_predictions.parquet",
        clinical=f"{CV_DIR}/clinical.json",
        subgroups=report(
            f"{CV_DIR}/subgroups.csv",
            caption="../report/subgroups.rst",
            category="Clinical evaluation",
            labels={"experiment": "{experiment}", "table": "subgroups"},
        ),
        forest=report(
            f"{CV_DIR}/subgroups.png",
            caption="../report/subgroups.rst",
            category="Clinical evaluation",
            labels={"experiment": "{experiment}", "figure": "subgroups"},
        ),
        calibration=report(
            f"{CV_DIR}/calibration.csv",
            caption="../report/calibration.rst",
            category="Clinical evaluation",
            labels={"experiment": "{experiment}", "table": "calibration"},
        ),
        reliability=report(
            f"{CV_DIR}/reliability.png",
            caption="../report/calibration.rst",
            category="Clinical evaluation",
            labels={"experiment": "{experiment}", "figure": "reliability"},
        ),
        operating_points=report(
            f"{CV_DIR}/operating_points.csv",
            caption="../report/operating_points.rst",
            category="Clinical evaluation",
            labels={"experiment": "{experiment}", "table": "operating points"},
        ),
        # likely label errors from the out-of-fold predictions (medfold.evaluation.labels)
        label_issues=report(
            f"{CV_DIR}/label_issues.csv",
            caption="../report/label_issues.rst",
            category="Cross-validation",
            labels={"experiment": "{experiment}", "table": "label issues"},
        ),
    log:
        f"{CV_DIR}/aggregate.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/aggregate_{{experiment}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=2000,
        runtime=20,
    params:
        bootstrap=STUDY.evaluation.bootstrap,
        seed=STUDY.evaluation.bootstrap_seed,
        evaluation=STUDY.evaluation.raw,
        tracking=STUDY.mlflow.raw,
        # <results> above <dataset>/<experiment>/cv/ (what tracking's default store is under)
        results=lambda wildcards, output: Path(output.summary).parents[3],
    script:
        "../scripts/aggregate.py"


rule ensemble_fold:
    input:
        predictions=lambda w: [
            fold_files(name, "predictions")[int(w.fold)]
            for name in ENSEMBLES[w.ensemble].experiments
        ],
        metrics=lambda w: [
            fold_files(name, "metrics")[int(w.fold)]
            for name in ENSEMBLES[w.ensemble].experiments
        ],
    output:
        predictions=f"{ENSEMBLE_DIR}/fold_{{fold}}/predictions.parquet",
        metrics=f"{ENSEMBLE_DIR}/fold_{{fold}}/metrics.json",
    log:
        f"{ENSEMBLE_DIR}/fold_{{fold}}/ensemble.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        experiments=lambda w: ENSEMBLES[w.ensemble].experiments,
        weights=lambda w: ENSEMBLES[w.ensemble].weights,
    script:
        "../scripts/ensemble_fold.py"


# an ensemble across experiments is aggregated as an experiment is, from its own fold files
use rule aggregate as aggregate_ensemble with:
    input:
        metrics=lambda w: ensemble_files(w.ensemble, "metrics"),
        predictions=lambda w: ensemble_files(w.ensemble, "predictions"),
        index=rules.index.output.table,
    output:
        **{
            name: path.replace(CV_DIR, f"{ENSEMBLE_DIR}/cv")
            for name, path in rules.aggregate.output.items()
        },
    log:
        f"{ENSEMBLE_DIR}/cv/aggregate.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/aggregate_ensemble_{{ensemble}}.tsv"


rule grid_table:
    input:
        summaries=lambda w: [cv_file(name, "summary") for name in GRIDS[w.grid]],
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/grids/{{grid}}.csv",
            caption="../report/grid.rst",
            category="Experiments",
            labels={"grid": "{grid}"},
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/grid_{{grid}}.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        combinations=lambda w: GRIDS[w.grid],
        rank_by=STUDY.report.grids.rank_by,
    script:
        "../scripts/grid_table.py"


rule compare_experiments:
    input:
        summaries=[cv_file(name, "summary") for name in EXPERIMENTS]
        + [ensemble_cv_file(name, "summary") for name in ENSEMBLES],
        ensembles=[cv_file(name, "ensemble") for name in EXPERIMENTS]
        + [ensemble_cv_file(name, "ensemble") for name in ENSEMBLES],
        test_predictions=[cv_file(name, "test_predictions") for name in EXPERIMENTS]
        + [ensemble_cv_file(name, "test_predictions") for name in ENSEMBLES],
        per_fold=[cv_file(name, "per_fold") for name in EXPERIMENTS]
        + [ensemble_cv_file(name, "per_fold") for name in ENSEMBLES],
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/experiments.csv",
            caption="../report/experiments.rst",
            category="Experiments",
        ),
        comparisons=report(
            f"{RESULTS}/{{dataset}}/comparisons.csv",
            caption="../report/comparisons.rst",
            category="Experiments",
        ),
        cv_tests=report(
            f"{RESULTS}/{{dataset}}/cv_tests.csv",
            caption="../report/cv_tests.rst",
            category="Experiments",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/compare_experiments.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        experiments=EXPERIMENTS + list(ENSEMBLES),
        comparisons=STUDY.evaluation.comparisons.raw,
        bootstrap=STUDY.evaluation.bootstrap,
        seed=STUDY.evaluation.bootstrap_seed,
    script:
        "../scripts/compare_experiments.py"


rule predict:
    input:
        models=lambda w: model_files(w.experiment, "model"),
        ensemble=lambda w: cv_file(w.experiment, "ensemble"),
    output:
        table=f"{RESULTS}/{{dataset}}/{{experiment}}/predict/predictions.parquet",
        csv=f"{RESULTS}/{{dataset}}/{{experiment}}/predict/predictions.csv",
        unreadable=f"{RESULTS}/{{dataset}}/{{experiment}}/predict/unreadable.csv",
        record=f"{RESULTS}/{{dataset}}/{{experiment}}/predict/prediction.json",
    log:
        f"{RESULTS}/{{dataset}}/{{experiment}}/predict/predict.log",
    conda:
        "../../envs/medfold.yaml"
    threads: 2
    resources:
        **site_resources(),
        mem_mb=4000,
        runtime=60,
    params:
        predict=STUDY.predict.raw,
    script:
        "../scripts/predict.py"
