"""Patient identifiers kept out of what leaves the machine.

A DICOM PatientID is usually the hospital's medical record number, and exports often name files
by it. With ``privacy.identifiers: pseudonymized`` (the default) every output meant to be shared
(the report, predictions, clinical and per-fold tables, the index and split reports, logs) shows
instead:

* a patient as ``P`` and 12 hex digits of HMAC-SHA256 of its ID, keyed with a secret generated
  once per results folder and kept in it (``privacy.key``): the same patient always gets the
  same pseudonym there, and nobody without the key can test a guessed record number against it;
* an image as ``I`` and 12 hex digits of the keyed hash of its ID, with the file's extension
  (directory and file names can carry identifiers).

``index.parquet`` and ``splits.parquet`` keep the raw IDs for the workflow itself (beside their
pseudonyms, ``shared_image_id`` and ``shared_patient_id``, so that a person holding the results
folder can find an image the report names). ``identifiers: raw`` shows the IDs as they are (a
public, already de-identified collection).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path, PurePosixPath

import pandas as pd

KEY_FILE = "privacy.key"
MODES = ("pseudonymized", "raw")
_SEPARATORS = re.compile(r"""([\s'",;:\[\](){}=|]+)""")
_NUMBER = re.compile(r"[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?%?")


def results_key(results: Path) -> bytes:
    """The results folder's secret, created on first use (atomically: concurrent jobs that race
    here all read the one key that won)."""
    path = Path(results) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(draft, path)  # fails if another job made the key first: theirs is kept
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return bytes.fromhex(path.read_text().strip())


class Pseudonyms:
    """Shared forms of patient and image IDs: keyed pseudonyms, or the IDs as they are (``key`` None)."""

    def __init__(self, key: bytes | None):
        self.key = key

    @classmethod
    def for_results(cls, results: Path, mode: str) -> Pseudonyms:
        if mode not in MODES:
            raise ValueError(f"privacy.identifiers: {mode!r} is not one of {list(MODES)}")
        return cls(results_key(results) if mode == "pseudonymized" else None)

    @property
    def raw(self) -> bool:
        return self.key is None

    def _digest(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:12]

    def patient(self, patient_id) -> str | None:
        if patient_id is None or (isinstance(patient_id, float) and pd.isna(patient_id)) or self.raw:
            return patient_id
        return "P" + self._digest("patient", str(patient_id))

    def image(self, image_id) -> str | None:
        if image_id is None or self.raw:
            return image_id
        suffix = PurePosixPath(str(image_id)).suffix.lower()
        return "I" + self._digest("image", str(image_id)) + (suffix if re.fullmatch(r"\.[a-z0-9]{1,6}", suffix) else "")

    def with_shared_ids(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with ``shared_image_id``, ``shared_patient_id`` and ``shared_patient_aliases``."""
        return table.assign(
            shared_image_id=[self.image(i) for i in table["image_id"]],
            shared_patient_id=[self.patient(p) for p in table["patient_id"]],
            shared_patient_aliases=[[self.patient(p) for p in aliases] for aliases in table["patient_aliases"]],
        )


def shareable_view(index: pd.DataFrame) -> pd.DataFrame:
    """The index as outputs meant to be shared see it: image_id, patient_id and patient_aliases
    are the shared forms, file paths are gone. Row order is kept (caches are by row)."""
    if "shared_image_id" not in index:
        return index
    out = index.assign(image_id=index["shared_image_id"], patient_id=index["shared_patient_id"])
    out["path"] = out["image_id"]
    if "shared_patient_aliases" in out:
        out["patient_aliases"] = out["shared_patient_aliases"]
    return out


def shared_splits(index: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """splits.parquet with the shared IDs of ``index`` in place of the raw ones."""
    if "shared_image_id" not in index:
        return splits
    images = dict(zip(index["image_id"], index["shared_image_id"]))
    patients = dict(zip(index["patient_id"], index["shared_patient_id"]))
    out = splits.assign(image_id=splits["image_id"].map(images).fillna(splits["image_id"]))
    if "patient_id" in out:
        out["patient_id"] = splits["patient_id"].map(patients).fillna(splits["patient_id"])
    return out


class Scrubber:
    """Replaces raw IDs in text and JSON-like records.

    * A whole string value that is an image ID, a path or a patient (``mapping``) is replaced,
      however short: a record's lists of patients and images.
    * Inside free text (log lines, messages, dictionary keys), a token found in ``mapping``, and a
      raw patient ID still inside a token (a file name carrying a record number), are replaced
      when they can identify: not a plain number of under MIN_NUMBER digits ("fold 2", "20
      epochs", "1,204 images/s" stay as they are, while a 7-digit record number does not)."""

    MIN_NUMBER = 6

    def __init__(self, mapping: dict[str, str], patients: dict[str, str] | None = None):
        self.mapping = mapping
        self.patients = {p: shared for p, shared in (patients or {}).items() if self._identifying(p, 4)}
        # longest first, so that a record number that contains another is replaced whole
        self.lengths = sorted({len(p) for p in self.patients}, reverse=True)

    @classmethod
    def _identifying(cls, token: str, shortest: int = 1) -> bool:
        if _NUMBER.fullmatch(token):
            return sum(c.isdigit() for c in token) >= cls.MIN_NUMBER
        return len(token) >= shortest

    def _inner(self, token: str) -> str:
        """``token`` with each raw patient ID inside it replaced (set lookups of its substrings of
        the IDs' lengths: linear in the token, whatever the number of patients)."""
        out, i = [], 0
        while i < len(token):
            for length in self.lengths:
                if token[i : i + length] in self.patients:
                    out.append(self.patients[token[i : i + length]])
                    i += length
                    break
            else:
                out.append(token[i])
                i += 1
        return "".join(out)

    def text(self, value: str, whole: bool = False) -> str:
        """``value`` scrubbed as free text; with ``whole``, first as one ID."""
        if not self.mapping or not value:
            return value
        if whole and value in self.mapping:
            return self.mapping[value]
        parts = _SEPARATORS.split(value)
        for i in range(0, len(parts), 2):
            token = parts[i]
            if not token or not self._identifying(token):
                continue
            if token in self.mapping:
                parts[i] = self.mapping[token]
            elif self.lengths:
                parts[i] = self._inner(token)
        return "".join(parts)

    def record(self, value):
        """``value`` (dicts, lists, strings, numbers) with every string scrubbed, keys as text."""
        if isinstance(value, str):
            return self.text(value, whole=True)
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.record(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.record(v) for v in value]
        return value


def index_scrubber(index: pd.DataFrame) -> Scrubber:
    """The Scrubber of an index that carries its shared IDs (a raw index, or one made before
    them: none)."""
    if "shared_image_id" not in index or (index["shared_image_id"] == index["image_id"]).all():
        return Scrubber({})
    mapping = dict(zip(index["image_id"].astype(str), index["shared_image_id"]))
    mapping.update(zip(index["path"].astype(str), index["shared_image_id"]))
    patients = dict(zip(index["patient_id"].astype(str), index["shared_patient_id"]))
    if "shared_patient_aliases" in index:
        for raw, shared in zip(index["patient_aliases"], index["shared_patient_aliases"]):
            patients.update(zip(raw, shared))
    mapping.update(patients)
    return Scrubber(mapping, patients)


class _ScrubbedLogs(logging.Filter):
    def __init__(self, scrub: Scrubber):
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.scrub.text(record.getMessage()), None
        return True


@contextlib.contextmanager
def scrubbed_logs(scrub: Scrubber):
    """Every log line written meanwhile (the rule's log file and stderr) with raw IDs replaced."""
    if not scrub.mapping:
        yield
        return
    handlers = logging.getLogger().handlers
    guard = _ScrubbedLogs(scrub)
    for handler in handlers:
        handler.addFilter(guard)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(guard)
