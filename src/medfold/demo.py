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
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

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


def _patient_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        cx=0.5 + rng.uniform(-0.03, 0.03),
        lung_w=rng.uniform(0.15, 0.19),
        lung_h=rng.uniform(0.30, 0.36),
        heart_w=rng.uniform(0.11, 0.14),
        brightness=rng.uniform(0.85, 1.1),
        size=SIZES[rng.integers(len(SIZES))],
    )


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def render_radiograph(anatomy: Anatomy, findings: set[str], rng: np.random.Generator,
                      signal: np.ndarray | None = None) -> np.ndarray:
    """A float image in [0, 1] of shape (height, width) showing ``findings``. ``signal`` (a
    boolean array of the same shape), when given, receives the pixels the findings drew: where
    the information that an explanation should point at lies."""
    width, height = anatomy.size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= width
    yy /= height
    drawn = np.zeros((height, width), bool)
    img = np.full((height, width), 0.08, np.float32)
    img[_ellipse(xx, yy, anatomy.cx, 0.55, 0.42, 0.52)] = 0.55  # soft tissue
    # ribs: faint horizontal stripes across the chest
    img += 0.04 * (np.sin(yy * 2 * np.pi * 9) > 0.6)
    left_cx, right_cx = anatomy.cx - 0.2, anatomy.cx + 0.2
    lungs = {}
    for side, lcx in (("left", left_cx), ("right", right_cx)):
        mask = _ellipse(xx, yy, lcx, 0.5, anatomy.lung_w, anatomy.lung_h)
        lungs[side] = (mask, lcx)
        img[mask] = 0.18
    img[np.abs(xx - anatomy.cx) < 0.035] = 0.75  # spine
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
    if signal is not None:
        signal[...] = drawn
    img = gaussian_filter(img, sigma=width / 200) * anatomy.brightness
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


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


def generate_cxr14(out: Path, patients: int, seed: int) -> Path:
    """NIH-like multi-label tree. Returns the CSV path."""
    rng = np.random.default_rng([seed, 14])
    rows = []
    sixteen_bit_done = False
    (out / "signal_masks").mkdir(parents=True, exist_ok=True)
    for patient in range(1, patients + 1):
        anatomy = _patient_anatomy(rng)
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
            _save(render_radiograph(anatomy, set(shown), rng, signal), out / "images" / name, mode)
            if shown:  # beside the images root, so the index never sees them
                Image.fromarray(signal).save(out / "signal_masks" / name)
            labels = "|".join(shown) or "No Finding"
            rows.append((name, labels, followup, patient))
    table = out / "Data_Entry.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        writer.writerows(rows)
    return table


def generate_folders(out: Path, patients: int, seed: int, test_fraction: float = 0.25) -> Path:
    """Kermany/COVID-like single-label folder tree with train/test folders and one leaked patient."""
    rng = np.random.default_rng([seed, 3])
    finding_of = {"Normal": set(), "Pneumonia": {"Pneumonia"}, "Effusion": {"Effusion"}}
    sixteen_bit_done = False
    for patient in range(1, patients + 1):
        anatomy = _patient_anatomy(rng)
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
            _save(render_radiograph(anatomy, finding_of[cls], rng), path, mode)
    return out


def generate_demo(out: Path, cxr14_patients: int = 150, folder_patients: int = 90, seed: int = 0) -> None:
    out = Path(out)
    generate_cxr14(out / "cxr14", cxr14_patients, seed)
    generate_folders(out / "chest_xray", folder_patients, seed)


def tree_digest(root: Path) -> str:
    """A hash of every file's relative path and bytes under ``root`` (to prove determinism)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
