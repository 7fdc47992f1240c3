"""What each switch of the training recipe changes on the demo: fold 0 of the demo's multi-label
data (4 findings, 64 px, LeNet with batch norm) trained once per switch, from the same initial
weights and data order, beside the plain recipe trained in the same run. Prints validation and
test macro AUROC, their change against the plain recipe, and the training time ratio.

The demo is small (about 360 training images per fold), so differences of a few hundredths are
within what another seed would give; the bench says what each switch costs and whether it
breaks learning, not which is best on real data.

    .venv/bin/python bench/recipe.py [--quick] [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # also where medfold is not installed
REPO = Path(__file__).resolve().parents[1]

from snakemake.utils import validate  # noqa: E402

from medfold.core.hardware import describe  # noqa: E402
from medfold.data.cache import build_cache  # noqa: E402
from medfold.data.demo import generate_cxr14  # noqa: E402
from medfold.data.index.build import build_index  # noqa: E402
from medfold.data.index.io import write_index  # noqa: E402
from medfold.split import make_splits  # noqa: E402
from medfold.training.train import run_fold  # noqa: E402

SWITCHES = {
    "plain": {},
    "cosine, 1 warm-up epoch": {"schedule": {"name": "cosine", "warmup_epochs": 1}},
    "one-cycle": {"schedule": {"name": "onecycle"}},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "mixup 0.2": {"mixup": {"mixup_alpha": 0.2}},
    "cutmix 1.0": {"mixup": {"cutmix_alpha": 1.0}},
    "weights average 0.98": {"ema": {"decay": 0.98}},
    "flip TTA": {"tta": "hflip"},
    "all of them": {
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "label_smoothing": 0.1,
        "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 0.5},
        "ema": {"decay": 0.98},
        "tta": "hflip",
    },
}


def config(overrides: dict) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["training"].update(overrides)
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, plain against all of them (the test suite)")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    switches = {k: SWITCHES[k] for k in ("plain", "all of them")} if args.quick else SWITCHES
    print(f"host: {describe()}; {epochs} epochs per run, fold 0 of the demo")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = config({})
        table_path = generate_cxr14(root / "demo", 150, 0)
        dataset = {**base["dataset"], "table": str(table_path), "root": str(table_path.parent / "images")}
        table, report = build_index(dataset, threads=2)
        write_index(table, report, root / "index.parquet", root / "index_report.json")
        splits, _ = make_splits(table, report["classes"], base["split"])
        splits.to_parquet(root / "splits.parquet", index=False)
        build_cache(table, root / "cache", base["training"]["image_size"], 1, threads=2)
        results = {}
        for name, overrides in switches.items():
            settings = config({"batch_norm": True, "epochs": epochs, "device": "cpu", **overrides})["training"]
            settings["early_stopping"]["enabled"] = False  # every run the same number of epochs
            start = time.perf_counter()
            out = root / "runs" / str(len(results))
            result = run_fold(settings, root / "index.parquet", root / "splits.parquet", root / "cache", 0, out, 2)
            results[name] = (result["val"]["auroc_macro"], result["test"]["auroc_macro"], time.perf_counter() - start)
    plain = results["plain"]
    print(f"{'switch':26s} {'val AUROC':>9s} {'change':>7s} {'test AUROC':>10s} {'change':>7s} {'time':>6s}")
    for name, (val, test, seconds) in results.items():
        print(
            f"{name:26s} {val:9.3f} {val - plain[0]:+7.3f} {test:10.3f} {test - plain[1]:+7.3f} "
            f"{seconds / plain[2]:5.2f}x"
        )
    everything = results["all of them"]
    print(f"RATIO all/plain test AUROC: {everything[1] / plain[1]:.3f}; time {everything[2] / plain[2]:.2f}x")


if __name__ == "__main__":
    main()
