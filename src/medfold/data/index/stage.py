"""The index rule's job and its outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from medfold.core import files
from medfold.core.privacy import Pseudonyms
from medfold.data.index.build import build_index
from medfold.data.index.io import write_index

# ----------------------------------------------------------------------------- the index stage


@dataclass(frozen=True)
class IndexOutputs(files.Outputs):
    """What the index rule writes."""

    table: Path
    report: Path
    NAMES: ClassVar[dict[str, str]] = {"table": "index.parquet", "report": "index_report.json"}


def index_job(dataset: dict, results, identifiers: str, outputs: IndexOutputs, threads: int = 1) -> None:
    """The index rule: ``dataset`` indexed, its identifiers pseudonymised with the results folder's key."""
    table, report = build_index(dataset, threads=threads, pseudonyms=Pseudonyms.for_results(results, identifiers))
    write_index(table, report, outputs.table, outputs.report)
