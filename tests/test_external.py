"""External validation on the demo's second site (medfold.data.demo.generate_external_site: other
patients, a scanner's intensity response, two of the training films planted under new patient
IDs): the copies are found before any prediction and left out (or stop the run), the frozen
ensemble's metrics, calibration drift and threshold shift are reported beside the internal test
set's, and recalibration fitted on a patient share improves calibration on the rest."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
from conftest import resolved_config

from medfold.core.errors import ConfigError, DataError
from medfold.data.index.io import read_index

DS = "demo_cxr14"


@pytest.fixture(scope="module")
def site(trained_workflow):
    work = trained_workflow
    out = work / "results" / DS / "external" / "site_b"
    return work, out, json.loads((out / "external.json").read_text())


def test_the_planted_training_films_are_found_named_and_left_out(site):
    work, out, record = site
    with open(work / "resources" / "demo" / "site_b" / "planted_from_training.csv", newline="") as fh:
        planted = list(csv.DictReader(fh))
    main, _ = read_index(work / "results" / DS / "index.parquet")
    ext, _ = read_index(out / "index.parquet")
    shared = dict(zip(main["image_id"], main["shared_image_id"]))
    shared_ext = dict(zip(ext["image_id"], ext["shared_image_id"]))
    copies = pd.read_csv(out / "copies.csv")
    found = dict(zip(copies["external_image"], copies["copy_of"]))
    for row in planted:  # each planted film found, and traced to the training film it copies
        assert found[shared_ext[row["copy"]]] == shared[row["original"]]
    assert sorted(copies["kind"]) == ["exact copy", "transformed copy"]
    assert copies["copy_of_set"].str.startswith("fold").all()  # training films, not test ones
    of_sets = record["copies"].pop("of_sets")
    assert record["copies"] == {"found": 2, "exact": 1, "near": 1, "on_copy": "exclude", "excluded": 2}
    assert sum(of_sets.values()) == 2 and all(s.startswith("fold") for s in of_sets)
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == len(ext) - 2 == record["external"]["images"]
    assert not set(copies["external_image"]) & set(predictions["image_id"])
    # the copies file and the predictions hold shared IDs only, never the files' own names
    assert not set(ext["image_id"]) & (set(predictions["image_id"]) | set(copies["external_image"]))


def test_metrics_drift_and_thresholds_are_reported_beside_the_internal_test_set(site):
    work, out, record = site
    ensemble = json.loads((work / "results" / DS / "batchnorm" / "cv" / "ensemble_test.json").read_text())
    assert record["internal"]["auroc_macro"] == ensemble["auroc_macro"]
    low, high = record["external"]["ci95"]["auroc_macro"]
    assert low < record["external"]["auroc_macro"] < high
    assert record["bootstrap"]["unit"] == "patient"
    assert record["external"]["auroc_macro"] > 0.6  # the frozen ensemble still ranks the other site's images
    classes = record["classes"]
    assert set(record["calibration"]["internal"]) == set(record["calibration"]["external"]) == set(classes)
    # the site's intensity response moves the probabilities: calibration and thresholds drift
    assert max(record["calibration"]["external"][c]["ece"] for c in classes) > max(
        record["calibration"]["internal"][c]["ece"] for c in classes
    )
    t = record["thresholds"]
    assert t["internal"] == ensemble["thresholds"] and t["rechosen"] != t["internal"]
    assert set(t["at_internal"]) == set(t["at_rechosen"]) == set(classes)
    recal = record["recalibration"]
    assert (
        recal["method"] == "temperature"
        and recal["fit"]["patients"] + recal["evaluated"]["patients"] == (record["external"]["patients"])
    )
    assert recal["auroc_macro_after"] == pytest.approx(recal["auroc_macro_before"], abs=1e-9)  # ranking kept
    assert (out / "reliability.png").stat().st_size > 10_000
    page = (work / "results" / DS / "report" / "index.html").read_text()
    assert 'id="external-site_b"' in page and "ECE external" in page and "re-chosen threshold" in page


def test_on_copy_stop_names_the_copies_and_writes_no_predictions(site, tmp_path):
    from medfold.deploy.external import ExternalOutputs, validate

    work, out, _ = site
    config = json.loads(json.dumps(resolved_config()))
    from medfold.study.resolve import external_settings

    settings = external_settings(config, "site_b", "workflow/schemas/config.schema.yaml", ["batchnorm"])
    settings["on_copy"] = "stop"
    res = work / "results" / DS
    outputs = ExternalOutputs.of(tmp_path)
    with pytest.raises(DataError, match=r"external.site_b: 2 of its images are copies of demo_cxr14's images"):
        validate(
            "site_b",
            settings,
            res / "batchnorm",
            res / "index.parquet",
            res / "splits.parquet",
            res / "cache" / "64" / "images.npy",
            out / "index.parquet",
            out / "cache" / "images.npy",
            outputs,
            50,
            0,
            10,
        )
    assert outputs.copies.exists() and not outputs.predictions.exists()


def test_external_settings_are_checked_before_any_job():
    from medfold.study.resolve import external_settings

    schema = "workflow/schemas/config.schema.yaml"
    config = resolved_config()
    config["external"] = {"x": {"experiment": "nope", "dataset": {"format": "csv", "table": "t.csv"}}}
    with pytest.raises(ConfigError, match=r"external.x.experiment: 'nope' is not an experiment"):
        external_settings(config, "x", schema, ["batchnorm"])
    config["external"] = {"x": {"experiment": "batchnorm", "dataset": {"format": "csv"}}}
    with pytest.raises(ConfigError, match=r"external.x.dataset.table: needed for format 'csv'"):
        external_settings(config, "x", schema, ["batchnorm"])
    config["external"] = {"x": {"experiment": "batchnorm", "dataset": {"format": "tiff"}}}
    with pytest.raises(ConfigError, match=r"external.x.dataset.format: 'tiff' is not one of"):
        external_settings(config, "x", schema, ["batchnorm"])
    config["external"] = {"x": {"experiment": "batchnorm", "dataset": {"format": "csv", "table": "t.csv"}}}
    resolved = external_settings(config, "x", schema, ["batchnorm"])
    assert resolved["dataset"]["labels"] == config["dataset"]["labels"] and resolved["on_copy"] == "exclude"


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_recalibration_fitted_on_a_patient_share_improves_calibration_on_the_rest(method):
    """A model three times over-confident and biased: each method, fitted on 40 % of the
    patients, lowers the expected calibration error on the other 60 %."""
    from medfold.deploy.external import recalibration

    rng = np.random.default_rng(1)
    n = 3000
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-(3 * z + 1)))
    probs = np.stack([1 - over, over], 1)
    patients = np.repeat(np.arange(n // 3), 3).astype(str)
    result = recalibration(
        "binary", ["no", "yes"], y, probs, patients, {"fraction": 0.4, "method": method, "seed": 0}, 10
    )
    assert result["fit"]["patients"] == 400 and result["evaluated"]["images"] == 1800
    assert result["after"]["yes"]["ece"] < 0.5 * result["before"]["yes"]["ece"]
    if method != "isotonic":  # monotone in the score: the ranking, and AUROC, stay
        assert result["auroc_macro_after"] == pytest.approx(result["auroc_macro_before"], abs=1e-6)
