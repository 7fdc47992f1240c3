# Helpers shared by the rules: config validation (before any job runs), paths, resources.
from pathlib import Path

import re

from snakemake.utils import validate

from medfold.study.resolve import compress_gpus, repeat_settings, resolve

validate(config, schema="../schemas/config.schema.yaml")

# the workflow's own files found from this file, so that it runs as a module too
WORKFLOW_DIR = Path(workflow.current_basedir).parent
SCHEMA = WORKFLOW_DIR / "schemas" / "config.schema.yaml"
# the whole config resolved and cross-checked once (medfold.study.resolve): a bad key stops
# here, before any job runs; the names below are the rules' short names for its parts
STUDY = resolve(config, SCHEMA)
RESULTS = STUDY.results
DATASET = STUDY.dataset
DATASET_DIR = f"{RESULTS}/{DATASET}"
OVERRIDES, GRIDS = STUDY.overrides, STUDY.grids
EXPERIMENTS = list(STUDY.experiments)
FOLDS = list(STUDY.folds)
SETTINGS = STUDY.settings  # experiment -> its settings dict (what jobs get)
TRAINING = STUDY.training  # experiment -> its TrainSettings (what rules read)
EXPERIMENT_FOLDS = STUDY.experiment_folds
REPEATS = STUDY.repeats
INIT_FROM = STUDY.init_from
ENSEMBLES = STUDY.ensemble_settings
INDEX_DATASET = STUDY.index_dataset
EXPLAINED = list(STUDY.explained)
EXPORTED = list(STUDY.exported)
EXTERNALS = STUDY.external_settings
CLUSTER = STUDY.cluster_settings
TRAIN_RESOURCES = STUDY.train_resources
VARIANTS = STUDY.variants
COMPRESSED = list(STUDY.compressed)
COMPRESSED_FOLDS = list(STUDY.compressed_folds)
EXPLAINED_FOLDS = list(STUDY.explained_folds)


def partition_for(gpus):
    return CLUSTER.partition_for(gpus)


def site_resources():
    return {
        "slurm_partition": CLUSTER.partition,
        "slurm_account": CLUSTER.account,
    }


FOLD_DIR = f"{RESULTS}/{{dataset}}/{{experiment}}/fold_{{fold}}"
REPEAT_DIR = f"{FOLD_DIR}/seed_{{repeat}}"
VARIANT_DIR = f"{RESULTS}/{{dataset}}/{{experiment}}/variants/{{variant}}"
CV_DIR = f"{RESULTS}/{{dataset}}/{{experiment}}/cv"
ENSEMBLE_DIR = f"{RESULTS}/{{dataset}}/ensembles/{{ensemble}}"


def any_of(names):
    """A wildcard pattern matching exactly these names (nothing when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    dataset=re.escape(DATASET),
    experiment=any_of(EXPERIMENTS),
    fold=r"\d+",
    repeat=any_of([str(r) for r in range(1, max(REPEATS.values()))]),
    size=r"\d+",
    variant=any_of(VARIANTS),
    ensemble=any_of(ENSEMBLES),
    grid=any_of(GRIDS),
    external=any_of(EXTERNALS),


def dataset_inputs(wildcards, dataset=None):
    """The source files the index reads (of ``dataset``, default the main dataset); the
    demo_<form> rules make them when they point into it."""
    ds = dataset or STUDY.dataset_settings
    listed = {"exclude": ds.exclude_images} if ds.exclude_images else {}
    if ds.format == "csv":
        return (
            {"table": ds.table}
            | ({"root": ds.root} if ds.root and not ds.metadata_only else {})
            | listed
        )
    if ds.format == "npz":
        return {"npz": ds.npz} | listed
    return {"root": ds.root} | listed


def manifest_input(wildcards):
    """The split manifest the split applies (split.method manifest): a change to it reruns the split."""
    split = STUDY.split
    return {"manifest": split.manifest} if split.method == "manifest" else {}


# Paths below come from the rules' own output and benchmark patterns (looked up when called,
# after every rule is defined), so each path is spelled once, in its rule.
def cache_of(experiment):
    return expand(
        rules.cache.output, dataset=DATASET, size=TRAINING[experiment].image_size
    )


def fold_files(experiment, output):
    return expand(
        getattr(rules.train.output, output),
        dataset=DATASET,
        experiment=experiment,
        fold=EXPERIMENT_FOLDS[experiment],
    )


def model_files(experiment, output):
    """Every trained model's ``output`` of an experiment, all seeds of each fold, fold by fold
    (fold 0 seed 0, fold 0 seed 1, ...): what its aggregate, fold ensemble and export use.
    """
    paths = []
    for fold in EXPERIMENT_FOLDS[experiment]:
        paths += expand(
            getattr(rules.train.output, output),
            dataset=DATASET,
            experiment=experiment,
            fold=fold,
        )
        paths += expand(
            getattr(rules.train_repeat.output, output),
            dataset=DATASET,
            experiment=experiment,
            fold=fold,
            repeat=range(1, REPEATS[experiment]),
        )
    return paths


def variant_files(experiment, output, variants=None):
    return expand(
        getattr(rules.compress.output, output),
        dataset=DATASET,
        experiment=experiment,
        variant=variants or list(VARIANTS),
        fold=COMPRESSED_FOLDS,
    )


def variant_cv_file(experiment, variant, output):
    return expand(
        getattr(rules.aggregate_variant.output, output),
        dataset=DATASET,
        experiment=experiment,
        variant=variant,
    )[0]


def ensemble_files(ensemble, output):
    return expand(
        getattr(rules.ensemble_fold.output, output),
        dataset=DATASET,
        ensemble=ensemble,
        fold=FOLDS,
    )


def ensemble_cv_file(ensemble, output):
    return expand(
        getattr(rules.aggregate_ensemble.output, output),
        dataset=DATASET,
        ensemble=ensemble,
    )[0]


def explanation_files(experiment, output):
    return expand(
        getattr(rules.explain.output, output),
        dataset=DATASET,
        experiment=experiment,
        fold=EXPLAINED_FOLDS,
    )


def cv_file(experiment, output):
    return expand(
        getattr(rules.aggregate.output, output), dataset=DATASET, experiment=experiment
    )[0]


def all_outputs():
    return [f"{DATASET_DIR}/report/index.html"]
