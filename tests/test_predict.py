"""Predictions on new images (medfold predict, and the workflow's predict target) are the
workflow's own predictions when the new images are the demo's test images: the same decoding,
resizing, normalisation, models and thresholds."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import run_snakemake

from medfold.data.index.io import read_index

DS = "demo_cxr14"
MEDFOLD = str(Path(sys.executable).parent / "medfold")  # the console command pip installed


def _test_images(work: Path, tmp_path: Path) -> pd.DataFrame:
    """The held-out test images as a CSV a user would write, plus a file that is not an image."""
    index, _ = read_index(work / "results" / DS / "index.parquet")
    splits = pd.read_parquet(work / "results" / DS / "splits.parquet")
    test = index[index["image_id"].isin(splits.loc[splits["set"] == "test", "image_id"])]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [str(work / p) for p in test["path"]]  # the index holds them relative to the workflow
    # named as the workflow's predictions name them (pseudonyms by default: medfold.core.privacy)
    table = pd.DataFrame({"path": [*paths, str(broken)], "image_id": [*test["shared_image_id"], "broken"]})
    table.to_csv(tmp_path / "new_images.csv", index=False)
    return table


def _predict(model: Path, images: Path, out: Path, *extra) -> pd.DataFrame:
    proc = subprocess.run(
        [MEDFOLD, "predict", str(model), str(images), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 unreadable" in proc.stdout
    unreadable = pd.read_csv(out / "unreadable.csv")
    assert unreadable["path"].str.endswith("broken.png").tolist() == [True] and unreadable["reason"].iloc[0]
    return pd.read_parquet(out / "predictions.parquet")


def _probs(frame: pd.DataFrame, order) -> np.ndarray:
    return frame.set_index("image_id").loc[order].filter(like="prob:").to_numpy()


def test_medfold_predict_equals_the_workflows_own_test_predictions(trained_workflow, tmp_path):
    exp = trained_workflow / "results" / DS / "batchnorm"
    table = _test_images(trained_workflow, tmp_path)
    ids = dict(zip(table["path"], table["image_id"]))
    order = table["image_id"].iloc[:-1].tolist()

    # the fold ensemble, labels at the thresholds of its pooled out-of-fold predictions
    got = _predict(exp, tmp_path / "new_images.csv", tmp_path / "ensemble").assign(
        image_id=lambda f: f["path"].map(ids)
    )
    own = pd.read_parquet(exp / "cv" / "ensemble_test_predictions.parquet")
    assert np.abs(_probs(got, order) - _probs(own, order)).max() < 1e-5
    thresholds = json.loads((exp / "cv" / "ensemble_test.json").read_text())["thresholds"]
    record = json.loads((tmp_path / "ensemble" / "prediction.json").read_text())
    # every seed of every fold (QUICK trains two of each)
    assert record["thresholds"] == thresholds and record["model"] == "fold ensemble of 6 models"
    classes = record["classes"]
    expected = ["|".join(c for c, p, t in zip(classes, row, thresholds) if p >= t) for row in _probs(got, order)]
    assert got.set_index("image_id").loc[order, "predicted"].fillna("").tolist() == expected

    # one fold's model, and a compressed variant's archive
    for model, predictions in (
        (exp / "fold_1" / "model.pt", exp / "fold_1" / "predictions.parquet"),
        (
            exp / "variants" / "int8" / "fold_0" / "model.pt2",
            exp / "variants" / "int8" / "fold_0" / "predictions.parquet",
        ),
    ):
        got = _predict(model, tmp_path / "new_images.csv", tmp_path / model.parent.name / model.suffix[1:])
        got["image_id"] = got["path"].map(ids)
        own = pd.read_parquet(predictions)
        own = own[own["set"] == "test"]
        assert np.abs(_probs(got, order) - _probs(own, order)).max() < 1e-5, model


def test_the_workflows_predict_target_with_gradcam(trained_workflow, tmp_path):
    folder = tmp_path / "new"
    table = _test_images(trained_workflow, tmp_path)
    for path in table["path"].iloc[:5]:
        (folder / "incoming").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / "incoming" / Path(path).name)
    (folder / "incoming" / "notes.dcm").write_text("not DICOM")
    target = f"results/{DS}/batchnorm/predict/predictions.csv"
    # README: a config file of one's own, given after the workflow's (later files win)
    (tmp_path / "predict.yaml").write_text(f"predict:\n  images: {folder}\n  gradcam: true\n")
    run_snakemake(
        trained_workflow,
        "--cores",
        "2",
        target,
        "--configfile",
        str(trained_workflow / "config" / "config.yaml"),
        str(tmp_path / "predict.yaml"),
    )
    out = trained_workflow / "results" / DS / "batchnorm" / "predict"
    got = pd.read_csv(out / "predictions.csv")
    assert len(got) == 5 and len(list((out / "gradcam").glob("*.png"))) == 5
    assert pd.read_csv(out / "unreadable.csv")["image"].tolist() == ["incoming/notes.dcm"]
