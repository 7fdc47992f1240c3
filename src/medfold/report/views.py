"""The typed views of the report page: dataclasses of tables, figures and values that the
templates lay out (medfold.report's first step fills them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, in jobs and tests alike
from markupsafe import Markup  # noqa: E402


# ----------------------------------------------------------------------------- views
@dataclass
class Table:
    """Rows of cells (text, numbers, None); the first ``left`` columns are left-aligned text.
    Numbers are formatted by the template (3 decimals), None and NaN shown as a dash."""

    headers: list[str]
    rows: list[list[Any]]
    left: int = 1
    row_classes: list[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.rows)


@dataclass
class Picture:
    """An image embedded as a data URL, with its text alternative and caption."""

    src: str
    alt: str
    caption: str = ""


@dataclass
class NearDuplicateCluster:
    patients: list[str]
    folders: list[str]
    pairs: list[str]
    pictures: list[Picture]


@dataclass
class NearDuplicates:
    searched: bool
    why: str = ""
    pairs: int = 0
    max_distance: int = 0
    bits: int = 0
    clusters: int = 0
    images: int = 0
    joining: int = 0
    distances: str = ""
    shown: list[NearDuplicateCluster] = field(default_factory=list)
    more: int = 0
    kinds: str = ""
    candidates: int = 0
    verified: int = 0
    min_score: float = 0.0
    neighbours: int = 0
    closest_rejected: str = ""
    largest: int = 0  # the largest cluster after the core check
    chained: int = 0  # the largest the accepted pairs alone made
    cut: list[str] = field(default_factory=list)  # links the core check cut
    large: list[str] = field(default_factory=list)  # clusters past LARGE_CLUSTER, with their weakest links


@dataclass
class DatasetView:
    name: str
    format: str
    task: str
    classes: int
    counts: Table
    left_out: Table | None
    label_map: Table | None
    unmapped: str
    listed_twice: Table | None
    warnings: list[str]
    skipped: Table | None
    per_set: Table
    near: NearDuplicates | None
    examples: list[tuple[str, list[Picture]]]


@dataclass
class SplitView:
    method: str
    folds: int
    seed: Any
    verdict: str
    ok: bool
    images_checked: int
    patients_crossing: int
    duplicates_crossing: int
    near_crossing: int
    sets: Table
    source_leaks: Table | None
    dropped: int
    dropped_rule: str
    dropped_table: Table | None
    grouping: str = ""  # what the split's groups stand for when the dataset names no patients


@dataclass
class Ensemble:
    models: int
    metrics: Table
    per_class: Table
    confusion: list[tuple[str, Table]]


@dataclass
class Clinical:
    skipped: str | None = None
    source: str = ""
    resamples: int = 0
    subgroups: Table | None = None
    forest: Markup | None = None
    temperatures: str = ""
    calibration: Table | None = None
    reliability: Markup | None = None
    operating_points: Table | None = None
    patient_aggregate: str = ""
    per_patient: Table | None = None


@dataclass
class ExperimentView:
    name: str
    best: bool
    headline: str
    per_fold: Table
    across: Table
    per_class: Table
    ensemble: Ensemble | None
    roc: Markup
    curves: Markup | None
    clinical: Clinical | None
    fold_reports: list = field(default_factory=list)  # of FoldReport, when there is no fold ensemble
    stages: Table | None = None  # staged fine-tuning: each stage's own test result, per fold
    decision: str = ""  # the rule accuracy, F1 and the confusion matrices use (training.decision)
    pruned: str = ""  # pruning while training: sparsity and storage, over the folds
    labels: LabelAuditView | None = None  # likely label errors from the out-of-fold predictions
    variance: Table | None = None  # with repeats: spread over folds and seeds, the variance split
    models: int = 0  # models trained (folds x seeds)


@dataclass
class LabelAuditView:
    """The top of an experiment's label audit (medfold.evaluation.labels): counts, table, thumbnails."""

    note: str
    table: Table
    pictures: list[Picture]


@dataclass
class ReferenceView:
    study: str
    source: str
    table: Table


@dataclass
class GridView:
    name: str
    combinations: int
    rank_by: str
    top: Table
    folds: list[int] | None = None  # the folds it was tuned on, when not every fold


@dataclass
class ExplainedFold:
    fold: int
    pictures: list[Picture]


@dataclass
class ExplanationsView:
    name: str
    folds: list[ExplainedFold]


@dataclass
class CompressedExperiment:
    name: str
    cpu_models: str
    isas: str
    table: Table
    figure: Markup


@dataclass
class CompressionView:
    threads: Any
    repeats: Any
    warmup: Any
    experiments: list[CompressedExperiment]


@dataclass
class Provenance:
    about: Table
    timings: Table | None
    config: str
    recipe: Table | None = None  # each experiment's training recipe, from its fold models' settings


@dataclass
class CardView:
    """An exported experiment's model card (medfold.deploy.card), as the page shows it."""

    name: str
    facts: Table  # section, field, text
    test: Table
    subgroups: Table
    calibration: Table
    operating_points: Table


@dataclass
class ExternalView:
    """One external validation (medfold.deploy.external), as the page shows it."""

    name: str
    experiment: str
    note: str
    metrics: Table
    copies: Table
    calibration: Table
    thresholds: Table
    figure: Picture | None


@dataclass
class PlanView:
    """What ``medfold plan`` read from the data and decided (its plan.json), beside the results."""

    statement: str
    fingerprint: Table  # what, found
    decisions: Table  # key, value, reason
    doubts: list[str]


@dataclass
class Report:
    title: str
    experiments: Table | None
    comparisons: Table | None
    details: list[ExperimentView]
    grids: list[GridView]
    dataset: DatasetView
    split: SplitView
    explanations: list[ExplanationsView]
    compression: CompressionView | None
    provenance: Provenance
    reference: ReferenceView | None = None
    cards: list[CardView] = field(default_factory=list)
    externals: list[ExternalView] = field(default_factory=list)
    cv_tests: Table | None = None  # the corrected repeated k-fold t-tests of the same pairs
    plan: PlanView | None = None  # medfold plan's fingerprint and decisions, when the config came from it
