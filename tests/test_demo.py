import csv
import os
import subprocess
import sys
from collections import Counter

from PIL import Image

from medfold.data.demo import generate_demo, tree_digest


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path, demo_dir):
    # in another process with another hash seed: set ordering must not leak into the data
    code = f"from medfold.data.demo import generate_demo; generate_demo({str(tmp_path / 'again')!r}, seed=0)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    generate_demo(tmp_path / "other", seed=1)
    assert tree_digest(tmp_path / "again") == tree_digest(demo_dir)
    assert tree_digest(tmp_path / "other") != tree_digest(demo_dir)


def test_csv_form_has_followups_unequal_classes_and_mixed_images(demo_dir):
    rows = list(csv.DictReader(open(demo_dir / "cxr14" / "Data_Entry.csv")))
    per_patient = Counter(r["Patient ID"] for r in rows)
    assert max(per_patient.values()) >= 3 and sum(v > 1 for v in per_patient.values()) > len(per_patient) / 2
    labels = Counter(label for r in rows for label in r["Finding Labels"].split("|"))
    assert "No Finding" in labels and len(set(labels.values())) == len(labels)  # all counts differ
    assert any("|" in r["Finding Labels"] for r in rows)  # multi-label rows exist
    images = [Image.open(demo_dir / "cxr14" / "images" / r["Image Index"]) for r in rows]
    modes = Counter(im.mode for im in images)
    assert modes["I;16"] == 1 and modes["RGB"] > 0 and modes["L"] > modes["RGB"]
    assert len({im.size for im in images}) >= 3


def test_folder_form_has_split_folders_classes_and_one_leaked_patient(demo_dir):
    files = [f for f in (demo_dir / "chest_xray").rglob("*") if f.is_file()]
    splits = {f.relative_to(demo_dir / "chest_xray").parts[0] for f in files}
    classes = Counter(f.parent.name for f in files)
    assert splits == {"train", "test"} and set(classes) == {"Normal", "Pneumonia", "Effusion"}
    where = {}
    for f in files:
        if f.name.startswith("person"):  # the planted copies carry a prefix
            where.setdefault(f.name.split("_")[0], set()).add(f.relative_to(demo_dir / "chest_xray").parts[0])
    assert [p for p, s in where.items() if len(s) > 1] == ["person1"]
