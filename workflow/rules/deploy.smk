# Deployment: an experiment's fold ensemble as one ONNX file, with its model card.


rule export:
    input:
        models=lambda w: model_files(w.experiment, "model"),
        metrics=lambda w: model_files(w.experiment, "metrics"),
        ensemble=lambda w: cv_file(w.experiment, "ensemble"),
        summary=lambda w: cv_file(w.experiment, "summary"),
        clinical=lambda w: cv_file(w.experiment, "clinical"),
        index_report=rules.index.output.report,
        split_summary=rules.split.output.summary,
        manifest=rules.split.output.manifest,
    output:
        onnx=f"{RESULTS}/{{dataset}}/{{experiment}}/export/model.onnx",
        record=f"{RESULTS}/{{dataset}}/{{experiment}}/export/model.json",
        card=f"{RESULTS}/{{dataset}}/{{experiment}}/export/model_card.json",
        card_md=report(
            f"{RESULTS}/{{dataset}}/{{experiment}}/export/model_card.md",
            caption="../report/model_card.rst",
            category="Deployment",
            labels={"experiment": "{experiment}", "file": "model card"},
        ),
    log:
        f"{RESULTS}/{{dataset}}/{{experiment}}/export/export.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/export_{{experiment}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: 1
    resources:
        **site_resources(),
        mem_mb=4000,
        runtime=30,
    params:
        card=STUDY.export.card.raw,
    script:
        "../scripts/export.py"


# External validation: another site's data through an experiment's frozen fold ensemble.
EXTERNAL_DIR = f"{RESULTS}/{{dataset}}/external/{{external}}"


rule external_index:
    input:
        unpack(lambda w: dataset_inputs(w, STUDY.external_settings[w.external].dataset)),
    output:
        table=f"{EXTERNAL_DIR}/index.parquet",
        report=f"{EXTERNAL_DIR}/index_report.json",
        cache=f"{EXTERNAL_DIR}/cache/images.npy",
    log:
        f"{EXTERNAL_DIR}/index.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/external_index_{{external}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: STUDY.resources.index_threads
    resources:
        **site_resources(),
        mem_mb=lambda w: EXTERNALS[w.external].mem_mb,
        runtime=120,
    params:
        dataset=lambda w: EXTERNALS[w.external].dataset.raw,
        identifiers=STUDY.privacy.identifiers,
        size=lambda w: TRAINING[EXTERNALS[w.external].experiment].image_size,
        channels=STUDY.images.channels,
        results=lambda wildcards, output: Path(output.table).parents[2],
    script:
        "../scripts/external_index.py"


rule external_validate:
    input:
        models=lambda w: model_files(EXTERNALS[w.external].experiment, "model"),
        ensemble=lambda w: cv_file(EXTERNALS[w.external].experiment, "ensemble"),
        ensemble_predictions=lambda w: cv_file(
            EXTERNALS[w.external].experiment, "ensemble_predictions"
        ),
        index=rules.index.output.table,
        splits=rules.split.output.splits,
        cache=lambda w: cache_of(EXTERNALS[w.external].experiment)[0],
        external_index=rules.external_index.output.table,
        external_cache=rules.external_index.output.cache,
    output:
        copies=report(
            f"{EXTERNAL_DIR}/copies.csv",
            caption="../report/external.rst",
            category="External validation",
            labels={"external": "{external}", "table": "copies of the training data"},
        ),
        predictions=f"{EXTERNAL_DIR}/predictions.parquet",
        record=f"{EXTERNAL_DIR}/external.json",
        reliability=report(
            f"{EXTERNAL_DIR}/reliability.png",
            caption="../report/external.rst",
            category="External validation",
            labels={"external": "{external}", "figure": "reliability"},
        ),
    log:
        f"{EXTERNAL_DIR}/external.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/external_validate_{{external}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: 2
    resources:
        **site_resources(),
        mem_mb=lambda w: EXTERNALS[w.external].mem_mb,
        runtime=60,
    params:
        settings=lambda w: EXTERNALS[w.external].raw,
        bootstrap=STUDY.evaluation.bootstrap,
        seed=STUDY.evaluation.bootstrap_seed,
        bins=STUDY.evaluation.calibration.bins,
    script:
        "../scripts/external_validate.py"
