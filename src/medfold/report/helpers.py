"""Small formatting helpers of the report: numbers, intervals, inline SVG and PNG figures."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, in jobs and tests alike
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markupsafe import Markup  # noqa: E402
from PIL import Image  # noqa: E402


# ----------------------------------------------------------------------------- small helpers
def fmt(value, digits: int = 3) -> str:
    """A cell's text: floats to ``digits`` decimals, None and NaN as a dash."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    if isinstance(value, np.integer):
        return str(int(value))
    return value if isinstance(value, Markup) else str(value)


def svg(fig) -> Markup:
    """A matplotlib figure as inline SVG (its text is XML-escaped by matplotlib)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return Markup(text[text.index("<svg") :])  # drop the XML prolog and doctype: inline SVG needs neither


def png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _ci(low, high, digits: int = 3) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _with_ci(value, low, high) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f} {_ci(low, high)}" if low is not None and not pd.isna(low) else f"{value:.3f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not pd.isna(v)]
    return float(np.mean(values)) if values else None


def _pm(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat.get("std") is not None else f"{stat['mean']:.3f}"


def _mean_pm(row: pd.Series, column: str, digits: int = 3, scale: float = 1.0) -> str:
    mean, std = row.get(f"{column}.mean"), row.get(f"{column}.std")
    if mean is None or pd.isna(mean):
        return "–"
    if std is None or pd.isna(std):  # one fold
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _count(value) -> str | None:
    return None if value is None or pd.isna(value) else str(int(value))


def _pixels(cache: np.ndarray, row: int) -> np.ndarray:
    return np.asarray(cache[row][0] if cache.shape[1] == 1 else np.moveaxis(cache[row], 0, 2))
