"""Synthetic chest-radiograph-like demo data, generated deterministically from a seed.

Two on-disk forms, the ones real users have:

* ``cxr14/``: an NIH ChestX-ray14-like tree: ``images/{patient:08d}_{followup:03d}.png`` and a
  ``Data_Entry.csv`` with ``Image Index``, ``Finding Labels`` (``|``-separated, ``No Finding``),
  ``Follow-up #`` and ``Patient ID``. Multi-label. ``signal_masks/<image>`` marks, for each
  image with a finding, the pixels the findings drew (what an explanation should highlight).
* ``chest_xray/``: a folder-per-class tree with the dataset's own split folders, as in the
  Kermany pneumonia and COVID-19 radiography collections:
  ``{train,test}/{Normal,Pneumonia,Effusion}/person{P}_{class}_{k}.png``. Single-label, and one
  patient deliberately appears in both ``train`` and ``test`` (a leak real collections have).

Every finding draws a visible pattern in the lung fields, so a small CNN learns it in a minute:
effusion fills the base of a lung, nodules are small bright discs, cardiomegaly widens the
heart shadow, pneumonia is a patchy cloud. Images come in mixed sizes and modes (8-bit L, RGB,
and exactly one 16-bit), patients have several follow-up images, and classes are unbalanced.

It also plants what public collections do to a split (``PLANTED``, ``planted_copies``):

* each patient has anatomy detail of their own (a smooth texture, as vessels and ribs are), and
  every follow-up is positioned a little differently, so distinct radiographs differ as real ones
  do; one patient in ten is an anatomical *twin* of another (same body shape, own detail), so
  a near-duplicate finder that merges look-alikes would show it;
* copies of some radiographs, rotated, mirrored, rescaled, re-encoded as JPEG or padded, filed
  under another patient (CSV form) or, prefixed as ``90Rotated_``, ``horizontalFlipped_``...,
  in the other split folder (folder form), as the COVID-19 collections hold them;
* one CSV row listed twice, under a second patient ID.

A third form, ``dicom/``, is a hospital PACS export (``generate_dicom``): compressed transfer
syntaxes, MONOCHROME1, header metadata, one harder scanner, and identifiers in headers and names.

Two more forms hold what a chest film at one size does not (issue 39), for the suite:
``generate_small_npz`` a 28 px MedMNIST ``.npz`` with no patient IDs whose official split repeats
training frames in val and test, and ``generate_fundus`` colour fundus-like photographs (a
circular field on black, vignetting, colour casts, one in three dim and hazy) named
``<patient>_{left,right}.png`` with re-published copies under new numbers.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy.ndimage import affine_transform, gaussian_filter

FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Pneumonia")
# Per-patient probability of carrying each finding: unequal on purpose.
FINDING_PREVALENCE = {"Cardiomegaly": 0.22, "Effusion": 0.30, "Nodule": 0.16, "Pneumonia": 0.12}
FOLDER_CLASSES = ("Normal", "Pneumonia", "Effusion")
FOLDER_CLASS_WEIGHTS = (0.5, 0.3, 0.2)
SIZES = ((128, 128), (160, 160), (144, 128), (112, 112), (192, 176))


@dataclass(frozen=True)
class Anatomy:
    """What stays the same across one patient's follow-ups."""

    cx: float  # body centre, fraction of width
    lung_w: float
    lung_h: float
    heart_w: float
    brightness: float
    size: tuple[int, int]  # (width, height)
    detail: int = 0  # seed of this person's own anatomy detail (the same in every follow-up)


@dataclass(frozen=True)
class Position:
    """How one follow-up was taken: the patient a little shifted and nearer or farther."""

    dx: float = 0.0  # fraction of width
    dy: float = 0.0
    scale: float = 1.0


def _patient_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        cx=0.5 + rng.uniform(-0.03, 0.03),
        lung_w=rng.uniform(0.15, 0.19),
        lung_h=rng.uniform(0.30, 0.36),
        heart_w=rng.uniform(0.11, 0.14),
        brightness=rng.uniform(0.85, 1.1),
        size=SIZES[rng.integers(len(SIZES))],
        detail=int(rng.integers(2**31)),
    )


def _followup_position(rng: np.random.Generator, followup: int) -> Position:
    """The first image is centred; later ones sit 3.5 % off centre, each in its own direction (a
    radiographer never positions a patient twice alike), a little nearer or farther."""
    if followup == 0:
        return Position()
    angle = np.pi / 2 * (followup - 1) + rng.uniform(-0.3, 0.3)
    return Position(float(0.035 * np.cos(angle)), float(0.035 * np.sin(angle)), float(1 + rng.uniform(-0.04, 0.04)))


def _anatomy_detail(anatomy: Anatomy, height: int, width: int) -> np.ndarray:
    """A smooth relative-density field unique to the person: fine and coarse structure."""
    rng = np.random.default_rng([anatomy.detail, height, width])
    field = np.zeros((height, width), np.float32)
    for sigma, amplitude in ((width / 24, 0.10), (width / 10, 0.08)):
        layer = gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), sigma=sigma)
        field += amplitude * layer / (layer.std() + 1e-9)
    return field


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _chest(anatomy: Anatomy, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, dict]:
    """The film without findings: soft tissue, ribs, lungs, spine, heart. Returns it and each
    lung's (mask, centre x)."""
    img = np.full(xx.shape, 0.08, np.float32)
    img[_ellipse(xx, yy, anatomy.cx, 0.55, 0.42, 0.52)] = 0.55  # soft tissue
    # ribs: faint horizontal stripes across the chest
    img += 0.04 * (np.sin(yy * 2 * np.pi * 9) > 0.6)
    lungs = {}
    for side, lcx in (("left", anatomy.cx - 0.2), ("right", anatomy.cx + 0.2)):
        mask = _ellipse(xx, yy, lcx, 0.5, anatomy.lung_w, anatomy.lung_h)
        lungs[side] = (mask, lcx)
        img[mask] = 0.18
    img[np.abs(xx - anatomy.cx) < 0.035] = 0.75  # spine
    img[_ellipse(xx, yy, anatomy.cx + 0.04, 0.66, anatomy.heart_w, 0.13)] = 0.7
    return img, lungs


def _draw_findings(img, findings: set[str], anatomy: Anatomy, lungs: dict, xx, yy, rng) -> np.ndarray:
    """Draw ``findings`` into ``img`` (in place, drawing from ``rng`` in a fixed order); returns
    the pixels they drew."""
    height, width = img.shape
    drawn = np.zeros((height, width), bool)
    heart_w = anatomy.heart_w * (1.7 if "Cardiomegaly" in findings else 1.0)
    heart = _ellipse(xx, yy, anatomy.cx + 0.04, 0.66, heart_w, 0.13)
    img[heart] = 0.7
    if "Cardiomegaly" in findings:  # the widening, not the heart every image has
        drawn |= heart & ~_ellipse(xx, yy, anatomy.cx + 0.04, 0.66, anatomy.heart_w, 0.13)
    if "Effusion" in findings:
        side = ("left", "right")[rng.integers(2)]
        mask, lcx = lungs[side]
        level = 0.5 + anatomy.lung_h * rng.uniform(0.15, 0.35)
        img[mask & (yy > level)] = 0.68
        drawn |= mask & (yy > level)
    if "Nodule" in findings:
        for _ in range(rng.integers(1, 4)):
            side = ("left", "right")[rng.integers(2)]
            _, lcx = lungs[side]
            ncx = lcx + rng.uniform(-0.5, 0.5) * anatomy.lung_w
            ncy = 0.5 + rng.uniform(-0.5, 0.4) * anatomy.lung_h
            r = rng.uniform(0.035, 0.05)
            nodule = _ellipse(xx, yy, ncx, ncy, r, r * width / height)
            img[nodule] = 0.85
            drawn |= nodule
    if "Pneumonia" in findings:
        side = ("left", "right")[rng.integers(2)]
        mask, lcx = lungs[side]
        cloud = gaussian_filter(rng.random((height, width)).astype(np.float32), sigma=width / 40)
        cloud = (cloud - cloud.min()) / (np.ptp(cloud) + 1e-6)
        region = mask & _ellipse(xx, yy, lcx, 0.45, anatomy.lung_w, anatomy.lung_h * 0.6)
        img[region] = np.maximum(img[region], 0.35 + 0.45 * cloud[region])
        drawn |= region
    return drawn


def render_radiograph(
    anatomy: Anatomy,
    findings: set[str],
    rng: np.random.Generator,
    signal: np.ndarray | None = None,
    position: Position = Position(),
    strength: float = 1.0,
) -> np.ndarray:
    """A float image in [0, 1] of shape (height, width) showing ``findings``. ``signal`` (a
    boolean array of the same shape), when given, receives the pixels the findings drew: where
    the information that an explanation should point at lies. ``strength`` below 1 draws the
    findings fainter (their contrast against the image without them scaled by it)."""
    width, height = anatomy.size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= width
    yy /= height
    img, lungs = _chest(anatomy, xx, yy)
    without = img.copy()
    drawn = _draw_findings(img, findings, anatomy, lungs, xx, yy, rng)
    if strength != 1.0:
        img = without + strength * (img - without)
    img = img * (1 + _anatomy_detail(anatomy, height, width))
    # this exposure's own mottle outside the lung fields (where the findings are): what tells two
    # films of one body apart, and distinct radiographs of alike shapes, as real films' grain does
    mottle = gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), sigma=width / 80)
    outside = ~(lungs["left"][0] | lungs["right"][0])
    img = img * (1 + 0.18 * outside * mottle / (mottle.std() + 1e-9))
    if position != Position():
        img, drawn = _place(img, position), _place(drawn.astype(np.float32), position) > 0.5
    if signal is not None:
        signal[...] = drawn
    img = gaussian_filter(img, sigma=width / 200) * anatomy.brightness
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _place(img: np.ndarray, position: Position) -> np.ndarray:
    height, width = img.shape
    inverse = 1 / position.scale
    offset = [height / 2 * (1 - inverse) - position.dy * height, width / 2 * (1 - inverse) - position.dx * width]
    return affine_transform(img, [inverse, inverse], offset=offset, order=1, mode="nearest")


def _save(img: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray((img * 65535).astype(np.uint16)).save(path)
        return
    gray = Image.fromarray((img * 255).astype(np.uint8), mode="L")
    (gray.convert("RGB") if mode == "RGB" else gray).save(path, optimize=False)


def _image_mode(rng: np.random.Generator, sixteen_bit_done: bool) -> str:
    if not sixteen_bit_done:
        return "I;16"
    return "RGB" if rng.random() < 0.12 else "L"


# Copies as public collections hold them: (prefix in folder form, what was done, file suffix).
PLANTED = (
    ("90Rotated_", "rotated 90°", ".png"),
    ("180Rotated_", "rotated 180° and padded", ".png"),
    ("horizontalFlipped_", "mirrored left-right", ".png"),
    ("resized_", "rescaled to 0.6 and re-encoded as JPEG (quality 85)", ".jpg"),
    ("jpeg_", "re-encoded as JPEG (quality 60)", ".jpg"),
    ("270Rotated_", "rotated 270° and rescaled to 1.4", ".png"),
    ("verticalFlipped_", "flipped top-bottom, JPEG (quality 90)", ".jpg"),
    ("padded_", "padded with a white border", ".png"),
)
TWIN_SHARE = 0.1
# Re-published copies (medfold.data.republish), filed under other patients in the CSV form: what a
# second collection did to a film before it was scraped again. Sources have no finding, so no
# signal mask needs the same geometry.
REPUBLISHED = (
    ("mild", "cropped up to 5 %, gamma 0.7-1.4, re-encoded as JPEG"),
    ("text", "a burned-in marker or date stamp"),
    ("arrow", "an annotation arrow"),
    (
        "combined",
        "two to four changes stacked (crop, shift, aspect, rotation, gamma, contrast, JPEG, border, text, arrow)",
    ),
)


def _transform_copy(image: Image.Image, which: int, nearest: bool = False) -> Image.Image:
    """The ``which``-th PLANTED transform of ``image`` (a mask uses nearest-neighbour resizing)."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    w, h = image.size
    fill = 0 if nearest else 255
    return [
        lambda: image.transpose(Image.ROTATE_90),
        lambda: ImageOps.expand(image.transpose(Image.ROTATE_180), border=max(2, int(0.06 * w)), fill=0),
        lambda: image.transpose(Image.FLIP_LEFT_RIGHT),
        lambda: image.resize((int(w * 0.6), int(h * 0.6)), resample),
        lambda: image,
        lambda: image.transpose(Image.ROTATE_270).resize((int(h * 1.4), int(w * 1.4)), resample),
        lambda: image.transpose(Image.FLIP_TOP_BOTTOM),
        lambda: ImageOps.expand(image, border=max(2, int(0.04 * w)), fill=fill),
    ][which]()


def _save_copy(source: Path, target: Path, which: int) -> None:
    from medfold.data.images import pixels_to_uint8

    with Image.open(source) as image:
        pixels = pixels_to_uint8(image)
    copy = _transform_copy(Image.fromarray(pixels), which)
    target.parent.mkdir(parents=True, exist_ok=True)
    quality = {3: 85, 4: 60, 6: 90}.get(which)
    copy.save(target, **({"quality": quality} if quality else {}))


def _anatomies(rng: np.random.Generator, patients: int) -> list[Anatomy]:
    """One per patient; one in ten a twin of an earlier patient (same body, own detail)."""
    out: list[Anatomy] = []
    for _ in range(patients):
        anatomy = _patient_anatomy(rng)
        if out and rng.random() < TWIN_SHARE:
            anatomy = replace(out[int(rng.integers(len(out)))], detail=anatomy.detail)
        out.append(anatomy)
    return out


def _write_manifest(path: Path, rows: list[tuple], header=("copy", "original", "transform")) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


# The planted subgroup: in patients this old, half the follow-ups show their listed findings at
# this share of their contrast and the other half not at all (the film does not show what the
# report lists: older patients' films are often AP and harder to read), so any model, however
# long it trains, is weaker on them.
WEAK_SUBGROUP_AGE = 65
WEAK_SUBGROUP_STRENGTH = 0.3
WEAK_SUBGROUP_UNSEEN = 0.5


def finding_strength(seed: int, patient: int, followup: int, age: int) -> float:
    """How visibly one image shows its findings (1: as drawn; 0: not at all), from a stream of
    its own so that the other images do not depend on it."""
    if age < WEAK_SUBGROUP_AGE:
        return 1.0
    unseen = np.random.default_rng([seed, 14, 8, patient, followup]).random() < WEAK_SUBGROUP_UNSEEN
    return 0.0 if unseen else WEAK_SUBGROUP_STRENGTH


def patient_metadata(seed: int, patient: int) -> tuple[int, str]:
    """(age in years, sex) of a demo patient, NIH-like (mean age about 50), from a stream of its
    own so that the images do not depend on it."""
    rng = np.random.default_rng([seed, 14, 7, patient])
    return int(np.clip(round(rng.normal(50, 18)), 1, 95)), ("M", "F")[int(rng.random() < 0.45)]


def _republish(out: Path, rows: list[tuple], first_patient: int, rng: np.random.Generator) -> list[tuple]:
    """REPUBLISHED copies of images without findings, each under a patient of its own; appends
    their table rows and returns their manifest rows (copy, original, what was done)."""
    from medfold.data.images import pixels_to_uint8
    from medfold.data.republish import republished

    originals = len(rows) - len(PLANTED)  # not a copy of a copy
    sources = [i for i, row in enumerate(rows[:originals]) if row[1] == "No Finding"]
    planted = []
    for k, i in enumerate(rng.choice(sources, len(REPUBLISHED), replace=False)):
        name, labels, _, _, age, sex, view = rows[int(i)]
        kind, what = REPUBLISHED[k]
        with Image.open(out / "images" / name) as image:
            pixels = pixels_to_uint8(image)
        copy = f"{first_patient + k:08d}_000.png"
        Image.fromarray(republished(pixels, kind, rng)).save(out / "images" / copy)
        rows.append((copy, labels, 0, first_patient + k, age, sex, view))
        planted.append((copy, name, what))
    return planted


def _label_errors(rows: list[tuple], strengths: dict) -> list[tuple]:
    """(image, finding, how) of every label its film contradicts: the weak subgroup's films
    whose listed findings are not drawn at all (``finding_strength`` 0), as text-mined labels
    list findings a film does not show. The label audit must find them. (Flipping clear films'
    labels as well was tried: it changed the stratified split and with it every demo figure.)"""
    return [
        (name, f, "listed, not drawn")
        for name, labels, *_ in rows
        if strengths.get(name) == 0.0 and labels != "No Finding"
        for f in labels.split("|")
    ]


def _plant_copies(out: Path, rows: list, patients: int, rng) -> list[tuple]:
    """Copies of PLANTED's films (their signal masks moved with them) filed under new patients;
    their rows appended to ``rows``. Returns (copy, original, how) for the manifest."""
    planted = []
    for which, source in enumerate(rng.choice(len(rows), len(PLANTED), replace=False)):
        name, labels, _, _, age, sex, view = rows[source]
        copy = f"{patients + 1 + which:08d}_000{PLANTED[which][2]}"
        _save_copy(out / "images" / name, out / "images" / copy, which)
        if (out / "signal_masks" / name).exists():
            with Image.open(out / "signal_masks" / name) as mask:
                _transform_copy(mask.convert("L"), which, nearest=True).save(out / "signal_masks" / copy, format="PNG")
        rows.append((copy, labels, 0, patients + 1 + which, age, sex, view))
        planted.append((copy, name, PLANTED[which][1]))
    return planted


def _write_table(table: Path, rows: list) -> Path:
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "Image Index",
                "Finding Labels",
                "Follow-up #",
                "Patient ID",
                "Patient Age",
                "Patient Gender",
                "View Position",
            ]
        )
        writer.writerows(rows)
    return table


def generate_cxr14(out: Path, patients: int, seed: int, label_errors: bool = True) -> Path:
    """NIH-like multi-label tree. Returns the CSV path. ``planted_copies.csv`` beside it lists
    the copies filed under other patients (PLANTED transforms, then REPUBLISHED ones); the
    last table row repeats an image under another patient ID. With ``label_errors``,
    ``planted_label_errors.csv`` lists every label its film contradicts (``_label_errors``).
    Patients have an age and sex (``Patient Age``, ``Patient Gender``, with the follow-up's
    ``View Position``); findings of
    patients aged ``WEAK_SUBGROUP_AGE`` or more are drawn faint or not at all
    (``finding_strength``): the subgroup an analysis should find weaker."""
    rng = np.random.default_rng([seed, 14])
    rows = []
    strengths = {}
    sixteen_bit_done = False
    (out / "signal_masks").mkdir(parents=True, exist_ok=True)
    for patient, anatomy in enumerate(_anatomies(rng, patients), start=1):
        age, sex = patient_metadata(seed, patient)
        # lists in FINDINGS order, never sets: set order varies with PYTHONHASHSEED and would
        # change which random draw goes to which finding from one process to the next
        carried = [f for f in FINDINGS if rng.random() < FINDING_PREVALENCE[f]]
        for followup in range(int(rng.integers(1, 6))):
            # a follow-up shows each of the patient's findings with high probability
            shown = [f for f in carried if rng.random() < 0.85]
            name = f"{patient:08d}_{followup:03d}.png"
            mode = _image_mode(rng, sixteen_bit_done)
            sixteen_bit_done = True
            signal = np.zeros(anatomy.size[::-1], bool)
            strength = finding_strength(seed, patient, followup, age)
            image = render_radiograph(anatomy, set(shown), rng, signal, _followup_position(rng, followup), strength)
            signal &= strength > 0  # an unseen finding drew nothing
            _save(image, out / "images" / name, mode)
            if shown:  # beside the images root, so the index never sees them
                Image.fromarray(signal).save(out / "signal_masks" / name)
            labels = "|".join(shown) or "No Finding"
            strengths[name] = strength
            view = "AP" if (age >= WEAK_SUBGROUP_AGE) == (followup % 3 != 2) else "PA"
            rows.append((name, labels, followup, patient, age, sex, view))
    planted = _plant_copies(out, rows, patients, rng)
    listed_twice = rows[int(rng.integers(len(rows) - len(PLANTED)))]
    planted += _republish(out, rows, patients + len(PLANTED) + 2, np.random.default_rng([seed, 23]))
    _write_manifest(out / "planted_copies.csv", planted)
    rows.append((listed_twice[0], listed_twice[1], 0, patients + len(PLANTED) + 1, *listed_twice[4:]))
    if label_errors:
        _write_manifest(out / "planted_label_errors.csv", _label_errors(rows, strengths), ("image", "finding", "how"))
    return _write_table(out / "Data_Entry.csv", rows)


def generate_folders(out: Path, patients: int, seed: int, test_fraction: float = 0.25) -> Path:
    """Kermany/COVID-like single-label folder tree with train/test folders, one leaked patient,
    and prefixed copies (``90Rotated_person7_...``) in the other split folder, listed in
    ``<out>_planted.csv`` beside the tree."""
    rng = np.random.default_rng([seed, 3])
    finding_of = {"Normal": set(), "Pneumonia": {"Pneumonia"}, "Effusion": {"Effusion"}}
    sixteen_bit_done = False
    written = []
    for patient, anatomy in enumerate(_anatomies(rng, patients), start=1):
        cls = FOLDER_CLASSES[rng.choice(len(FOLDER_CLASSES), p=FOLDER_CLASS_WEIGHTS)]
        split = "test" if rng.random() < test_fraction else "train"
        n_images = int(rng.integers(2 if patient == 1 else 1, 4))
        for k in range(n_images):
            # patient 1 leaks: its last image sits in the other split folder
            leaks = patient == 1 and k == n_images - 1
            image_split = {"train": "test", "test": "train"}[split] if leaks else split
            mode = _image_mode(rng, sixteen_bit_done)
            sixteen_bit_done = True
            path = out / image_split / cls / f"person{patient}_{cls.lower()}_{k}.png"
            _save(render_radiograph(anatomy, finding_of[cls], rng, position=_followup_position(rng, k)), path, mode)
            written.append(path)
    planted = []
    for which, source in enumerate(rng.choice(len(written), len(PLANTED), replace=False)):
        path = written[int(source)]
        other = {"train": "test", "test": "train"}[path.parent.parent.name]
        copy = out / other / path.parent.name / (PLANTED[which][0] + path.stem + PLANTED[which][2])
        _save_copy(path, copy, which)
        planted.append((copy.relative_to(out).as_posix(), path.relative_to(out).as_posix(), PLANTED[which][1]))
    _write_manifest(out.parent / f"{out.name}_planted.csv", planted)
    return out


# The DICOM form's scanners: (Manufacturer, ManufacturerModelName, InstitutionName, share of
# patients, photometric interpretation, transfer syntax, finding strength, detector noise). The
# bedside portable unit's films are harder (AP, noisier, findings faint or unseen): the report's
# subgroup table by scanner must find it.
DICOM_SCANNERS = (
    ("Acme Medical", "Acme DR 500", "North General Hospital", 0.4, "MONOCHROME2", "1.2.840.10008.1.2.4.80", 1.0, 0.01),
    ("Borealis", "Borealis CR 12", "South Clinic", 0.3, "MONOCHROME1", "1.2.840.10008.1.2.5", 1.0, 0.01),
    ("Corvid", "Corvid Portable 2", "South Clinic", 0.3, "MONOCHROME2", "1.2.840.10008.1.2.4.90", 0.3, 0.05),
)
HARD_SCANNER = "Corvid Portable 2"


def generate_dicom(out: Path, patients: int, seed: int) -> Path:
    """A hospital PACS export: ``<class>/<record number>_<k>.dcm``, 12 bits stored, each scanner in
    its own transfer syntax (JPEG-LS, RLE, JPEG 2000, all lossless) and photometric
    interpretation, headers with sex, age (``065Y``), view, manufacturer, model and institution, and
    the identifiers a real export carries (PatientName, PatientBirthDate, AccessionNumber, the record
    number as PatientID and in the file name) that medfold must keep out of what it shares."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

    rng = np.random.default_rng([seed, 24])
    finding_of = {"Normal": set(), "Pneumonia": {"Pneumonia"}, "Effusion": {"Effusion"}}
    shares = np.array([scanner[3] for scanner in DICOM_SCANNERS])
    records = rng.choice(np.arange(1_000_000, 10_000_000), patients, replace=False)
    for patient, anatomy in enumerate(_anatomies(rng, patients), start=1):
        cls = FOLDER_CLASSES[rng.choice(len(FOLDER_CLASSES), p=FOLDER_CLASS_WEIGHTS)]
        maker, model, site, _, photometric, syntax, strength, noise = DICOM_SCANNERS[
            int(rng.choice(len(DICOM_SCANNERS), p=shares))
        ]
        age, sex = patient_metadata(seed + 24, patient)
        record = str(int(records[patient - 1]))
        for k in range(int(rng.integers(1, 4))):
            # on the portable unit half of the findings do not show at all (as the demo's 65+ patients)
            shown = strength if strength == 1.0 or rng.random() >= WEAK_SUBGROUP_UNSEEN else 0.0
            picture = render_radiograph(
                anatomy, finding_of[cls], rng, position=_followup_position(rng, k), strength=shown
            )
            picture = np.clip(picture + rng.normal(0, noise, picture.shape), 0, 1)
            values = np.round(picture * 4095).astype(np.uint16)
            uid_of = lambda *what: generate_uid(entropy_srcs=[str(seed), record, str(k), *what])  # noqa: E731
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")  # computed radiography
            meta.MediaStorageSOPInstanceUID = uid_of("image")
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid_of("study"), uid_of("series")
            ds.PatientID, ds.PatientName = record, f"DEMO^PATIENT{patient:04d}"
            ds.PatientBirthDate, ds.AccessionNumber = f"{2026 - age}0101", f"A{record}{k}"
            ds.PatientSex, ds.PatientAge = sex, f"{age:03d}Y"
            ds.Modality, ds.BodyPartExamined, ds.StudyDate = "CR", "CHEST", f"2026{1 + k:02d}15"
            ds.ViewPosition = "AP" if model == HARD_SCANNER else "PA"
            ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName = maker, model, site
            ds.Rows, ds.Columns = values.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = (4095 - values if photometric == "MONOCHROME1" else values).tobytes()
            # the UIDs above stay (deterministic); RLE through pylibjpeg-rle's compiled encoder
            # (pydicom's own is pure Python: 9 of the form's 11 s)
            rle = {"encoding_plugin": "pylibjpeg"} if syntax == RLELossless else {}
            ds.compress(UID(syntax), generate_instance_uid=False, **rle)
            path = out / cls / f"{record}_{k}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return out


# the second site: its scanner gives lower contrast and a brighter floor (x GAIN + OFFSET)
SITE_GAIN, SITE_OFFSET = 0.75, 40


def _site_shift(path: Path) -> None:
    """Rewrite an image file with the second site's intensity response, in its own format."""
    with Image.open(path) as image:
        mode, pixels = image.mode, np.asarray(image)
    if pixels.dtype == np.uint16:
        shifted = np.clip(pixels * SITE_GAIN + SITE_OFFSET * 257, 0, 65535).astype(np.uint16)
        Image.fromarray(shifted).save(path)
        return
    shifted = np.clip(np.rint(pixels * SITE_GAIN + SITE_OFFSET), 0, 255).astype(np.uint8)
    Image.fromarray(shifted, mode=mode).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def generate_external_site(out: Path, training: Path, patients: int, seed: int) -> Path:
    """A second hospital's NIH-like CSV tree for external validation: other patients, drawn with
    another seed, every image through the site's intensity response (``SITE_GAIN``,
    ``SITE_OFFSET``); and two of ``training``'s images planted in it under new patient IDs, one
    byte for byte and one through the site's response: leaks an external validation must find.
    ``planted_from_training.csv`` lists them (copy, source, how)."""
    table = generate_cxr14(out, patients, seed, label_errors=False)
    for path in sorted((out / "images").iterdir()):
        _site_shift(path)
    with open(training / "Data_Entry.csv", newline="") as fh:
        source_rows = list(csv.reader(fh))[1:]
    planted, rows = [], []
    # the first films of patients 3 and 4, with their labels (both in the demo's training folds:
    # tests/test_external.py checks it)
    chosen = [r for r in source_rows if r[0] in ("00000003_000.png", "00000004_000.png")]
    for which, row in enumerate(chosen):
        copy = f"{90000 + which:08d}_000.png"
        shutil.copyfile(training / "images" / row[0], out / "images" / copy)
        how = "the same file"
        if which == 1:
            _site_shift(out / "images" / copy)
            how = "through the site's intensity response"
        rows.append([copy, row[1], 0, 90000 + which, *row[4:]])
        planted.append((copy, row[0], how))
    with open(table, "a", newline="") as fh:
        csv.writer(fh).writerows(rows)
    _write_manifest(out / "planted_from_training.csv", planted)
    return table


# the demo's forms, each made by its own rule (demo_<form>) so that a config indexes only the
# forms it reads; site_b plants copies of cxr14's films and so is made after it
DEMO_FORMS = ("cxr14", "chest_xray", "dicom", "site_b")


def generate_form(
    out: Path, form: str, cxr14_patients: int = 150, folder_patients: int = 90, seed: int = 0, dicom_patients: int = 220
) -> None:
    """One form of the demo under ``out`` (``out/<form>``); site_b needs ``out/cxr14`` made first."""
    out = Path(out)
    if form == "cxr14":
        generate_cxr14(out / "cxr14", cxr14_patients, seed)
    elif form == "chest_xray":
        generate_folders(out / "chest_xray", folder_patients, seed)
    elif form == "dicom":
        generate_dicom(out / "dicom", dicom_patients, seed)
    elif form == "site_b":
        generate_external_site(out / "site_b", out / "cxr14", max(20, cxr14_patients // 3), seed + 1)
    else:
        raise ValueError(f"no demo form {form!r}; the forms are {', '.join(DEMO_FORMS)}")


def generate_demo(
    out: Path, cxr14_patients: int = 150, folder_patients: int = 90, seed: int = 0, dicom_patients: int = 220
) -> None:
    """Every form of the demo under ``out``."""
    for form in DEMO_FORMS:
        generate_form(out, form, cxr14_patients, folder_patients, seed, dicom_patients)


def tree_digest(root: Path) -> str:
    """A hash of every file's relative path and bytes under ``root`` (to prove determinism)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- small and colour
SMALL_SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))


def generate_small_npz(out: Path, patients: int = 60, seed: int = 0, copies: int = 8) -> Path:
    """A 28 px MedMNIST form of the demo (``small.npz``: train/val/test images and labels, one
    film per patient, no patient IDs, label 1 when the film shows any finding), made as MedMNIST
    was made: each film rendered at its own size, then area-averaged to 28 x 28. ``copies``
    training films are exported again (gamma and a JPEG re-encode, nothing moved: the same frame)
    into val and test, listed in ``small_planted.csv`` (copy, original as ``<split>/<index>``):
    the official split leaks them, as ultrasound and X-ray benchmarks do."""
    from medfold.data.republish import republished, small

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 28])
    films, labels = [], []
    for anatomy in _anatomies(rng, patients):
        findings = {f for f in FINDINGS if rng.random() < FINDING_PREVALENCE[f]}
        films.append(np.round(render_radiograph(anatomy, findings, rng) * 255).astype(np.uint8))
        labels.append(int(bool(findings)))
    cuts = np.cumsum([0] + [round(share * patients) for _, share in SMALL_SPLITS])
    cuts[-1] = patients
    arrays, where = {}, {}
    for (split, _), lo, hi in zip(SMALL_SPLITS, cuts[:-1], cuts[1:]):
        arrays[f"{split}_images"] = [small(films[i]) for i in range(lo, hi)]
        arrays[f"{split}_labels"] = [labels[i] for i in range(lo, hi)]
        where.update({i: f"{split}/{i - lo:06d}" for i in range(lo, hi)})
    planted = []
    for k, i in enumerate(rng.choice(int(cuts[1]), copies, replace=False)):
        split = "val" if k % 2 else "test"
        arrays[f"{split}_images"].append(small(republished(films[i], "same_frame", rng)))
        arrays[f"{split}_labels"].append(labels[i])
        planted.append((f"{split}/{len(arrays[f'{split}_images']) - 1:06d}", where[int(i)], "same frame"))
    path = out / "small.npz"
    np.savez(
        path,
        **{k: np.stack(v) if k.endswith("images") else np.array(v, np.uint8)[:, None] for k, v in arrays.items()},
    )
    _write_manifest(out / "small_planted.csv", planted)
    return path


def render_fundus(rng: np.random.Generator, eye: str, side: int = 160) -> np.ndarray:
    """A colour fundus-like photograph (uint8, side x side x 3): a circular field on black, an
    orange-red retina with vignetting and a colour cast of its own, the optic disc on the eye's
    nasal side, a tree of vessels branching from it; some photographs dim and low in contrast,
    as real collections hold them (the ones a copy finder merges when the circle is compared)."""
    from PIL import ImageDraw

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    radius = 0.47
    inside = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= radius**2
    # one photograph in three dim, hazy and low in contrast: little but the circle and its shading
    faint = rng.random() < 0.35
    dim = rng.uniform(0.2, 0.35) if faint else rng.uniform(0.5, 1.0)
    contrast = 0.12 if faint else 0.55
    cast = rng.uniform(0.8, 1.2, 3) * np.array([0.85, 0.42, 0.18])
    vignette = 1 - 0.6 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / radius**2
    base = gaussian_filter(rng.standard_normal((side, side)).astype(np.float32), side / 30)
    retina = (0.75 + (0.02 if faint else 0.08) * base / (base.std() + 1e-9)) * vignette * dim
    disc = (0.5 + (0.27 if eye == "right" else -0.27) + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.05, 0.05))
    vessels = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(vessels)
    for _ in range(int(rng.integers(6, 10))):  # each vessel a random walk out of the disc, branching once
        angle = rng.uniform(0, 2 * np.pi)
        point = np.array(disc) * side
        width = int(rng.integers(2, 4))
        for step in range(int(rng.integers(12, 22))):
            angle += rng.normal(0, 0.25)
            following = point + side * 0.03 * np.array([np.cos(angle), np.sin(angle)])
            draw.line([tuple(point), tuple(following)], fill=255, width=width)
            if step == 6:
                width = max(1, width - 1)
            point = following
    vessel = gaussian_filter(np.asarray(vessels, np.float32) / 255, 0.7)
    disc_mask = np.exp(-(((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (2 * 0.045**2)))
    image = np.empty((side, side, 3), np.float32)
    for c in range(3):
        lift = (0.9, 0.8, 0.5)[c]
        image[..., c] = retina * cast[c] * (1 - contrast * vessel) + lift * dim * disc_mask
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    image[~inside] = 0
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def generate_fundus(out: Path, patients: int = 30, seed: int = 0, copies: int = 6) -> Path:
    """A glaucoma-like folder tree of colour fundus photographs, ``{glaucoma,normal}/
    <patient>_{left,right}.png``, both eyes of a patient under their number (as ODIR names them),
    and ``copies`` re-published copies of random photographs (turned or mirrored; cropped to their
    circle; or cropped a little, re-coloured and re-encoded) filed under new patient numbers, listed in
    ``fundus_planted.csv``. Returns the tree's root."""
    from medfold.data.republish import republished

    out = Path(out)
    root = out / "fundus"
    rng = np.random.default_rng([seed, 3])
    names = []
    for patient in range(1, patients + 1):
        folder = "glaucoma" if rng.random() < 0.3 else "normal"
        for eye in ("left", "right"):
            name = f"{folder}/{patient}_{eye}.png"
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_fundus(rng, eye)).save(root / name)
            names.append(name)
    planted = []
    for k, i in enumerate(rng.choice(len(names), copies, replace=False)):
        original = np.asarray(Image.open(root / names[i]))
        copy = republished(original, ("orientation", "circle", "recoloured")[k % 3], rng)
        folder, eye = names[i].split("/")[0], names[i].rsplit("_", 1)[1]
        name = f"{folder}/{patients + 1 + k}_{eye}"
        Image.fromarray(copy).save(root / name)
        planted.append((name, names[i], ("orientation", "circle", "recoloured")[k % 3]))
    _write_manifest(out / "fundus_planted.csv", planted)
    return root
