# Cross-validation aggregation per experiment, and the comparison of experiments.


rule aggregate:
    input:
        metrics=lambda w: fold_files(w.experiment, "metrics"),
        predictions=lambda w: fold_files(w.experiment, "predictions"),
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
        bootstrap=config["evaluation"]["bootstrap"],
        seed=config["evaluation"]["bootstrap_seed"],
    script:
        "../scripts/aggregate.py"


rule ensemble_fold:
    input:
        predictions=lambda w: [
            fold_files(name, "predictions")[int(w.fold)]
            for name in ENSEMBLES[w.ensemble]["experiments"]
        ],
        metrics=lambda w: [
            fold_files(name, "metrics")[int(w.fold)]
            for name in ENSEMBLES[w.ensemble]["experiments"]
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
        experiments=lambda w: ENSEMBLES[w.ensemble]["experiments"],
        weights=lambda w: ENSEMBLES[w.ensemble]["weights"],
    script:
        "../scripts/ensemble_fold.py"


rule aggregate_ensemble:
    input:
        metrics=lambda w: ensemble_files(w.ensemble, "metrics"),
        predictions=lambda w: ensemble_files(w.ensemble, "predictions"),
    output:
        per_fold=f"{ENSEMBLE_DIR}/cv/per_fold.csv",
        summary_table=f"{ENSEMBLE_DIR}/cv/summary.csv",
        summary=f"{ENSEMBLE_DIR}/cv/summary.json",
        ensemble=f"{ENSEMBLE_DIR}/cv/ensemble_test.json",
        ensemble_predictions=f"{ENSEMBLE_DIR}/cv/ensemble_test_predictions.parquet",
    log:
        f"{ENSEMBLE_DIR}/cv/aggregate.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=2000,
        runtime=20,
    params:
        bootstrap=config["evaluation"]["bootstrap"],
        seed=config["evaluation"]["bootstrap_seed"],
    script:
        "../scripts/aggregate.py"


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
        rank_by=config["grids"]["rank_by"],
    script:
        "../scripts/grid_table.py"


rule compare_experiments:
    input:
        summaries=[cv_file(name, "summary") for name in EXPERIMENTS]
        + [ensemble_cv_file(name, "summary") for name in ENSEMBLES],
        ensembles=[cv_file(name, "ensemble") for name in EXPERIMENTS]
        + [ensemble_cv_file(name, "ensemble") for name in ENSEMBLES],
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/experiments.csv",
            caption="../report/experiments.rst",
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
    script:
        "../scripts/compare_experiments.py"


rule predict:
    input:
        models=lambda w: fold_files(w.experiment, "model"),
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
        predict=config["predict"],
    script:
        "../scripts/predict.py"
