"""medfold.study.resolve: the whole config resolved once, every cross-key check in the
library, called directly (no Snakemake)."""

import pytest
from conftest import SCHEMA, resolved_config

from medfold.core.errors import ConfigError
from medfold.study.resolve import Study, resolve


def test_the_demo_config_resolves_to_its_experiments_folds_and_jobs():
    study = resolve(resolved_config(), SCHEMA)
    assert isinstance(study, Study)
    assert study.experiments == ("baseline", "batchnorm", "sweep_lr~0.003", "sweep_lr~0.01")
    assert study.grids == {"sweep": {"sweep_lr~0.003": {"lr": 0.003}, "sweep_lr~0.01": {"lr": 0.01}}}
    assert study.folds == (0, 1, 2)
    assert study.experiment_folds == dict.fromkeys(study.experiments, [0, 1, 2])
    assert study.settings["sweep_lr~0.01"]["lr"] == 0.01 and study.settings["batchnorm"]["batch_norm"]
    assert study.compressed == ("batchnorm",) and study.compressed_folds == (0,)
    assert study.explained == ("batchnorm",) and study.explained_folds == (0,)
    assert study.compared == (*study.experiments, "baseline_and_batchnorm")
    # the subgroups' columns travel into the index with the table's own metadata columns
    assert {"Patient Age", "Patient Gender", "View Position"} <= set(study.index_dataset["metadata_columns"])
    assert study.train_resources["baseline"]["tasks"] == 1
    with pytest.raises(AttributeError):
        study.folds = (0,)  # frozen


@pytest.mark.parametrize(
    "dataset,needs",
    [
        ({}, "format 'folders' needs dataset.root"),
        ({"format": "csv"}, "format 'csv' needs dataset.table and dataset.root"),
        ({"format": "npz"}, "format 'npz' needs dataset.npz"),
    ],
)
def test_a_config_that_names_no_data_says_which_keys_and_how_to_start(dataset, needs):
    """A newcomer's first --configfile holding only ``training: {epochs: 3}`` replaces the demo's
    config whole: a ConfigError naming the keys and the presets, not Snakemake's input function."""
    config = resolved_config({"training": {"epochs": 3}, **({"dataset": dataset} if dataset else {})}, base=None)
    with pytest.raises(ConfigError, match=needs) as raised:
        resolve(config, SCHEMA)
    assert "medfold init --preset" in str(raised.value)


def test_a_config_with_no_experiment_says_how_to_name_one():
    config = resolved_config({"experiments": {}})
    config["experiments"] = {}  # the demo's own are merged in: take them out, as a file of one's own has none
    with pytest.raises(ConfigError, match="names no experiment to train") as raised:
        resolve(config, SCHEMA)
    assert "experiments: {baseline: {}}" in str(raised.value)


def test_folds_of_one_experiment_limit_what_it_trains_and_what_may_use_it():
    study = resolve(resolved_config({"experiments": {"sweep": {"folds": [0]}}, "compression": {"folds": [0]}}), SCHEMA)
    assert study.experiment_folds["sweep_lr~0.01"] == [0]
    assert study.experiment_folds["baseline"] == [0, 1, 2]


def test_init_from_gives_the_source_fold_model_path():
    config = resolved_config({"experiments": {"tuned": {"init_from": {"experiment": "baseline", "fold": 1}}}})
    study = resolve(config, SCHEMA)
    assert study.init_from["tuned"] == f"{study.results}/demo_cxr14/baseline/fold_1/model.pt"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"split": {"folds": 1}}, r"split\.folds is 1; split\.method 'stratified' needs at least 2"),
        (
            {"split": {"method": "manifest", "manifest": "nowhere.csv"}},
            r"split\.manifest: 'nowhere\.csv' is not a file",
        ),
        ({"experiments": {"baseline": {"folds": [5]}}}, r"experiments\.baseline\.folds: folds \[5\] do not exist"),
        ({"ensembles": {"pair": {"experiments": ["baseline", "nope"]}}}, r"ensembles\.pair\.experiments: \['nope'\]"),
        (
            {"ensembles": {"baseline": {"experiments": ["batchnorm", "baseline"]}}},
            r"ensembles\.baseline: the name is an experiment's",
        ),
        (
            {"experiments": {"baseline": {"folds": [0]}}},
            r"ensembles\.baseline_and_batchnorm\.experiments: experiment 'baseline' trains on folds \[0\] only",
        ),
        ({"evaluation": {"comparisons": {"reference": "nope"}}}, r"evaluation\.comparisons\.reference: \['nope'\]"),
        ({"evaluation": {"comparisons": {"pairs": [["baseline", "x"]]}}}, r"evaluation\.comparisons\.pairs: \['x'\]"),
        ({"reference": {"experiments": {"nope": {}}}}, r"reference\.experiments\.nope: neither an experiment"),
        ({"explain": {"experiments": ["nope"]}}, r"explain\.experiments: \['nope'\] are not experiments"),
        ({"explain": {"folds": [7]}}, r"explain\.folds: folds \[7\] do not exist"),
        ({"export": {"experiments": ["nope"]}}, r"export\.experiments: \['nope'\] are not experiments"),
        ({"compression": {"experiments": ["nope"]}}, r"compression\.experiments: \['nope'\] are not experiments"),
        (
            {
                "experiments": {"batchnorm": {"folds": [1]}},
                "explain": {"folds": [1]},
                "ensembles": {"baseline_and_batchnorm": {"experiments": ["baseline", "sweep_lr~0.01"]}},
            },
            r"compression\.experiments: experiment 'batchnorm' trains on folds \[1\] only",
        ),
        (
            {
                "dataset": {"format": "folders", "root": "x"},
                "evaluation": {"subgroups": [{"column": "Age", "name": "a"}]},
            },
            r"evaluation\.subgroups / dataset\.metadata_columns name .*'Age'",
        ),
        (
            {"experiments": {"spread": {"distributed": {"backend": "ddp", "gpus": 3, "nodes": 2}}}},
            r"experiments\.spread\.distributed\.nodes: 2 nodes",
        ),
        (
            {
                "experiments": {
                    "spread": {"distributed": {"backend": "ddp", "gpus": 2, "nodes": 2, "launcher": "local"}}
                }
            },
            r"experiments\.spread\.distributed\.launcher: 'local' starts processes on this machine only",
        ),
        ({"experiments": {"baseline": {"model": "no_such_net"}}}, r"experiments\.baseline\.model: 'no_such_net'"),
    ],
)
def test_each_cross_key_error_names_its_key(overrides, message):
    config = resolved_config(overrides)
    with pytest.raises(ConfigError, match=message):
        resolve(config, SCHEMA)


def test_folds_grid_and_repeats_are_typed_in_the_schema_and_checked_again_by_resolve():
    from snakemake.exceptions import WorkflowError

    for bad, where in (
        ({"folds": "0"}, "folds"),
        ({"folds": [-1]}, "folds"),
        ({"repeats": 0}, "repeats"),
        ({"grid": {"lr": []}}, "grid"),
        ({"grid": {}}, "grid"),
    ):
        with pytest.raises(WorkflowError, match=rf"\['allOf'\]\[0\]\['properties'\]\['{where}'\]"):
            resolved_config({"experiments": {"baseline": bad}})
    # a config that skipped the schema still meets resolve's own check, by key
    config = resolved_config()
    config["experiments"]["baseline"]["folds"] = "0"
    with pytest.raises(ConfigError, match=r"experiments\.baseline\.folds: expected a list of fold numbers"):
        resolve(config, SCHEMA)


# ----------------------------------------------------------------------------- typed sections
def test_every_section_class_has_the_schema_keys_as_fields():
    """A key added to the schema, renamed or dropped without its settings class fails here."""
    import dataclasses

    from medfold.settings.sections import SECTIONS, load_schema

    schema = load_schema(SCHEMA)
    for path, cls in SECTIONS.items():
        node = schema
        for part in path:
            node = node["additionalProperties"] if part == "*" else node["properties"][part]
        fields = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        keys = set(node.get("properties") or {})
        if path == ("variants", "*", "pruning"):  # shared with training.pruning, which has ``enabled``
            keys |= {"enabled"}
        assert fields == keys, f"{'.'.join(path)}: fields {sorted(fields ^ keys)} differ from the schema"


def test_training_settings_cover_every_training_key():
    import dataclasses

    from medfold.settings.sections import load_schema
    from medfold.settings.training import TrainSettings

    keys = set(load_schema(SCHEMA)["properties"]["training"]["properties"])
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    # keys typed under another name, or read by the resolver only (init_from; the others in resolve)
    renamed = {"train_metrics": "train_metrics_images", "mixup": "mixing", "ema": "ema_decay"}
    resolver_only = {"init_from"}
    missing = {k for k in keys - resolver_only if renamed.get(k, k) not in fields}
    assert not missing, f"training keys without a TrainSettings field: {sorted(missing)}"


def test_the_study_holds_each_section_typed_with_its_dict():
    from medfold.settings.sections import DatasetSettings, SplitSettings
    from medfold.settings.training import TrainSettings

    config = resolved_config({"split": {"folds": 4}, "evaluation": {"calibration": {"bins": 7}}})
    study = resolve(config, SCHEMA)
    assert isinstance(study.split, SplitSettings) and study.split.folds == 4
    assert study.split.raw == config["split"] and list(study.split.raw) == list(config["split"])
    assert study.evaluation.calibration.bins == 7
    assert isinstance(study.dataset_settings, DatasetSettings)
    assert study.dataset_settings.near_duplicates.max_distance == config["dataset"]["near_duplicates"]["max_distance"]
    assert isinstance(study.training["baseline"], TrainSettings)
    assert study.training["sweep_lr~0.01"].lr == 0.01 and study.training["batchnorm"].batch_norm
    assert study.training["baseline"].raw is study.settings["baseline"]  # the dict jobs get, unchanged
    assert study.variant_settings["pruned70"].pruning.final_sparsity == 0.7
    assert study.external_settings["site_b"].recalibrate.fraction == 0.4
    assert study.ensemble_settings["baseline_and_batchnorm"].experiments == ["baseline", "batchnorm"]
    with pytest.raises(dataclasses_frozen()):
        study.split.folds = 2


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_a_partial_dict_gets_the_schema_defaults_and_keeps_its_own_values():
    from medfold.settings.sections import ExplainSettings, LatencySettings, SplitSettings

    split = SplitSettings.of({"folds": 5, "method": "stratified"})
    assert split.folds == 5 and split.test_fraction == 0.2 and split.source_roles.val == ["val", "valid", "validation"]
    assert ExplainSettings.of({"lime": {"samples": 10}}).lime.samples == 10
    assert ExplainSettings.of({"lime": {"samples": 10}}).lime.kernel == "squared"
    assert LatencySettings.of(None).batch_sizes == [1, 32]
    same = SplitSettings.of(split)
    assert same is split


# names that hold a config section (or part of one) by this project's conventions
# (not the names results are read back as too: near, cluster, card, export, external, variants)
SECTION_NAMES = {
    "cfg", "config", "settings", "section", "setting", "ds", "dataset", "split", "training", "evaluation",
    "explain", "lime", "variant", "compression", "latency", "parallel", "distributed", "prune", "pruning",
    "mlflow", "tracking", "predict", "site", "reference", "grids", "resources", "comparisons", "recalibrate",
    "options", "targets", "oversample",
}  # fmt: skip


def test_no_library_module_reads_a_config_section_by_string_key():
    """Outside medfold.settings and medfold.study (where a config is resolved), a config section is
    read by attribute from its typed settings:
    ``x["key"]`` or ``x.get("key")`` on a name that holds a section is an error here. (Result
    files read back, metrics.json's records and the like, are named for what they are.)"""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "medfold"
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.relative_to(src).parts[0] in ("settings", "study"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript):
                target, key = node.value, node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                target, key = node.func.value, node.args[0] if node.args else None
            else:
                continue
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                continue
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
            if name in SECTION_NAMES and not (path.name == "dicom.py" and name == "ds"):  # pydicom's Dataset
                found.append(f"{path.relative_to(src)}:{node.lineno} {name}[{key.value!r}]")
    where = "outside medfold.settings and medfold.study"
    assert not found, f"config sections read by string key {where}:\n" + "\n".join(found)
