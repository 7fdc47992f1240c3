"""Constants the parts of medfold.evaluation.clinical share."""

from __future__ import annotations

PROB = "prob:"
