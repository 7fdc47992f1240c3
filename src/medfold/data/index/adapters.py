"""The dataset adapters of the index: a folder per class, a CSV table, a MedMNIST ``.npz``; each
turns its source into candidate rows (image, path, labels, source split), refusing what it
cannot read with the file and the key named."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from medfold.core.errors import ConfigError
from medfold.data.dicom import looks_like_dicom
from medfold.data.images import ImageCheck, content_hash, signatures
from medfold.data.index._constants import NPZ_SPLITS
from medfold.settings.sections import DatasetSettings

log = logging.getLogger("medfold.data.index")


# ----------------------------------------------------------------------------- adapters
def _folder_candidates(dataset: DatasetSettings) -> tuple[pd.DataFrame, list[dict], int]:
    """root/[split dirs...]/<class>/<file>: the parent folder is the class, folders above it
    (``train``, ``Fold3/valid``...) are the dataset's own split."""
    if not dataset.root:
        raise ConfigError("dataset.root: not set; format 'folders' needs the folder holding the class folders")
    root = Path(dataset.root)
    if not root.is_dir():
        raise ConfigError(
            f"dataset.root: folder {root} does not exist (format 'folders' needs the class folders' parent)"
        )
    extensions = tuple(e.lower() for e in dataset.image_extensions)
    exclude = set(dataset.exclude_folders)
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
            top = dataset.class_folder == "top"
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


class _Columns:
    """A CSV table's columns, each checked to exist when a dataset key names it."""

    def __init__(self, table: Path, frame: pd.DataFrame):
        self.table, self.frame = table, frame

    def need(self, key: str, column: str | None) -> None:
        if column and column not in self.frame.columns:
            raise ConfigError(
                f"{self.table}: column {column!r} (dataset.{key}) not found; the table has columns "
                f"{list(self.frame.columns)}"
            )


def _read_csv_table(dataset: DatasetSettings) -> tuple[Path, pd.DataFrame, int]:
    """The table (its columns stripped) with the rows dataset.filter selects, and how many it left out."""
    table = Path(dataset.table or "")
    if not dataset.table or not table.is_file():
        raise ConfigError(f"dataset.table: CSV file {dataset.table!r} does not exist (format 'csv' needs it)")
    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False, compression="infer")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{table}: cannot be read as CSV: {exc}") from exc
    frame.columns = [c.strip() for c in frame.columns]
    frame, left_out = apply_filter(frame, dataset.filter, str(table))
    if not dataset.path_column:
        raise ConfigError(
            f"dataset.path_column: format 'csv' needs the column naming each image; {table} has columns "
            f"{list(frame.columns)}"
        )
    if not dataset.label_columns and not dataset.label_column:
        raise ConfigError(
            f"dataset.label_column (or dataset.label_columns): format 'csv' needs the labels; {table} has "
            f"columns {list(frame.columns)}"
        )
    return table, frame, left_out


def _csv_labels(columns: _Columns, dataset: DatasetSettings) -> list[list[str]]:
    """Each row's labels: from one-hot columns, or one column split at dataset.label_separator."""
    frame = columns.frame
    if dataset.label_columns:
        for column in dataset.label_columns:
            columns.need("label_columns", column)
        onehot = frame[dataset.label_columns].apply(lambda col: col.str.strip().isin(["1", "1.0", "True", "true"]))
        names = np.array(dataset.label_columns, dtype=object)
        return [list(names[row]) for row in onehot.to_numpy()]
    columns.need("label_column", dataset.label_column)
    raw = frame[dataset.label_column].str.strip()
    sep = dataset.label_separator
    labels = [[part.strip() for part in value.split(sep)] if sep else [value] for value in raw]
    return [[part for part in parts if part] for parts in labels]


def _csv_source_split(frame: pd.DataFrame, image_ids: pd.Series, dataset: DatasetSettings):
    if dataset.source_split_lists:
        if dataset.source_split_column:
            raise ConfigError(
                "dataset.source_split_lists and dataset.source_split_column both give the source split; keep one"
            )
        return _split_from_lists(image_ids, dataset.source_split_lists)
    return frame[dataset.source_split_column].str.strip() if dataset.source_split_column else None


def _csv_candidates(dataset: DatasetSettings) -> tuple[pd.DataFrame, list[dict], int]:
    """The table's rows (those dataset.filter selects: how many it left out is returned too)."""
    table, frame, left_out = _read_csv_table(dataset)
    columns = _Columns(table, frame)
    columns.need("path_column", dataset.path_column)
    columns.need("patient_column", dataset.patient_column)
    columns.need("source_split_column", dataset.source_split_column)
    labels = _csv_labels(columns, dataset)
    image_ids = frame[dataset.path_column].str.strip()
    root = Path(dataset.root) if dataset.root else table.parent
    source_split = _csv_source_split(frame, image_ids, dataset)
    if dataset.metadata_only:
        paths = [str(root / i) for i in image_ids]
        unlisted: list[dict] = []
    else:
        paths, unlisted = _locate(root, image_ids, dataset)
    inside = _inside_root(root, paths, dataset.allow_outside_root)
    out = pd.DataFrame(
        {
            "image_id": image_ids,
            "path": paths,
            "labels": labels,
            "patient_id": frame[dataset.patient_column].str.strip() if dataset.patient_column else None,
            "source_split": source_split,
            "_line": frame.index.to_numpy() + 2,  # the CSV's own line (header on line 1), kept through dataset.filter
        }
    )
    refused = [
        {"path": p, "reason": f"line {line}: path leaves dataset.root {str(root)!r} (set dataset.allow_outside_root)"}
        for p, line, ok in zip(out["path"], out["_line"], inside)
        if not ok
    ]
    out = out[inside].reset_index(drop=True)
    _csv_metadata(out, _Columns(table, frame[inside]), dataset)
    return out, unlisted + refused, left_out


def _csv_metadata(out: pd.DataFrame, columns: _Columns, dataset: DatasetSettings) -> None:
    """The metadata columns (and, for a metadata-only table, each image's size) into ``out``;
    a patient column must name a patient on every row."""
    frame = columns.frame
    for column in dataset.metadata_columns or []:
        if column in (dataset.dicom_metadata or []) and column not in frame.columns:
            continue  # read from the images' DICOM headers
        columns.need("metadata_columns (or evaluation.subgroups)", column)
        out[f"meta:{column}"] = frame[column].str.strip().to_numpy()
    if dataset.metadata_only:
        for key, column in (
            ("meta_width", dataset.metadata_width_column),
            ("meta_height", dataset.metadata_height_column),
        ):
            columns.need(key.replace("meta_", "metadata_") + "_column", column)
            out[key] = pd.to_numeric(frame[column], errors="coerce").astype("Int64").to_numpy() if column else None
    if dataset.patient_column:
        empty = out["patient_id"] == ""
        if empty.any():
            raise ConfigError(
                f"{columns.table}: column {dataset.patient_column!r} (dataset.patient_column) is empty for "
                f"{int(empty.sum())} rows, e.g. {out.loc[empty, 'image_id'].iloc[0]!r}"
            )


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


def map_labels(cand: pd.DataFrame, dataset: DatasetSettings) -> tuple[pd.DataFrame, dict]:
    """Raw labels to classes through dataset.label_map (see its description); returns the
    candidates (single-label rows left with no class removed) and what was mapped and dropped."""
    mapping, other = dataset.label_map, dataset.unmapped_label
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
    if dataset.task != "multilabel":
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


def _merge_repeated_rows(out: pd.DataFrame, table, dataset: DatasetSettings) -> tuple[pd.DataFrame, list[dict]]:
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
        if len(set(map(frozenset, label_sets))) > 1 and dataset.task != "multilabel":
            raise ConfigError(
                f"{table}: {image_id!r} is listed on lines {lines} with different labels "
                f"{[list(labels) for labels in label_sets]} (dataset.task {dataset.task!r} needs one label per image; "
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


def _locate(root: Path, image_ids: pd.Series, dataset: DatasetSettings) -> tuple[list[str], list[dict]]:
    """Paths of the listed images; with ``recursive_lookup`` (NIH ships them in images_001..012/)
    they are found by file name anywhere under root. Image files under root that the table does
    not list are reported, not indexed."""
    if not root.is_dir():
        raise ConfigError(f"dataset.root: folder {root} does not exist (the CSV's paths are relative to it)")
    on_disk = {}
    extensions = tuple(e.lower() for e in dataset.image_extensions)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(extensions):
                full = Path(dirpath) / name
                on_disk[full.relative_to(root).as_posix()] = full
    by_name = {}
    if dataset.recursive_lookup:
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


def _npz_candidates(dataset: DatasetSettings) -> tuple[pd.DataFrame, list[dict], int]:
    path = Path(dataset.npz or "")
    if not dataset.npz or not path.is_file():
        raise ConfigError(f"dataset.npz: file {dataset.npz!r} does not exist (format 'npz' needs a MedMNIST .npz)")
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
            if dataset.task == "multilabel":
                names = _npz_names(dataset, labels.shape[1], path)
                label_lists = [[names[j] for j in np.flatnonzero(row)] for row in labels]
            else:
                names = _npz_names(dataset, int(labels.max()) + 1, path)
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


def _npz_names(dataset: DatasetSettings, count: int, path: Path) -> list[str]:
    if dataset.labels:
        if len(dataset.labels) < count:
            raise ConfigError(f"{path}: labels need {count} class names but dataset.labels has {len(dataset.labels)}")
        return list(dataset.labels)
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
