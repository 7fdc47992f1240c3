"""The boundary between a Snakemake rule and the library: logging to the rule's log file and
stderr, and a user-facing error (no traceback) when the step fails for a reason the user can fix."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from medfold.core.errors import MedfoldError

# Third-party messages that read like faults and are not: faiss says which of its builds it
# loaded (it tries the AVX2 build first, and reports its absence at INFO); torch's C++ extension
# loader warns that this CPU machine has no CUDA runtime; inductor warns of a tensor copy inside
# its own lowering; torch's pytree registry warns of torchao's enum registration in every int8
# job; the ONNX exporter's rewriter (onnxscript, onnx_ir) narrates its passes at INFO. Shown again
# with MEDFOLD_VERBOSE=1.
VERBOSE = "MEDFOLD_VERBOSE"
QUIETED = {
    "faiss": logging.WARNING,
    "torch.utils.cpp_extension": logging.ERROR,
    "torch.utils._pytree": logging.ERROR,
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
}
QUIETED_WARNINGS = (r"torch\._inductor",)


def verbose() -> bool:
    return os.environ.get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no")


def quiet_third_parties() -> None:
    """Keep the messages above out of the console and the job logs, unless MEDFOLD_VERBOSE is set."""
    if verbose():
        return
    for name, level in QUIETED.items():
        logging.getLogger(name).setLevel(level)
    for module in QUIETED_WARNINGS:
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


def setup_logging(log_path: str | None = None, append: bool = False, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="a" if append else "w"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    quiet_third_parties()


def guarded(
    name: str, log_path: str | None, work: Callable[[], None], append: bool = False, level: int = logging.INFO
) -> None:
    """Run ``work()`` with logging set up; a MedfoldError ends the process with its message
    and exit status 1, no traceback."""
    setup_logging(log_path, append, level)
    try:
        work()
    except MedfoldError as exc:
        logging.getLogger("medfold").error("%s failed: %s", name, exc)
        logging.shutdown()
        sys.exit(1)


def run(smk: Any, work: Callable[[Any], None]) -> None:
    """A rule's script: ``work(snakemake)`` under ``guarded``, logging to the rule's log. A rule
    that reads the index logs only the shared IDs it carries (medfold.core.privacy), whatever its
    code prints."""
    guarded(getattr(smk, "rule", "step"), smk.log[0] if len(smk.log) else None, lambda: _private(smk, work))


def _private(smk: Any, work: Callable[[Any], None]) -> None:
    inputs = getattr(smk, "input", None)
    index = inputs["index"] if inputs is not None and "index" in inputs.keys() else None
    if not isinstance(index, str):
        work(smk)
        return
    import pyarrow.parquet as pq

    from medfold.core.privacy import index_scrubber, scrubbed_logs

    columns = ["image_id", "path", "patient_id", "patient_aliases", "shared_image_id", "shared_patient_id"]
    names = pq.read_schema(index).names
    table = pq.read_table(index, columns=[c for c in [*columns, "shared_patient_aliases"] if c in names]).to_pandas()
    scrub = index_scrubber(table)
    with scrubbed_logs(scrub):
        try:
            work(smk)
        except MedfoldError as exc:  # its message is logged after this: scrubbed here
            raise type(exc)(scrub.text(str(exc))) from None
