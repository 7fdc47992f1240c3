# Helpers shared by the rules: config validation (before any job runs), paths, resources.
from pathlib import Path

import re

from snakemake.utils import validate

from medfold.settings import experiment_settings

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
DATASET = config["dataset"]["name"]
DATASET_DIR = f"{RESULTS}/{DATASET}"
EXPERIMENTS = list(config["experiments"])
FOLDS = list(range(config["split"]["folds"]))
# every experiment's merged settings, checked now: a bad override stops before any job runs
SETTINGS = {
    name: experiment_settings(
        config, name, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
    )
    for name in EXPERIMENTS
}
FOLD_DIR = f"{RESULTS}/{{dataset}}/{{experiment}}/fold_{{fold}}"
CV_DIR = f"{RESULTS}/{{dataset}}/{{experiment}}/cv"


wildcard_constraints:
    dataset=re.escape(DATASET),
    experiment="|".join(re.escape(name) for name in EXPERIMENTS),
    fold=r"\d+",
    size=r"\d+",


def dataset_inputs(wildcards):
    """The source files the index reads; the demo_data rule makes them when they point into it."""
    ds = config["dataset"]
    if ds["format"] == "csv":
        return {"table": ds["table"]} | (
            {"root": ds["root"]} if ds["root"] and not ds["metadata_only"] else {}
        )
    if ds["format"] == "npz":
        return {"npz": ds["npz"]}
    return {"root": ds["root"]}


def cache_of(experiment):
    size = SETTINGS[experiment]["image_size"]
    return [
        f"{DATASET_DIR}/cache/{size}/images.npy",
        f"{DATASET_DIR}/cache/{size}/image_ids.txt",
    ]


def fold_files(experiment, name):
    return [f"{DATASET_DIR}/{experiment}/fold_{k}/{name}" for k in FOLDS]


def report_inputs():
    """Every result file the report reads, by section (passed to the script as params too)."""
    exp = {
        name: {
            "per_fold": f"{DATASET_DIR}/{name}/cv/per_fold.csv",
            "summary": f"{DATASET_DIR}/{name}/cv/summary.json",
            "ensemble": f"{DATASET_DIR}/{name}/cv/ensemble_test.json",
            "ensemble_predictions": f"{DATASET_DIR}/{name}/cv/ensemble_test_predictions.parquet",
            "predictions": fold_files(name, "predictions.parquet"),
            "histories": fold_files(name, "history.csv"),
        }
        for name in EXPERIMENTS
    }
    size = min(SETTINGS[name]["image_size"] for name in EXPERIMENTS)
    benchmarks = [
        f"{DATASET_DIR}/benchmarks/{step}.tsv"
        for step in ("index", "split", "check_split")
    ]
    benchmarks += [
        f"{DATASET_DIR}/benchmarks/cache_{SETTINGS[n]['image_size']}.tsv"
        for n in EXPERIMENTS
    ]
    benchmarks += [
        f"{DATASET_DIR}/benchmarks/train_{n}_fold_{k}.tsv"
        for n in EXPERIMENTS
        for k in FOLDS
    ]
    benchmarks += [f"{DATASET_DIR}/benchmarks/aggregate_{n}.tsv" for n in EXPERIMENTS]
    return {
        "index": f"{DATASET_DIR}/index.parquet",
        "index_report": f"{DATASET_DIR}/index_report.json",
        "split_summary": f"{DATASET_DIR}/split_summary.json",
        "split_check": f"{DATASET_DIR}/split_check.json",
        "cache": f"{DATASET_DIR}/cache/{size}/images.npy",
        "comparison": f"{DATASET_DIR}/experiments.csv",
        "experiments": exp,
        "benchmarks": sorted(set(benchmarks)),
    }


def flat_files(tree):
    if isinstance(tree, str):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [path for value in values for path in flat_files(value)]


def all_outputs():
    return [f"{DATASET_DIR}/report/index.html"]
