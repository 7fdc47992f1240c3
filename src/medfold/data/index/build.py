"""``build_index``: candidates, patients and labels checked, every image opened and checked (in
parallel for many), metadata columns, near-duplicates, and the index report."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from medfold.core.errors import ConfigError
from medfold.core.privacy import Pseudonyms, index_scrubber, scrubbed_logs
from medfold.core.progress import Progress, tracked
from medfold.data.dicom import check_header_fields, number_or_age, read_header_fields
from medfold.data.images import ImageCheck, check_image
from medfold.data.index.adapters import ADAPTERS, _check_npz, _merge_repeated_rows, apply_filter, map_labels
from medfold.data.index.duplicates import _near_duplicates
from medfold.data.index.io import _arrow, _frame, with_defaults
from medfold.data.index.labels import _check_labels
from medfold.data.index.patients import _dicom_patients, _resolve_patients
from medfold.settings.sections import DatasetSettings

log = logging.getLogger("medfold.data.index")


def _filtered(cand: pd.DataFrame, dataset: DatasetSettings, header_columns: list) -> tuple[pd.DataFrame, int]:
    """dataset.filter over a folder's or an npz's candidates: their label, image_id and source
    split, and the DICOM fields read (by keyword, ages as numbers). Returns the rows kept and how
    many were left out."""
    view = cand.assign(label=[labels[0] if labels else "" for labels in cand["labels"]])
    for column in header_columns:
        values = cand[f"meta:{column}"]
        view[column] = values.map(number_or_age) if column == "PatientAge" else values
    kept, left_out = apply_filter(view, dataset.filter, str(dataset.root or dataset.npz))
    return cand.loc[kept.index].reset_index(drop=True), left_out


def _opened(cand: pd.DataFrame, dataset: DatasetSettings, threads: int) -> list:
    """Every candidate opened and checked (an npz's arrays, or each file; a metadata-only table's
    sizes from its columns, nothing opened); their sizes, hashes and fingerprints into ``cand``."""
    if dataset.metadata_only:
        # no files to open: sizes come from the table when it has them (NIH does)
        checks = [ImageCheck(width=w, height=h) for w, h in zip(cand.pop("meta_width"), cand.pop("meta_height"))]
    elif dataset.format == "npz":
        checks = _check_npz(dataset.npz, cand["npz_index"].to_numpy(), cand["source_split"])
    else:
        with Progress(f"index {dataset.name}", len(cand)) as progress:
            checks = check_images(cand["path"].tolist(), threads, progress)
    cand["present"] = not dataset.metadata_only
    for field in ("width", "height", "mode", "file_bytes", "content_hash", "fingerprint", "study_uid", "series_uid"):
        cand[field] = [getattr(c, field) for c in checks]
    return checks


def build_index(
    dataset: DatasetSettings | dict, threads: int = 1, pseudonyms: Pseudonyms | None = None
) -> tuple[pd.DataFrame, dict]:
    """Return (index table, report). ``dataset``: the ``dataset`` settings (or the section's dict).
    With ``pseudonyms`` (medfold.core.privacy), the table carries each image's and patient's shared IDs
    and the report and the log lines show only those; without, the IDs as they are."""
    dataset = DatasetSettings.of(dataset)
    fmt = dataset.format
    source = dataset.source
    if dataset.metadata_only and fmt != "csv":
        raise ConfigError(
            f"dataset.metadata_only works with dataset.format 'csv' (a table to read without images), not {fmt!r}"
        )
    header_keywords = list(dataset.dicom_metadata or [])
    check_header_fields(header_keywords)
    cand, ignored, filtered = ADAPTERS[fmt](dataset)
    left_out = {"dataset.filter": filtered}
    header_columns = (
        [] if dataset.metadata_only or fmt == "npz" else _dicom_header_columns(cand, header_keywords, threads)
    )
    _check_metadata_columns(cand, dataset, fmt)
    if dataset.filter and fmt != "csv":  # the table's own columns are filtered in the csv adapter
        cand, left_out["dataset.filter"] = _filtered(cand, dataset, header_columns)
    cand, label_mapping = map_labels(cand, dataset)
    if label_mapping.get("images_left_without_a_class"):
        left_out["no class after dataset.label_map"] = label_mapping["images_left_without_a_class"]
    if cand.empty:
        raise ConfigError(
            f"{source}: no images found (dataset.format {fmt!r}, extensions {list(dataset.image_extensions)})"
        )
    if "npz_index" not in cand:
        cand["npz_index"] = None
    cand, repeated = _merge_repeated_rows(cand, source, dataset)
    if repeated:
        joined = "each is one image, its patients joined (index_report.json)"
        log.warning("%d files are listed more than once in %s; %s", len(repeated), source, joined)
    warnings: list[str] = []
    patient_source = _resolve_patients(cand, dataset, warnings)
    pseudonyms = pseudonyms or Pseudonyms(None)
    cand, left_out["dataset.exclude_images"], unmatched = _exclude_listed(cand, dataset.exclude_images, pseudonyms)
    if unmatched:
        warnings.append(f"dataset.exclude_images: {unmatched} listed IDs match no image of this dataset")
    classes = _check_labels(cand, dataset, str(source))

    checks = _opened(cand, dataset, threads)
    patient_source = _dicom_patients(cand, checks, patient_source, warnings)
    cand = pseudonyms.with_shared_ids(cand)
    scrub = index_scrubber(cand)  # every candidate's IDs, the skipped ones' too
    with scrubbed_logs(scrub):
        table, report = _finish(cand, checks, dataset, threads, classes, patient_source, warnings, ignored, source)
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


def _finish(
    cand, checks, dataset, threads, classes, patient_source, warnings, ignored, source
) -> tuple[pd.DataFrame, dict]:
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
    near = _near_duplicates(table, dataset, kept_signatures, threads)
    for message in warnings:
        log.warning(message)
    # through the Arrow schema: a wrong type fails here, not in a later rule
    table = _frame(_arrow(with_defaults(table)))
    report = _report(table, dataset, classes, patient_source, skipped, ignored, warnings, len(cand))
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
    the process that computed it: BLAS runs on one thread in this process too, since the area
    average's float32 product rounds differently under OpenBLAS's threaded kernels (on an AMD
    EPYC, 6 of the demo's 482 descriptors differed by one unit between the two paths)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from threadpoolctl import threadpool_limits

    forked = threads > 1 and len(paths) >= PROCESS_MIN_IMAGES
    fork = multiprocessing.get_context("fork")
    with (
        ProcessPoolExecutor(threads, mp_context=fork, initializer=_one_blas_thread) if forked else threadpool_limits(1)
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


def _check_metadata_columns(cand: pd.DataFrame, dataset: DatasetSettings, fmt: str) -> None:
    """Every column evaluation.subgroups (or dataset.metadata_columns) names must be carried."""
    missing = [c for c in dataset.metadata_columns or [] if f"meta:{c}" not in cand]
    if missing:
        carried = sorted(c[5:] for c in cand.columns if c.startswith("meta:"))
        raise ConfigError(
            f"dataset.metadata_columns (or evaluation.subgroups) {missing}: not carried into the index; metadata "
            f"comes from dataset.table's columns (format 'csv') or DICOM headers (dataset.dicom_metadata), and "
            f"this {fmt!r} dataset carries {carried or 'none'}"
        )


def _report(table, dataset, classes, patient_source, skipped, ignored, warnings, candidates) -> dict:
    dup_groups = (
        table[table["content_hash"].notna() & table["content_hash"].duplicated(keep=False)]
        .groupby("content_hash")["image_id"]
        .apply(sorted)
    )
    per_class = Counter(label for labels in table["labels"] for label in labels)
    unlabeled = int((table["labels"].map(len) == 0).sum())
    return {
        "dataset": dataset.name,
        "format": dataset.format,
        "task": dataset.task,
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
        "metadata_only": bool(dataset.metadata_only),
        "warnings": warnings,
    }
