"""The dataset presets in config/examples/, each on a small generated tree of the layout it is for:
indexed, split and checked with the preset's own settings, and planned by the real snakemake."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, planned, resolved_config, run_snakemake
from PIL import Image

from medfold.core.errors import ConfigError, LeakageError
from medfold.data.demo import _patient_anatomy, render_radiograph
from medfold.data.index.build import build_index
from medfold.split import check_split, fold_members, make_splits

EXAMPLES = REPO / "config" / "examples"


def preset(name: str, **dataset) -> dict:
    """The preset alone (as --replace-workflow-config runs it), paths pointed at a generated tree."""
    config = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    config["dataset"].update(dataset)
    return resolved_config(config, base=None)


def radiograph(rng, findings=(), size=48, mode="L") -> Image.Image:
    anatomy = dataclasses.replace(_patient_anatomy(rng), size=(size, size))
    pixels = (render_radiograph(anatomy, set(findings), rng) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def split_of(index: pd.DataFrame, config: dict) -> pd.DataFrame:
    splits, _ = make_splits(index, config["classes"], config["split"])
    check_split(index, splits)
    return splits


def index_of(config: dict) -> tuple[pd.DataFrame, dict]:
    table, report = build_index(config["dataset"], threads=2)
    config["classes"] = report["classes"]
    return table, report


def dry_run(tmp_path: Path, config: dict) -> dict[str, int]:
    (tmp_path / "config").mkdir(exist_ok=True)
    path = tmp_path / "config" / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "classes"}))
    return planned(run_snakemake(tmp_path, "--dry-run", "--cores", "2", "--replace-workflow-config"))


# ----------------------------------------------------------------------------- Kermany
def kermany_tree(root: Path, rng) -> dict[str, str]:
    """chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}; returns image path -> expected patient."""
    expected = {}
    for p in range(1, 41):
        split = "test" if p % 5 == 0 else "val" if p == 7 else "train"
        pneumonia = p % 2 == 0
        for k in range(1 + p % 3):
            if pneumonia:
                name, patient = f"person{p}_{'bacteria' if k % 2 else 'virus'}_{k}.jpeg", f"person{p}"
            elif p % 3 == 0:
                name, patient = f"NORMAL2-IM-{p:04d}-{k + 1:04d}.jpeg", f"NORMAL2-IM-{p:04d}"
            else:
                name, patient = f"IM-{p:04d}-{k + 1:04d}.jpeg", f"IM-{p:04d}"
            cls = "PNEUMONIA" if pneumonia else "NORMAL"
            save(radiograph(rng, {"Pneumonia"} if pneumonia else ()), root / split / cls / name)
            expected[f"{split}/{cls}/{name}"] = patient
    return expected


def test_kermany_patients_come_from_both_naming_schemes_and_the_test_folder_is_the_test_set(tmp_path):
    expected = kermany_tree(tmp_path / "chest_xray", np.random.default_rng(1))
    config = preset("kermany_pneumonia", root=str(tmp_path / "chest_xray"))
    index, report = index_of(config)
    assert report["classes"] == ["NORMAL", "PNEUMONIA"] and report["patient_id_source"] == "regex"
    assert dict(zip(index["image_id"], index["patient_id"])) == expected
    splits = split_of(index, config)
    test = set(splits.loc[splits["set"] == "test", "image_id"])
    assert test == {i for i in expected if i.startswith("test/")}
    assert sorted(splits.loc[splits["set"] == "cv", "fold"].unique()) == [0, 1, 2, 3, 4]  # val/ joined the pool
    # a patient in both train/ and test/: the test folder stays the test set, whole, and that
    # patient's training films are set aside (on_source_leak: drop, as the study kept its test set)
    save(
        radiograph(np.random.default_rng(2), {"Pneumonia"}),
        tmp_path / "chest_xray" / "test" / "PNEUMONIA" / "person2_virus_9.jpeg",
    )
    index, _ = index_of(config)
    splits, summary = make_splits(index, config["classes"], config["split"])
    assert summary["source_leaks"][0]["patients"] == ["person2"] and "set aside" in summary["test_method"]
    assert set(splits.loc[splits["set"] == "test", "image_id"]) == {
        i for i in index["image_id"] if i.startswith("test/")
    }
    person2 = index["patient_id"] == "person2"
    assert set(splits.loc[person2 & ~index["image_id"].str.startswith("test/"), "set"]) == {"excluded"}
    check_split(index, splits)
    jobs = dry_run(tmp_path, config)
    assert jobs["train"] == 2 * 5 and jobs["ensemble_fold"] == 5 and jobs["explain"] == 5


# ----------------------------------------------------------------------------- COVID-19 Radiography
COVID_CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


def test_covid_radiography_classes_are_the_top_folders_and_masks_are_not_images(tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    rng = np.random.default_rng(3)
    for c, cls in enumerate(COVID_CLASSES):
        for n in range(1, 9):
            save(
                radiograph(rng, [("Pneumonia",), ("Effusion",), (), ("Nodule",)][c]),
                root / cls / "images" / f"{cls}-{n}.png",
            )
            save(Image.new("L", (48, 48), 255), root / cls / "masks" / f"{cls}-{n}.png")
        (root / f"{cls}.metadata.xlsx").write_bytes(b"PK\x03\x04 spreadsheet")
    config = preset("covid19_radiography", root=str(root))
    index, report = index_of(config)
    assert report["classes"] == COVID_CLASSES and report["images_indexed"] == 32
    assert not index["image_id"].str.contains("/masks/").any()
    assert all(labels == [image_id.split("/")[0]] for image_id, labels in zip(index["image_id"], index["labels"]))
    assert sorted(Path(f["path"]).name for f in report["ignored_files"]) == sorted(
        f"{c}.metadata.xlsx" for c in COVID_CLASSES
    )
    assert any("NO PATIENT IDS" in w for w in report["warnings"])
    splits = split_of(index, config)
    assert (splits["set"] == "test").sum() > 0 and splits.loc[splits["set"] == "cv", "fold"].nunique() == 5
    jobs = dry_run(tmp_path, config)
    assert jobs["train"] == 9 * 5 and jobs["aggregate_ensemble"] == 1  # the study's nine experiments


# ----------------------------------------------------------------------------- glaucoma folds
def glaucoma_tree(root: Path, folds: int, images: int, rng, size: int = 48) -> dict:
    """Fold0..Fold<folds-1>/{train,valid,test}/{normal,abnormal}: every fold holds every image;
    fold k's test folder has images i % folds == k, its valid folder i % folds == k + 1. The
    preset gives the folders the study's roles: test validates, valid is held out."""
    pool = [
        (radiograph(rng, {"Effusion"} if i % 2 else (), size, "RGB"), "abnormal" if i % 2 else "normal")
        for i in range(images)
    ]
    roles = {}
    for k in range(folds):
        for i, (image, cls) in enumerate(pool):
            role = "test" if i % folds == k else "valid" if i % folds == (k + 1) % folds else "train"
            rel = f"Fold{k}/{role}/{cls}/img{i:03d}.png"
            save(image, root / rel)
            roles[rel] = (k, {"valid": "test", "test": "val"}.get(role, role))
    return roles


def test_glaucoma_folds_are_honoured_as_given_and_checked_within_each_fold(tmp_path):
    roles = glaucoma_tree(tmp_path / "glaucoma", 10, 40, np.random.default_rng(4))
    config = preset("glaucoma_folds", root=str(tmp_path / "glaucoma"))
    index, report = index_of(config)
    assert report["classes"] == ["normal", "abnormal"] and report["images_indexed"] == 400
    splits = split_of(index, config)
    for k in range(10):
        members = fold_members(splits, k)
        for role in ("train", "val", "test"):
            assert set(members[role]) == {rel for rel, (fold, r) in roles.items() if fold == k and r == role}
    # the same image in two roles of one fold is a leak, named by its fold
    shutil.copy(
        tmp_path / "glaucoma" / "Fold3" / "train" / "abnormal" / "img001.png",
        tmp_path / "glaucoma" / "Fold3" / "test" / "abnormal" / "copy.png",
    )
    index, _ = index_of(config)
    splits, _ = make_splits(index, config["classes"], config["split"])
    with pytest.raises(LeakageError, match=r"fold_3/val"):
        check_split(index, splits)
    with pytest.raises(ConfigError, match=r"split.folds is 9 but the dataset's own folds are \[0, 1, .*9\]"):
        make_splits(index, config["classes"], {**config["split"], "folds": 9})
    jobs = dry_run(tmp_path, config)
    # the study's Models 1, 2, 3 and 5 on Fold0, its ten folds from Model 2, and its two searches
    # on Fold0 (32 and 36 combinations)
    assert jobs["train"] == 4 + 10 + 32 + 36 and jobs["explain"] == 10 and jobs["grid_table"] == 2


def test_glaucoma_preset_trains_in_stages_on_its_own_folds_through_the_workflow(tmp_path):
    """The real workflow on a 3-fold tree of the glaucoma layout, with the preset's staged
    schedule shortened and a small model: it learns, and the report is written without a fold
    ensemble (each fold has its own test set)."""
    glaucoma_tree(tmp_path / "glaucoma", 3, 90, np.random.default_rng(5), size=64)
    config = preset("glaucoma_folds", root=str(tmp_path / "glaucoma"))
    config["split"]["folds"] = 3
    config["training"].update(
        model="lenet", pretrained=None, head=None, batch_norm=True, image_size=32, gpus=0, batch_size=16, threads=2
    )
    config["experiments"] = {
        "staged": {
            "stages": [
                {"train": "head", "epochs": 2, "lr": 0.003},
                {"train": "last_blocks", "blocks": 1, "epochs": 3, "lr": 0.003},
                {"train": "all", "epochs": 8, "lr": 0.003},
            ]
        }
    }
    config["explain"] = {"experiments": ["staged"], "images_per_class": 1}
    config["reference"] = {"study": "Study 002", "experiments": {"staged": {"val.accuracy": 0.906, "parameters": 1}}}
    config["evaluation"] = {"bootstrap": 100}
    dry_run(tmp_path, config)  # writes the config
    run_snakemake(tmp_path, "--cores", "2", "--replace-workflow-config")
    out = tmp_path / "results" / "glaucoma_folds"
    summary = json.loads((out / "staged" / "cv" / "summary.json").read_text())
    assert summary["statistics"]["test.auroc_macro"]["mean"] > 0.8  # effusion (abnormal) is visible
    assert json.loads((out / "staged" / "cv" / "ensemble_test.json").read_text()) is None
    metrics = json.loads((out / "staged" / "fold_0" / "metrics.json").read_text())
    assert [s["train"] for s in metrics["stages"]] == ["head", "last_blocks", "all"]
    trainable = [s["trainable_parameters"] for s in metrics["stages"]]
    assert trainable[0] < trainable[1] < trainable[2]
    history = pd.read_csv(out / "staged" / "fold_0" / "history.csv")
    assert history["stage"].iloc[0] == 1 and history["stage"].iloc[-1] == 3
    # train-set metrics each epoch beside the validation ones, for the learning curves
    assert {"train_auroc_macro", "train_accuracy", "train_f1_macro", "train_eval_loss"} <= set(history.columns)
    assert history["train_auroc_macro"].iloc[-1] > history["train_auroc_macro"].iloc[0]
    html = (out / "report" / "index.html").read_text()
    assert "Explanations" in html
    # the study's figures beside the run's, and each stage's own test result
    assert "The study beside this run" in html and "0.906" in html
    assert "Each stage of the staged fine-tuning" in html and "fold 2, stage 3" in html
    assert all("test" in s and s["test"]["auroc_macro"] is not None for s in metrics["stages"])
    # no fold ensemble, so each fold's own classification report and confusion matrix
    assert "Each fold on its own sets" in html
    for fold in range(3):
        assert f"fold {fold}, validation set" in html and f"fold {fold}, test set" in html


# ----------------------------------------------------------------------------- NIH ChestX-ray14
NIH_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]


def nih_tree(root: Path, rng) -> tuple[list[str], list[str]]:
    rows, train, test = [], [], []
    for patient in range(1, 31):
        for follow_up in range(1 + patient % 3):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = [NIH_LABELS[(patient + j) % 14] for j in range(patient % 3)]
            save(radiograph(rng), root / f"images_{1 + patient % 2:03d}" / "images" / name)
            rows.append(
                {
                    "Image Index": name,
                    "Finding Labels": "|".join(findings) or "No Finding",
                    "Follow-up #": follow_up,
                    "Patient ID": patient,
                    "Patient Age": 50,
                    "Patient Gender": "F",
                    "View Position": "PA",
                    "OriginalImage[Width": 48,
                    "Height]": 48,
                    "OriginalImagePixelSpacing[x": 0.14,
                    "y]": 0.14,
                }
            )
            (test if patient % 4 == 0 else train).append(name)
    pd.DataFrame(rows).to_csv(root / "Data_Entry_2017.csv", index=False)
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return train, test


def test_nih_official_lists_give_the_test_set(tmp_path):
    root = tmp_path / "nih"
    train, test = nih_tree(root, np.random.default_rng(6))
    lists = {"train": str(root / "train_val_list.txt"), "test": str(root / "test_list.txt")}
    config = preset("nih_cxr14", table=str(root / "Data_Entry_2017.csv"), root=str(root), source_split_lists=lists)
    index, report = index_of(config)
    assert report["classes"] == NIH_LABELS and report["images_indexed"] == len(train) + len(test)
    splits = split_of(index, config)
    assert set(splits.loc[splits["set"] == "test", "image_id"]) == set(test)
    assert splits.loc[splits["set"] == "cv", "fold"].nunique() == 5
    # an image in no list is named
    (root / "test_list.txt").write_text("\n".join(test[1:]) + "\n")
    with pytest.raises(ConfigError, match=rf"image '{test[0]}' is in none of the lists"):
        index_of(config)
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    jobs = dry_run(tmp_path, config)
    # the thesis's fourteen configurations (six pruned while training, two QAT from the start, two on
    # 4 GPUs) on 5 folds, its two 6-combination grids on fold 0; six variants of resnet50 on each fold
    assert jobs["train"] == 14 * 5 + 2 * 6 and jobs["compress"] == 6 * 5 and jobs["grid_table"] == 2


# ----------------------------------------------------------------------------- MedMNIST
def test_organsmnist_official_split_is_one_fold_and_its_grid_is_four_jobs(tmp_path):
    rng = np.random.default_rng(7)
    arrays = {}
    for split, n in (("train", 60), ("val", 20), ("test", 30)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 11).reshape(n, 1)
    np.savez(tmp_path / "organsmnist.npz", **arrays)
    config = preset("organsmnist", npz=str(tmp_path / "organsmnist.npz"))
    index, report = index_of(config)
    assert report["classes"] == config["dataset"]["labels"] and report["images_indexed"] == 110
    splits = split_of(index, config)
    members = fold_members(splits, 0)
    assert {role: len(ids) for role, ids in members.items()} == {"train": 60, "val": 20, "test": 30}
    assert all(i.startswith("val/") for i in members["val"])
    jobs = dry_run(tmp_path, config)
    # the study's five steps, its three ResNets, a 2x2 grid (4 combinations) and one fold: 12 trainings
    assert jobs["train"] == 12 and jobs["grid_table"] == 1 and jobs["ensemble_fold"] == 1


def test_nih_pneumonia_preset_makes_pneumonia_against_the_rest(tmp_path):
    root = tmp_path / "nih"
    nih_tree(root, np.random.default_rng(6))
    lists = {"train": str(root / "train_val_list.txt"), "test": str(root / "test_list.txt")}
    config = preset("nih_pneumonia", table=str(root / "Data_Entry_2017.csv"), root=str(root), source_split_lists=lists)
    index, report = index_of(config)
    rows = pd.read_csv(root / "Data_Entry_2017.csv")
    pneumonia = set(rows.loc[rows["Finding Labels"].str.contains("Pneumonia"), "Image Index"])
    assert report["classes"] == ["Rest", "Pneumonia"] and report["task"] == "binary"
    assert set(index.loc[index["labels"].map(lambda labels: labels == ["Pneumonia"]), "image_id"]) == pneumonia
    assert (index["labels"].map(len) == 1).all() and report["images_indexed"] == len(rows)
    assert report["label_map"]["unmapped_raw_labels"]["No Finding"] == (rows["Finding Labels"] == "No Finding").sum()
    jobs = dry_run(tmp_path, config)
    assert jobs["train"] == 5
