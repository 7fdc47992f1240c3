"""The boundary between a Snakemake rule and the library: logging to the rule's log file and
stderr, and a user-facing error (no traceback) when the step fails for a reason the user can fix."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from .errors import MedfoldError


def setup_logging(log_path: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def run(smk: Any, work: Callable[[Any], None]) -> None:
    """Run ``work(snakemake)``; a MedfoldError ends the job with its message and exit status 1."""
    setup_logging(smk.log[0] if len(smk.log) else None)
    try:
        work(smk)
    except MedfoldError as exc:
        name = getattr(smk, "rule", "step")
        logging.getLogger("medfold").error("%s failed: %s", name, exc)
        logging.shutdown()
        sys.exit(1)
