# Compressed variants of every fold model (pruned, quantized, reduced precision), their
# cross-validation aggregation, and one table per experiment of size, latency and metric cost.


rule compress:
    input:
        index=rules.index.output.table,
        splits=rules.split.output.splits,
        cache=lambda w: cache_of(w.experiment),
        base=rules.train.output.model,
    output:
        model=f"{VARIANT_DIR}/fold_{{fold}}/model.pt2",
        history=f"{VARIANT_DIR}/fold_{{fold}}/history.csv",
        predictions=f"{VARIANT_DIR}/fold_{{fold}}/predictions.parquet",
        metrics=f"{VARIANT_DIR}/fold_{{fold}}/metrics.json",
        compression=f"{VARIANT_DIR}/fold_{{fold}}/compression.json",
    log:
        f"{VARIANT_DIR}/fold_{{fold}}/compress.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/compress_{{experiment}}_{{variant}}_fold_{{fold}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: STUDY.compression.threads
    resources:
        mem_mb=STUDY.compression.mem_mb,
        runtime=STUDY.compression.runtime,
        gpu=lambda w: compress_gpus(SETTINGS[w.experiment], VARIANTS[w.variant]),
        slurm_partition=lambda w: partition_for(
            compress_gpus(SETTINGS[w.experiment], VARIANTS[w.variant])
        ),
        slurm_account=CLUSTER.account,
    params:
        variant=lambda w: VARIANTS[w.variant],
        settings=lambda w: SETTINGS[w.experiment],
        compression=STUDY.compression.raw,
    script:
        "../scripts/compress.py"


# a variant's folds are aggregated as an experiment's are (cross-validation only: no clinical files)
use rule aggregate as aggregate_variant with:
    input:
        metrics=lambda w: variant_files(w.experiment, "metrics", [w.variant]),
        predictions=lambda w: variant_files(w.experiment, "predictions", [w.variant]),
    output:
        **{
            name: f"{VARIANT_DIR}/cv/{Path(path).name}"
            for name, path in rules.aggregate.output.items()
            if name
            in (
                "per_fold",
                "summary_table",
                "summary",
                "ensemble",
                "ensemble_predictions",
            )
        },
    log:
        f"{VARIANT_DIR}/cv/aggregate.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/variants/aggregate_{{experiment}}_{{variant}}.tsv"


rule variants_table:
    input:
        records=lambda w: variant_files(w.experiment, "compression"),
        summaries=lambda w: [
            variant_cv_file(w.experiment, v, "summary") for v in VARIANTS
        ],
        base_summary=lambda w: cv_file(w.experiment, "summary"),
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/{{experiment}}/variants/variants.csv",
            caption="../report/variants.rst",
            category="Compression",
            labels={"experiment": "{experiment}", "table": "per fold"},
        ),
        summary=report(
            f"{RESULTS}/{{dataset}}/{{experiment}}/variants/variants_summary.csv",
            caption="../report/variants_summary.rst",
            category="Compression",
            labels={"experiment": "{experiment}", "table": "summary"},
        ),
    log:
        f"{RESULTS}/{{dataset}}/{{experiment}}/variants/variants_table.log",
    conda:
        "../../envs/medfold.yaml"
    resources:
        **site_resources(),
        mem_mb=1000,
        runtime=10,
    params:
        variants=lambda w: list(VARIANTS),
    script:
        "../scripts/variants_table.py"
