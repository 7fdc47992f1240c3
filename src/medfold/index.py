"""Index a dataset into one validated table: image, patient, labels, size, content hash.

Three adapters read what users have (a folder-per-class tree, a CSV such as NIH's
``Data_Entry_2017.csv``, a MedMNIST ``.npz``) into the same candidate table; the rest
(patient IDs, label checks, decoding every image, duplicates) is shared. A bad image never
aborts indexing: it is listed in the report with its reason and left out of the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import files
from . import fingerprint as fp
from .dicom import check_header_fields, looks_like_dicom, number_or_age, read_header_fields
from .errors import ConfigError
from .images import ImageCheck, check_image, content_hash, signatures
from .privacy import Pseudonyms, index_scrubber, scrubbed_logs
from .progress import Progress, tracked

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("patient_id", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("source_split", pa.string()),
        ("npz_index", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mode", pa.string()),
        ("file_bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("present", pa.bool_()),
        ("fingerprint", pa.string()),
        ("near_duplicate_cluster", pa.int64()),
        ("patient_aliases", pa.list_(pa.string())),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        # what outputs meant to be shared show (medfold.privacy): pseudonyms, or the IDs as they are
        ("shared_image_id", pa.string()),
        ("shared_patient_id", pa.string()),
        ("shared_patient_aliases", pa.list_(pa.string())),
    ]
)
META_KEY = b"medfold"
NPZ_SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- adapters
def _folder_candidates(ds: dict) -> tuple[pd.DataFrame, list[dict], int]:
    """root/[split dirs...]/<class>/<file>: the parent folder is the class, folders above it
    (``train``, ``Fold3/valid``...) are the dataset's own split."""
    if not ds["root"]:
        raise ConfigError("dataset.root: not set; format 'folders' needs the folder holding the class folders")
    root = Path(ds["root"])
    if not root.is_dir():
        raise ConfigError(
            f"dataset.root: folder {root} does not exist (format 'folders' needs the class folders' parent)"
        )
    extensions = tuple(e.lower() for e in ds["image_extensions"])
    exclude = set(ds["exclude_folders"])
    rows, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if not name.lower().endswith(extensions) and not (
                "." not in name and looks_like_dicom(Path(dirpath) / name)
            ):
                ignored.append(
                    {"path": str(root / rel), "reason": f"extension not in dataset.image_extensions {list(extensions)}"}
                )
                continue
            if rel_dir == Path("."):
                ignored.append(
                    {"path": str(root / rel), "reason": "file directly under dataset.root has no class folder"}
                )
                continue
            parts = rel_dir.parts
            top = ds["class_folder"] == "top"
            rows.append(
                {
                    "image_id": rel,
                    "path": str(root / rel),
                    "labels": [parts[0] if top else parts[-1]],
                    "patient_id": None,
                    "source_split": None if top else "/".join(parts[:-1]) or None,
                }
            )
    return pd.DataFrame(rows, columns=["image_id", "path", "labels", "patient_id", "source_split"]), ignored, 0


def _csv_candidates(ds: dict) -> tuple[pd.DataFrame, list[dict], int]:
    """The table's rows (those dataset.filter selects: how many it left out is returned too)."""
    table = Path(ds["table"] or "")
    if not ds["table"] or not table.is_file():
        raise ConfigError(f"dataset.table: CSV file {ds['table']!r} does not exist (format 'csv' needs it)")
    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False, compression="infer")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{table}: cannot be read as CSV: {exc}") from exc
    frame.columns = [c.strip() for c in frame.columns]
    frame, left_out = apply_filter(frame, ds["filter"], str(table))

    def need(key: str, column: str | None) -> None:
        if column and column not in frame.columns:
            raise ConfigError(
                f"{table}: column {column!r} (dataset.{key}) not found; the table has columns {list(frame.columns)}"
            )

    if not ds["path_column"]:
        raise ConfigError(
            f"dataset.path_column: format 'csv' needs the column naming each image; {table} has columns "
            f"{list(frame.columns)}"
        )
    if not ds["label_columns"] and not ds["label_column"]:
        raise ConfigError(
            f"dataset.label_column (or dataset.label_columns): format 'csv' needs the labels; {table} has "
            f"columns {list(frame.columns)}"
        )
    need("path_column", ds["path_column"])
    need("patient_column", ds["patient_column"])
    need("source_split_column", ds["source_split_column"])
    if ds["label_columns"]:
        for column in ds["label_columns"]:
            need("label_columns", column)
        onehot = frame[ds["label_columns"]].apply(lambda col: col.str.strip().isin(["1", "1.0", "True", "true"]))
        names = np.array(ds["label_columns"], dtype=object)
        labels = [list(names[row]) for row in onehot.to_numpy()]
    else:
        need("label_column", ds["label_column"])
        raw = frame[ds["label_column"]].str.strip()
        sep = ds["label_separator"]
        labels = [[part.strip() for part in value.split(sep)] if sep else [value] for value in raw]
        labels = [[part for part in parts if part] for parts in labels]
    image_ids = frame[ds["path_column"]].str.strip()
    root = Path(ds["root"]) if ds["root"] else table.parent
    source_split = frame[ds["source_split_column"]].str.strip() if ds["source_split_column"] else None
    if ds["source_split_lists"]:
        if ds["source_split_column"]:
            raise ConfigError(
                "dataset.source_split_lists and dataset.source_split_column both give the source split; keep one"
            )
        source_split = _split_from_lists(image_ids, ds["source_split_lists"])
    if ds["metadata_only"]:
        paths = [str(root / i) for i in image_ids]
        unlisted: list[dict] = []
    else:
        paths, unlisted = _locate(root, image_ids, ds)
    inside = _inside_root(root, paths, ds.get("allow_outside_root", False))
    out = pd.DataFrame(
        {
            "image_id": image_ids,
            "path": paths,
            "labels": labels,
            "patient_id": frame[ds["patient_column"]].str.strip() if ds["patient_column"] else None,
            "source_split": source_split,
            "_line": frame.index.to_numpy() + 2,  # the CSV's own line (header on line 1), kept through dataset.filter
        }
    )
    refused = [
        {"path": p, "reason": f"line {line}: path leaves dataset.root {str(root)!r} (set dataset.allow_outside_root)"}
        for p, line, ok in zip(out["path"], out["_line"], inside)
        if not ok
    ]
    out, frame = out[inside].reset_index(drop=True), frame[inside]
    for column in ds.get("metadata_columns") or []:
        if column in (ds.get("dicom_metadata") or []) and column not in frame.columns:
            continue  # read from the images' DICOM headers
        need("metadata_columns (or evaluation.subgroups)", column)
        out[f"meta:{column}"] = frame[column].str.strip().to_numpy()
    if ds["metadata_only"]:
        for key, column in (("meta_width", ds["metadata_width_column"]), ("meta_height", ds["metadata_height_column"])):
            need(key.replace("meta_", "metadata_") + "_column", column)
            out[key] = pd.to_numeric(frame[column], errors="coerce").astype("Int64").to_numpy() if column else None
    if ds["patient_column"]:
        empty = out["patient_id"] == ""
        if empty.any():
            raise ConfigError(
                f"{table}: column {ds['patient_column']!r} (dataset.patient_column) is empty for "
                f"{int(empty.sum())} rows, e.g. {out.loc[empty, 'image_id'].iloc[0]!r}"
            )
    return out, unlisted + refused, left_out


def _inside_root(root: Path, paths: list[str], allowed: bool) -> np.ndarray:
    """Whether each path stays under ``root`` once ``..`` and absolute parts are resolved (links
    are not followed: a dataset linked in from elsewhere is the user's own choice)."""
    if allowed:
        return np.ones(len(paths), bool)
    top = os.path.normpath(os.path.abspath(root))
    return np.array([os.path.normpath(os.path.abspath(p)).startswith(top + os.sep) for p in paths], bool)


def apply_filter(frame: pd.DataFrame, query: str | None, source: str) -> tuple[pd.DataFrame, int]:
    """The rows ``query`` selects, and how many it left out. Errors name dataset.filter."""
    if not query:
        return frame, 0
    try:
        kept = frame.query(query, engine="python")
    except pd.errors.UndefinedVariableError as exc:
        raise ConfigError(
            f"dataset.filter {query!r}: {exc} in {source}; its columns are {list(frame.columns)} "
            "(a name with spaces goes in backticks)"
        ) from exc
    except Exception as exc:  # a syntax error, a type clash: pandas raises many kinds
        raise ConfigError(
            f"dataset.filter {query!r} cannot be evaluated on {source}: {type(exc).__name__}: {exc}"
        ) from exc
    if kept.empty:
        raise ConfigError(f"dataset.filter {query!r} leaves none of the {len(frame)} rows of {source}")
    return kept, len(frame) - len(kept)


def map_labels(cand: pd.DataFrame, ds: dict) -> tuple[pd.DataFrame, dict]:
    """Raw labels to classes through dataset.label_map (see its description); returns the
    candidates (single-label rows left with no class removed) and what was mapped and dropped."""
    mapping, other = ds["label_map"], ds["unmapped_label"]
    if not mapping:
        return cand, {}
    mapped, unmapped = Counter(), Counter()

    def one(raw: list[str]) -> list[str]:
        out = []
        for label in raw:
            if label in mapping:
                target = mapping[label]
            else:
                unmapped[label] += 1
                target = other
            if target is not None:
                mapped[f"{label} -> {target}"] += 1
                out.append(target)
        return list(dict.fromkeys(out))

    cand = cand.assign(labels=[one(raw) for raw in cand["labels"]])
    dropped = 0
    if ds["task"] != "multilabel":
        # several classes for one image: the one label_map names first wins, unmapped_label last
        order = {c: i for i, c in enumerate(dict.fromkeys(v for v in mapping.values() if v is not None))}
        cand["labels"] = [sorted(labels, key=lambda c: order.get(c, len(order)))[:1] for labels in cand["labels"]]
        empty = cand["labels"].map(len) == 0
        dropped = int(empty.sum())
        cand = cand[~empty].reset_index(drop=True)
    return cand, {
        "mapped": dict(sorted(mapped.items())),
        "unmapped_raw_labels": dict(sorted(unmapped.items())),
        "unmapped_label": other,
        "images_left_without_a_class": dropped,
    }


def _merge_repeated_rows(out: pd.DataFrame, table, ds: dict) -> tuple[pd.DataFrame, list[dict]]:
    """A file the table lists more than once is one image: its first row's patient, the others'
    patients kept as ``patient_aliases`` (they join one group in the split). Labels must agree,
    except for multilabel, where the image carries the union: each row is a reader's findings,
    and dropping a finding one of them saw would hide a positive. Each repeat is reported."""
    out["patient_aliases"] = [[] for _ in range(len(out))]
    if "_line" not in out:  # tables bring their own line numbers (csv adapter); others need none
        out["_line"] = np.arange(len(out)) + 2
    repeated = out["image_id"].duplicated(keep=False)
    merged = []
    for image_id, rows in out[repeated].groupby("image_id", sort=False):
        label_sets = [tuple(labels) for labels in rows["labels"]]
        lines = rows["_line"].tolist()
        if len(set(map(frozenset, label_sets))) > 1 and ds["task"] != "multilabel":
            raise ConfigError(
                f"{table}: {image_id!r} is listed on lines {lines} with different labels "
                f"{[list(labels) for labels in label_sets]} (dataset.task {ds['task']!r} needs one label per image; "
                "fix the table or drop one row)"
            )
        union = list(dict.fromkeys(label for labels in label_sets for label in labels))
        patients = list(dict.fromkeys(p for p in rows["patient_id"] if p is not None))
        first = rows.index[0]
        out.at[first, "labels"] = union
        out.at[first, "patient_aliases"] = patients[1:]
        merged.append(
            {
                "image_id": image_id,
                "lines": lines,
                "patients": patients,
                "labels": union,
                "labels_differed": len(set(map(frozenset, label_sets))) > 1,
            }
        )
    out = out[~out["image_id"].duplicated(keep="first")].drop(columns="_line").reset_index(drop=True)
    return out, merged


def _split_from_lists(image_ids: pd.Series, lists: dict[str, str]) -> pd.Series:
    """Each image's split name from list files (NIH's train_val_list.txt / test_list.txt)."""
    split = pd.Series(None, index=image_ids.index, dtype=object)
    for name, file in lists.items():
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"dataset.source_split_lists.{name}: list file {file} does not exist")
        listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        member = image_ids.isin(listed)
        twice = member & split.notna()
        if twice.any():
            raise ConfigError(
                f"{file}: image {image_ids[twice].iloc[0]!r} is also listed for split {split[twice].iloc[0]!r} "
                f"(dataset.source_split_lists)"
            )
        unknown = listed - set(image_ids)
        if unknown:
            log.warning(
                "%s lists %d images that the table does not have, e.g. %s", file, len(unknown), sorted(unknown)[:3]
            )
        split[member] = name
    if split.isna().any():
        raise ConfigError(
            f"dataset.source_split_lists: image {image_ids[split.isna()].iloc[0]!r} is in none of the "
            f"lists {sorted(lists)} ({int(split.isna().sum())} such images)"
        )
    return split


def _locate(root: Path, image_ids: pd.Series, ds: dict) -> tuple[list[str], list[dict]]:
    """Paths of the listed images; with ``recursive_lookup`` (NIH ships them in images_001..012/)
    they are found by file name anywhere under root. Image files under root that the table does
    not list are reported, not indexed."""
    if not root.is_dir():
        raise ConfigError(f"dataset.root: folder {root} does not exist (the CSV's paths are relative to it)")
    on_disk = {}
    extensions = tuple(e.lower() for e in ds["image_extensions"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(extensions):
                full = Path(dirpath) / name
                on_disk[full.relative_to(root).as_posix()] = full
    by_name = {}
    if ds["recursive_lookup"]:
        for rel, full in on_disk.items():
            by_name.setdefault(Path(rel).name, full)
    paths, used = [], set()
    for image_id in image_ids:
        full = on_disk.get(image_id) or by_name.get(Path(image_id).name) or (root / image_id)
        used.add(full)
        paths.append(str(full))
    unlisted = [
        {"path": str(p), "reason": "image file under dataset.root is not listed in dataset.table"}
        for p in sorted(set(on_disk.values()) - used)
    ]
    return paths, unlisted


def _npz_candidates(ds: dict) -> tuple[pd.DataFrame, list[dict], int]:
    path = Path(ds["npz"] or "")
    if not ds["npz"] or not path.is_file():
        raise ConfigError(f"dataset.npz: file {ds['npz']!r} does not exist (format 'npz' needs a MedMNIST .npz)")
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        rows = []
        for split in NPZ_SPLITS:
            if f"{split}_images" not in keys:
                continue
            if f"{split}_labels" not in keys:
                raise ConfigError(f"{path}: has '{split}_images' but no '{split}_labels' (MedMNIST layout expected)")
            labels = archive[f"{split}_labels"]
            labels = labels.reshape(len(labels), -1)
            n = len(labels)
            if ds["task"] == "multilabel":
                names = _npz_names(ds, labels.shape[1], path)
                label_lists = [[names[j] for j in np.flatnonzero(row)] for row in labels]
            else:
                names = _npz_names(ds, int(labels.max()) + 1, path)
                label_lists = [[names[int(row[0])]] for row in labels]
            rows.append(
                pd.DataFrame(
                    {
                        "image_id": [f"{split}/{i:06d}" for i in range(n)],
                        "path": str(path),
                        "labels": label_lists,
                        "patient_id": None,
                        "source_split": split,
                        "npz_index": np.arange(n),
                    }
                )
            )
        if not rows:
            raise ConfigError(
                f"{path}: no '<split>_images' arrays (expected train_images/val_images/test_images); "
                f"found {sorted(keys)}"
            )
    return pd.concat(rows, ignore_index=True), [], 0


def _npz_names(ds: dict, count: int, path: Path) -> list[str]:
    if ds["labels"]:
        if len(ds["labels"]) < count:
            raise ConfigError(f"{path}: labels need {count} class names but dataset.labels has {len(ds['labels'])}")
        return list(ds["labels"])
    return [str(i) for i in range(count)]


def _check_npz(path: str, indices: np.ndarray, source_splits: pd.Series) -> list[ImageCheck]:
    checks = []
    with np.load(path, allow_pickle=False) as archive:
        for split in source_splits.unique():
            images = archive[f"{split}_images"]
            for i in indices[(source_splits == split).to_numpy()]:
                pixels = images[i]
                if pixels.dtype != np.uint8:
                    checks.append(ImageCheck(reason=f"array dtype {pixels.dtype} is not uint8"))
                    continue
                mode = "L" if pixels.ndim == 2 else "RGB"
                print_, signature = signatures(pixels)
                checks.append(
                    ImageCheck(
                        pixels.shape[1],
                        pixels.shape[0],
                        mode,
                        pixels.nbytes,
                        content_hash(pixels),
                        fingerprint=print_,
                        signature=signature,
                    )
                )
    return checks


ADAPTERS = {"folders": _folder_candidates, "csv": _csv_candidates, "npz": _npz_candidates}


# ----------------------------------------------------------------------------- patients
def _patient_regex(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"dataset.patient_regex: {pattern!r} is not a valid regular expression: {exc}") from exc
    return regex


def patient_from_name(names: pd.Series, pattern: str) -> pd.Series:
    """Patient IDs from file names: the named group ``patient``, else group 1, else the match.
    NIH ``00000001_000.png`` with ``^(\\d+)_`` gives ``00000001``; Kermany
    ``person1_bacteria_1.jpeg`` with ``^(person\\d+)_`` gives ``person1``. No match gives None."""
    regex = _patient_regex(pattern)
    group = "patient" if "patient" in regex.groupindex else (1 if regex.groups else 0)

    def one(name: str):
        match = regex.search(name)
        return match.group(group) if match else None

    return names.map(lambda p: one(Path(p).name))


NO_PATIENTS = "none (each image is its own patient)"


def _dicom_patients(cand: pd.DataFrame, checks: list[ImageCheck], source: str, warnings: list[str]) -> str:
    """With neither a patient column nor a regex, DICOM files name their patient (PatientID):
    a folder of DICOM files is split by patient with no table."""
    ids = pd.Series([c.dicom_patient_id for c in checks], index=cand.index)
    if source != NO_PATIENTS or ids.isna().all():
        return source
    cand["patient_id"] = ids.where(ids.notna(), cand["patient_id"])
    warnings[:] = [w for w in warnings if not w.startswith("NO PATIENT IDS")]
    missing = int(ids.isna().sum())
    if missing:
        warnings.append(f"{missing} images have no DICOM PatientID; each of those is its own patient")
    return "DICOM PatientID"


def _resolve_patients(cand: pd.DataFrame, ds: dict, warnings: list[str]) -> str:
    if ds["patient_column"] and cand["patient_id"].notna().all():
        return "column"
    if ds["patient_regex"]:
        found = patient_from_name(cand["image_id"], ds["patient_regex"])
        missing = found.isna()
        if missing.all():
            raise ConfigError(
                f"dataset.patient_regex: {ds['patient_regex']!r} matches none of the {len(cand)} file names, "
                f"e.g. {Path(cand['image_id'].iloc[0]).name!r}"
            )
        if missing.any():
            examples = [Path(p).name for p in cand.loc[missing, "image_id"].head(5)]
            warnings.append(
                f"dataset.patient_regex {ds['patient_regex']!r} does not match {int(missing.sum())} file names "
                f"(e.g. {examples}); each of those images is treated as its own patient"
            )
        cand["patient_id"] = found.where(~missing, "image:" + cand["image_id"])
        return "regex"
    warnings.append(
        "NO PATIENT IDS: neither dataset.patient_column nor dataset.patient_regex gives a patient; "
        "every image is treated as its own patient, so follow-up images of one patient may land in "
        "different sets and cross-validation may be optimistic"
    )
    cand["patient_id"] = "image:" + cand["image_id"]
    return NO_PATIENTS


# ----------------------------------------------------------------------------- labels
def _check_labels(cand: pd.DataFrame, ds: dict, source: str) -> list[str]:
    task = ds["task"]
    if task == "multilabel" and ds["no_finding_label"]:
        nf = ds["no_finding_label"]
        cand["labels"] = [[label for label in labels if label != nf] for labels in cand["labels"]]
    found = Counter(label for labels in cand["labels"] for label in labels)
    if ds["labels"]:
        unknown = sorted(set(found) - set(ds["labels"]))
        if unknown:
            first = unknown[0]
            example = cand.loc[[first in labels for labels in cand["labels"]], "image_id"].iloc[0]
            raise ConfigError(
                f"{source}: label {first!r} (image {example!r}) is not in dataset.labels {list(ds['labels'])}"
                + (f"; {len(unknown) - 1} more unknown labels: {unknown[1:6]}" if len(unknown) > 1 else "")
            )
        classes = list(ds["labels"])
    else:
        classes = sorted(found)
    if task != "multilabel":
        counts = cand["labels"].map(len)
        bad = counts != 1
        if bad.any():
            example = cand.loc[bad].iloc[0]
            raise ConfigError(
                f"{source}: dataset.task is {task!r}, so every image needs exactly one label, but "
                f"{int(bad.sum())} images have another number, e.g. {example['image_id']!r} with "
                f"{list(example['labels'])}"
            )
        if task == "binary" and len(classes) != 2:
            raise ConfigError(f"{source}: dataset.task is 'binary' but there are {len(classes)} classes: {classes}")
    if len(classes) < (1 if task == "multilabel" else 2):
        raise ConfigError(f"{source}: found classes {classes}; a {task} task needs more")
    return classes


# ----------------------------------------------------------------------------- main entry
def build_index(ds: dict, threads: int = 1, pseudonyms: Pseudonyms | None = None) -> tuple[pd.DataFrame, dict]:
    """Return (index table, report). ``ds`` is the validated ``dataset`` config section. With
    ``pseudonyms`` (medfold.privacy), the table carries each image's and patient's shared IDs and
    the report and the log lines show only those; without, the IDs as they are."""
    fmt = ds["format"]
    source = ds["table"] if fmt == "csv" else ds["npz"] if fmt == "npz" else ds["root"]
    if ds["metadata_only"] and fmt != "csv":
        raise ConfigError(
            f"dataset.metadata_only works with dataset.format 'csv' (a table to read without images), not {fmt!r}"
        )
    header_keywords = list(ds.get("dicom_metadata") or [])
    check_header_fields(header_keywords)
    cand, ignored, filtered = ADAPTERS[fmt](ds)
    left_out = {"dataset.filter": filtered}
    header_columns = (
        [] if ds["metadata_only"] or fmt == "npz" else _dicom_header_columns(cand, header_keywords, threads)
    )
    _check_metadata_columns(cand, ds, fmt)
    if ds["filter"] and fmt != "csv":  # the table's own columns are filtered in the csv adapter
        view = cand.assign(label=[labels[0] if labels else "" for labels in cand["labels"]])
        for column in header_columns:  # DICOM fields by their keyword, ages as numbers
            values = cand[f"meta:{column}"]
            view[column] = values.map(number_or_age) if column == "PatientAge" else values
        kept, left_out["dataset.filter"] = apply_filter(view, ds["filter"], str(ds["root"] or ds["npz"]))
        cand = cand.loc[kept.index].reset_index(drop=True)
    cand, label_mapping = map_labels(cand, ds)
    if label_mapping.get("images_left_without_a_class"):
        left_out["no class after dataset.label_map"] = label_mapping["images_left_without_a_class"]
    if cand.empty:
        raise ConfigError(
            f"{source}: no images found (dataset.format {fmt!r}, extensions {list(ds['image_extensions'])})"
        )
    if "npz_index" not in cand:
        cand["npz_index"] = None
    cand, repeated = _merge_repeated_rows(cand, source, ds)
    if repeated:
        log.warning(
            "%d files are listed more than once in %s; each is one image, its patients joined (index_report.json)",
            len(repeated),
            source,
        )
    warnings: list[str] = []
    patient_source = _resolve_patients(cand, ds, warnings)
    pseudonyms = pseudonyms or Pseudonyms(None)
    cand, left_out["dataset.exclude_images"], unmatched = _exclude_listed(cand, ds.get("exclude_images"), pseudonyms)
    if unmatched:
        warnings.append(f"dataset.exclude_images: {unmatched} listed IDs match no image of this dataset")
    classes = _check_labels(cand, ds, str(source))

    if ds["metadata_only"]:
        # no files to open: sizes come from the table when it has them (NIH does)
        checks = [ImageCheck(width=w, height=h) for w, h in zip(cand.pop("meta_width"), cand.pop("meta_height"))]
    elif fmt == "npz":
        checks = _check_npz(ds["npz"], cand["npz_index"].to_numpy(), cand["source_split"])
    else:
        with Progress(f"index {ds['name']}", len(cand)) as progress:
            checks = check_images(cand["path"].tolist(), threads, progress)
    cand["present"] = not ds["metadata_only"]
    for field in ("width", "height", "mode", "file_bytes", "content_hash", "fingerprint", "study_uid", "series_uid"):
        cand[field] = [getattr(c, field) for c in checks]
    patient_source = _dicom_patients(cand, checks, patient_source, warnings)
    cand = pseudonyms.with_shared_ids(cand)
    scrub = index_scrubber(cand)  # every candidate's IDs, the skipped ones' too
    with scrubbed_logs(scrub):
        table, report = _finish(cand, checks, ds, threads, classes, patient_source, warnings, ignored, source)
    report["listed_more_than_once"] = repeated
    report["exclude_images_unmatched"] = unmatched
    report["rows_left_out"] = {k: int(v) for k, v in left_out.items() if v}
    report["label_map"] = label_mapping
    report["identifiers"] = "raw" if pseudonyms.raw else "pseudonymized"
    return table, scrub.record(report)


def read_id_list(path) -> list[str]:
    """Image IDs from a file: one per line (``#`` comments), or a CSV's image_id column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"dataset.exclude_images {path}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if lines and "image_id" in lines[0].split(","):
        return pd.read_csv(path, comment=None)["image_id"].astype(str).str.strip().tolist()
    return lines


def _exclude_listed(cand: pd.DataFrame, path, pseudonyms: Pseudonyms) -> tuple[pd.DataFrame, int, int]:
    """``cand`` without the images ``dataset.exclude_images`` lists (by raw ID or pseudonym),
    before any is decoded; how many went and how many listed IDs matched nothing."""
    if not path:
        return cand, 0, 0
    listed = set(read_id_list(path))
    raw = cand["image_id"].astype(str)
    shared = raw.map(pseudonyms.image).astype(str)
    drop = raw.isin(listed) | shared.isin(listed)
    unmatched = len(listed - set(raw[drop]) - set(shared[drop]))
    log.info("dataset.exclude_images: %d images left out (%d listed IDs match none)", int(drop.sum()), unmatched)
    return cand.loc[~drop].reset_index(drop=True), int(drop.sum()), unmatched


def _finish(cand, checks, ds, threads, classes, patient_source, warnings, ignored, source) -> tuple[pd.DataFrame, dict]:
    """The decoded candidates into the table (the unusable ones listed), near-duplicates, report."""
    reasons = pd.Series([c.reason for c in checks], index=cand.index)
    bad = reasons.notna()
    skipped = [
        {"image_id": i, "path": p, "reason": r}
        for i, p, r in zip(cand.loc[bad, "image_id"], cand.loc[bad, "path"], reasons[bad])
    ]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    table = cand.loc[~bad].reset_index(drop=True)
    kept_signatures = [c.signature for c, is_bad in zip(checks, bad.to_numpy()) if not is_bad]
    if table.empty:
        raise ConfigError(
            f"{source}: all {len(cand)} images were unreadable; first: {skipped[0]['path']}: {skipped[0]['reason']}"
        )
    near = _near_duplicates(table, ds, kept_signatures, threads)
    for message in warnings:
        log.warning(message)
    # through the Arrow schema: a wrong type fails here, not in a later rule
    table = _frame(_arrow(with_defaults(table)))
    report = _report(table, ds, classes, patient_source, skipped, ignored, warnings, len(cand))
    report["near_duplicates"] = near
    return table, report


PROCESS_MIN_IMAGES = 256  # fewer images are checked in this process: forking costs more than it gives


def _one_blas_thread() -> None:
    """A worker's BLAS runs serially: the processes are the parallelism (two forked workers each
    running OpenBLAS's threads indexed 175 images/s on 2 cores, serial BLAS 763)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def check_images(paths: list[str], threads: int, progress: Progress | None = None) -> list[ImageCheck]:
    """``check_image`` of each path, in order. With several threads, in that many forked worker
    processes: decoding releases the interpreter lock but the signatures' many small NumPy and
    OpenCV calls do not, so threads ran slower than one (Kermany, 2 threads: 279 images/s
    against 344); processes scale as the decoder does. Each image's result does not depend on
    the process that computed it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    forked = threads > 1 and len(paths) >= PROCESS_MIN_IMAGES
    fork = multiprocessing.get_context("fork")
    with (
        ProcessPoolExecutor(threads, mp_context=fork, initializer=_one_blas_thread)
        if forked
        else contextlib.nullcontext()
    ) as pool:
        results = pool.map(check_image, paths, chunksize=16) if forked else map(check_image, paths)
        return list(tracked(results, progress) if progress is not None else results)


def _dicom_header_columns(cand: pd.DataFrame, keywords: list[str], threads: int) -> list[str]:
    """``meta:<keyword>`` columns from the header of each DICOM file among the candidates (read
    before dataset.filter, which can select on them); a column the dataset's table already
    carries is kept as the table has it. Returns the keywords added."""
    if not keywords or cand.empty:
        return []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        fields = list(pool.map(lambda path: read_header_fields(path, keywords), cand["path"], chunksize=64))
    if all(f is None for f in fields):
        return []
    added = [k for k in keywords if f"meta:{k}" not in cand]
    for keyword in added:
        cand[f"meta:{keyword}"] = [None if f is None else f[keyword] for f in fields]
    return added


def _check_metadata_columns(cand: pd.DataFrame, ds: dict, fmt: str) -> None:
    """Every column evaluation.subgroups (or dataset.metadata_columns) names must be carried."""
    missing = [c for c in ds.get("metadata_columns") or [] if f"meta:{c}" not in cand]
    if missing:
        carried = sorted(c[5:] for c in cand.columns if c.startswith("meta:"))
        raise ConfigError(
            f"dataset.metadata_columns (or evaluation.subgroups) {missing}: not carried into the index; metadata "
            f"comes from dataset.table's columns (format 'csv') or DICOM headers (dataset.dicom_metadata), and "
            f"this {fmt!r} dataset carries {carried or 'none'}"
        )


def _near_duplicates(table: pd.DataFrame, ds: dict, signatures: list, threads: int = 1) -> dict:
    """Fill ``near_duplicate_cluster`` and describe each cluster for the report: its images,
    their patients and source splits, and its accepted pairs with kind, verification score,
    fingerprint distance and orientation (medfold.matching); ``pair_list`` holds every accepted
    pair for check_split, ``closest_rejected`` the best-scoring pairs that were not accepted."""
    from . import matching

    settings = ds["near_duplicates"]
    table["near_duplicate_cluster"] = pd.array([None] * len(table), dtype="Int64")
    has = table["fingerprint"].notna().to_numpy() & np.array([s is not None for s in signatures], bool)
    if not settings["enabled"] or has.sum() < 2:
        why = (
            "dataset.near_duplicates.enabled is false"
            if not settings["enabled"]
            else "no fingerprints (images not opened)"
        )
        return {"searched": False, "why": why, "max_distance": settings["max_distance"]}
    rows = np.flatnonzero(has)
    typed = matching.MatchSettings.from_config(settings)
    start = time.perf_counter()
    found, stats = matching.find_copies(
        fp.hex_to_bits(table["fingerprint"].to_numpy()[rows]),
        [signatures[i] for i in rows],
        table["content_hash"].to_numpy()[rows],
        _text(table["patient_id"])[rows],
        typed,
        threads,
    )
    seconds = time.perf_counter() - start
    found["a"], found["b"] = rows[found["a"]], rows[found["b"]]
    pairs = found[found["accepted"]].reset_index(drop=True)
    component = fp.clusters(len(table), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    sizes = np.bincount(component)
    in_cluster = sizes[component] > 1
    # clusters numbered by their first image in image_id order, as split groups are
    order = np.argsort(table["image_id"].to_numpy(), kind="stable")
    first_seen = list(dict.fromkeys(component[order][in_cluster[order]].tolist()))
    number = {c: i for i, c in enumerate(first_seen)}
    table.loc[in_cluster, "near_duplicate_cluster"] = [number[c] for c in component[in_cluster]]
    ids = table["image_id"].to_numpy()
    listed = [_pair_record(ids, p) for p in pairs.itertuples(index=False)]
    # members and pairs grouped by cluster once (a scan per cluster was O(clusters x images))
    clustered = order[in_cluster[order]]  # rows in image_id order
    members_of = pd.Series(clustered).groupby(component[clustered]).agg(list)
    edges_of = pd.Series(range(len(pairs))).groupby(component[pairs["a"].to_numpy()]).agg(list) if len(pairs) else {}
    described = []
    for c in first_seen:
        members = members_of[c]
        described.append(
            {
                "cluster": number[c],
                "images": table["image_id"].iloc[members].tolist(),
                "patients": sorted(set(table["patient_id"].iloc[members])),
                "source_splits": sorted({str(s) for s in table["source_split"].iloc[members] if s is not None}),
                "pairs": [listed[i] for i in edges_of[c]],
            }
        )
    joining = [c for c in described if len(c["patients"]) > 1 or len(c["source_splits"]) > 1]
    rejected = found[~found["accepted"]].sort_values(["score", "a", "b"], ascending=[False, True, True]).head(20)
    log.info(
        "near-duplicates: %d candidate pairs, %d verified, %d accepted in %d clusters (%d join patients or "
        "source splits) among %d images, %.2f s",
        stats["candidates"],
        stats["verified"],
        len(pairs),
        len(described),
        len(joining),
        len(rows),
        seconds,
    )
    return {
        "searched": True,
        "max_distance": settings["max_distance"],
        "fingerprint_bits": fp.BITS,
        "neighbours": typed.neighbours,
        "min_score": typed.min_score,
        "early_score": typed.early_score,
        "seconds": round(seconds, 3),
        "stages": stats,
        "pairs": int(len(pairs)),
        "kinds": {k: int(v) for k, v in pairs["kind"].value_counts().sort_index().items()},
        "clusters": len(described),
        "images": int(in_cluster.sum()),
        "clusters_joining_patients_or_sources": len(joining),
        "distances": {str(k): int(v) for k, v in pairs["distance"].value_counts().sort_index().items()},
        # the ones that change the split first; clusters within one patient after them
        "cluster_list": (joining + [c for c in described if c not in joining])[:500],
        "pair_list": listed,
        "closest_rejected": [_pair_record(ids, p) for p in rejected.itertuples(index=False)],
    }


def _text(column: pd.Series) -> np.ndarray:
    """A column as plain strings, missing values as '' (so that two missing values are equal)."""
    return np.array(["" if pd.isna(v) else str(v) for v in column], dtype=object)


def _pair_record(ids: np.ndarray, p) -> dict:
    """One verified pair as the report and check_split read it."""
    from .fingerprint import ORIENTATION_NAMES

    return {
        "a": str(ids[p.a]),
        "b": str(ids[p.b]),
        "kind": p.kind,
        "score": round(float(p.score), 4),
        "distance": int(p.distance),
        "how": ORIENTATION_NAMES[int(p.orientation)],
        "exact": p.kind == "exact copy",
        "similarity": float(p.similarity),
        "registration": {
            "shift_x": round(float(p.shift_x), 4),
            "shift_y": round(float(p.shift_y), 4),
            "scale_x": round(float(p.scale_x), 4),
            "scale_y": round(float(p.scale_y), 4),
            "rotation_degrees": round(float(p.rotation), 2),
            "overlap": round(float(p.overlap), 3),
        },
    }


def _report(table, ds, classes, patient_source, skipped, ignored, warnings, candidates) -> dict:
    dup_groups = (
        table[table["content_hash"].notna() & table["content_hash"].duplicated(keep=False)]
        .groupby("content_hash")["image_id"]
        .apply(sorted)
    )
    per_class = Counter(label for labels in table["labels"] for label in labels)
    unlabeled = int((table["labels"].map(len) == 0).sum())
    return {
        "dataset": ds["name"],
        "format": ds["format"],
        "task": ds["task"],
        "classes": classes,
        "images_listed": int(candidates),
        "images_indexed": int(len(table)),
        "images_skipped": len(skipped),
        "skipped": skipped,
        "ignored_files": ignored,
        "patients": int(table["patient_id"].nunique()),
        "patient_id_source": patient_source,
        "images_per_class": {c: int(per_class.get(c, 0)) for c in classes},
        "images_without_finding": unlabeled,
        "source_splits": {
            str(k): int(v) for k, v in table["source_split"].value_counts(dropna=False).sort_index().items()
        },
        "duplicates": {
            "groups": int(len(dup_groups)),
            "images": int(sum(len(g) for g in dup_groups)),
            "examples": [list(g) for g in dup_groups.head(20)],
        },
        "modes": {str(k): int(v) for k, v in table["mode"].value_counts(dropna=False).items()},
        "metadata_only": bool(ds["metadata_only"]),
        "warnings": warnings,
    }


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
    # shared IDs: the raw ones (a table made without medfold.privacy shares them as they are)
    if "shared_image_id" not in table:
        table["shared_image_id"] = table["image_id"]
    if "shared_patient_id" not in table:
        table["shared_patient_id"] = table["patient_id"]
    if "shared_patient_aliases" not in table:
        table["shared_patient_aliases"] = [list(a) for a in table["patient_aliases"]]
    return table


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
