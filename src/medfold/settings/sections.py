"""Typed, frozen settings for each config section, built from the section's dict in one place.

A section class is a frozen dataclass whose fields are the section's keys (the schema's
properties, checked by tests/test_study.py); ``from_config`` fills in the schema's defaults for
any key not given (so a partial dict from a test or a bench gets the same values the workflow
would), builds nested sections by their own classes, and keeps the merged dict as ``raw`` for
provenance (what result files record). ``of`` accepts a section object or a dict, so that every
library entry point can be called either way.

The library reads settings by attribute only; ``build`` below is the one place a section's dict
is read by key (``tests/test_study.py`` asserts that no other module indexes one).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType

import yaml

from medfold.core.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def _schema_text(path: str) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def load_schema(path=None) -> dict:
    """The config schema, read once per path (every resolution and section reads this copy:
    treat it as read-only)."""
    return _schema_text(str(path or SCHEMA_PATH))


def _subschema(path: tuple[str, ...]) -> dict:
    schema = load_schema()
    for part in path:
        schema = schema["additionalProperties"] if part == "*" else schema["properties"][part]
    return schema


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "target":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def schema_defaults(schema: dict):
    """The defaults a (sub)schema declares, nested objects filled in key by key."""
    if schema.get("type") == "object" and "properties" in schema:
        declared = schema.get("default") or {}
        return deep_merge({k: schema_defaults(p) for k, p in schema["properties"].items()}, declared)
    return copy.deepcopy(schema.get("default"))


def _dataclass_of(hint):
    """The dataclass a field's type names (``X`` or ``X | None``), or None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        found = [a for a in typing.get_args(hint) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


@functools.cache
def _fields(cls) -> tuple[tuple[str, type | None], ...]:
    """Each field of ``cls`` but ``raw``, with the dataclass its type names (or None)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _dataclass_of(hints[f.name])) for f in dataclasses.fields(cls) if f.name != "raw")


def build(cls, raw: Mapping):
    """An instance of the dataclass ``cls`` from the dict ``raw``: each field from the key of its
    name; a field typed as a dataclass is built from its dict by that class's ``from_config`` (or
    by ``build``); a key ``raw`` lacks leaves the field's default. A ``raw`` field gets ``raw``."""
    values = {}
    for name, nested in _fields(cls):
        if name not in raw:
            continue
        value = raw[name]
        if nested is not None and isinstance(value, Mapping):
            value = nested.from_config(value) if hasattr(nested, "from_config") else build(nested, value)
        values[name] = value
    if any(f.name == "raw" for f in dataclasses.fields(cls)):
        values["raw"] = raw
    return cls(**values)


@functools.cache
def section_defaults(path: tuple[str, ...]) -> dict:
    """The defaults of the schema at ``path`` (``*``: a named entry), once; {} for none."""
    defaults = schema_defaults(_subschema(path)) if path else None
    return defaults if isinstance(defaults, Mapping) else {}  # a nullable block declares none


def with_defaults(given: Mapping, defaults: Mapping) -> dict:
    """``given`` (as it is, in its own key order) with every key it lacks taken from
    ``defaults``, nested maps filled in the same way. A complete section comes back equal to
    itself, so what it records (``raw``) is what the config said."""
    out = dict(given)
    for key, default in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(default)
        elif isinstance(out[key], Mapping) and isinstance(default, Mapping) and key != "target":
            out[key] = with_defaults(out[key], default)
    return out


def coerce(cls, value):
    """``value`` as the dataclass ``cls``: itself when it is one, else built from its dict (``build``)."""
    return value if isinstance(value, cls) else build(cls, value or {})


class Section:
    """Base of the section classes: ``schema_path`` (class attribute) is where the section's
    schema is, ``*`` for a named entry (a variant, an external site)."""

    schema_path: typing.ClassVar[tuple[str, ...]] = ()

    @classmethod
    def defaults(cls) -> dict:
        """The section's schema defaults, computed once per section (``with_defaults`` copies
        what it takes from them)."""
        return section_defaults(cls.schema_path)

    @classmethod
    def from_config(cls, raw: Mapping | None):
        return build(cls, with_defaults(raw or {}, cls.defaults()))

    @classmethod
    def of(cls, value):
        """``value`` as this section: itself when it is one, else built from its dict."""
        return value if isinstance(value, cls) else cls.from_config(value)


def _raw():
    return field(default_factory=dict, repr=False, compare=False)


# ----------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class NearDuplicateSettings(Section):
    """``dataset.near_duplicates``: the fingerprint search for re-published copies."""

    schema_path = ("dataset", "near_duplicates")
    enabled: bool = True
    max_distance: int = 5
    neighbours: int = 4
    min_score: float = 0.85
    early_score: float = 0.5
    raw: dict = _raw()


@dataclass(frozen=True)
class DatasetSettings(Section):
    """``dataset``: where the images are, how labels, patients and source splits are read."""

    schema_path = ("dataset",)
    name: str = "dataset"
    format: str = "folders"
    task: str = "multiclass"
    root: str | None = None
    table: str | None = None
    npz: str | None = None
    path_column: str | None = None
    label_column: str | None = None
    label_separator: str | None = None
    label_columns: list = field(default_factory=list)
    no_finding_label: str | None = None
    labels: list = field(default_factory=list)
    patient_column: str | None = None
    patient_regex: str | None = None
    source_split_column: str | None = None
    image_extensions: list = field(default_factory=list)
    class_folder: str = "parent"
    source_split_lists: dict = field(default_factory=dict)
    filter: str | None = None
    label_map: dict = field(default_factory=dict)
    unmapped_label: str | None = None
    near_duplicates: NearDuplicateSettings = field(default_factory=NearDuplicateSettings)
    exclude_folders: list = field(default_factory=list)
    allow_outside_root: bool = False
    recursive_lookup: bool = False
    metadata_columns: list = field(default_factory=list)
    dicom_metadata: list = field(default_factory=list)
    exclude_images: str | None = None
    metadata_only: bool = False
    metadata_width_column: str | None = None
    metadata_height_column: str | None = None
    raw: dict = _raw()

    @property
    def source(self) -> str | None:
        """The path this format reads: the table (csv), the .npz (npz) or the root folder."""
        return self.table if self.format == "csv" else self.npz if self.format == "npz" else self.root


# ----------------------------------------------------------------------------- split
@dataclass(frozen=True)
class SourceRoles(Section):
    """``split.source_roles``: which names of a dataset's own split mean train, val and test."""

    schema_path = ("split", "source_roles")
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)
    raw: dict = _raw()

    def items(self):
        """(role, names) pairs, as the section's dict gives them."""
        return ((role, getattr(self, role)) for role in ("train", "val", "test"))

    def names(self, role: str) -> list:
        return getattr(self, role)


@dataclass(frozen=True)
class SplitSettings(Section):
    """``split``: the held-out test set and the folds."""

    schema_path = ("split",)
    seed: int = 0
    method: str = "stratified"
    manifest: str | None = None
    folds: int = 3
    source_fold_pattern: str | None = None
    source_roles: SourceRoles = field(default_factory=SourceRoles)
    test_fraction: float = 0.2
    test_from_source: bool = False
    source_test_names: list = field(default_factory=list)
    on_source_leak: str = "resplit"
    on_source_duplicate: str = "stop"
    raw: dict = _raw()


# ----------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class CalibrationSettings(Section):
    schema_path = ("evaluation", "calibration")
    bins: int = 10
    temperature_scaling: bool = True
    raw: dict = _raw()


@dataclass(frozen=True)
class OperatingPointSettings(Section):
    schema_path = ("evaluation", "operating_points")
    specificity: list = field(default_factory=list)
    sensitivity: list = field(default_factory=list)
    raw: dict = _raw()


@dataclass(frozen=True)
class PatientLevelSettings(Section):
    schema_path = ("evaluation", "patient_level")
    enabled: bool = True
    aggregate: str = "max"
    raw: dict = _raw()


@dataclass(frozen=True)
class ComparisonSettings(Section):
    """``evaluation.comparisons``: which experiments are tested against which."""

    schema_path = ("evaluation", "comparisons")
    cv_metric: str = "val.auroc_macro"
    reference: str | None = None
    pairs: list = field(default_factory=list)
    raw: dict = _raw()


@dataclass(frozen=True)
class EvaluationSettings(Section):
    """``evaluation``: the clinical reviewer's analyses of each experiment."""

    schema_path = ("evaluation",)
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    subgroups: list = field(default_factory=list)
    min_subgroup_images: int = 20
    min_subgroup_patients: int = 5
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    operating_points: OperatingPointSettings = field(default_factory=OperatingPointSettings)
    patient_level: PatientLevelSettings = field(default_factory=PatientLevelSettings)
    comparisons: ComparisonSettings = field(default_factory=ComparisonSettings)
    raw: dict = _raw()


# ----------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class LimeSettings(Section):
    schema_path = ("explain", "lime")
    samples: int = 300
    superpixels: int = 64
    compactness: float = 0.1
    kernel_width: float = 0.25
    kernel: str = "squared"
    surrogate: str = "ridge"
    segmentation: str = "slic"
    clusters: int = 38
    raw: dict = _raw()


@dataclass(frozen=True)
class ExplainSettings(Section):
    schema_path = ("explain",)
    experiments: list = field(default_factory=list)
    folds: list = field(default_factory=list)
    images_per_class: int = 2
    seed: int = 0
    lime: LimeSettings = field(default_factory=LimeSettings)
    mem_mb: int = 3000
    runtime: int = 30
    raw: dict = _raw()


# ----------------------------------------------------------------------------- compression
@dataclass(frozen=True)
class LatencySettings(Section):
    schema_path = ("compression", "latency")
    batch_sizes: list = field(default_factory=list)
    warmup: int = 3
    repeats: int = 20
    raw: dict = _raw()


@dataclass(frozen=True)
class CompressionSettings(Section):
    schema_path = ("compression",)
    experiments: list = field(default_factory=list)
    folds: list = field(default_factory=list)
    latency: LatencySettings = field(default_factory=LatencySettings)
    threads: int = 2
    mem_mb: int = 4000
    runtime: int = 60
    raw: dict = _raw()


@dataclass(frozen=True)
class PruningSettings(Section):
    """A pruning schedule (``variants.<name>.pruning``, and ``training.pruning`` with ``enabled``)."""

    schema_path = ("variants", "*", "pruning")
    scope: str = "global"
    layers: str = "conv"
    initial_sparsity: float = 0.1
    final_sparsity: float = 0.5
    start_epoch: float = 0.5
    end_epoch: float = 7
    exponent: float = 3
    update_every: int = 10
    adaptive_targets: list = field(default_factory=list)
    enabled: bool = False
    raw: dict = _raw()


@dataclass(frozen=True)
class VariantSettings(Section):
    """``variants.<name>``: one compressed variant of a fold model."""

    schema_path = ("variants", "*")
    method: str = "ptq"
    epochs: int = 8
    lr: float | None = None
    calibration_images: int = 256
    quantize_layers: str = "all"
    pruning: PruningSettings = field(default_factory=PruningSettings)
    raw: dict = _raw()


# ----------------------------------------------------------------------------- the rest
@dataclass(frozen=True)
class PredictSettings(Section):
    schema_path = ("predict",)
    images: str | None = None
    column: str | None = None
    gradcam: bool = False
    raw: dict = _raw()


@dataclass(frozen=True)
class MlflowSettings(Section):
    schema_path = ("tracking", "mlflow")
    enabled: bool = False
    uri: str | None = None
    experiment: str | None = None
    raw: dict = _raw()


@dataclass(frozen=True)
class RecalibrationSettings(Section):
    """``external.<name>.recalibrate``: refit calibration on a share of the site's patients."""

    schema_path = ("external", "*", "recalibrate")
    fraction: float = 0.3
    method: str = "temperature"
    seed: int | None = None
    raw: dict = _raw()


@dataclass(frozen=True)
class ExternalSettings(Section):
    """``external.<name>``, resolved (``resolve.external_settings``): the site's dataset as a
    ``DatasetSettings``."""

    schema_path = ("external", "*")
    experiment: str | None = None
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    on_copy: str = "exclude"
    recalibrate: RecalibrationSettings | None = None
    mem_mb: int = 4000
    raw: dict = _raw()


@dataclass(frozen=True)
class EnsembleSettings(Section):
    """``ensembles.<name>``: an experiment ensemble, the weighted mean of experiments' fold models."""

    schema_path = ("ensembles", "*")
    experiments: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    raw: dict = _raw()


@dataclass(frozen=True)
class GridSettings(Section):
    schema_path = ("grids",)
    rank_by: str = "val.auroc_macro"
    top_k: int = 10
    raw: dict = _raw()


@dataclass(frozen=True)
class ReferenceSettings(Section):
    schema_path = ("reference",)
    study: str = ""
    source: str = ""
    experiments: dict = field(default_factory=dict)
    raw: dict = _raw()


@dataclass(frozen=True)
class CardSettings(Section):
    """``export.card``: the model card's statements that only people can make."""

    schema_path = ("export", "card")
    intended_use: str = ""
    intended_users: str = ""
    out_of_scope: str = ""
    ethical_considerations: str = ""
    limitations: str = ""
    raw: dict = _raw()


@dataclass(frozen=True)
class ExportSettings(Section):
    schema_path = ("export",)
    experiments: list = field(default_factory=list)
    card: CardSettings = field(default_factory=CardSettings)
    raw: dict = _raw()


@dataclass(frozen=True)
class ClusterSettings(Section):
    """``cluster``: the Slurm partition (one for GPU jobs) and account jobs go to."""

    schema_path = ("cluster",)
    partition: str = ""
    gpu_partition: str = ""
    account: str = ""
    raw: dict = _raw()

    def partition_for(self, gpus: int) -> str:
        """The partition of a job that asks for ``gpus`` GPUs."""
        return (self.gpu_partition or self.partition) if gpus else self.partition


@dataclass(frozen=True)
class ResourceSettings(Section):
    schema_path = ("resources",)
    index_threads: int = 2
    cache_threads: int = 2
    raw: dict = _raw()


@dataclass(frozen=True)
class PrivacySettings(Section):
    schema_path = ("privacy",)
    identifiers: str = "pseudonymized"
    raw: dict = _raw()


@dataclass(frozen=True)
class ImageSettings(Section):
    schema_path = ("images",)
    channels: int = 1
    raw: dict = _raw()


@dataclass(frozen=True)
class DemoSettings(Section):
    """``demo``: where the generated demo data is written, its seed and its sizes."""

    schema_path = ("demo",)
    output: str = "resources/demo"
    seed: int = 0
    cxr14_patients: int = 150
    folder_patients: int = 90
    dicom_patients: int = 220
    raw: dict = _raw()


@dataclass(frozen=True)
class ReportSettings:
    """What the report page reads of the config: how grids are ranked, compression's timing
    settings, the study's published figures, the folds each configured experiment trains on
    (a grid tuned on some folds only), and the whole config for the page's provenance section."""

    grids: GridSettings = field(default_factory=GridSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    chosen_folds: dict = field(default_factory=dict)  # experiment -> its folds, sorted; absent: every fold
    raw: dict = _raw()

    @classmethod
    def from_config(cls, config: Mapping) -> ReportSettings:
        experiments = config.get("experiments") or {}
        return cls(
            grids=GridSettings.of(config.get("grids")),
            compression=CompressionSettings.of(config.get("compression")),
            reference=ReferenceSettings.of(config.get("reference")),
            chosen_folds={name: sorted(o["folds"]) for name, o in experiments.items() if o and o.get("folds")},
            raw=dict(config),
        )

    @classmethod
    def of(cls, value) -> ReportSettings:
        return value if isinstance(value, cls) else cls.from_config(value)


SECTIONS: dict[tuple[str, ...], type] = {
    cls.schema_path: cls
    for cls in (
        NearDuplicateSettings,
        DatasetSettings,
        SourceRoles,
        SplitSettings,
        CalibrationSettings,
        OperatingPointSettings,
        PatientLevelSettings,
        ComparisonSettings,
        EvaluationSettings,
        LimeSettings,
        ExplainSettings,
        LatencySettings,
        CompressionSettings,
        PruningSettings,
        VariantSettings,
        PredictSettings,
        MlflowSettings,
        RecalibrationSettings,
        ExternalSettings,
        EnsembleSettings,
        GridSettings,
        ReferenceSettings,
        CardSettings,
        ExportSettings,
        ClusterSettings,
        ResourceSettings,
        PrivacySettings,
        ImageSettings,
        DemoSettings,
    )
}


def settings_digest(settings: dict) -> str:
    """An experiment's settings as one canonical string: a checkpoint or a tracking run resumes
    only under the settings it was made with."""
    return json.dumps(settings, sort_keys=True)


def check_schedule(initial: float, final: float, start: float, end: float) -> None:
    if not 0 <= initial <= final < 1:
        raise ConfigError(f"pruning: need 0 <= initial_sparsity ({initial}) <= final_sparsity ({final}) < 1")
    if not 0 <= start < end:
        raise ConfigError(f"pruning: need 0 <= start_epoch ({start}) < end_epoch ({end})")
