# Image cache, one training job per experiment and fold.


rule cache:
    input:
        index=rules.index.output.table,
    output:
        images=f"{RESULTS}/{{dataset}}/cache/{{size}}/images.npy",
        ids=f"{RESULTS}/{{dataset}}/cache/{{size}}/image_ids.txt",
    log:
        f"{RESULTS}/{{dataset}}/logs/cache_{{size}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/cache_{{size}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: STUDY.resources.cache_threads
    resources:
        **site_resources(),
        mem_mb=2000,
        runtime=120,
    params:
        channels=STUDY.images.channels,
    script:
        "../scripts/cache.py"


rule train:
    input:
        index=rules.index.output.table,
        splits=rules.split.output.splits,
        split_check=rules.check_split.output.check,
        cache=lambda w: cache_of(w.experiment),
        init=lambda w: INIT_FROM.get(w.experiment, []),
    output:
        model=f"{FOLD_DIR}/model.pt",
        history=report(
            f"{FOLD_DIR}/history.csv",
            caption="../report/history.rst",
            category="Training",
            labels={"experiment": "{experiment}", "fold": "{fold}"},
        ),
        predictions=f"{FOLD_DIR}/predictions.parquet",
        metrics=f"{FOLD_DIR}/metrics.json",
        tensorboard=directory(f"{FOLD_DIR}/tensorboard"),
    log:
        f"{FOLD_DIR}/train.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/train_{{experiment}}_fold_{{fold}}.tsv"
    conda:
        "../../envs/medfold.yaml"
    threads: lambda w: TRAINING[w.experiment].threads
    resources:
        mem_mb=lambda w: TRAINING[w.experiment].mem_mb,
        runtime=lambda w: TRAINING[w.experiment].runtime,
        gpu=lambda w: TRAIN_RESOURCES[w.experiment]["gpu"],
        gres=lambda w: TRAIN_RESOURCES[w.experiment]["gres"],
        nodes=lambda w: TRAIN_RESOURCES[w.experiment]["nodes"],
        tasks=lambda w: TRAIN_RESOURCES[w.experiment]["tasks"],
        tasks_per_gpu=lambda w: TRAIN_RESOURCES[w.experiment]["tasks_per_gpu"],
        mpi=lambda w: TRAIN_RESOURCES[w.experiment]["mpi"],
        slurm_extra=lambda w: TRAIN_RESOURCES[w.experiment]["slurm_extra"],
        slurm_partition=lambda w: partition_for(
            TRAIN_RESOURCES[w.experiment]["gpu"]
            or TRAIN_RESOURCES[w.experiment]["gres"]
        ),
        slurm_account=CLUSTER.account,
    params:
        settings=lambda w: SETTINGS[w.experiment],
        tracking=STUDY.mlflow.raw,
        results=lambda wildcards, output: Path(output.model).parents[3],
    script:
        "../scripts/train.py"


# repeat r >= 1 of a fold (experiments.<name>.repeats): the same fold trained with seed r's
# streams (medfold.core.seeds.repeat), one job each; repeat 0 is the fold's own model above
use rule train as train_repeat with:
    output:
        model=f"{REPEAT_DIR}/model.pt",
        history=report(
            f"{REPEAT_DIR}/history.csv",
            caption="../report/history.rst",
            category="Training",
            labels={
                "experiment": "{experiment}",
                "fold": "{fold}",
                "seed": "{repeat}",
            },
        ),
        predictions=f"{REPEAT_DIR}/predictions.parquet",
        metrics=f"{REPEAT_DIR}/metrics.json",
        tensorboard=directory(f"{REPEAT_DIR}/tensorboard"),
    log:
        f"{REPEAT_DIR}/train.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/train_{{experiment}}_fold_{{fold}}_seed_{{repeat}}.tsv"
    params:
        settings=lambda w: repeat_settings(SETTINGS[w.experiment], int(w.repeat)),
        tracking=STUDY.mlflow.raw,
        results=lambda wildcards, output: Path(output.model).parents[4],
