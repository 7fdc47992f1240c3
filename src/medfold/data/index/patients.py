"""Patients of the index: from a column, from file names (a pattern), from DICOM headers, or none."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from medfold.core.errors import ConfigError
from medfold.data.images import ImageCheck
from medfold.settings.sections import DatasetSettings


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


def _resolve_patients(cand: pd.DataFrame, dataset: DatasetSettings, warnings: list[str]) -> str:
    if dataset.patient_column and cand["patient_id"].notna().all():
        return "column"
    if dataset.patient_regex:
        found = patient_from_name(cand["image_id"], dataset.patient_regex)
        missing = found.isna()
        if missing.all():
            raise ConfigError(
                f"dataset.patient_regex: {dataset.patient_regex!r} matches none of the {len(cand)} file names, "
                f"e.g. {Path(cand['image_id'].iloc[0]).name!r}"
            )
        if missing.any():
            examples = [Path(p).name for p in cand.loc[missing, "image_id"].head(5)]
            warnings.append(
                f"dataset.patient_regex {dataset.patient_regex!r} does not match {int(missing.sum())} file names "
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
