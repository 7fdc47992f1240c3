"""medfold plan beside hand-written configurations, on real collections, in the same run.

For each set, `medfold plan <set> --budget B` writes a config and the workflow runs it here (its
wall time measured against B); then each hand-written configuration of that set runs the same way
(experiments beside the plan's in its own folder: the same index, split and cache, so that only
the training choices differ, and the report compares them on the same test images). The table
gives each run's wall time and its fold ensemble's test AUROC and accuracy with their 95 %
patient-bootstrap intervals (ensemble_test.json), and the plan's AUROC minus the best hand-written
one's.

Sets: kermany28 (../shared/data/kermany_224 area-averaged to 28 x 28 grey, its official train/test
folders: how PneumoniaMNIST was made), nih1000 (64 px, its train/valid/test folders), odir (400 px
colour fundus photographs), and the demo's forms (demo_folders, demo_csv, demo_npz: generated).

    .venv/bin/python bench/plan.py --data ../shared/data --sets kermany28 --budget 15m
    .venv/bin/python bench/plan.py --data ../shared/data --budget 10m      (every set: hours)
    .venv/bin/python bench/plan.py --quick     (the demo's folder form, 2 folds, a 1-minute budget: the suite)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # also where medfold is not installed

from medfold.core.hardware import describe  # noqa: E402
from medfold.study.plan import parse_budget  # noqa: E402

PLAIN_AUGMENT = {"hflip": 0.5, "rotation": 0, "brightness": 0, "contrast": 0}
# hand-written training sections, the best found by hand for each kind of set (bench/README: how)
HAND = {
    "small": {  # 28 px, MedMNIST-like: the LeNet the 28-px studies use (study 004), batch norm
        "lenet_bn_15": {"model": "lenet", "image_size": 28, "batch_norm": True, "epochs": 15, "batch_size": 64},
    },
    "films": {  # chest films at 64 px: the demo's own recipe
        "lenet_bn_20": {"model": "lenet", "image_size": 64, "batch_norm": True, "epochs": 20, "batch_size": 32},
    },
    "fundus": {  # colour photographs: a wider net, flips and rotations as the glaucoma study did
        "lenet_wide_flips": {
            "model": "lenet_wide",
            "image_size": 64,
            "batch_norm": True,
            "epochs": 20,
            "batch_size": 32,
            "augment": {"hflip": 0.5, "rotation": 20},
        },
    },
}


def kermany28(data: Path, out: Path) -> Path:
    """Kermany's films as PneumoniaMNIST was made: each film area-averaged to 28 x 28 grey."""
    from PIL import Image

    root = out / "kermany28"
    for path in sorted((data / "kermany_224").rglob("*.jpeg")):
        target = root / path.relative_to(data / "kermany_224").with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").resize((28, 28), Image.Resampling.BOX).save(target)
    return root


def sets(names: list[str], data: Path | None, work: Path, quick: bool = False) -> dict[str, tuple[Path, str]]:
    """name -> (the collection's path, its kind in HAND)."""
    from medfold.data.demo import generate_cxr14, generate_folders, generate_small_npz

    makers = {
        "kermany28": lambda: (kermany28(data, work), "small"),
        "nih1000": lambda: (data / "nih1000", "films"),
        "odir": lambda: (data / "fundus_odir", "fundus"),
        "demo_folders": lambda: (generate_folders(work / "demo_folders", 30 if quick else 90, 0), "films"),
        "demo_csv": lambda: (generate_cxr14(work / "demo_csv", 150, 0), "films"),
        "demo_npz": lambda: (generate_small_npz(work / "demo_npz.npz", 400, 0), "small"),
    }
    found = {name: makers[name]() for name in names}
    return {name: (path.resolve(), kind) for name, (path, kind) in found.items()}  # each workflow runs elsewhere


def run(config: dict, work: Path, cores: int) -> float:
    """The workflow on ``config`` in ``work``; its wall seconds."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]
    cmd += ["--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", str(cores)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the workflow failed in {work}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def test_figures(work: Path, config: dict, experiment: str) -> dict:
    """The fold ensemble's test AUROC and accuracy with their 95 % patient-bootstrap intervals."""
    path = work / "results" / config["dataset"]["name"] / experiment / "cv" / "ensemble_test.json"
    record = json.loads(path.read_text())
    return {m: (record[m], *record["ci95"][m]) for m in ("auroc_macro", "accuracy")}


def planned(path: Path, budget: str, cores: int, work: Path, folds: int | None = None) -> tuple[dict, dict]:
    """medfold plan's config of ``path`` (and its plan.json), written in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "planned.yaml"
    subprocess.run(
        [str(Path(sys.executable).with_name("medfold")), "plan", str(path), "--out", str(out)]
        + ["--budget", budget, "--cores", str(cores), "--force"]
        + (["--folds", str(folds)] if folds else []),
        check=True,
        capture_output=True,
        text=True,
    )
    config = yaml.safe_load(out.read_text())
    config["plan"] = str(work / "plan.json")
    return config, json.loads((work / "plan.json").read_text())


def with_hand_written(plan_config: dict, kind: str) -> dict:
    """The plan's config with the hand-written experiments of ``kind`` beside its own: the same
    index, split and cache (run in the plan's folder, only their training runs), and the report's
    paired comparisons on the same test images."""
    experiments = {"planned": plan_config["experiments"]["planned"]}  # its seeds per fold, if any
    for name, training in HAND[kind].items():
        experiments[name] = {**training, "early_stopping": {"enabled": True, "patience": 6}}
        # a hand-written recipe is its own: none of the plan's augmentation, schedule or weighting
        # (every key given: an experiment's override is merged into the plan's training section)
        experiments[name]["augment"] = {**PLAIN_AUGMENT, **training.get("augment", {})}
        experiments[name] |= {"tta": "none", "class_weights": False, "schedule": {"name": "plateau"}}
    return {**plan_config, "experiments": experiments}


def cell(figure: tuple) -> str:
    return f"{figure[0]:.3f} [{figure[1]:.3f}, {figure[2]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="the folder of real sets (../shared/data)")
    parser.add_argument("--sets", nargs="+", default=["kermany28", "nih1000", "odir", "demo_folders", "demo_csv"])
    parser.add_argument("--budget", default="15m", help="each plan's budget (each hand-written run is unbounded)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the demo's folder form, 2 folds, a 1-minute budget")
    parser.add_argument("--work", type=Path, help="keep every run's folder here (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.sets, args.budget = ["demo_folders"], "1m"
        HAND["films"] = {"lenet_bn_3": {**HAND["films"]["lenet_bn_20"], "epochs": 3}}
    if any(s in ("kermany28", "nih1000", "odir") for s in args.sets) and not args.data:
        parser.error("--data ../shared/data is needed for the real sets")
    print(f"host: {describe()}; budget {args.budget} on {args.cores} cores")
    budget = parse_budget(args.budget)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name, (path, kind) in sets(args.sets, args.data, work, args.quick).items():
            folder = work / name
            config, record = planned(path, args.budget, args.cores, folder, 2 if args.quick else None)
            chosen = {d["key"]: d["value"] for d in record["decisions"]}
            print(
                f"\n{name}: plan {chosen['training.model']} at {chosen['training.image_size']} px, "
                f"{chosen['training.epochs']} epochs, {chosen['split.folds']} folds"
            )
            both = with_hand_written(config, kind)
            if args.quick:  # the paths only, in one workflow run (its wall time says nothing of the budget)
                seconds = hand_seconds = run(both, folder, args.cores)
            else:
                seconds = run(config, folder, args.cores)  # the plan alone: its wall time against the budget
                hand_seconds = run(both, folder, args.cores)  # the hand-written trainings (and the report)
            rows.append((name, "plan", seconds, test_figures(folder, config, "planned")))
            for hand in HAND[kind]:
                rows.append((name, hand, hand_seconds / len(HAND[kind]), test_figures(folder, both, hand)))
    print(f"\n{'set':<13} {'config':<17} {'wall':>7} {'/budget':>8}  {'test AUROC [95% CI]':<24} accuracy [95% CI]")
    for name, config, seconds, r in rows:
        print(
            f"{name:<13} {config:<17} {seconds:6.0f}s {seconds / budget:7.2f}x  "
            f"{cell(r['auroc_macro']):<24} {cell(r['accuracy'])}"
        )
    for name in dict.fromkeys(n for n, *_ in rows):
        mine = [(c, s, r["auroc_macro"][0]) for n, c, s, r in rows if n == name]
        plan_seconds, plan_auroc = next((s, a) for c, s, a in mine if c == "plan")
        best = max(a for c, s, a in mine if c != "plan")
        print(
            f"RATIO {name}: plan - best hand-written test AUROC {plan_auroc - best:+.3f}; "
            f"plan wall / budget {plan_seconds / budget:.2f}"
        )


if __name__ == "__main__":
    main()
