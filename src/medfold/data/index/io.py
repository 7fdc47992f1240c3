"""The index table on disk: Parquet with the index schema and its metadata, read back with defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medfold.core.errors import ConfigError
from medfold.data.index._constants import INDEX_SCHEMA, META_KEY


def write_index(table: pd.DataFrame, report: dict, parquet_path, report_path) -> None:
    meta = {"classes": report["classes"], "task": report["task"], "dataset": report["dataset"]}
    arrow = _arrow(with_defaults(table))
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    Path(parquet_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow, parquet_path)
    Path(report_path).write_text(json.dumps(report, indent=2) + "\n")


def read_index(path) -> tuple[pd.DataFrame, dict]:
    """The index table and its metadata (classes in order, task), checked against the schema."""
    arrow = pq.read_table(path)
    missing = [name for name in INDEX_SCHEMA.names if name not in arrow.schema.names]
    if missing or META_KEY not in (arrow.schema.metadata or {}):
        raise ConfigError(
            f"{path}: not a medfold index (missing columns {missing} or metadata); rebuild it with the index rule"
        )
    meta = json.loads(arrow.schema.metadata[META_KEY])
    return _frame(arrow), meta


def _arrow(table: pd.DataFrame) -> pa.Table:
    """The index's Arrow table: the schema's columns, then the metadata columns carried from the
    dataset's table (``meta:<column>``, text as the table has it)."""
    meta = [c for c in table.columns if c.startswith("meta:")]
    schema = pa.schema([*INDEX_SCHEMA, *[pa.field(c, pa.string()) for c in meta]])
    return pa.Table.from_pandas(table[schema.names], schema=schema, preserve_index=False)


def _frame(arrow: pa.Table) -> pd.DataFrame:
    """The one pandas form of an index table: nullable integers, labels as Python lists."""
    table = arrow.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    for column in ("labels", "patient_aliases", "shared_patient_aliases"):
        if column in table:
            table[column] = table[column].map(lambda v: [] if v is None else list(v))
    return table


def with_defaults(table: pd.DataFrame) -> pd.DataFrame:
    """A hand-made table (tests, user scripts) completed with the columns indexing adds on its
    own: no fingerprint, no near-duplicate cluster, no patient aliases."""
    table = table.copy()
    for column, value in (
        ("fingerprint", None),
        ("near_duplicate_cluster", None),
        ("study_uid", None),
        ("series_uid", None),
    ):
        if column not in table:
            table[column] = value
    if "patient_aliases" not in table:
        table["patient_aliases"] = [[] for _ in range(len(table))]
    # shared IDs: the raw ones (a table made without medfold.core.privacy shares them as they are)
    if "shared_image_id" not in table:
        table["shared_image_id"] = table["image_id"]
    if "shared_patient_id" not in table:
        table["shared_patient_id"] = table["patient_id"]
    if "shared_patient_aliases" not in table:
        table["shared_patient_aliases"] = [list(a) for a in table["patient_aliases"]]
    return table
