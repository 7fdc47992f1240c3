"""The report's input manifest: every result file the report page reads, typed.

The workflow builds one ``ReportInputs`` (``report_inputs()`` in common.smk, from the rules' own
output patterns) and hands it to the report rule twice: its ``paths()`` are the rule's inputs, so
a changed result file reruns the report, and the object itself is the script's parameter, which
``medfold.report.gather`` reads. Tests and the command line may give a plain dict of the same
shape (``ReportInputs.of``); a key that is not part of the manifest is refused by name.

Files are given as strings or paths. Read access by key (``files["summary"]``,
``files.get("clinical")``) works as it did when the manifest was a dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from medfold.core.errors import ConfigError


class _ByKey:
    """Read access by key, as for the dict this manifest used to be."""

    def __getitem__(self, key: str):
        return getattr(self, key)

    def get(self, key: str, default=None):
        value = getattr(self, key, None)
        return default if value is None else value

    @classmethod
    def of(cls, given):
        """``given`` if it is one already, else built from a dict (only this class's keys)."""
        if isinstance(given, cls):
            return given
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"report inputs: {unknown} are not {cls.__name__} keys (there are {sorted(names)})")
        return cls(**{k: v for k, v in given.items() if v is not None})


def _paths(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _paths(v)]
    return [str(value)]


@dataclass(frozen=True)
class ExperimentFiles(_ByKey):
    """The result files of one experiment (or experiment ensemble) the report reads."""

    per_fold: str
    summary: str
    ensemble: str
    ensemble_predictions: str | None = None
    predictions: list = field(default_factory=list)  # per fold, fold order
    histories: dict = field(default_factory=dict)  # fold -> history.csv (the page never parses a path)
    metrics: dict = field(default_factory=dict)  # fold -> metrics.json
    clinical: str | None = None
    forest: str | None = None
    reliability: str | None = None
    label_issues: str | None = None
    explanations: list = field(default_factory=list)  # explain records, explained experiments only
    model_card: str | None = None  # exported experiments only
    variants: dict | None = None  # compressed experiments only: {"table": ..., "summary": ...}

    def paths(self) -> list[str]:
        return [p for f in dataclasses.fields(self) for p in _paths(getattr(self, f.name))]


@dataclass(frozen=True)
class ExternalFiles(_ByKey):
    """The result files of one external validation the report reads."""

    record: str
    reliability: str

    def paths(self) -> list[str]:
        return [str(self.record), str(self.reliability)]


@dataclass(frozen=True)
class ReportInputs(_ByKey):
    """Every result file of a study the report reads (optional parts ``None`` or empty)."""

    index: str
    index_report: str
    split_summary: str
    split_check: str
    cache: str | None = None  # images.npy: thumbnails
    comparison: str | None = None  # experiments.csv
    comparisons: str | None = None
    cv_tests: str | None = None
    experiments: dict = field(default_factory=dict)  # name -> ExperimentFiles
    ensembles: dict = field(default_factory=dict)  # experiment ensembles: name -> ExperimentFiles
    grids: dict = field(default_factory=dict)  # grid -> its ranked table
    benchmarks: list = field(default_factory=list)  # Snakemake benchmark files: job timings
    externals: dict = field(default_factory=dict)  # name -> ExternalFiles
    plan: str | None = None  # plan.json of medfold plan, when the config says so (plan:)

    def __post_init__(self):
        for name in ("experiments", "ensembles"):
            object.__setattr__(self, name, {k: ExperimentFiles.of(v) for k, v in getattr(self, name).items()})
        object.__setattr__(self, "externals", {k: ExternalFiles.of(v) for k, v in self.externals.items()})

    def paths(self) -> list[str]:
        """Every file named, in manifest order: the report rule's inputs."""
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("experiments", "ensembles", "externals"):
                found += [p for files in value.values() for p in files.paths()]
            else:
                found += _paths(value)
        return found
