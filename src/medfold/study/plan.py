"""A configuration planned from the data (``medfold plan``), as nnU-Net plans segmentation from a
dataset fingerprint (Isensee et al., Nature Methods 18:203, 2021): read the collection, write a
complete config whose every decision carries its reason, and a ``plan.json`` of the fingerprint
and the decisions. The rules are fixed and written down in docs/plan.md; a measured training step
of each candidate model on this machine turns the time budget into epochs.

Where the plan is unsure (a patient pattern that explains few names, mixed image sizes, classes
too small to split), it says so in ``doubts`` and in the summary rather than guessing silently.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medfold.core.errors import ConfigError
from medfold.data.images import IMAGE_EXTENSIONS

# tokens of a file name: runs between separators; the patient is the first token with a digit,
# with the words before it (person1_bacteria_1, IM-0001-0001, NIH's 00000001_000, ODIR's 0_left).
# A first word-with-a-number shared by too many images to be one patient (NORMAL2-IM-0007-0001's
# NORMAL2) is a prefix: the patient is the number after it.
_TOKEN = r"[^_\-. ]"
_SEP = r"[_\-. ]"
_FIRST_NUMBER = rf"(?:[^_\-.\d ]+{_SEP})*{_TOKEN}*\d{_TOKEN}*"
COARSE = 50  # a "patient" of more images than this and than 2 % of the collection is a prefix


def patient_pattern(prefixes: list[str] = ()) -> str:
    """The patient regex: the first number of a name, after any of ``prefixes``."""
    before = f"(?:(?:{'|'.join(re.escape(p) for p in prefixes)}){_SEP})?" if prefixes else ""
    return rf"^(?P<patient>{before}{_FIRST_NUMBER})"


ROLE_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
TEST_NAMES = ("test", "testing")
LABEL_COLUMN_HINTS = ("finding", "label", "class", "diagnosis", "target")
PATIENT_COLUMN_HINTS = ("patient", "subject")
SEPARATORS = ("|", ";", ",")
SAMPLE = 200  # images decoded for sizes, colour and modality


@dataclass
class Fingerprint:
    """What the collection is, as far as its files, names and a sample of its pixels say."""

    source: str
    format: str
    images: int
    classes: dict[str, int]
    task: str
    roles: dict[str, int]
    patients: dict
    sizes: dict
    colour: str
    modality: str
    exact_duplicates: int
    dataset: dict  # the config's dataset block, as read
    doubts: list[str] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        counts = [c for c in self.classes.values() if c]
        return max(counts) / min(counts) if counts else 1.0


# ----------------------------------------------------------------------------- patients
def _grouped(names: list[str], pattern: str) -> list[str | None]:
    """Each name's patient as the index will read it (``dataset.patient_regex``)."""
    from medfold.data.index.patients import patient_from_name

    return patient_from_name(pd.Series(names, dtype=object), pattern).tolist()


def patients_from_names(names: list[str]) -> dict:
    """The patient pattern of ``names`` (file names): how many names it explains, how many
    patients it finds and how many images each; ``regex`` None when every image stands alone.
    Counts only: no patient ID goes into plan.json, which a user may share with the config."""
    pattern = patient_pattern()
    found = _grouped(names, pattern)
    limit = max(COARSE, 0.02 * len(names))
    # a word with a number (NORMAL2) shared by many images is a prefix; a bare number stays one patient
    prefixes = sorted(p for p, n in Counter(x for x in found if x).items() if n > limit and re.search("[A-Za-z]", p))
    if prefixes:
        pattern = patient_pattern(prefixes)
        found = _grouped(names, pattern)
    explained = [p for p in found if p is not None]
    per_patient = Counter(explained)
    counts = np.array(list(per_patient.values()) or [0])
    share = len(explained) / max(len(names), 1)
    grouped = len(per_patient) < len(explained)
    out = {
        "source": "file names",
        "regex": pattern if grouped else None,
        "prefixes": prefixes,
        "explained": round(share, 4),
        "patients": len(per_patient) if grouped else len(names),
        "images_per_patient": {"median": float(np.median(counts)), "max": int(counts.max())},
    }
    out["statement"] = (
        f"patients from file names: {out['patients']} patients, {out['images_per_patient']['median']:g} images "
        f"each (median, at most {out['images_per_patient']['max']}); the pattern explains {share:.0%} of names"
        if grouped
        else "no patient pattern in the file names: every image stands alone as its own patient"
    )
    return out


# ----------------------------------------------------------------------------- reading the collection
def _form(data: Path) -> str:
    if data.is_file() and data.suffix == ".npz":
        return "npz"
    if data.is_file() and (data.suffix == ".csv" or data.name.endswith(".csv.gz")):
        return "csv"
    if data.is_dir():
        return "folders"
    raise ConfigError(f"{data}: expected a folder of images, a CSV table or a MedMNIST .npz")


def _pick(columns, hints, exclude=()) -> str | None:
    for column in columns:
        if column not in exclude and any(h in column.lower() for h in hints):
            return column
    return None


def _csv_block(data: Path) -> dict:
    """The dataset block of a CSV: its path, label and patient columns, the label separator and
    the metadata columns, read from the table's names and values."""
    table = pd.read_csv(data, dtype=str, keep_default_na=False)
    columns = list(table.columns)
    looks_like_path = {c: table[c].str.lower().str.endswith(IMAGE_EXTENSIONS).mean() for c in columns}
    path_column = max(columns, key=looks_like_path.get)
    if looks_like_path[path_column] < 0.5:
        raise ConfigError(f"{data}: no column names image files (expected one whose values end in .png, .jpg, ...)")
    label_column = _pick(columns, LABEL_COLUMN_HINTS, exclude=(path_column,))
    if label_column is None:
        raise ConfigError(f"{data}: no label column found (a column named like {', '.join(LABEL_COLUMN_HINTS)})")
    values = table[label_column]
    separator = next((s for s in SEPARATORS if values.str.contains(s, regex=False).mean() > 0.02), None)
    patient_column = _pick(columns, PATIENT_COLUMN_HINTS, exclude=(path_column, label_column))
    named = (path_column, label_column, patient_column)
    few = [c for c in columns if c not in named and (1 < table[c].nunique() <= 20 or "age" in c.lower())]
    # images elsewhere below the table's folder (NIH's images_001..012/) are found by file name
    beside = all((data.parent / name).exists() for name in table[path_column].head(20))
    lists = _split_lists(data.parent)
    return {
        "format": "csv",
        "table": str(data),
        "root": str(data.parent),
        "path_column": path_column,
        "label_column": label_column,
        **({"label_separator": separator} if separator else {}),
        **({"patient_column": patient_column} if patient_column else {}),
        **({"metadata_columns": few} if few else {}),
        **({} if beside else {"recursive_lookup": True}),
        **({"source_split_lists": lists} if lists else {}),
    }


def _split_lists(folder: Path) -> dict[str, str]:
    """The dataset's own split as list files beside its table (NIH's ``train_val_list.txt`` and
    ``test_list.txt``): role -> file, when a test list is among them."""
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*list*.txt")):
        stem = path.stem.lower()
        role = "test" if "test" in stem else "train" if "train" in stem else "val" if "val" in stem else None
        if role and role not in found:
            found[role] = str(path)
    return found if "test" in found else {}


def _npz_block(data: Path) -> tuple[dict, np.ndarray]:
    """The dataset block of a MedMNIST archive (multi-label when a row has several labels), and
    the first images of its first part for the pixel sample."""
    with np.load(data, allow_pickle=False) as archive:
        first = next(k.removesuffix("_images") for k in archive.files if k.endswith("_images"))
        width = archive[f"{first}_labels"].reshape(len(archive[f"{first}_labels"]), -1).shape[1]
        sample = archive[f"{first}_images"][:SAMPLE]
    return {"format": "npz", "npz": str(data), "task": "multilabel" if width > 1 else "multiclass"}, sample


def _candidates(data: Path, form: str, name: str) -> tuple[pd.DataFrame, dict, np.ndarray | None]:
    """The candidate table indexing will build: the index's own adapter on the dataset block read
    from ``data``; the block; an npz's pixel sample."""
    from medfold.data.index.adapters import ADAPTERS
    from medfold.settings.sections import DatasetSettings

    sample = None
    if form == "folders":
        dataset = {"format": "folders", "root": str(data)}
    elif form == "csv":
        dataset = _csv_block(data)
    else:
        dataset, sample = _npz_block(data)
    cand, _, _ = ADAPTERS[form](DatasetSettings.of({"name": name, **dataset}))
    if cand.empty:
        raise ConfigError(f"{data}: no images found ({form})")
    return cand, dataset, sample


def _pixels_sample(frame: pd.DataFrame, npz_sample) -> list[np.ndarray]:
    if npz_sample is not None:
        return list(npz_sample)
    from medfold.data.images import decode

    rows = np.linspace(0, len(frame) - 1, min(SAMPLE, len(frame))).astype(int)
    out = []
    for path in frame["path"].iloc[rows]:
        try:
            out.append(decode(path).pixels)
        except Exception:  # an unreadable file: indexing lists it with its reason
            continue
    return out


def _look(pixels: list[np.ndarray], doubts: list[str]) -> tuple[dict, str, str]:
    """Sizes, colour, and the modality the pixels suggest."""
    from medfold.data.fingerprint import trimmed_grey
    from medfold.data.images import is_colour
    from medfold.data.matching import field_of_view

    if not pixels:
        raise ConfigError("no image of the sample could be decoded")
    shapes = np.array([p.shape[:2] for p in pixels])
    sides = shapes.min(1)
    aspect = shapes[:, 1] / shapes[:, 0]
    sizes = {
        "median_side": int(np.median(sides)),
        "smallest_side": int(sides.min()),
        "largest_side": int(shapes.max()),
        "median_aspect": round(float(np.median(aspect)), 3),
        "distinct_sizes": int(len({tuple(s) for s in shapes})),
    }
    if sizes["distinct_sizes"] > 1 and sides.max() > 2 * sides.min():
        doubts.append(f"image sizes are mixed ({sides.min()} to {sides.max()} px on the short side): all are resized")
    colour_share = np.mean([is_colour(p) for p in pixels])
    stored_rgb = np.mean([p.ndim == 3 for p in pixels])
    colour = "colour" if colour_share > 0.5 else "grey stored as RGB" if stored_rgb > 0.5 else "grey"
    # the field of view as the near-duplicate search finds it, on the same grey image
    fields = [field_of_view(trimmed_grey(p), colour == "colour") is not None for p in pixels[:50]]
    framed = float(np.mean(fields))
    if colour == "colour" and framed > 0.5:
        modality = "fundus photograph (a colour image in a circular field of view)"
    elif sizes["median_side"] <= 32:
        modality = "small grey images (MedMNIST-like: CT slices, ultrasound or radiographs)"
    elif framed > 0.5:
        modality = "grey images in a field of view (ultrasound sector or CT)"
    else:
        modality = "radiograph (a grey image filling its frame)"
    return sizes, colour, modality


def _duplicates(frame: pd.DataFrame, form: str) -> int:
    """Groups of byte-identical files, hashing only files that share a size with another (npz:
    not read here; indexing hashes every image's pixels)."""
    if form == "npz":
        return 0
    sizes = pd.Series([Path(p).stat().st_size for p in frame["path"]], index=frame["path"])
    shared = sizes[sizes.duplicated(keep=False)].index
    digests = Counter(hashlib.blake2b(Path(p).read_bytes(), digest_size=16).digest() for p in shared)
    return sum(1 for n in digests.values() if n > 1)


def fingerprint(data, name: str | None = None) -> Fingerprint:
    """Read ``data`` (a folder tree, a CSV, a MedMNIST .npz) into its Fingerprint."""
    data = Path(data)
    form = _form(data)
    name = name or data.stem.replace(".", "_")
    frame, dataset, npz_sample = _candidates(data, form, name)
    doubts: list[str] = []
    counts = Counter(label for labels in frame["labels"] for label in labels if label)
    no_finding = next((c for c in counts if c.lower().replace("_", " ") in ("no finding", "normal")), None)
    multilabel = "label_separator" in dataset or dataset.get("task") == "multilabel"
    task = "multilabel" if multilabel else ("binary" if len(counts) == 2 else "multiclass")
    if task == "multilabel" and no_finding:
        dataset["no_finding_label"] = no_finding
        counts.pop(no_finding)
    small = [c for c, n in counts.items() if n < 10]
    if small:
        doubts.append(f"classes with fewer than 10 images ({small}): too few to split into folds reliably")
    roles = Counter(str(r).split("/")[0].lower() for r in frame["source_split"] if r)
    headers = _dicom_headers(frame) if form == "folders" else None
    patients = _patients(form, frame, dataset, doubts, headers)
    sizes, colour, modality = _look(_pixels_sample(frame, npz_sample), doubts)
    stated = headers["Modality"].dropna().value_counts() if headers is not None else pd.Series(dtype=int)
    if len(stated):  # the header's word over the pixels' guess
        code = stated.index[0]
        modality = f"{DICOM_MODALITIES.get(code, code)} (DICOM Modality {code})"
        if len(stated) > 1:
            doubts.append(f"the DICOM files hold several modalities: {dict(stated)}")
    return Fingerprint(
        source=str(data),
        format=form,
        images=len(frame),
        classes=dict(sorted(counts.items())),
        task=task,
        roles=dict(roles),
        patients=patients,
        sizes=sizes,
        colour=colour,
        modality=modality,
        exact_duplicates=_duplicates(frame, form),
        dataset={"name": name, **dataset, "task": task, "labels": sorted(counts)},
        doubts=doubts,
    )


# DICOM Modality codes (PS3.3 C.7.3.1.1.1) to what the rules call them
DICOM_MODALITIES = {
    "CR": "radiograph",
    "DX": "radiograph",
    "MG": "radiograph (mammogram)",
    "US": "ultrasound",
    "CT": "CT",
    "MR": "MR",
    "OP": "fundus photograph",
    "XC": "photograph",
}


def _dicom_headers(frame: pd.DataFrame) -> pd.DataFrame | None:
    """PatientID and Modality of every DICOM file of a folder tree (headers only, no pixels);
    None when the files are not DICOM."""
    from medfold.data.dicom import looks_like_dicom, read_header_fields

    if not frame["path"].head(20).map(looks_like_dicom).all():
        return None
    fields = [read_header_fields(path, ("PatientID", "Modality")) or {} for path in frame["path"]]
    return pd.DataFrame(fields, index=frame.index, columns=["PatientID", "Modality"])


def _patients(form: str, frame: pd.DataFrame, dataset: dict, doubts: list[str], headers=None) -> dict:
    """Where patients come from: a CSV's patient column, DICOM PatientID, else a pattern in the
    file names (set as dataset.patient_regex), else none (said in ``doubts``)."""
    if headers is not None and headers["PatientID"].notna().mean() > 0.9:
        counts = headers["PatientID"].dropna().value_counts()
        dataset["patient_regex"] = None  # the index reads each file's PatientID
        patients = {
            "source": "DICOM PatientID",
            "patients": int(len(counts)),
            "images_per_patient": {"median": float(counts.median()), "max": int(counts.max())},
            "statement": f"patients from DICOM PatientID: {len(counts)} patients, "
            f"{counts.median():g} images each (median, at most {counts.max()})",
        }
        missing = int(headers["PatientID"].isna().sum())
        if missing:
            doubts.append(f"{missing} DICOM files have no PatientID: each stands alone")
        return patients
    if "patient_column" in dataset and frame["patient_id"].notna().all():
        patients = {
            "source": f"column {dataset['patient_column']!r}",
            "patients": int(frame["patient_id"].nunique()),
            "statement": f"patients from column {dataset['patient_column']!r}",
        }
    elif form == "npz":
        patients = {
            "source": None,
            "patients": len(frame),
            "statement": "MedMNIST has no patient IDs: images stand alone",
        }
        doubts.append(patients["statement"])
    else:
        patients = patients_from_names(list(frame["image_id"]))
        if patients["regex"]:
            dataset["patient_regex"] = patients["regex"]
            if patients["explained"] < 0.9:
                doubts.append(f"the patient pattern explains only {patients['explained']:.0%} of the file names")
        else:
            doubts.append(patients["statement"])
    return patients


# ----------------------------------------------------------------------------- the rules
@dataclass
class Decision:
    key: str  # dotted config key
    value: object
    reason: str


@dataclass
class Candidate:
    model: str
    image_size: int
    batch_size: int
    seconds_per_image: float = 0.0  # a training step's time per image, measured here
    pretrained: str | None = None  # "imagenet" when torchvision's weights are in the hub cache


def weights_cached(model: str) -> bool:
    """Whether torchvision's ImageNet weights of ``model`` are in this machine's hub cache (the
    plan never downloads: it proposes what runs here as planned)."""
    from medfold.training.models import is_torchvision, torchvision_weights, weights_path

    if not is_torchvision(model):
        return False
    weights = torchvision_weights(model, "imagenet")
    return weights is not None and weights_path(weights).is_file()


def candidates(fp: Fingerprint, device: str, cached=weights_cached) -> list[Candidate]:
    """Models from smallest to largest, at the input sizes the images allow (never enlarged);
    an ImageNet-pretrained ResNet18 last (preferred when affordable) when its weights are cached."""
    side = fp.sizes["median_side"]
    sizes = [28] if side <= 32 else [64, 128] if side >= 128 else [64]
    if device == "cuda":
        sizes = sorted({min(side, 224), *sizes})
    out = []
    for size in sizes:
        out += [Candidate("lenet", size, 64), Candidate("lenet_wide", size, 64)]
        if size >= 64:
            out.append(Candidate("resnet18", size, 32))
            if cached("resnet18"):
                out.append(Candidate("resnet18", size, 32, pretrained="imagenet"))
    return out


def fit_batch(per_image_bytes: float, fixed_bytes: float, free_bytes: float, share: float = 0.5, cap: int = 256) -> int:
    """The largest power-of-two batch whose training step, as measured (``fixed_bytes`` for the
    model, its gradients and optimiser state, ``per_image_bytes`` for each image's activations),
    fits in ``share`` of the device's free memory (the rest for the data loader's pinned batches,
    the allocator's fragmentation and evaluation); at most ``cap``, at least 1."""
    room = free_bytes * share - fixed_bytes
    batch = 1
    while batch * 2 <= cap and (batch * 2) * per_image_bytes <= room:
        batch *= 2
    return batch


MIN_STEPS, MIN_BATCH = 20, 16


def steps_batch(train_images: int, largest: int) -> int:
    """The largest power-of-two batch, up to ``largest`` (what the model's default or the GPU's
    memory allows), that still gives MIN_STEPS updates an epoch; at least MIN_BATCH. On a small
    collection a large batch leaves few updates for the budget's epochs (NIH1000 at a 5-minute budget:
    batch 64, 10 updates an epoch, 0.013 AUROC under the same model at batch 32 with more epochs)."""
    batch = largest
    while batch > MIN_BATCH and train_images / batch < MIN_STEPS:
        batch //= 2
    return batch


def _trainer(candidate: Candidate, channels: int, classes: int, device: str):
    """A function running one training step (forward, backward, Adam) of ``candidate`` on a batch
    of ``images`` random images: what the plan measures, in time and in memory."""
    import torch

    from medfold.training.models import build_model

    torch.manual_seed(0)
    model = build_model(candidate.model, channels, classes, 0, None, True, 0.0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    batches = {}

    def step(images: int) -> None:
        if images not in batches:
            batches[images] = (
                torch.rand(images, channels, candidate.image_size, candidate.image_size, device=device),
                torch.randint(0, classes, (images,), device=device),
            )
        batch, target = batches[images]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), target).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def cuda_memory(candidate: Candidate, channels: int, classes: int) -> tuple[float, float, float]:
    """(bytes per image, fixed bytes, free bytes) of ``candidate``'s training step on the GPU:
    the peak memory of a step at 8 and at 16 images."""
    import torch

    step = _trainer(candidate, channels, classes, "cuda")
    peaks = []
    for images in (8, 16):
        torch.cuda.reset_peak_memory_stats()
        step(images)
        peaks.append(torch.cuda.max_memory_allocated())
    per_image = max((peaks[1] - peaks[0]) / 8, 1.0)
    free, _ = torch.cuda.mem_get_info()
    return per_image, peaks[0] - 8 * per_image, free + torch.cuda.memory_allocated()


TIMED_BATCH = 16


def time_step(
    candidate: Candidate, channels: int, classes: int, device: str = "cpu", steps: int = 2, rounds: int = 3
) -> float:
    """Seconds per training image of ``candidate`` on this machine: the median of ``rounds``
    timings of a few forward, backward and optimiser steps on random images, after one warm-up
    step (one timing alone moved a 5-minute plan between 8 and 12 epochs on a shared machine)."""
    step = _trainer(candidate, channels, classes, device)
    # per-image time: on a CPU a small batch measures it well enough; a GPU is timed at the batch
    # its memory holds (a small one leaves it idle, and the epochs afforded would be too few)
    images = candidate.batch_size if device == "cuda" else min(candidate.batch_size, TIMED_BATCH)
    step(images)
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step(images)
        timings.append((time.perf_counter() - start) / (steps * images))
    return float(np.median(timings))


@dataclass
class Budget:
    """What the budget buys (docs/plan.md): the workflow's fixed jobs (indexing, caching, the
    split and its check, aggregation, the comparison table, the report) and each training job's
    start cost come first; the rest goes to epochs, the folds running side by side on the cores,
    each epoch its training images plus a third of that for scoring the validation fold, and a
    margin for what a step on random images does not see (loading, augmentation, metrics)."""

    seconds: float
    cores: int
    threads: int = 2
    images: int = 0  # the collection's: indexing and caching decode each once
    # calibrated on one measured run (NIH1000, 5 min on 2 AMD EPYC cores, docs/plan.md): its 7
    # fixed jobs took 51 s in all, a training job's start about 10 s, an epoch 0.7 of the model's
    job_seconds: float = 8.0  # a job's start: Python, torch, medfold, Snakemake's bookkeeping
    fixed_jobs: int = 7
    decode_seconds: float = 0.004  # per image, indexing and caching
    margin: float = 0.1  # an epoch's time beyond the timed steps (loading, augmentation, metrics)

    def fixed(self, folds: int, repeats: int = 1) -> float:
        """Seconds spent whatever the model: the fixed jobs, each training job's start, decoding."""
        return (self.fixed_jobs + self.rounds(folds, repeats)) * self.job_seconds + self.images * self.decode_seconds

    def rounds(self, folds: int, repeats: int = 1) -> int:
        """How many times the training jobs (a fold and a seed each) fill the cores."""
        side_by_side = max(1, self.cores // self.threads)
        return -(-(folds * repeats) // side_by_side)

    def epoch_seconds(self, c: Candidate, train_images: int) -> float:
        return train_images * c.seconds_per_image * (1 + 1 / 3) * (1 + self.margin)

    def epochs(self, c: Candidate, train_images: int, folds: int, repeats: int = 1) -> int:
        per_epoch = self.epoch_seconds(c, train_images)
        left = max(self.seconds - self.fixed(folds, repeats), 0)
        return int(left / max(self.rounds(folds, repeats) * per_epoch, 1e-9))


MIN_EPOCHS, WANTED_EPOCHS, MAX_EPOCHS = 5, 15, 60
COSINE_FROM = 10  # epochs from which the schedule is cosine, run to its end
MAX_REPEATS = 5


def repeats_afforded(chosen: Candidate, budget: Budget, train_images: int, folds: int) -> int:
    """Seeds of each fold that the budget affords at MAX_EPOCHS each (at most MAX_REPEATS): where
    even the largest candidate leaves time over at MAX_EPOCHS, more models in the fold ensemble
    rather than a budget left unspent (a small collection, small images)."""
    repeats = 1
    while repeats < MAX_REPEATS and budget.epochs(chosen, train_images, folds, repeats + 1) >= MAX_EPOCHS:
        repeats += 1
    return repeats


def choose(cands: list[Candidate], budget: Budget, train_images: int, folds: int) -> tuple[Candidate, int, str]:
    """The largest candidate that affords WANTED_EPOCHS; else the one affording most epochs above
    MIN_EPOCHS; else the smallest (with the doubt said)."""
    afforded = [(c, budget.epochs(c, train_images, folds)) for c in cands]
    good = [(c, e) for c, e in afforded if e >= WANTED_EPOCHS]
    if good:
        c, e = good[-1]
        return c, min(e, MAX_EPOCHS), f"the largest candidate affording {WANTED_EPOCHS}+ epochs in the budget"
    fair = [(c, e) for c, e in afforded if e >= MIN_EPOCHS]
    if fair:
        c, e = max(fair, key=lambda ce: ce[1])
        return c, e, f"no candidate affords {WANTED_EPOCHS} epochs; the one affording the most"
    c, e = afforded[0]
    return c, max(e, 1), f"even the smallest model affords under {MIN_EPOCHS} epochs: raise --budget"


def augmentations(fp: Fingerprint) -> tuple[dict, str, str]:
    """The augmentations and test-time flip the modality allows."""
    if fp.modality.startswith("fundus"):
        return (
            {"hflip": 0.5, "rotation": 30, "brightness": 0.1, "contrast": 0.1},
            "hflip",
            "a fundus photograph has no up or left to keep (left and right eyes mirror each other): "
            "flips, rotations and small intensity changes; flip at test time too",
        )
    return (
        {"hflip": 0.0, "rotation": 10, "brightness": 0.1, "contrast": 0.1},
        "none",
        "no flips (a radiograph's or a slice's left and right are anatomy: the heart is on the left), "
        "small rotations and intensity changes",
    )


def _split_decisions(fp: Fingerprint, folds: int | None = None) -> list[Decision]:
    own_test = [r for r in fp.roles if r in TEST_NAMES]
    if folds:
        out = [Decision("split.folds", folds, "asked for (--folds)")]
    else:
        folds = 5 if fp.images <= 5000 else 3
        out = [Decision("split.folds", folds, f"{fp.images} images: {folds} folds")]
    if own_test:
        keep = "a patient on both sides has its other images set aside; the test set stays whole"
        out += [
            Decision("split.test_from_source", True, f"the dataset's own test set ({own_test[0]}/) is kept"),
            Decision("split.source_test_names", own_test, "its folder name"),
            Decision("split.on_source_leak", "drop", keep),
        ]
    else:
        out.append(Decision("split.test_fraction", 0.2, "no test set of its own: a fifth of the patients held out"))
    return out


def _training_decisions(
    fp: Fingerprint, chosen: Candidate, epochs: int, why: str, arithmetic: str, train_images: int
) -> list[Decision]:
    augment, tta, why_aug = augmentations(fp)
    steps = train_images // chosen.batch_size
    cosine = epochs >= COSINE_FROM
    patience, why_patience = (
        (
            epochs,
            "the cosine schedule sets the run's length (and so the budget holds); the best validation "
            "epoch's weights are kept",
        )
        if cosine
        else (max(3, epochs // 4), "stop on a plateau")
    )
    out = [
        Decision("training.model", chosen.model, why),
        Decision("training.image_size", chosen.image_size, f"median image side {fp.sizes['median_side']} px"),
        *(
            [Decision("training.pretrained", chosen.pretrained, "torchvision's ImageNet weights are in the hub cache")]
            if chosen.pretrained
            else []
        ),
        Decision(
            "training.batch_size",
            chosen.batch_size,
            f"{steps} updates an epoch on {train_images} training images (at least {MIN_STEPS} wanted); "
            f"what the step was timed with",
        ),
        Decision("training.batch_norm", True, "faster, steadier training of the small models"),
        Decision("training.epochs", epochs, f"what the budget affords: {arithmetic}"),
        Decision("training.early_stopping", {"enabled": True, "patience": patience}, why_patience),
        Decision("training.augment", augment, why_aug),
        Decision("training.tta", tta, "flips are safe for this modality" if tta != "none" else "no flips (above)"),
    ]
    if cosine:
        out.append(
            Decision("training.schedule", {"name": "cosine", "warmup_epochs": 1}, "cosine after a warm-up epoch")
        )
    if fp.imbalance > 3:
        out.append(Decision("training.class_weights", True, f"the largest class is {fp.imbalance:.1f} x the smallest"))
    return out


def plan(
    fp: Fingerprint,
    budget_s: float,
    device: str = "cpu",
    cores: int = 2,
    timer=time_step,
    folds: int | None = None,
    gpus: int = 1,
    memory=cuda_memory,
) -> list[Decision]:
    """The configuration of ``fp`` under ``budget_s`` seconds of this machine, decision by decision
    (``timer`` and ``memory`` measure a candidate's step: its time per image, and on a GPU its memory)."""
    channels = 3 if fp.colour == "colour" else 1
    classes = max(len(fp.classes), 2)
    split = _split_decisions(fp, folds)
    folds = split[0].value
    train_images = int(fp.images * 0.8 * (folds - 1) / folds)
    cands = candidates(fp, device)
    for c in cands:
        if device == "cuda":  # the batch the GPU's memory holds; the step is timed at it
            c.batch_size = fit_batch(*memory(c, channels, classes))
        c.batch_size = steps_batch(train_images, c.batch_size)
        c.seconds_per_image = timer(c, channels, classes, device)
    if device == "cuda":  # a fold job per GPU: as many folds side by side as GPUs
        budget = Budget(budget_s, cores=gpus, threads=1, images=fp.images)
        threads = max(1, cores // gpus)
        placement = [
            Decision("training.device", "cuda", "planned for a GPU (--device cuda)"),
            Decision("training.gpus", 1, f"a GPU per fold job: {min(gpus, folds)} folds train at once"),
            Decision("training.threads", threads, f"{cores} cores over {gpus} GPU jobs: data loading and metrics"),
        ]
    else:
        budget = Budget(budget_s, cores, images=fp.images)
        at_once = max(1, cores // budget.threads)
        placement = [Decision("training.threads", budget.threads, f"{cores} cores: {at_once} folds train at once")]
    chosen, epochs, why = choose(cands, budget, train_images, folds)
    repeats = repeats_afforded(chosen, budget, train_images, folds) if epochs >= MAX_EPOCHS else 1
    timed = ", ".join(f"{c.model}@{c.image_size} {1 / c.seconds_per_image:.0f} img/s" for c in cands)
    arithmetic = (
        f"{budget_s:.0f} s less {budget.fixed(folds, repeats):.0f} s of fixed jobs and job starts, over "
        f"{budget.rounds(folds, repeats)} round(s) of folds at {budget.epoch_seconds(chosen, train_images):.1f} s "
        f"an epoch"
    )
    experiment = (
        Decision(
            "experiments",
            {"planned": {"repeats": repeats}},
            f"{repeats} seeds of each fold: the budget affords them at {MAX_EPOCHS} epochs each; the fold "
            f"ensemble averages all {repeats * folds} models and decides",
        )
        if repeats > 1
        else Decision("experiments", {"planned": {}}, "one experiment, the training section; its fold ensemble decides")
    )
    return [
        Decision("dataset", fp.dataset, f"read from {fp.format}: {fp.images} images; {fp.patients['statement']}"),
        Decision("images.channels", channels, f"the images are {fp.colour}"),
        *split,
        *_training_decisions(fp, chosen, epochs, f"{why} (measured here: {timed})", arithmetic, train_images),
        *placement,
        experiment,
    ]


# ----------------------------------------------------------------------------- writing it
def _nest(decisions: list[Decision]) -> dict:
    config: dict = {}
    for dec in decisions:
        *parents, leaf = dec.key.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = dec.value
    return config


def config_text(decisions: list[Decision], fp: Fingerprint, plan_path: str | None = None) -> str:
    """The config as YAML, each planned key under a comment giving its reason; ``plan_path``: the
    plan.json the report shows beside the results."""
    import yaml

    reasons = {d.key: d.reason for d in decisions}
    lines = [
        f"# Planned by `medfold plan` from {fp.source} (plan.json beside it holds the fingerprint).",
        "# Every decision's reason is the comment above it; the rules are in docs/plan.md.",
        *(f"# DOUBT: {doubt}" for doubt in fp.doubts),
        "",
    ]

    def emit(node: dict, prefix: str, indent: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in reasons:
                lines.append(" " * indent + f"# {reasons[dotted]}")
            # a block for a section; one line for a small setting of scalars ({enabled: true, patience: 3})
            small = isinstance(value, dict) and len(value) <= 3 and not any(isinstance(v, dict) for v in value.values())
            if isinstance(value, dict) and value and not small:
                lines.append(" " * indent + f"{key}:")
                emit(value, dotted + ".", indent + 2)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
                lines.append(" " * indent + f"{key}: {text.removesuffix('...').strip()}")

    emit(_nest(decisions), "", 0)
    if plan_path:
        lines += ["# the fingerprint and these decisions: the report shows them beside the results"]
        lines.append(f"plan: {plan_path}")
    return "\n".join(lines) + "\n"


def write_plan(decisions: list[Decision], fp: Fingerprint, out: Path) -> Path:
    """``out`` (the config) and ``plan.json`` beside it; returns plan.json's path."""
    out = Path(out)
    path = out.with_name("plan.json")
    out.write_text(config_text(decisions, fp, str(path)))
    record = {"fingerprint": asdict(fp), "decisions": [asdict(d) for d in decisions]}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def summary(decisions: list[Decision], fp: Fingerprint) -> str:
    picked = {d.key: d.value for d in decisions}
    lines = [
        f"{fp.source}: {fp.images} images, {fp.task} over {len(fp.classes)} classes {dict(fp.classes)}",
        f"  {fp.modality}; {fp.colour}; median side {fp.sizes['median_side']} px",
        f"  {fp.patients['statement']}",
        f"  plan: {picked['training.model']} at {picked['training.image_size']} px, "
        f"{picked['training.epochs']} epochs, {picked['split.folds']} folds",
    ]
    lines += [f"  DOUBT: {doubt}" for doubt in fp.doubts]
    return "\n".join(lines)


def parse_budget(text: str) -> float:
    """``30m``, ``2h``, ``900s`` or seconds, as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ConfigError(f"--budget {text!r}: expected a time such as 30m, 2h or 900s")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
