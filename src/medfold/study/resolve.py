"""Resolve a config: ``resolve`` turns the whole (schema-validated) config into one ``Study``, with
every cross-key check; ``experiment_settings`` gives an experiment's settings, the training
defaults with its overrides, checked against the schema's rules for training keys, so a typo in
an experiment is caught before any job runs."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import jsonschema
import pandas as pd

from medfold.core.errors import ConfigError
from medfold.settings.sections import (
    SCHEMA_PATH,
    ClusterSettings,
    CompressionSettings,
    DatasetSettings,
    DemoSettings,
    EnsembleSettings,
    EvaluationSettings,
    ExplainSettings,
    ExportSettings,
    ExternalSettings,
    ImageSettings,
    MlflowSettings,
    PredictSettings,
    PrivacySettings,
    ReportSettings,
    ResourceSettings,
    SplitSettings,
    VariantSettings,
    check_schedule,
    deep_merge,
    load_schema,
    schema_defaults,
)
from medfold.settings.training import TrainSettings


def expand_grids(experiments: dict, schema_path) -> tuple[dict, dict]:
    """Experiments with a ``grid`` (training key, dotted for nested ones, to a list of values)
    become one experiment per combination through Snakemake's Paramspace, named
    ``<experiment>_<key>~<value>_...``. Returns (every experiment's overrides, and per grid its
    combinations' names with their values)."""
    from snakemake.utils import Paramspace

    training_keys = set(load_schema(schema_path)["properties"]["training"]["properties"])
    expanded, grids = {}, {}
    for name, overrides in experiments.items():
        overrides = dict(overrides or {})
        grid = overrides.pop("grid", None)
        if grid is None:
            expanded[name] = overrides
            continue
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(
                f"experiments.{name}.grid: expected a map of training keys to lists of values, got {grid!r}"
            )
        for key, values in grid.items():
            if key.split(".")[0] not in training_keys:
                raise ConfigError(
                    f"experiments.{name}.grid: {key!r} is not a training key (config/README.md lists them)"
                )
            if not isinstance(values, list) or not values:
                raise ConfigError(f"experiments.{name}.grid.{key}: expected a non-empty list of values, got {values!r}")
        combos = list(itertools.product(*grid.values()))
        # Paramspace takes column names as identifiers: a nested key is spelled with "_" in the names
        columns = [k.replace(".", "_") for k in grid]
        space = Paramspace(pd.DataFrame(combos, columns=columns), filename_params="*", param_sep="~", filename_sep="_")
        grids[name] = {}
        for pattern, values in zip(space.instance_patterns, combos):
            combo = f"{name}_{pattern}"
            nested: dict = {}
            for key, value in zip(grid, values):
                *path, last = key.split(".")
                level = nested
                for part in path:
                    level = level.setdefault(part, {})
                level[last] = value
            expanded[combo] = deep_merge(overrides, nested)
            grids[name][combo] = dict(zip(grid, values))
    return expanded, grids


def experiment_settings(config: dict, name: str, schema_path, experiments: dict | None = None) -> dict:
    """``config`` is the validated config (training defaults filled in); ``experiments`` the
    overrides after grid expansion (default: ``expand_grids`` of the config's)."""
    if experiments is None:
        experiments, _ = expand_grids(config["experiments"], schema_path)
    if name not in experiments:
        raise ConfigError(f"experiments: no experiment named {name!r}; there are {sorted(experiments)}")
    overrides = dict(experiments[name] or {})
    overrides.pop("folds", None)  # which folds it trains on: the workflow's business, not training's
    overrides.pop("repeats", None)  # how many seeds of each fold: the workflow's too
    settings = deep_merge(config["training"], overrides)
    training_schema = load_schema(schema_path)["properties"]["training"]
    errors = sorted(jsonschema.Draft202012Validator(training_schema).iter_errors(settings), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path)
        raise ConfigError(f"experiments.{name}{'.' + where if where else ''}: {first.message}")
    _check_training(settings, name)
    _check_model(settings, name, config.get("networks") or {})
    return settings


def _check_training(settings: dict, name: str) -> None:
    """The cross-key rules of an experiment's training settings: augmentation ranges, pruning
    against the epochs and the weights' average, nodes against processes, QAT beside pruning."""
    for key in ("brightness_range", "contrast_range"):
        bounds = settings["augment"].get(key)
        if bounds is not None and bounds[0] > bounds[1]:
            raise ConfigError(f"experiments.{name}.augment.{key}: expected [low, high] with low <= high, got {bounds}")
    prune = settings.get("pruning") or {}
    if prune.get("enabled"):
        import math

        where = f"experiments.{name}.pruning"
        check_pruning(prune, f"experiments.{name}")
        epochs = (
            sum(stage.get("epochs") or settings["epochs"] for stage in settings["stages"])
            if settings["stages"]
            else settings["epochs"]
        )
        if math.ceil(prune["end_epoch"]) > epochs:
            raise ConfigError(
                f"{where}.end_epoch: {prune['end_epoch']} is after the last of the {epochs} epochs, so no epoch "
                f"would have the final sparsity to be chosen; lower it or train longer"
            )
        if (settings.get("ema") or {}).get("decay"):
            raise ConfigError(f"{where}: pruning during training and ema (a weights average) do not combine")
    parallel = settings["distributed"]
    if parallel["nodes"] > 1 and (parallel["backend"] == "none" or parallel["gpus"] % parallel["nodes"]):
        raise ConfigError(
            f"experiments.{name}.distributed.nodes: {parallel['nodes']} nodes need backend ddp or horovod and "
            f"a number of processes (distributed.gpus, {parallel['gpus']}) they divide evenly"
            + ("" if parallel["backend"] != "none" else f"; the backend is {parallel['backend']!r}")
        )
    if parallel["nodes"] > 1 and parallel["launcher"] == "local":
        raise ConfigError(
            f"experiments.{name}.distributed.launcher: 'local' starts processes on this machine only, and "
            f"distributed.nodes is {parallel['nodes']}; use launcher auto or srun (a Slurm job across the nodes)"
        )
    if (settings.get("qat") or {}).get("enabled") and prune.get("enabled"):
        raise ConfigError(
            f"experiments.{name}: qat and pruning during training do not combine (both rewrite the weights "
            f"every step); train one experiment with each, as the thesis did"
        )


def _check_model(settings: dict, name: str, networks: dict) -> None:
    """The experiment's model exists and takes its head (networks: shapes checked at its image
    size on the meta device, nothing allocated); a networks: model travels in the settings."""
    from medfold.training.models import known_model  # torchvision's model list, read only for a name that is not ours

    if settings["model"] in networks:
        settings["network"] = networks[settings["model"]]  # travels with the settings into model.pt
        import torch

        from medfold.training.models import LayerCNN

        with torch.device("meta"):  # its shapes checked at this image size, nothing allocated
            LayerCNN(1, 2, settings["network"], settings["image_size"])
        if settings.get("head") is not None:
            raise ConfigError(
                f"experiments.{name}.head: {settings['model']!r} is a network of networks:; its head is "
                f"described there (head: dense layers), training.head is for torchvision backbones"
            )
    elif settings.get("head") is not None:
        import torch

        from medfold.training.models import build_model

        try:
            with torch.device("meta"):  # the backbone takes this head: checked now, nothing allocated
                build_model(settings["model"], 1, 2, head=settings["head"])
        except ConfigError as err:
            raise ConfigError(str(err).replace("training.head:", f"experiments.{name}.head:", 1)) from None
    elif not known_model(settings["model"]):
        raise ConfigError(
            f"experiments.{name}.model: {settings['model']!r} is neither a network of networks: "
            f"({', '.join(sorted(networks)) or 'none defined'}), lenet, lenet_wide, vgg16_dws nor a "
            f"torchvision classification model (torchvision.models.list_models())"
        )


def experiment_repeats(overrides: dict | None, name: str) -> int:
    """``experiments.<name>.repeats``: how many seeds of each fold are trained (default 1)."""
    repeats = (overrides or {}).get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(
            f"experiments.{name}.repeats: expected a whole number of seeds per fold, 1 or more, got {repeats!r}"
        )
    return repeats


def repeat_settings(settings: dict, r: int) -> dict:
    """The settings of repeat ``r`` of a fold: the experiment's, with the training seed of that
    repeat (``medfold.core.seeds.repeat``); repeat 0 is the experiment's own settings, unchanged, so
    that adding repeats to a finished experiment retrains nothing it has."""
    if r == 0:
        return settings
    from medfold.core import seeds

    return {**settings, "seed": seeds.repeat(settings["seed"], r), "repeat": r}


def resolve_init_from(settings: dict[str, dict], folds: dict[str, list[int]], model_path) -> dict[str, str]:
    """Experiments that start from another's trained fold model (``init_from``): each checked (the
    experiment exists, trained that fold, is not itself nor a cycle, no ``pretrained`` beside it),
    given that model as its pretrained file (in place of any ``pretrained``) and the statistics
    that model was trained with.
    ``model_path(experiment, fold)`` is the model.pt's path. Returns experiment -> that path."""
    from medfold.training.models import resolved_normalize

    sources = {}
    for name, s in settings.items():
        start = s.get("init_from")
        if not start:
            continue
        where = f"experiments.{name}.init_from"
        source, fold = start["experiment"], start["fold"]
        if source not in settings:
            raise ConfigError(f"{where}: {source!r} is not an experiment (there are {sorted(settings)})")
        if fold not in folds[source]:
            raise ConfigError(f"{where}: {source!r} trains on folds {folds[source]}, not fold {fold}")
        chain, at = [name], source
        while at is not None:
            if at in chain:
                raise ConfigError(f"{where}: the experiments start from each other: {' -> '.join(chain + [at])}")
            chain.append(at)
            at = (settings[at].get("init_from") or {}).get("experiment")
        sources[name] = str(model_path(source, fold))
    for name in sources:  # each start's own statistics: those of the first model of its chain
        first = name
        while settings[first].get("init_from"):
            first = settings[first]["init_from"]["experiment"]
        origin = settings[first]
        if settings[name]["normalize"] == "auto":
            settings[name]["normalize"] = resolved_normalize(
                origin["normalize"], origin.get("pretrained"), origin["model"]
            )
        settings[name]["pretrained"] = sources[name]
    return sources


def variant_settings(config: dict, name: str, schema_path) -> dict:
    """A compression variant's settings with every default filled in, checked against the schema
    and, for pruning, for a schedule that can run."""
    variant_schema = load_schema(schema_path)["properties"]["variants"]["additionalProperties"]
    settings = deep_merge(schema_defaults(variant_schema), config["variants"][name] or {})
    errors = sorted(jsonschema.Draft202012Validator(variant_schema).iter_errors(settings), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].path)
        raise ConfigError(f"variants.{name}{'.' + where if where else ''}: {errors[0].message}")
    if settings["method"] == "prune":
        check_pruning(settings["pruning"], f"variants.{name}")
    return settings


def external_settings(config: dict, name: str, schema_path, experiments) -> dict:
    """An ``external.<name>`` block with its dataset filled in as ``dataset`` is (the schema's
    defaults; the main dataset's labels, label map and no-finding label where it gives none, so
    that its classes are the experiment's) and checked: which experiment, the dataset block, the
    recalibration fraction."""
    schema = load_schema(schema_path)["properties"]
    entry = schema["external"]["additionalProperties"]
    given = dict(config["external"][name] or {})
    block = {**{k: v for k, v in schema_defaults(entry).items() if k != "dataset"}, **given}
    where = f"external.{name}"
    errors = sorted(jsonschema.Draft202012Validator(entry).iter_errors(block), key=lambda e: list(e.path))
    if errors:
        at = ".".join(str(p) for p in errors[0].path)
        raise ConfigError(f"{where}{'.' + at if at else ''}: {errors[0].message}")
    if block["recalibrate"] is not None and {"fraction", "method"} - set(block["recalibrate"]):
        raise ConfigError(f"{where}.recalibrate: needs fraction and method (temperature, platt or isotonic)")
    if not block.get("experiment"):
        raise ConfigError(f"{where}.experiment: needed (the experiment whose fold ensemble is validated)")
    if block["experiment"] not in experiments:
        raise ConfigError(f"{where}.experiment: {block['experiment']!r} is not an experiment (there are {experiments})")
    main = config["dataset"]
    dataset = deep_merge(schema_defaults(schema["dataset"]), {"name": name})
    for key in ("labels", "label_map", "no_finding_label", "task", "near_duplicates"):
        dataset[key] = copy.deepcopy(main.get(key))
    dataset = deep_merge(dataset, block.get("dataset") or {})
    errors = sorted(jsonschema.Draft202012Validator(schema["dataset"]).iter_errors(dataset), key=lambda e: list(e.path))
    if errors:
        at = ".".join(str(p) for p in errors[0].path)
        raise ConfigError(f"{where}.dataset{'.' + at if at else ''}: {errors[0].message}")
    if dataset["format"] == "folders" and not dataset.get("root"):
        raise ConfigError(f"{where}.dataset.root: needed for format {dataset['format']!r}")
    if dataset["format"] == "csv" and not dataset.get("table"):
        raise ConfigError(f"{where}.dataset.table: needed for format 'csv'")
    if dataset["format"] == "npz" and not dataset.get("npz"):
        raise ConfigError(f"{where}.dataset.npz: needed for format 'npz'")
    dataset["metadata_columns"] = []
    return {**block, "dataset": dataset}


def check_pruning(p: dict, where: str) -> None:
    """A ``pruning`` block's schedule can run; the error names ``where`` it is."""
    try:
        check_schedule(p["initial_sparsity"], p["final_sparsity"], p["start_epoch"], p["end_epoch"])
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}") from None


def uses_gpu(settings: dict) -> bool:
    return settings["device"] != "cpu" and (settings["gpus"] > 0 or settings["distributed"]["backend"] != "none")


def train_resources(settings: dict) -> dict:
    """What a training job asks the scheduler for. DDP: one task per GPU, started by srun inside
    the job (``mpi``: the Slurm plugin then runs the command as is). Horovod (gloo build) on one
    node: one task that holds all the job's GPUs, horovodrun starting the processes inside it
    (``launcher: srun``: one task per GPU, as DDP).

    On more than one node (``distributed.nodes``), both backends: ``nodes`` nodes with gpus/nodes
    tasks and GPUs on each (``gres`` and ``--ntasks-per-node``, per node, rather than a total that
    Slurm could place unevenly), srun starting one task per process."""
    parallel = settings["distributed"]
    spread = parallel["backend"] != "none"
    gpu = (parallel["gpus"] if spread else settings["gpus"]) if uses_gpu(settings) else 0
    nodes = parallel["nodes"] if spread else 1
    if nodes > 1:
        per_node = parallel["gpus"] // nodes
        return {
            "gpu": 0,
            "gres": f"gpu:{per_node}" if gpu else "",
            "nodes": nodes,
            "tasks": parallel["gpus"],
            "tasks_per_gpu": 0,
            "mpi": "srun",
            "slurm_extra": f"--ntasks-per-node={per_node}",
        }
    tasks = parallel["backend"] == "ddp" or (parallel["backend"] == "horovod" and parallel["launcher"] == "srun")
    return {
        "gpu": gpu,
        "gres": "",
        "nodes": 1,
        "tasks": parallel["gpus"] if tasks else 1,
        "tasks_per_gpu": 1 if tasks and gpu else 0,
        "mpi": "srun" if tasks else "",
        "slurm_extra": "",
    }


def compress_gpus(settings: dict, variant: dict) -> int:
    """Fine-tuning variants (prune, qat) train on a GPU when the experiment does; calibration,
    conversion and timing are for x86 CPUs and run there."""
    return 1 if variant["method"] in ("prune", "qat") and uses_gpu(settings) else 0


# ----------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class Study:
    """One config, resolved once (``resolve``): what the workflow runs, every cross-key check
    passed. Its maps hold plain dicts (rules hand them to jobs, which unpickle them); treat them
    as read-only."""

    config: dict  # the validated config, defaults filled in, for provenance
    results: str
    dataset: str  # the dataset's name: results/<dataset>/...
    experiments: tuple[str, ...]  # after grid expansion
    folds: tuple[int, ...]
    overrides: dict  # experiment -> its overrides (grids expanded)
    grids: dict  # grid -> {combination name: {key: value}}
    experiment_folds: dict  # experiment -> the folds it trains on
    repeats: dict  # experiment -> seeds per fold
    init_from: dict  # experiment -> the model.pt it starts from (init_from)
    compared: tuple[str, ...]  # experiments and experiment ensembles
    explained: tuple[str, ...]
    explained_folds: tuple[int, ...]
    exported: tuple[str, ...]
    compressed: tuple[str, ...]
    compressed_folds: tuple[int, ...]
    train_resources: dict  # experiment -> what its training jobs ask the scheduler for
    # each section typed (medfold.settings.sections; ``raw`` on each is its dict, what the rules
    # hand to jobs): what the rules read, and what the library's entry points take
    training: dict  # experiment -> its merged, checked TrainSettings
    dataset_settings: DatasetSettings  # the dataset block the index reads, subgroup columns added
    split: SplitSettings
    evaluation: EvaluationSettings
    explain: ExplainSettings
    compression: CompressionSettings
    variant_settings: dict  # name -> its resolved compression variant
    external_settings: dict  # name -> its resolved external-validation block
    ensemble_settings: dict  # name -> its experiment ensemble
    export: ExportSettings
    predict: PredictSettings
    mlflow: MlflowSettings
    report: ReportSettings
    cluster_settings: ClusterSettings
    resources: ResourceSettings
    privacy: PrivacySettings
    images: ImageSettings
    demo: DemoSettings

    # the same sections as the dicts the rules hand to jobs (each typed one's ``raw``)
    @property
    def settings(self) -> dict:
        """experiment -> its merged, checked training settings dict."""
        return {name: s.raw for name, s in self.training.items()}

    @property
    def index_dataset(self) -> dict:
        return self.dataset_settings.raw

    @property
    def variants(self) -> dict:
        return {name: v.raw for name, v in self.variant_settings.items()}

    @property
    def externals(self) -> dict:
        return {name: e.raw for name, e in self.external_settings.items()}

    @property
    def ensembles(self) -> dict:
        return {name: e.raw for name, e in self.ensemble_settings.items()}

    @property
    def cluster(self) -> dict:
        return self.cluster_settings.raw


class _Names:
    """The experiments and folds a config defines, and the checks that other keys name only those."""

    def __init__(self, experiments: tuple[str, ...], folds: tuple[int, ...]):
        self.experiments, self.folds = experiments, folds
        self.trained: dict[str, list[int]] = {}  # experiment -> the folds it trains on

    def experiments_only(self, key: str, names) -> None:
        unknown = sorted(set(names) - set(self.experiments))
        if unknown:
            raise ConfigError(f"{key}: {unknown} are not experiments (there are {list(self.experiments)})")

    def folds_of(self, key: str, chosen) -> tuple[int, ...]:
        """The folds a key names (every fold when empty), each checked to exist."""
        unknown = sorted(set(chosen) - set(self.folds))
        if unknown:
            raise ConfigError(f"{key}: folds {unknown} do not exist (split.folds gives folds {list(self.folds)})")
        return tuple(sorted(chosen)) or self.folds

    def covers(self, key: str, names, needed) -> None:
        """Experiments that ``key`` uses on ``needed`` folds must have trained on them."""
        for name in names:
            missing = sorted(set(needed) - set(self.trained[name]))
            if missing:
                raise ConfigError(
                    f"{key}: experiment {name!r} trains on folds {self.trained[name]} only "
                    f"(its folds key), not on folds {missing} that {key.split('.')[0]} needs"
                )


def _check_split(split: dict, folds: tuple[int, ...]) -> None:
    from pathlib import Path

    if split["method"] == "stratified" and len(folds) < 2:
        raise ConfigError(
            f"split.folds is {len(folds)}; split.method 'stratified' needs at least 2 "
            "(a single train/val/test split is split.method 'source')"
        )
    if split["method"] == "manifest" and not (split["manifest"] and Path(split["manifest"]).is_file()):
        raise ConfigError(
            f"split.manifest: {split['manifest']!r} is not a file; split.method 'manifest' "
            "needs the split_manifest.csv to apply"
        )


def _experiment_folds(overrides: dict, names: _Names) -> dict[str, list[int]]:
    """An experiment may train on some folds only (``folds: [0]``: a grid tuned on one fold, as
    study 002 tuned on Fold0); its aggregate, fold ensemble and report cover those folds."""
    chosen_folds = {}
    for name in names.experiments:
        chosen = overrides[name].get("folds") or []
        if not isinstance(chosen, list) or not all(isinstance(f, int) for f in chosen):
            raise ConfigError(f"experiments.{name}.folds: expected a list of fold numbers, got {chosen!r}")
        chosen_folds[name] = list(names.folds_of(f"experiments.{name}.folds", chosen))
    return chosen_folds


def _check_ensembles(ensembles: dict, names: _Names) -> None:
    for name, ensemble in ensembles.items():
        names.experiments_only(f"ensembles.{name}.experiments", ensemble["experiments"])
        if name in names.experiments:
            raise ConfigError(f"ensembles.{name}: the name is an experiment's too")
        names.covers(f"ensembles.{name}.experiments", ensemble["experiments"], names.folds)


def _index_dataset(source: dict, evaluation: dict) -> dict:
    """The dataset block the index reads: the table's metadata columns, with the columns that
    subgroups are evaluated on, each checked to be one this format can carry."""
    from medfold.data.dicom import check_header_fields

    _check_data_named(source)
    columns = list(dict.fromkeys(source["metadata_columns"] + [spec["column"] for spec in evaluation["subgroups"]]))
    check_header_fields(source["dicom_metadata"])
    from_headers = set(source["dicom_metadata"])
    not_carried = [c for c in columns if c not in from_headers or source["format"] == "npz"]
    if not_carried and source["format"] != "csv":
        raise ConfigError(
            f"evaluation.subgroups / dataset.metadata_columns name {not_carried}: metadata columns "
            f"are read from dataset.table (format 'csv') or DICOM headers (dataset.dicom_metadata "
            f"{sorted(from_headers)}), and dataset.format is {source['format']!r}"
        )
    return {**source, "metadata_columns": columns}


# what each dataset.format reads: the keys that must name it
DATA_KEYS = {"csv": ("table",), "folders": ("root",), "dicom": ("root",), "npz": ("npz",)}


def _check_plan(plan: str | None) -> None:
    from pathlib import Path

    if plan and not Path(plan).is_file():
        raise ConfigError(
            f"plan: {plan} is not a file (the plan.json that medfold plan wrote beside this config, as a "
            "path from the working directory); remove the key from a config written by hand"
        )


def _check_experiments_named(overrides: dict) -> None:
    if not overrides:
        raise ConfigError(
            "experiments: the config names no experiment to train; give at least one, e.g. "
            "`experiments: {baseline: {}}` (the training section's settings), or start from a preset "
            "(`medfold init --preset <name> my.yaml`)"
        )


def _check_data_named(source: dict) -> None:
    """A dataset block that names no data (a config file given with --configfile replaces the
    demo's, so one holding only ``training:`` has the schema's empty dataset) stops here, naming
    the keys its format needs and how to start, not in Snakemake's input function."""
    fmt = source.get("format", "csv")
    missing = [f"dataset.{key}" for key in DATA_KEYS.get(fmt, ()) if not source.get(key)]
    if fmt == "csv" and not source.get("root") and not source.get("metadata_only"):
        missing.append("dataset.root")
    if missing:
        raise ConfigError(
            f"dataset: format {fmt!r} needs {' and '.join(missing)}, and this config names none "
            f"(a --configfile replaces the demo's config/config.yaml whole, so a file holding only other "
            f"sections has no dataset). Start from a preset: `medfold presets` lists them, `medfold init "
            f"--preset <name> my.yaml` writes one to edit; or copy config/config.yaml"
        )


def _check_compared(config: dict, compared: tuple[str, ...]) -> None:
    """Comparisons and reference figures name experiments or experiment ensembles."""
    comparisons = config["evaluation"]["comparisons"]
    named = [("evaluation.comparisons.reference", [comparisons["reference"]] if comparisons["reference"] else [])]
    named += [("evaluation.comparisons.pairs", pair) for pair in comparisons["pairs"]]
    for key, names in named:
        unknown = sorted(set(names) - set(compared))
        if unknown:
            raise ConfigError(f"{key}: {unknown} are neither experiments nor ensembles (there are {list(compared)})")
    for name in config["reference"]["experiments"]:
        if name not in compared:
            raise ConfigError(
                f"reference.experiments.{name}: neither an experiment nor an ensemble (there are {list(compared)})"
            )


# One piece (67 lines): the checks run in the order a user meets their errors (split, experiments,
# ensembles, dataset, comparisons, externals, variants), and the Study is built from all of them.
def resolve(config: dict, schema_path=None) -> Study:
    """The ``Study`` of a config already validated against the schema (Snakemake's ``validate``,
    which fills in the defaults). Raises ConfigError, naming the key, for anything the schema
    cannot say: names that must refer to experiments, folds that must exist, keys that only work
    together. The workflow calls it once, before any job runs; tests call it directly."""

    schema_path = schema_path or SCHEMA_PATH
    results, dataset = config["results"], config["dataset"]["name"]
    overrides, grids = expand_grids(config["experiments"], schema_path)
    _check_experiments_named(overrides)
    _check_plan(config.get("plan"))
    names = _Names(tuple(overrides), tuple(range(config["split"]["folds"])))
    _check_split(config["split"], names.folds)
    # every experiment's merged settings, checked now: a bad override stops before any job runs
    settings = {name: experiment_settings(config, name, schema_path, overrides) for name in names.experiments}
    names.trained = _experiment_folds(overrides, names)
    # experiments that start from another's fold model: that model is an input of their training
    init_from = resolve_init_from(
        settings, names.trained, lambda name, fold: f"{results}/{dataset}/{name}/fold_{fold}/model.pt"
    )
    ensembles = config["ensembles"]
    _check_ensembles(ensembles, names)
    index_dataset = _index_dataset(config["dataset"], config["evaluation"])
    compared = names.experiments + tuple(ensembles)
    _check_compared(config, compared)
    explained = tuple(config["explain"]["experiments"])
    names.experiments_only("explain.experiments", explained)
    exported = tuple(config["export"]["experiments"])
    names.experiments_only("export.experiments", exported)
    # external validation: each block resolved and checked now (its dataset as dataset is)
    externals = {
        name: external_settings(config, name, schema_path, list(names.experiments)) for name in config["external"]
    }
    # compression variants, resolved and checked now too; they apply to these experiments
    variants = {name: variant_settings(config, name, schema_path) for name in config["variants"]}
    compression = config["compression"]
    if variants:
        names.experiments_only("compression.experiments", compression["experiments"])
    compressed = tuple(compression["experiments"] or names.experiments) if variants else ()
    compressed_folds = names.folds_of("compression.folds", compression["folds"])
    explained_folds = names.folds_of("explain.folds", config["explain"]["folds"])
    names.covers("compression.experiments", compressed, compressed_folds)
    names.covers("explain.experiments", explained, explained_folds)
    return Study(
        config=config,
        results=results,
        dataset=dataset,
        experiments=names.experiments,
        folds=names.folds,
        overrides=overrides,
        grids=grids,
        experiment_folds=names.trained,
        repeats={name: experiment_repeats(overrides[name], name) for name in names.experiments},
        init_from=init_from,
        compared=compared,
        explained=explained,
        explained_folds=explained_folds,
        exported=exported,
        compressed=compressed,
        compressed_folds=compressed_folds,
        train_resources={name: train_resources(settings[name]) for name in names.experiments},
        training={name: TrainSettings.from_config(settings[name]) for name in names.experiments},
        dataset_settings=DatasetSettings.of(index_dataset),
        variant_settings={name: VariantSettings.of(v) for name, v in variants.items()},
        external_settings={name: ExternalSettings.of(e) for name, e in externals.items()},
        ensemble_settings={name: EnsembleSettings.of(e) for name, e in ensembles.items()},
        **_sections(config),
    )


def _sections(config: dict) -> dict:
    """The Study's settings of the sections that need no cross-key resolution."""
    return dict(
        split=SplitSettings.of(config["split"]),
        evaluation=EvaluationSettings.of(config["evaluation"]),
        explain=ExplainSettings.of(config["explain"]),
        compression=CompressionSettings.of(config["compression"]),
        export=ExportSettings.of(config["export"]),
        predict=PredictSettings.of(config["predict"]),
        mlflow=MlflowSettings.of(config["tracking"]["mlflow"]),
        report=ReportSettings.of(config),
        cluster_settings=ClusterSettings.of(config["cluster"]),
        resources=ResourceSettings.of(config["resources"]),
        privacy=PrivacySettings.of(config["privacy"]),
        images=ImageSettings.of(config["images"]),
        demo=DemoSettings.of(config["demo"]),
    )
