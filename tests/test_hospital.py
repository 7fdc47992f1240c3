"""The demo's hospital export (medfold.data.demo.generate_dicom) through the real workflow, once: a
PACS export of compressed DICOM named by record number, split by PatientID, evaluated by scanner,
view, sex and age, and nothing that identifies a patient in any output meant to be shared."""

import hashlib
import hmac
import json
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, run_snakemake, workflow_dir

from medfold.data.demo import HARD_SCANNER

pytestmark = pytest.mark.workflow
DS = "results/demo_dicom"
# files that keep raw IDs for the workflow itself (medfold.core.privacy), and the key
PRIVATE = {"index.parquet", "splits.parquet", "privacy.key"}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    work = workflow_dir(
        tmp_path_factory.mktemp("hospital"),
        yaml.safe_load((REPO / "config" / "examples" / "demo_dicom.yaml").read_text()),
        base=None,
    )
    run_snakemake(work, "--cores", "2", "resources/demo/dicom")
    export = work / "resources" / "demo" / "dicom" / "Normal"
    record = sorted(export.glob("*_0.dcm"))[0].name.split("_")[0]
    # what else a hand-made export holds: a truncated file and a note, both named by record number
    (export / f"{record}_9.dcm").write_bytes((export / f"{record}_0.dcm").read_bytes()[:600])
    (export / f"{record}_notes.txt").write_text("requested by ward 3\n")
    run_snakemake(work, "--cores", "2")
    run_snakemake(work, "--cores", "2", "--report", str(work / DS / "snakemake_report.zip"))
    return work, record


def test_the_export_is_split_by_patient_id_with_its_headers_in_the_index(hospital):
    work, record = hospital
    index = pd.read_parquet(work / DS / "index.parquet")
    report = json.loads((work / DS / "index_report.json").read_text())
    assert report["patient_id_source"] == "DICOM PatientID" and report["identifiers"] == "pseudonymized"
    assert index["patient_id"].str.fullmatch(r"\d{7}").all() and report["patients"] == index["patient_id"].nunique()
    assert set(index["mode"]) == {"DICOM MONOCHROME1 12-bit", "DICOM MONOCHROME2 12-bit"}
    assert set(index["meta:ManufacturerModelName"]) == {"Acme DR 500", "Borealis CR 12", HARD_SCANNER}
    assert index["meta:PatientAge"].astype(float).between(1, 95).all()  # "065Y" read in years
    (skipped,) = report["skipped"]
    assert skipped["image_id"].startswith("I") and record not in json.dumps(report)
    assert "cannot" in skipped["reason"] or "corrupt" in skipped["reason"]
    splits = pd.read_parquet(work / DS / "splits.parquet")
    assert splits.groupby("patient_id")["fold"].nunique().max() == 1
    assert json.loads((work / DS / "split_check.json").read_text())["verdict"] == "leak-free"
    # the shareable split: every image by its pixels' hash, its patient by pseudonym
    manifest = pd.read_csv(work / DS / "split_manifest.csv", comment="#", dtype=str)
    assert len(manifest) == index["content_hash"].nunique() and set(manifest["patient"]) <= set(
        index["shared_patient_id"]
    )


def test_the_subgroup_table_finds_the_harder_scanner(hospital):
    work, _ = hospital
    table = pd.read_csv(work / DS / "lenet_bn" / "cv" / "subgroups.csv")
    auroc = table[(table["metric"] == "auroc_macro") & (table["subgroup"] == "scanner")].set_index("group")
    others = auroc.drop(index=["all", HARD_SCANNER])
    assert not auroc["too_small"].any() and len(others) == 2
    assert auroc.loc[HARD_SCANNER, "value"] < others["value"].min() - 0.1, auroc
    assert auroc.loc[HARD_SCANNER, "ci_high"] < others["value"].min()
    html = (work / DS / "report" / "index.html").read_text()
    assert f'<td class="l">{HARD_SCANNER}</td>' in html


def _texts(path: Path):
    """What a reader of ``path`` sees: a Parquet table as CSV, each member of a zip, else bytes."""
    if path.suffix == ".parquet":
        yield pq.read_table(path).to_pandas().to_csv()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                yield name + archive.read(name).decode("latin-1")
    else:
        yield path.read_bytes().decode("latin-1")


def test_no_raw_identifier_is_in_any_output_meant_to_be_shared(hospital):
    work, record = hospital
    index = pd.read_parquet(work / DS / "index.parquet")
    raw = {record, "DEMO^PATIENT", *index["patient_id"], *(Path(i).stem for i in index["image_id"])}
    scanned, found = 0, {}
    for path in sorted(p for p in (work / "results").rglob("*") if p.is_file()):
        if path.name in PRIVATE or "cache" in path.relative_to(work).parts:
            continue
        scanned += 1
        hits = {r for text in _texts(path) for r in raw if r in text}
        if hits:
            found[str(path.relative_to(work))] = sorted(hits)[:3]
    assert not found, found
    # the report, predictions, clinical tables, logs and Snakemake's own report were among them
    assert scanned > 40 and (work / DS / "snakemake_report.zip").stat().st_size > 0
    # a patient's pseudonym is HMAC-SHA256 of its ID with the results folder's key, and the same everywhere
    key = bytes.fromhex((work / "results" / "privacy.key").read_text().strip())
    first = index.iloc[0]
    assert (
        first["shared_patient_id"]
        == "P" + hmac.new(key, f"patient:{first['patient_id']}".encode(), hashlib.sha256).hexdigest()[:12]
    )
    predictions = pd.read_parquet(work / DS / "lenet_bn" / "fold_0" / "predictions.parquet")
    shared = dict(zip(index["shared_image_id"], index["shared_patient_id"]))
    assert all(shared[i] == p for i, p in zip(predictions["image_id"], predictions["patient_id"]))
    html = (work / DS / "report" / "index.html").read_text()
    assert any(i in html for i in index["shared_image_id"])  # the report names images by their pseudonyms


def test_a_second_site_applies_the_split_manifest_through_the_workflow(hospital, tmp_path):
    work, _ = hospital
    manifest = tmp_path / "their_split_manifest.csv"
    manifest.write_bytes((work / DS / "split_manifest.csv").read_bytes())
    config = yaml.safe_load((REPO / "config" / "examples" / "demo_dicom.yaml").read_text())
    config["split"].update(method="manifest", manifest=str(manifest))
    second = workflow_dir(tmp_path / "second", config, base=None)
    run_snakemake(second, "--cores", "2", f"{DS}/split_check.json")
    ours, theirs = (pd.read_parquet(w / DS / "splits.parquet") for w in (work, second))
    hashes = [
        dict(zip(*pd.read_parquet(w / DS / "index.parquet")[["image_id", "content_hash"]].T.values))
        for w in (work, second)
    ]
    placed = [
        s.assign(hash=s["image_id"].map(h)).set_index("hash")[["set", "fold"]].sort_index()
        for s, h in zip((ours, theirs), hashes)
    ]
    pd.testing.assert_frame_equal(*placed)  # every image in the same set and fold
    summary = json.loads((second / DS / "split_summary.json").read_text())
    assert summary["method"] == "manifest" and summary["manifest"]["images_not_in_manifest"] == []
    assert json.loads((second / DS / "split_check.json").read_text())["verdict"] == "leak-free"
