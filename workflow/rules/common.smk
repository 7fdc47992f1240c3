# Helpers shared by the rules: config validation (before any job runs), paths, resources.
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
DATASET = config["dataset"]["name"]
DATASET_DIR = f"{RESULTS}/{DATASET}"


wildcard_constraints:
    dataset=DATASET,


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


def all_outputs():
    return [f"{DATASET_DIR}/split_check.json"]
