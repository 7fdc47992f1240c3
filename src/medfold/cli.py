"""The ``medfold`` command: what a user does outside the workflow.

    medfold predict MODEL IMAGES --out DIR [--column C] [--gradcam]
    medfold init --preset NAME [CONFIG]      (a starter config from config/examples/)
    medfold presets                          (the presets there)
    medfold plan DATA [--out C] [--budget 30m] (a config planned from the data)

Errors a user can fix print one line and exit with status 1, as the workflow's rules do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfold.core.errors import ConfigError, MedfoldError

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"


def presets() -> dict[str, str]:
    """Preset name to its first comment line."""
    out = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        out[path.stem] = first
    return out


def init(preset: str, target: Path, force: bool = False) -> Path:
    known = presets()
    if preset not in known:
        raise ConfigError(f"--preset {preset!r} is not one of {sorted(known)} (medfold presets lists them)")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; choose another name or pass --force")
    text = (EXAMPLES / f"{preset}.yaml").read_text()
    header = (
        f"# Written by `medfold init --preset {preset}`. Edit the paths under dataset:, then run\n"
        f"#   snakemake --cores 8 --configfile {target}\n"
        "# This file replaces the demo's config: only what it names runs. Every key: config/README.md\n\n"
    )
    target.write_text(header + text)
    return target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfold",
        description="medfold: patient-level cross-validated deep "
        "learning on medical images (the workflow itself runs with snakemake).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "predict",
        help="apply a trained experiment, fold model or compressed variant to new images",
        description="Apply a fold ensemble (an experiment's results folder), one fold's model.pt, or "
        "a variant's model.pt2 to a folder, CSV or single image, with training's preprocessing; "
        "labels at the thresholds chosen on validation.",
    )
    p.add_argument("model", type=Path, help="results/<dataset>/<experiment>, .../fold_<k>/model.pt or .../model.pt2")
    p.add_argument("images", type=Path, help="a folder of images (DICOM included), a CSV listing them, or one image")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions.csv/.parquet, unreadable.csv")
    p.add_argument(
        "--column", help="the CSV column with image paths (default: path, file, filename, image or Image Index)"
    )
    p.add_argument("--gradcam", action="store_true", help="also write Grad-CAM overlays of the predicted class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    e = sub.add_parser(
        "export",
        help="export a fold ensemble, fold model or compressed variant as one ONNX file, with a model card",
        description="Write DIR/model.onnx: uint8 images in, training's normalisation, the fold models averaged "
        "(flip TTA when the experiment used it), probabilities out; thresholds, classes and input size in its "
        "metadata. onnxruntime checks it against PyTorch before it is kept. For an experiment's folder, also "
        "DIR/model_card.md and .json.",
    )
    e.add_argument("model", type=Path, help="results/<dataset>/<experiment>, .../fold_<k>/model.pt or .../model.pt2")
    e.add_argument("--out", type=Path, required=True, help="folder for model.onnx, model.json and the model card")
    e.add_argument("--name", default="model.onnx", help="the ONNX file's name (default model.onnx)")
    e.add_argument(
        "--card",
        type=Path,
        help="a YAML file with the card's texts (intended_use, intended_users, out_of_scope, "
        "ethical_considerations, limitations), as export.card in the config",
    )
    i = sub.add_parser(
        "init",
        help="write a starter config from a preset",
        description="Write a starter config from config/examples/<preset>.yaml.",
    )
    i.add_argument("--preset", required=True, help="one of: " + ", ".join(presets()))
    i.add_argument("config", nargs="?", type=Path, default=Path("my_dataset.yaml"))
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub.add_parser("presets", help="list the dataset presets")
    pl = sub.add_parser(
        "plan",
        help="plan a complete config from a dataset (its fingerprint, fixed rules, a time budget)",
        description="Read a folder tree, a CSV or a MedMNIST .npz; write a config whose every decision says its "
        "reason, and plan.json (the fingerprint and the decisions) beside it. The rules: docs/plan.md.",
    )
    pl.add_argument("data", type=Path, help="a folder of class folders, a CSV table, or a .npz")
    pl.add_argument("--out", type=Path, default=Path("config.yaml"), help="the config to write (default config.yaml)")
    pl.add_argument("--budget", default="30m", help="the workflow's wall time on this machine: 30m, 2h, 900s")
    pl.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pl.add_argument("--cores", type=int, default=2, help="the --cores snakemake will run with (default 2)")
    pl.add_argument("--gpus", type=int, default=1, help="with --device cuda: GPUs, one fold job on each (default 1)")
    pl.add_argument("--folds", type=int, help="cross-validation folds (default: 5 up to 5,000 images, else 3)")
    pl.add_argument("--name", help="the dataset's name (default: the folder's or file's)")
    pl.add_argument("--force", action="store_true", help="overwrite an existing config")
    return parser


def _plan(args) -> None:
    from medfold.study.plan import fingerprint, parse_budget, plan, summary, write_plan

    if args.out.exists() and not args.force:
        raise ConfigError(f"{args.out} exists; choose another name or pass --force")
    budget = parse_budget(args.budget)
    fp = fingerprint(args.data, args.name)
    decisions = plan(fp, budget, args.device, args.cores, folds=args.folds, gpus=args.gpus)
    record = write_plan(decisions, fp, args.out)
    print(summary(decisions, fp))
    print(f"wrote {args.out} and {record}; run: snakemake --cores {args.cores} --configfile {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from medfold.core.step import setup_logging

    setup_logging()
    try:
        if args.command == "predict":
            import torch

            from medfold.deploy.predict import list_images, load_predictor, predict_images

            if args.threads:
                torch.set_num_threads(args.threads)
            summary = predict_images(
                load_predictor(args.model),
                list_images(args.images, args.column),
                args.out,
                args.batch_size,
                args.gradcam,
            )
            print(f"{summary['predicted']} images predicted, {summary['unreadable']} unreadable: {args.out}")
        elif args.command == "export":
            from medfold.deploy import card
            from medfold.deploy.export import export_onnx

            notes = card.read_notes(args.card) if args.card else {}  # checked before the export's work
            record = export_onnx(args.model, args.out, args.name)
            written = [args.out / record["file"]]
            if args.model.is_dir():  # an experiment: its card too
                written += card.write(card.build(args.model, notes, record), args.out)
            print(
                f"exported {record['model']}: {', '.join(str(p) for p in written)} "
                f"(onnxruntime within {record['parity_max_abs_difference']:.1g} of PyTorch)"
            )
        elif args.command == "plan":
            _plan(args)
        elif args.command == "init":
            path = init(args.preset, args.config, args.force)
            print(f"wrote {path}; edit its dataset paths, then: snakemake --cores 8 --configfile {path}")
        else:
            for name, about in presets().items():
                print(f"{name:<22} {about}")
    except MedfoldError as exc:
        print(f"medfold {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
