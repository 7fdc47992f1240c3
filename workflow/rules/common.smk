# Helpers shared by the rules: config validation (before any job runs), paths, resources.
from pathlib import Path

import re

from snakemake.utils import validate

from medfold.dicom import check_header_fields
from medfold.errors import ConfigError
from medfold.settings import (
    compress_gpus,
    expand_grids,
    experiment_repeats,
    experiment_settings,
    external_settings,
    repeat_settings,
    resolve_init_from,
    train_resources,
    variant_settings,
)

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
DATASET = config["dataset"]["name"]
DATASET_DIR = f"{RESULTS}/{DATASET}"
SCHEMA = Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
# an experiment with a grid is one experiment per combination (Paramspace), ranked per grid
OVERRIDES, GRIDS = expand_grids(config["experiments"], SCHEMA)
EXPERIMENTS = list(OVERRIDES)
FOLDS = list(range(config["split"]["folds"]))
if config["split"]["method"] == "stratified" and len(FOLDS) < 2:
    raise ConfigError(
        f"split.folds is {len(FOLDS)}; split.method 'stratified' needs at least 2 "
        "(a single train/val/test split is split.method 'source')"
    )
if config["split"]["method"] == "manifest" and not (
    config["split"]["manifest"] and Path(config["split"]["manifest"]).is_file()
):
    raise ConfigError(
        f"split.manifest: {config['split']['manifest']!r} is not a file; split.method 'manifest' "
        "needs the split_manifest.csv to apply"
    )
# every experiment's merged settings, checked now: a bad override stops before any job runs
SETTINGS = {
    name: experiment_settings(config, name, SCHEMA, OVERRIDES) for name in EXPERIMENTS
}


def check_names(key, names):
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise ConfigError(
            f"{key}: {unknown} are not experiments (there are {EXPERIMENTS})"
        )


def chosen_folds(key, folds):
    """The folds a key names (every fold when empty), each checked to exist."""
    unknown = sorted(set(folds) - set(FOLDS))
    if unknown:
        raise ConfigError(
            f"{key}: folds {unknown} do not exist (split.folds gives folds {FOLDS})"
        )
    return sorted(folds) or FOLDS


# an experiment may train on some folds only (``folds: [0]``: a grid tuned on one fold, as
# study 002 tuned on Fold0); its aggregate, fold ensemble and report cover those folds
EXPERIMENT_FOLDS = {}
for _name in EXPERIMENTS:
    _folds = OVERRIDES[_name].get("folds") or []
    if not isinstance(_folds, list) or not all(isinstance(f, int) for f in _folds):
        raise ConfigError(
            f"experiments.{_name}.folds: expected a list of fold numbers, got {_folds!r}"
        )
    EXPERIMENT_FOLDS[_name] = chosen_folds(f"experiments.{_name}.folds", _folds)
# seeds of each fold (``repeats: R``): repeat 0 is fold_<k>/ itself, repeat r >= 1 fold_<k>/seed_<r>/
REPEATS = {name: experiment_repeats(OVERRIDES[name], name) for name in EXPERIMENTS}


def covers(key, names, folds):
    """Experiments that ``key`` uses on ``folds`` must have trained on them."""
    for name in names:
        missing = sorted(set(folds) - set(EXPERIMENT_FOLDS[name]))
        if missing:
            raise ConfigError(
                f"{key}: experiment {name!r} trains on folds {EXPERIMENT_FOLDS[name]} only "
                f"(its folds key), not on folds {missing} that {key.split('.')[0]} needs"
            )


# experiments that start from another's fold model: that model is an input of their training
INIT_FROM = resolve_init_from(
    SETTINGS,
    EXPERIMENT_FOLDS,
    lambda name, fold: f"{RESULTS}/{DATASET}/{name}/fold_{fold}/model.pt",
)

ENSEMBLES = config["ensembles"]
for _name, _ensemble in ENSEMBLES.items():
    check_names(f"ensembles.{_name}.experiments", _ensemble["experiments"])
    if _name in EXPERIMENTS:
        raise ConfigError(f"ensembles.{_name}: the name is an experiment's too")
    covers(f"ensembles.{_name}.experiments", _ensemble["experiments"], FOLDS)
# the index carries the table's metadata columns that subgroups are evaluated on
EVALUATION = config["evaluation"]
INDEX_DATASET = {
    **config["dataset"],
    "metadata_columns": list(
        dict.fromkeys(
            config["dataset"]["metadata_columns"]
            + [spec["column"] for spec in EVALUATION["subgroups"]]
        )
    ),
}
check_header_fields(config["dataset"]["dicom_metadata"])
_from_headers = set(config["dataset"]["dicom_metadata"])
_format = config["dataset"]["format"]
_not_carried = [
    c
    for c in INDEX_DATASET["metadata_columns"]
    if c not in _from_headers or _format == "npz"
]
if _not_carried and _format != "csv":
    raise ConfigError(
        f"evaluation.subgroups / dataset.metadata_columns name {_not_carried}: metadata columns "
        f"are read from dataset.table (format 'csv') or DICOM headers (dataset.dicom_metadata "
        f"{sorted(_from_headers)}), and dataset.format is {_format!r}"
    )
COMPARED = list(EXPERIMENTS) + list(ENSEMBLES)
for _key, _names in [
    (
        "evaluation.comparisons.reference",
        (
            [EVALUATION["comparisons"]["reference"]]
            if EVALUATION["comparisons"]["reference"]
            else []
        ),
    )
] + [
    ("evaluation.comparisons.pairs", pair)
    for pair in EVALUATION["comparisons"]["pairs"]
]:
    _unknown = sorted(set(_names) - set(COMPARED))
    if _unknown:
        raise ConfigError(
            f"{_key}: {_unknown} are neither experiments nor ensembles (there are {COMPARED})"
        )
for _name in config["reference"]["experiments"]:
    if _name not in COMPARED:
        raise ConfigError(
            f"reference.experiments.{_name}: neither an experiment nor an ensemble (there are {COMPARED})"
        )
EXPLAINED = config["explain"]["experiments"]
check_names("explain.experiments", EXPLAINED)
EXPORTED = config["export"]["experiments"]
check_names("export.experiments", EXPORTED)
# external validation: each block resolved and checked now (its dataset as dataset is)
EXTERNALS = {
    name: external_settings(config, name, SCHEMA, EXPERIMENTS)
    for name in config["external"]
}
# the site's Slurm partitions and account (empty: the cluster's defaults), set in config so that
# the profile stays the same everywhere
CLUSTER = config["cluster"]


def partition_for(gpus):
    return (
        (CLUSTER["gpu_partition"] or CLUSTER["partition"])
        if gpus
        else CLUSTER["partition"]
    )


def site_resources():
    return {
        "slurm_partition": CLUSTER["partition"],
        "slurm_account": CLUSTER["account"],
    }


TRAIN_RESOURCES = {name: train_resources(SETTINGS[name]) for name in EXPERIMENTS}
# compression variants, resolved and checked now too; they apply to these experiments
VARIANTS = {name: variant_settings(config, name, SCHEMA) for name in config["variants"]}
if VARIANTS:
    check_names("compression.experiments", config["compression"]["experiments"])
COMPRESSED = (config["compression"]["experiments"] or EXPERIMENTS) if VARIANTS else []
COMPRESSED_FOLDS = chosen_folds("compression.folds", config["compression"]["folds"])
EXPLAINED_FOLDS = chosen_folds("explain.folds", config["explain"]["folds"])
covers("compression.experiments", COMPRESSED, COMPRESSED_FOLDS)
covers("explain.experiments", EXPLAINED, EXPLAINED_FOLDS)
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


def dataset_inputs(wildcards, ds=None):
    """The source files the index reads (of ``ds``, default the main dataset); the demo_data
    rule makes them when they point into it."""
    ds = ds or config["dataset"]
    listed = {"exclude": ds["exclude_images"]} if ds.get("exclude_images") else {}
    if ds["format"] == "csv":
        return (
            {"table": ds["table"]}
            | ({"root": ds["root"]} if ds["root"] and not ds["metadata_only"] else {})
            | listed
        )
    if ds["format"] == "npz":
        return {"npz": ds["npz"]} | listed
    return {"root": ds["root"]} | listed


def manifest_input(wildcards):
    """The split manifest the split applies (split.method manifest): a change to it reruns the split."""
    split = config["split"]
    return {"manifest": split["manifest"]} if split["method"] == "manifest" else {}


# Paths below come from the rules' own output and benchmark patterns (looked up when called,
# after every rule is defined), so each path is spelled once, in its rule.
def cache_of(experiment):
    return expand(
        rules.cache.output, dataset=DATASET, size=SETTINGS[experiment]["image_size"]
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


def report_inputs():
    """Every result file the report reads, by section (passed to the script as params too)."""
    experiments = {
        name: {
            "per_fold": cv_file(name, "per_fold"),
            "summary": cv_file(name, "summary"),
            "ensemble": cv_file(name, "ensemble"),
            "ensemble_predictions": cv_file(name, "ensemble_predictions"),
            "predictions": fold_files(name, "predictions"),
            # fold -> its history (the report never reads a fold number from a path)
            "histories": dict(zip(EXPERIMENT_FOLDS[name], fold_files(name, "history"))),
            "metrics": dict(zip(EXPERIMENT_FOLDS[name], fold_files(name, "metrics"))),
            "clinical": cv_file(name, "clinical"),
            "forest": cv_file(name, "forest"),
            "reliability": cv_file(name, "reliability"),
            "label_issues": cv_file(name, "label_issues"),
        }
        for name in EXPERIMENTS
    }
    for name in EXPLAINED:
        experiments[name]["explanations"] = explanation_files(name, "record")
    for name in EXPORTED:
        experiments[name]["model_card"] = expand(
            rules.export.output.card, dataset=DATASET, experiment=name
        )[0]
    ensembles = {
        name: {
            "per_fold": ensemble_cv_file(name, "per_fold"),
            "summary": ensemble_cv_file(name, "summary"),
            "ensemble": ensemble_cv_file(name, "ensemble"),
            "ensemble_predictions": ensemble_cv_file(name, "ensemble_predictions"),
            "predictions": ensemble_files(name, "predictions"),
            "histories": {},
            "metrics": dict(zip(FOLDS, ensemble_files(name, "metrics"))),
            "clinical": ensemble_cv_file(name, "clinical"),
            "forest": ensemble_cv_file(name, "forest"),
            "reliability": ensemble_cv_file(name, "reliability"),
            "label_issues": ensemble_cv_file(name, "label_issues"),
        }
        for name in ENSEMBLES
    }
    for name in COMPRESSED:
        experiments[name]["variants"] = {
            "table": expand(
                rules.variants_table.output.table, dataset=DATASET, experiment=name
            )[0],
            "summary": expand(
                rules.variants_table.output.summary, dataset=DATASET, experiment=name
            )[0],
        }
    sizes = sorted({SETTINGS[name]["image_size"] for name in EXPERIMENTS})
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
    return {
        "index": expand(rules.index.output.table, dataset=DATASET)[0],
        "index_report": expand(rules.index.output.report, dataset=DATASET)[0],
        "split_summary": expand(rules.split.output.summary, dataset=DATASET)[0],
        "split_check": expand(rules.check_split.output.check, dataset=DATASET)[0],
        "cache": cache_of(min(EXPERIMENTS, key=lambda n: SETTINGS[n]["image_size"]))[0],
        "comparison": expand(rules.compare_experiments.output.table, dataset=DATASET)[
            0
        ],
        "comparisons": expand(
            rules.compare_experiments.output.comparisons, dataset=DATASET
        )[0],
        "cv_tests": expand(rules.compare_experiments.output.cv_tests, dataset=DATASET)[
            0
        ],
        "experiments": experiments,
        "ensembles": ensembles,
        "grids": {
            name: expand(rules.grid_table.output.table, dataset=DATASET, grid=name)[0]
            for name in GRIDS
        },
        "benchmarks": benchmarks,
        "externals": {
            name: {
                "record": expand(
                    rules.external_validate.output.record,
                    dataset=DATASET,
                    external=name,
                )[0],
                "reliability": expand(
                    rules.external_validate.output.reliability,
                    dataset=DATASET,
                    external=name,
                )[0],
            }
            for name in EXTERNALS
        },
    }


def flat_files(tree):
    if isinstance(tree, str):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [path for value in values for path in flat_files(value)]


def all_outputs():
    return [f"{DATASET_DIR}/report/index.html"]
