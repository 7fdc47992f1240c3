"""The HTML report in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, folder_dataset, planned, resolved_config, run_snakemake
from PIL import Image

from medfold.index import build_index, write_index
from medfold.report import render
from medfold.split import check_split, make_splits, write_json

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
DS = "results/demo_cxr14"


def open_in_chromium(page_path: Path, screenshot: Path) -> dict:
    """Load a local page; return its visible text, console errors, requests and dialogs."""
    from playwright.sync_api import sync_playwright

    seen = {"errors": [], "requests": [], "dialogs": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        seen["text"] = page.inner_text("body")
        seen["headings"] = [h.strip() for h in page.locator("h1, h2").all_inner_texts()]
        seen["svgs"] = page.locator("svg").count()
        seen["images_loaded"] = page.evaluate(
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return seen


def test_report_opens_in_chromium_with_every_section_and_no_network(trained_workflow, tmp_path):
    page = trained_workflow / DS / "report" / "index.html"
    shot = tmp_path / "report.png"
    seen = open_in_chromium(page, shot)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 50_000
    assert seen["headings"] == [
        "medfold report: demo_cxr14",
        "Dataset",
        "Split",
        "Experiments",
        "Experiment: baseline",
        "Experiment: batchnorm",
        "Experiment: both",
        "Explanations",
        "Compression",
        "Provenance",
    ]
    assert seen["errors"] == [] and seen["dialogs"] == []
    assert [u for u in seen["requests"] if not u.startswith(("file://", "data:"))] == []
    assert seen["svgs"] >= 4 and seen["images_loaded"]
    text = seen["text"]
    index_report = json.loads((trained_workflow / DS / "index_report.json").read_text())
    assert f"images indexed\t{index_report['images_indexed']}" in text
    assert "Leakage check: leak-free" in text
    comparison = pd.read_csv(trained_workflow / DS / "experiments.csv")
    for _, row in comparison.iterrows():
        assert f"{row['ensemble_test.auroc_macro']:.3f} [{row['ensemble_test.auroc_macro.ci_low']:.3f}," in text
    best = comparison.loc[comparison["best"], "experiment"].item()
    assert f"{best} ★" in text
    per_fold = pd.read_csv(trained_workflow / DS / "baseline" / "cv" / "per_fold.csv")
    assert f"{per_fold['test.auroc_macro'].iloc[0]:.3f}" in text
    variants = pd.read_csv(trained_workflow / DS / "batchnorm" / "variants" / "variants_summary.csv")
    int8 = variants.set_index("variant").loc["int8"]
    assert f"{int8['ratio.tensor_size.mean']:.2f} ± {int8['ratio.tensor_size.std']:.2f}" in text
    for word in (
        "torch",
        "snakemake",
        "workflow commit",
        "Wall time per job",
        "train_baseline_fold_0",
        " ISA ",
        "compress_batchnorm_int8_fold_0",
        "explain_batchnorm_fold_0",
    ):
        assert word in text
    # one overlay per class and fold, each captioned with what it explains
    record = json.loads(
        (trained_workflow / DS / "batchnorm" / "fold_2" / "explanations" / "explanations.json").read_text()
    )
    item = record["images"][0]
    assert f"{item['image_id']}: explains {item['explained_class']}" in text
    assert seen["images_loaded"] and text.count("explains ") == 3 * 4
    # the demo's 8 planted copies, each beside its original, with the transform found
    planted = pd.read_csv(trained_workflow / "resources" / "demo" / "cxr14" / "planted_copies.csv")
    assert text.count("The same radiograph under patients") == len(planted) == 8
    for copy, original in zip(planted["copy"], planted["original"]):
        assert copy in text and original in text
    assert "rotated 90°" in text and "mirrored left-right" in text
    assert "0 near-duplicate clusters crossing sets" in text


def test_report_rule_reruns_when_a_metrics_file_changes_and_not_otherwise(trained_workflow):
    assert planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run")) == {}
    metrics = trained_workflow / DS / "batchnorm" / "fold_0" / "metrics.json"
    os.utime(metrics)  # a newer time alone is no change: Snakemake compares small files' checksums
    assert planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run")) == {}
    metrics.write_text(metrics.read_text().replace('"fold": 0', '"fold": 0, "note": "edited"', 1))
    after = planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run"))
    # batchnorm's variants table compares its variants with the base model's cross-validation summary
    # and the ensemble "both" averages batchnorm's fold 0 with baseline's
    assert after == {
        "aggregate": 1,
        "compare_experiments": 1,
        "variants_table": 1,
        "ensemble_fold": 1,
        "aggregate_ensemble": 1,
        "report": 1,
        "all": 1,
    }
    run_snakemake(trained_workflow, "--cores", "2")


EVIL_CLASS = "<script>alert('class')</script>&co".replace("/", "")  # '/' cannot be in a folder name
EVIL_FILE = "person7_<script>alert('file')<script>&x_0.png"
EVIL_COPY = "person90_<img src=x onerror=alert(1)>_0.png"


def test_dataset_strings_are_escaped(tmp_path, demo_dir):
    root = tmp_path / "tree"
    sources = sorted((demo_dir / "chest_xray" / "train" / "Normal").glob("*.png"))
    for cls, files in ((EVIL_CLASS, sources[:6]), ("Normal", sources[6:12])):
        (root / cls).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, root / cls / f"person{i + (0 if cls == 'Normal' else 50)}_{i}.png")
    (root / EVIL_CLASS / EVIL_FILE).write_bytes(b"not a png")  # shows up in the skipped-files table
    # a rotated copy with markup in its name: shown among the near-duplicates
    Image.open(sources[0]).transpose(Image.ROTATE_90).save(root / "Normal" / EVIL_COPY)
    ds = folder_dataset(root)
    index, report = build_index(ds)
    write_index(index, report, tmp_path / "index.parquet", tmp_path / "index_report.json")
    splits, summary = make_splits(index, report["classes"], resolved_config({"split": {"folds": 2}})["split"])
    write_json(summary, tmp_path / "split_summary.json")
    write_json(check_split(index, splits), tmp_path / "split_check.json")
    page = tmp_path / "report.html"
    page.write_text(
        render(
            {
                "index": tmp_path / "index.parquet",
                "index_report": tmp_path / "index_report.json",
                "split_summary": tmp_path / "split_summary.json",
                "split_check": tmp_path / "split_check.json",
            },
            {"dataset": ds},
            REPO,
        )
    )
    source = page.read_text()
    assert "<script" not in source.lower()
    assert "&lt;script&gt;alert(&#x27;class&#x27;)&lt;script&gt;&amp;co" in source
    assert "person7_&lt;script&gt;alert(&#x27;file&#x27;)&lt;script&gt;&amp;x_0.png" in source
    assert "<img src=x" not in source and "Normal/person90_&lt;img src=x onerror=alert(1)&gt;_0.png is" in source
    seen = open_in_chromium(page, tmp_path / "escaped.png")
    assert seen["dialogs"] == [] and seen["errors"] == []
    assert EVIL_CLASS in seen["text"] and EVIL_FILE in seen["text"] and EVIL_COPY in seen["text"]


def test_snakemakes_native_report_holds_the_labelled_results(trained_workflow):
    import zipfile

    run_snakemake(trained_workflow, "--report", "native_report.zip")
    with zipfile.ZipFile(trained_workflow / "native_report.zip") as archive:
        names = archive.namelist()
    for part in (
        "experiments.csv",
        "per_fold.csv",
        "summary.csv",
        "history.csv",
        "index.html",
        "subgroups.csv",
        "subgroups.png",
        "reliability.png",
        "calibration.csv",
        "operating_points.csv",
        "comparisons.csv",
    ):
        assert any(n.endswith(part) for n in names), part
