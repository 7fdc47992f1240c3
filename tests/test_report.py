"""The HTML report in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, folder_dataset, planned, resolved_config, run_snakemake
from PIL import Image

from medfold.data.index.build import build_index
from medfold.data.index.io import write_index
from medfold.report.page import render
from medfold.split import check_split, make_splits, write_json

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
DS = "results/demo_cxr14"


def open_in_chromium(page_path: Path, screenshot: Path, top_screenshot: Path | None = None) -> dict:
    """Load a local page; return its text (every collapsible block opened), its heights as
    opened, with every block collapsed and with every block open, console errors, requests and
    dialogs."""
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
        if top_screenshot is not None:  # the page as a reader first sees it
            page.screenshot(path=str(top_screenshot))
        seen["height_as_opened"] = page.evaluate("document.documentElement.scrollHeight")
        seen["width"] = page.evaluate("document.documentElement.scrollWidth")
        seen["details"] = page.locator("details").count()
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = false)")
        seen["height_collapsed"] = page.evaluate("document.documentElement.scrollHeight")
        # hidden text is not in innerText: read the page with every block open
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        seen["height_open"] = page.evaluate("document.documentElement.scrollHeight")
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
    # README shows the top of the page: MEDFOLD_SCREENSHOT=docs/report.png refreshes it
    top = Path(os.environ.get("MEDFOLD_SCREENSHOT", tmp_path / "top.png"))
    seen = open_in_chromium(page, shot, top)
    print(f"screenshot: {shot}, top of the page: {top}")
    assert shot.stat().st_size > 50_000 and top.stat().st_size > 20_000
    # the comparison of experiments first, then each experiment's detail (folded), then the data
    assert seen["headings"] == [
        "medfold report: demo_cxr14",
        "Experiments",
        "Experiment: baseline",
        "Experiment: batchnorm",
        "Experiment: both",
        "Dataset",
        "Split",
        "Explanations",
        "Compression",
        "External validation",
        "Deployment: model cards",
        "Provenance",
    ]
    # tables scroll inside the page; folded blocks keep the page short
    assert seen["width"] <= 1280 and seen["height_collapsed"] < seen["height_as_opened"] < seen["height_open"]
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
        "Training recipe per experiment",
    ):
        assert word in text
    # the learning curves plot the training subsample against validation
    history = pd.read_csv(trained_workflow / DS / "baseline" / "fold_0" / "history.csv")
    assert {"train_auroc_macro", "train_accuracy", "val_f1_macro"} <= set(history.columns)
    # one overlay per class and fold, each captioned with what it explains
    record = json.loads(
        (trained_workflow / DS / "batchnorm" / "fold_2" / "explanations" / "explanations.json").read_text()
    )
    item = record["images"][0]
    assert f"{item['image_id']}: explains {item['explained_class']}" in text
    assert seen["images_loaded"] and text.count("explains ") == 3 * 4
    # the demo's 8 transformed and 4 re-published copies, each beside its original, with the
    # transform found, the kind of match and the verification score
    planted = pd.read_csv(trained_workflow / "resources" / "demo" / "cxr14" / "planted_copies.csv")
    assert text.count("The same radiograph under patients") == len(planted) == 12
    # named by their pseudonyms (privacy.identifiers is pseudonymized by default), never their file names
    shared = dict(pd.read_parquet(trained_workflow / DS / "index.parquet")[["image_id", "shared_image_id"]].values)
    for copy, original in zip(planted["copy"], planted["original"]):
        assert shared[copy] in text and shared[original] in text and copy not in text and original not in text
    assert "rotated 90°" in text and "mirrored left-right" in text
    assert re.search(r"registered copy, score 0\.(8[5-9]|9\d)\d \(shifted", text)
    assert re.search(r"transformed copy, score (0\.9\d\d|1\.000)", text)
    assert "0 near-duplicate clusters crossing sets" in text


def test_report_rule_reruns_when_a_metrics_file_changes_and_not_otherwise(trained_workflow):
    assert planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run")) == {}
    metrics = trained_workflow / DS / "batchnorm" / "fold_0" / "metrics.json"
    os.utime(metrics)  # a newer time alone is no change: Snakemake compares small files' checksums
    assert planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run")) == {}
    original = metrics.read_text()
    metrics.write_text(original.replace('"fold": 0', '"fold": 0, "note": "edited"', 1))
    after = planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run"))
    # batchnorm's variants table compares its variants with the base model's cross-validation summary,
    # the ensemble "both" averages batchnorm's fold 0 with baseline's, and batchnorm is exported
    # (its card reads the metrics) and validated on the demo's second site
    assert after == {
        "aggregate": 1,
        "compare_experiments": 1,
        "variants_table": 1,
        "ensemble_fold": 1,
        "aggregate_ensemble": 1,
        "export": 1,
        "external_validate": 1,
        "report": 1,
        "all": 1,
    }
    # the content put back is the content the outputs were made from: nothing to do again (and
    # the shared workflow stays as the other tests expect it, without rerunning those jobs)
    metrics.write_text(original)
    assert planned(run_snakemake(trained_workflow, "--cores", "2", "--dry-run")) == {}


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
    # medfold plan's record of the same tree, shown beside the results (its class names are the tree's)
    from medfold.study.plan import fingerprint, plan, write_plan

    found = fingerprint(root)
    write_plan(plan(found, 600, timer=lambda *_: 1e-3), found, tmp_path / "planned.yaml")
    page = tmp_path / "report.html"
    page.write_text(
        render(
            {
                "index": tmp_path / "index.parquet",
                "index_report": tmp_path / "index_report.json",
                "split_summary": tmp_path / "split_summary.json",
                "split_check": tmp_path / "split_check.json",
                "plan": tmp_path / "plan.json",
            },
            {"dataset": ds},
            REPO,
        )
    )
    source = page.read_text()
    assert "<script" not in source.lower()
    assert "&lt;script&gt;alert(&#39;class&#39;)&lt;script&gt;&amp;co" in source
    assert "person7_&lt;script&gt;alert(&#39;file&#39;)&lt;script&gt;&amp;x_0.png" in source
    assert "<img src=x" not in source and "Normal/person90_&lt;img src=x onerror=alert(1)&gt;_0.png is" in source
    plan_section = source[source.index('<h2 id="plan">') : source.index('<h2 id="dataset">')]
    assert "binary: &lt;script&gt;alert(&#39;class&#39;)&lt;script&gt;&amp;co " in plan_section  # its classes
    assert "training.epochs" in plan_section and "what the budget affords" in plan_section
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


def _experiment_files(work: Path, experiment: str) -> dict:
    """The result files the report reads for one experiment of a finished workflow."""
    exp = work / DS / experiment
    cv = exp / "cv"
    return {
        "per_fold": cv / "per_fold.csv",
        "summary": cv / "summary.json",
        "ensemble": cv / "ensemble_test.json",
        "ensemble_predictions": cv / "ensemble_test_predictions.parquet",
        "predictions": [exp / f"fold_{k}" / "predictions.parquet" for k in range(3)],
        "histories": {k: exp / f"fold_{k}" / "history.csv" for k in range(3)},
        "clinical": cv / "clinical.json",
        "forest": cv / "subgroups.png",
        "reliability": cv / "reliability.png",
    }


def test_a_twelve_combination_grid_keeps_the_folded_page_short(trained_workflow, tmp_path):
    """The report of a 3x4 grid (the trained batchnorm experiment's files under 12 combination
    names): each combination is one folded line, tables stay inside the page."""
    ds = trained_workflow / DS
    comparison = pd.read_csv(ds / "experiments.csv")
    source = comparison[comparison["experiment"] == "batchnorm"].iloc[0]
    names = [f"sweep_lr~{lr}_batch_size~{bs}" for lr in (0.001, 0.003, 0.01) for bs in (8, 16, 32, 64)]

    def page(grid: list[str], name: str) -> dict:
        rows = [source.to_dict() | {"experiment": n, "best": i == 0} for i, n in enumerate(grid)]
        table = pd.concat([comparison.assign(best=False), pd.DataFrame(rows)], ignore_index=True)
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        ranked = pd.DataFrame(
            {
                "rank": range(1, len(grid) + 1),
                "experiment": grid,
                "param:lr": [float(n.split("~")[1].split("_")[0]) for n in grid],
                "param:batch_size": [int(n.split("~")[2]) for n in grid],
                "val.auroc_macro.mean": source["val.auroc_macro.mean"],
                "val.auroc_macro.std": source["val.auroc_macro.std"],
                "test.auroc_macro.mean": source["test.auroc_macro.mean"],
                "train_seconds.mean": source["train_seconds.mean"],
            }
        )
        ranked.to_csv(tmp_path / f"{name}_grid.csv", index=False)
        inputs = {
            "index": ds / "index.parquet",
            "index_report": ds / "index_report.json",
            "split_summary": ds / "split_summary.json",
            "split_check": ds / "split_check.json",
            "cache": ds / "cache" / "64" / "images.npy",
            "comparison": tmp_path / f"{name}.csv",
            "experiments": {
                n: _experiment_files(trained_workflow, e)
                for n, e in [("baseline", "baseline"), ("batchnorm", "batchnorm")] + [(n, "batchnorm") for n in grid]
            },
            "grids": {"sweep": tmp_path / f"{name}_grid.csv"} if grid else {},
        }
        config = resolved_config({"grids": {"top_k": 12}})
        config["experiments"]["sweep"]["folds"] = [0]  # tuned on one fold: the page says so
        (tmp_path / f"{name}.html").write_text(render(inputs, config, REPO))
        return open_in_chromium(tmp_path / f"{name}.html", tmp_path / f"{name}.png")

    without, with_grid = page([], "two"), page(names, "grid")
    print({k: (without[k], with_grid[k]) for k in ("height_collapsed", "height_as_opened", "height_open", "width")})
    assert with_grid["details"] >= without["details"] + 12 and with_grid["errors"] == []
    assert all(f"Experiment: {n}" in with_grid["headings"] for n in names)
    # collapsed, each combination costs its summary line and its rows in two tables, not a page
    assert with_grid["height_collapsed"] - without["height_collapsed"] < 12 * 150
    assert with_grid["height_collapsed"] < 9000 < with_grid["height_open"]
    assert with_grid["width"] <= 1280
    assert "Grid: sweep (tuned on fold 0 only, not on every fold" in with_grid["text"]
