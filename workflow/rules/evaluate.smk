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


rule compare_experiments:
    input:
        summaries=[cv_file(name, "summary") for name in EXPERIMENTS],
        ensembles=[cv_file(name, "ensemble") for name in EXPERIMENTS],
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
        experiments=EXPERIMENTS,
    script:
        "../scripts/compare_experiments.py"
