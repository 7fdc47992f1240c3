"""The clinical evaluation's figures (subgroup forest plot, reliability diagram) and ``write``,
which puts every file of it where the rule says."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medfold.evaluation.clinical.experiment import calibration_table, summary_record
from medfold.evaluation.clinical.subgroups import SUBGROUP_COLUMNS


# ----------------------------------------------------------------------------- figures
def forest_figure(name: str, subgroups: pd.DataFrame):
    """One panel per subgroup column: macro AUROC and its interval per group, the whole test
    set's as a dashed line; groups too small are named, not plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    macro = subgroups[subgroups["metric"] == "auroc_macro"]
    columns = list(dict.fromkeys(macro["subgroup"]))
    heights = [max(1, macro[macro["subgroup"] == c]["group"].nunique()) for c in columns]
    fig, axes = plt.subplots(
        len(columns),
        1,
        figsize=(6.4, 0.9 + 0.34 * sum(heights) + 0.5 * len(columns)),
        squeeze=False,
        height_ratios=heights,
        layout="constrained",
    )
    for ax, column in zip(axes[:, 0], columns):
        part = macro[macro["subgroup"] == column].reset_index(drop=True)
        overall = part.loc[part["group"] == "all", "value"]
        y = np.arange(len(part))[::-1]
        for yi, (_, r) in zip(y, part.iterrows()):
            label = f"{r['group']} ({r['images']} images, {r['patients']} patients)"
            if r["too_small"] or r["value"] is None or pd.isna(r["value"]):
                ax.text(
                    0.505, yi, "too small" if r["too_small"] else "undefined", va="center", fontsize=8, color="#777"
                )
            else:
                if pd.notna(r["ci_low"]):
                    ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color="#0072B2", lw=1.6)
                ax.plot([r["value"]], [yi], "s", color="black" if r["group"] == "all" else "#0072B2", ms=5)
            ax.annotate(
                label,
                (0, yi),
                xycoords=("axes fraction", "data"),
                xytext=(-6, 0),
                textcoords="offset points",
                ha="right",
                va="center",
                fontsize=8,
            )
        if len(overall) and pd.notna(overall.iloc[0]):
            ax.axvline(float(overall.iloc[0]), color="#555", ls="--", lw=0.8)
        ax.set_yticks([])
        lows = pd.to_numeric(part["ci_low"], errors="coerce").dropna()
        ax.set_xlim(max(0.0, min(0.5, float(lows.min()) - 0.02)) if len(lows) else 0.5, 1.0)
        ax.set_ylim(-0.7, len(part) - 0.3)
        ax.set_title(f"{column}", fontsize=9, loc="left")
        ax.set_xlabel("macro AUROC (95% CI, patient bootstrap)", fontsize=8)
    fig.suptitle(f"{name}: subgroups of the held-out test set", fontsize=10)
    return fig


def reliability_figure(name: str, measured: dict):
    """Reliability diagram per class: observed fraction against mean predicted probability per
    bin, before (and after) temperature scaling, bin sizes as marker areas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(measured["before"])
    cols = min(4, len(classes))
    nrows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.1 * cols, 3.2 * nrows), squeeze=False, layout="constrained")
    for ax, c in zip(axes.ravel(), classes):
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        for stage, color in (("before", "#D55E00"), ("after", "#0072B2")):
            r = (measured.get(stage) or {}).get(c)
            if not r:
                continue
            pts = [(p, o, n) for p, o, n in zip(r["mean_predicted"], r["observed"], r["count"]) if n]
            if pts:
                p, o, n = map(np.asarray, zip(*pts))
                t = measured.get("temperatures") or {}
                label = (
                    f"before, ECE {r['ece']:.3f}"
                    if stage == "before"
                    else f"temperature-scaled, ECE {r['ece']:.3f}"
                    + (f" (T {np.mean(list(t.values())):.2f})" if t else "")
                )
                ax.plot(p, o, "-", color=color, lw=1.2, label=label)
                ax.scatter(p, o, s=8 + 60 * n / n.max(), color=color, zorder=3)
        ax.set(title=c, xlabel="mean predicted probability", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(classes) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: reliability on the held-out test set", fontsize=10)
    return fig


def write_clinical(result: dict, name: str, output) -> None:
    """Every file of the clinical evaluation, to the paths the rule names (``output`` has
    test_predictions, clinical, subgroups, forest, calibration, reliability, operating_points)."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result["test_predictions"].to_parquet(output.test_predictions, index=False)
    Path(output.clinical).write_text(json.dumps(summary_record(result), indent=2) + "\n")
    subgroups = result.get("subgroups", pd.DataFrame(columns=SUBGROUP_COLUMNS))
    subgroups.to_csv(output.subgroups, index=False)
    result.get("operating_points", pd.DataFrame()).to_csv(output.operating_points, index=False)
    calibration_table(result.get("calibration", {})).to_csv(output.calibration, index=False)
    figures = (
        (
            output.forest,
            lambda: forest_figure(name, subgroups),
            len(subgroups),
            "no subgroups configured (evaluation.subgroups)",
        ),
        (
            output.reliability,
            lambda: reliability_figure(name, result["calibration"]),
            "calibration" in result,
            result.get("skipped", ""),
        ),
    )
    for path, draw, available, why in figures:
        if available:
            fig = draw()
        else:  # a placeholder saying why, so the rule's outputs always exist
            fig, ax = plt.subplots(figsize=(5, 1))
            ax.axis("off")
            ax.text(0.5, 0.5, f"{name}: {why}", ha="center", va="center")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
