"""The report's own figures (ROC, training curves, compression) and the job timings."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, in jobs and tests alike
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from medfold.data.index.labels import targets_for  # noqa: E402
from medfold.report._constants import PALETTE  # noqa: E402
from medfold.report.helpers import svg  # noqa: E402


# ----------------------------------------------------------------------------- figures
def roc_figure(name: str, predictions: pd.DataFrame, ensemble: pd.DataFrame, classes: list[str], task: str) -> str:
    scored = [classes[1]] if task == "binary" else classes
    cols = min(4, len(scored))
    nrows = int(np.ceil(len(scored) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.3 * nrows), squeeze=False, layout="constrained")
    test = predictions[predictions["set"] == "test"]
    for ax, c in zip(axes.ravel(), scored):
        j = classes.index(c)
        for k, (fold, part) in enumerate(test.groupby("fold")):
            y = targets_for(part["labels"], classes, task)
            y01 = y[:, j] if task == "multilabel" else (y == j).astype(int)
            if 0 < y01.sum() < len(y01):
                fpr, tpr, _ = roc_curve(y01, part[f"prob:{c}"])
                ax.plot(fpr, tpr, color=PALETTE[k % len(PALETTE)], lw=1, alpha=0.8, label=f"fold {fold}")
        y = targets_for(ensemble["labels"], classes, task) if ensemble is not None else np.zeros(0)
        y01 = y[:, j] if task == "multilabel" else (y == j).astype(int)
        if ensemble is not None and 0 < y01.sum() < len(y01):
            fpr, tpr, _ = roc_curve(y01, ensemble[f"prob:{c}"])
            ax.plot(fpr, tpr, color="black", lw=2, label="ensemble")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set(title=c, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.ravel()[len(scored) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: ROC on the held-out test set")
    return svg(fig)


CURVES = (  # (title, training column, validation column)
    ("loss", "train_eval_loss", "val_loss"),
    ("macro AUROC", "train_auroc_macro", "val_auroc_macro"),
    ("accuracy", "train_accuracy", "val_accuracy"),
    ("macro F1", "train_f1_macro", "val_f1_macro"),
)


def curves_figure(name: str, histories: dict[int, pd.DataFrame]) -> str:
    """Learning curves, training set (solid) against validation (dashed), one colour per fold. The
    training values are those of the fixed subsample scored in eval mode after each epoch, so both
    lines measure the same model the same way; the running loss of the augmented batches is dotted.
    Histories from before train-set metrics existed plot their validation lines only."""
    panels = [c for c in CURVES if any(c[2] in h for h in histories.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), layout="constrained", squeeze=False)
    for ax, (title, train_col, val_col) in zip(axes[0], panels):
        for k, (fold, h) in enumerate(sorted(histories.items())):
            color = PALETTE[k % len(PALETTE)]
            if train_col in h and h[train_col].notna().any():
                ax.plot(h["epoch"], h[train_col], color=color, lw=1.2, label=f"fold {fold} train")
            elif val_col == "val_loss" and "train_loss" in h:
                ax.plot(h["epoch"], h["train_loss"], color=color, lw=1.2, label=f"fold {fold} train")
            if val_col == "val_loss" and train_col in h:
                ax.plot(h["epoch"], h["train_loss"], color=color, lw=0.8, ls=":")
            if val_col in h:
                ax.plot(h["epoch"], h[val_col], color=color, lw=1.2, ls="--", label=f"fold {fold} validation")
        ax.set(xlabel="epoch", title=title)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"{name}: learning curves (solid: training set, dashed: validation; "
        "dotted: running loss of the augmented batches)",
        fontsize=9,
    )
    return svg(fig)


def compression_figure(name: str, table: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for k, (variant, group) in enumerate(table.groupby("variant", sort=False)):
        ax.scatter(
            group["ratio.size"],
            group["delta.test.auroc_macro"],
            color=PALETTE[k % len(PALETTE)],
            label=str(variant),
            s=28,
        )
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xlabel("on-disk size (x base model)")
    ax.set_ylabel("test AUROC change")
    ax.set_title(f"{name}: size against AUROC, one point per fold", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return svg(fig)


def read_timings(paths) -> pd.DataFrame:
    rows = []
    for p in paths:
        frame = pd.read_csv(p, sep="\t")
        rows.append(
            {
                "job": Path(p).stem,
                "s": float(frame["s"].iloc[0]),
                "max_rss": pd.to_numeric(frame["max_rss"], errors="coerce").iloc[0],
            }
        )
    return pd.DataFrame(rows, columns=["job", "s", "max_rss"])
