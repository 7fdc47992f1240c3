"""The exported fold ensemble (medfold export, the workflow's export/ target) is the workflow's
own ensemble under onnxruntime: the same probabilities on the demo's test images, from medfold's
cache or from a user's own resizing code; one fold and the compressed variants too; and its model
card is built from the result files, holds no identifier and appears in the report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfold.data.index.io import read_index
from medfold.deploy.export import export_onnx
from medfold.deploy.predict import read_metadata, session

DS = "demo_cxr14"
MEDFOLD = str(Path(sys.executable).parent / "medfold")


@pytest.fixture(scope="module")
def demo(trained_workflow):
    work = trained_workflow
    index, _ = read_index(work / "results" / DS / "index.parquet")
    splits = pd.read_parquet(work / "results" / DS / "splits.parquet")
    cache = np.load(work / "results" / DS / "cache" / "64" / "images.npy", mmap_mode="r")
    rows = np.flatnonzero(index["image_id"].isin(splits.loc[splits["set"] == "test", "image_id"]))
    return work, index, cache, rows


def _medfold(*args) -> subprocess.CompletedProcess:
    """The console command pip installed, as a user runs it."""
    return subprocess.run([MEDFOLD, *map(str, args)], capture_output=True, text=True, timeout=600)


def _probs(frame: pd.DataFrame, ids) -> np.ndarray:
    return frame.set_index("image_id").loc[list(ids)].filter(like="prob:").to_numpy()


def test_the_exported_ensemble_is_the_workflows_ensemble(demo):
    work, index, cache, rows = demo
    exp = work / "results" / DS / "batchnorm"
    onnx_path = exp / "export" / "model.onnx"
    meta = read_metadata(onnx_path)
    ensemble = json.loads((exp / "cv" / "ensemble_test.json").read_text())
    _, index_meta = read_index(work / "results" / DS / "index.parquet")
    assert meta["thresholds"] == ensemble["thresholds"] and meta["classes"] == index_meta["classes"]
    assert (meta["image_size"], meta["channels"], meta["model"]) == (64, 1, "fold ensemble of 6 models")
    got = session(onnx_path).run(None, {"images": np.ascontiguousarray(cache[rows])})[0]
    own = pd.read_parquet(exp / "cv" / "ensemble_test_predictions.parquet")
    want = _probs(own, index["shared_image_id"].iloc[rows])
    assert got.shape == want.shape == (len(rows), 4)
    assert np.abs(got - want).max() < 1e-4
    record = json.loads((exp / "export" / "model.json").read_text())
    assert record["parity_max_abs_difference"] < 1e-4

    # a user's own code, as the metadata states the resize, gives medfold's cache and its result
    assert "PIL bilinear, reducing_gap=3.0" in meta["resize"]
    grey = [r for r in rows if Image.open(work / index["path"].iat[r]).mode == "L"]
    assert len(grey) > 0.5 * len(rows)
    mine = np.stack(
        [
            np.asarray(
                Image.open(work / index["path"].iat[r]).resize((64, 64), Image.Resampling.BILINEAR, reducing_gap=3.0)
            )[None]
            for r in grey
        ]
    )
    assert np.array_equal(mine, cache[grey])
    from_mine = session(onnx_path).run(None, {"images": mine})[0]
    assert np.abs(from_mine - _probs(own, index["shared_image_id"].iloc[grey])).max() < 1e-4


def test_one_fold_and_the_compressed_variants_export_where_onnx_can_carry_them(demo, tmp_path):
    work, index, cache, rows = demo
    exp = work / "results" / DS / "batchnorm"
    images = np.ascontiguousarray(cache[rows])
    ids = index["shared_image_id"].iloc[rows]
    for source, predictions, tolerance in (
        (exp / "fold_1" / "model.pt", exp / "fold_1" / "predictions.parquet", 1e-4),
        (
            exp / "variants" / "pruned" / "fold_0" / "model.pt2",
            exp / "variants" / "pruned" / "fold_0" / "predictions.parquet",
            1e-4,
        ),
        # int8: onnxruntime's int8 kernels against inductor's compiled int8 graph
        (
            exp / "variants" / "int8" / "fold_0" / "model.pt2",
            exp / "variants" / "int8" / "fold_0" / "predictions.parquet",
            2e-2,
        ),
    ):
        out = tmp_path / source.parent.parent.name / source.parent.name
        record = export_onnx(source, out)
        got = session(out / "model.onnx").run(None, {"images": images})[0]
        frame = pd.read_parquet(predictions)
        want = _probs(frame[frame["set"] == "test"], ids)
        assert np.abs(got - want).max() < tolerance, source
        assert record["parity_max_abs_difference"] <= record["parity_tolerance"]
    assert "QuantizeLinear" in {n.op_type for n in __import__("onnx").load(str(out / "model.onnx")).graph.node}


def test_an_int8_export_is_held_to_pytorch_and_the_fp32_model_on_any_isa_and_a_broken_one_is_refused(demo, tmp_path):
    """On an AVX2-only host onnxruntime's fast u8s8 kernels drifted 0.02-0.04 from PyTorch's int8
    graph and the export was refused; with medfold's session (u8u8 there) it is within 1e-3 on
    every ISA. A file whose quantisation scale is wrong is still refused, naming what failed."""
    import onnx
    from onnx import numpy_helper

    from medfold.core.errors import MedfoldError
    from medfold.deploy.export import INT8_PARITY, InferencePath, _base_model, _source, int8_check

    work, index, cache, rows = demo
    source = work / "results" / DS / "batchnorm" / "variants" / "int8" / "fold_2" / "model.pt2"
    record = export_onnx(source, tmp_path / "int8")
    assert record["parity_max_abs_difference"] <= INT8_PARITY and record["check_images"] == 32
    assert record["decisions_agreeing"] >= 0.95 and record["host_isa"]
    # onnxruntime's int8 is as far from the fp32 model as PyTorch's int8 is (both measured)
    gap = record["onnx_vs_fp32_max_abs_difference"] - record["pytorch_int8_vs_fp32_max_abs_difference"]
    assert abs(gap) <= INT8_PARITY
    # on the demo's real test images too, the exported file agrees with PyTorch's int8 graph
    predictor, modules, _ = _source(source)
    module = InferencePath(modules, predictor.mean, predictor.std, predictor.scale, predictor.tta, predictor.task)
    module.training = False
    images = np.ascontiguousarray(cache[rows])
    int8_check(tmp_path / "int8" / "model.onnx", module, _base_model(source, predictor), images, predictor.thresholds)

    # a broken export: one weight's dequantisation scale 1.5x too large
    model = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    scale = inits[node.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(MedfoldError, match="the int8 export is refused: its probabilities differ"):
        int8_check(broken, module, _base_model(source, predictor), images, predictor.thresholds)
    assert not broken.exists()


def test_medfold_export_writes_the_card_and_medfold_predict_takes_the_onnx_file(demo, tmp_path):
    work, index, cache, rows = demo
    exp = work / "results" / DS / "batchnorm"
    notes = tmp_path / "card.yaml"
    notes.write_text("intended_use: triage <b>research</b> only\nlimitations: one site\n")
    proc = _medfold("export", exp, "--out", tmp_path / "out", "--card", notes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["intended_use"]["intended_use"] == "triage <b>research</b> only"
    assert card["intended_use"]["out_of_scope"].startswith("not stated")
    ensemble = json.loads((exp / "cv" / "ensemble_test.json").read_text())
    test = card["quantitative_analyses"]["test"]
    assert test["auroc_macro"]["value"] == ensemble["auroc_macro"]
    assert test["auroc_macro"]["ci95"] == ensemble["ci95"]["auroc_macro"]
    split = json.loads((work / "results" / DS / "split_summary.json").read_text())
    assert card["evaluation_data"]["held_out_test_set"]["patients"] == split["sets"]["test"]["patients"]
    manifest = (work / "results" / DS / "split_manifest.csv").read_text()
    assert f"# split_digest: {card['split_digest']}" in manifest
    assert card["software"]["onnxruntime"] and card["metrics"]["thresholds_from"] == "pooled out-of-fold predictions"
    # counts only: no patient or image identifier, real or pseudonymised (the demo's raw patient
    # IDs are small integers, which any count could contain: their pseudonyms are checked)
    text = (tmp_path / "out" / "model_card.md").read_text() + json.dumps(card)
    for column in ("shared_patient_id", "image_id", "shared_image_id"):
        assert not any(str(v) in text for v in index[column].unique()), column
    bad = tmp_path / "bad.yaml"
    bad.write_text("intended_use: x\nwho_knows: y\n")
    proc = _medfold("export", exp, "--out", tmp_path / "bad", "--card", bad)
    assert proc.returncode == 1 and "['who_knows'] are not card fields" in proc.stderr
    assert not (tmp_path / "bad").exists()

    # medfold predict on the exported file: the workflow's ensemble probabilities and labels
    paths = [str(work / p) for p in index["path"].iloc[rows]]
    pd.DataFrame({"path": paths}).to_csv(tmp_path / "new.csv", index=False)
    proc = _medfold("predict", tmp_path / "out" / "model.onnx", tmp_path / "new.csv", "--out", tmp_path / "p")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_parquet(tmp_path / "p" / "predictions.parquet")
    own = pd.read_parquet(exp / "cv" / "ensemble_test_predictions.parquet")
    want = _probs(own, index["shared_image_id"].iloc[rows])
    assert np.abs(got.filter(like="prob:").to_numpy() - want).max() < 1e-4
    record = json.loads((tmp_path / "p" / "prediction.json").read_text())
    assert record["thresholds"] == ensemble["thresholds"] and record["model"].startswith("ONNX export")


def test_the_report_shows_the_model_card_escaped(demo):
    work = demo[0]
    page = (work / "results" / DS / "report" / "index.html").read_text()
    assert 'id="card-batchnorm"' in page and "Model card: batchnorm" in page
    card = json.loads((work / "results" / DS / "batchnorm" / "export" / "model_card.json").read_text())
    assert card["intended_use"]["intended_use"].split()[0] in page
    assert "Ethical considerations" in page and card["split_digest"] in page


@pytest.mark.parametrize(
    "tta, scale, qat", [("hflip", "255", False), ("none", "image_max", False), ("none", "255", True)]
)
def test_flip_tta_image_max_scaling_and_qat_models_are_carried_into_the_file(tta, scale, qat, tmp_path):
    """What the demo does not use: the exported path averages each model with its mirrored image
    (flip TTA), scales each image by its maximum, and keeps QAT's fake quantization, exactly as
    medfold predict's Predictor computes them (within the export's 1e-4)."""
    import torch

    from medfold.deploy.export import InferencePath, parity, write_onnx
    from medfold.deploy.predict import Predictor
    from medfold.training import fakequant
    from medfold.training.models import build_model

    models = [build_model("lenet", 1, 3, init_seed=k).eval() for k in range(2)]
    images = np.random.default_rng(0).integers(0, 200, (6, 1, 32, 32), dtype=np.uint8)
    if qat:
        for m in models:
            fakequant.prepare(m, "all").train()
            m(torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)))  # observe ranges, as training does
            m.eval()
    mean, std = [0.4], [0.3]
    predictor = Predictor(models, ["a", "b", "c"], "multiclass", 32, 1, None, mean=mean, std=std, tta=tta, scale=scale)
    module = InferencePath(models, mean, std, scale, tta, "multiclass").eval()
    path = tmp_path / "m.onnx"
    write_onnx(module, torch.from_numpy(images[:2]), path)
    got = session(path).run(None, {"images": images})[0]
    want = predictor.probabilities(predictor.input(images))
    # 1e-4, the export's own tolerance: under QAT a value that lands on a rounding boundary can go
    # either way in onnxruntime's float arithmetic (1.2e-5 seen once)
    assert np.abs(got - want).max() < 1e-4 and parity(path, module, images) < 1e-4
    assert np.allclose(got.sum(1), 1, atol=1e-5)  # softmax: one distribution per image
    plain = Predictor(models, ["a", "b", "c"], "multiclass", 32, 1, None, mean=mean, std=std)
    if tta != "none" or scale != "255":  # the setting changed the result: it was not ignored
        assert np.abs(got - plain.probabilities(plain.input(images))).max() > 1e-4
