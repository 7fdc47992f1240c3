"""Constants the parts of medfold.clinical share."""

from __future__ import annotations

PROB = "prob:"
