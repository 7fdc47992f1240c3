"""Third-party messages that read like faults stay out of the console and the job logs, and come
back with MEDFOLD_VERBOSE=1."""

import subprocess
import sys

import pytest

# a job's logging set up as a rule's script sets it up, then the messages as faiss, torch's C++
# extension loader and pytree registry, the ONNX exporter's rewriter and inductor emit them
JOB = """
import logging, sys, warnings
from medfold.core.step import setup_logging
setup_logging(sys.argv[1])
logging.getLogger("faiss.loader").info("Could not load library with AVX2 support due to: ModuleNotFoundError")
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
warnings.warn_explicit("To copy construct from a tensor, it is recommended", UserWarning, "mkldnn_lowerings.py", 827,
                       module="torch._inductor.mkldnn_lowerings")
logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass and is now natively")
logging.getLogger("onnx_ir.passes.common.unused_removal").info("Removed 69 unused nodes")
logging.getLogger("onnxscript.rewriter").info("Applied 18 of general pattern rewrite rules.")
logging.getLogger("medfold.training.train").info("fold 0 epoch 1/3")
warnings.warn_explicit("a warning of medfold's own", UserWarning, "fold.py", 1, module="medfold.training.fold")
"""
NOISE = ("AVX2 support", "No CUDA runtime", "natively", "unused nodes", "rewrite rules", "To copy construct")


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_noise_is_kept_out_unless_verbose(tmp_path, monkeypatch, verbose):
    monkeypatch.setenv("MEDFOLD_VERBOSE", "1" if verbose else "")
    log = tmp_path / "job.log"
    proc = subprocess.run([sys.executable, "-c", JOB, str(log)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    console, written = proc.stderr, log.read_text()
    assert "fold 0 epoch 1/3" in console and "fold 0 epoch 1/3" in written  # medfold's own lines stay
    assert "a warning of medfold's own" in console  # and so do other warnings
    for text in NOISE[:-1]:
        assert (text in written) == verbose and (text in console) == verbose
    assert (NOISE[-1] in console) == verbose
