"""Writing results so that a fault loses nothing: atomic replacement, space reserved before a
memory map is filled, and a full disk reported as the path and the space it needed."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np

from medfold.core.errors import DataError

CHUNK = 64 << 20


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path if path.is_dir() else path.parent).free / 1e6:.1f} MB free"
    except OSError:
        return "free space unknown"


@contextmanager
def writing(path, what: str = "writing"):
    """Turn 'no space left on device' while writing ``path`` into a DataError naming it."""
    path = Path(path)
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"{path}: no space left on the device while {what} ({_free(path)}); free space and "
                f"run the same command again (completed work is kept)"
            ) from exc
        raise


def save_torch_atomic(obj, path) -> None:
    """torch.save to a temporary name, then rename: a kill or a full disk never leaves a
    half-written file under the real name. Serialised in memory first, so that a full disk is
    an OSError from a plain write (torch's zip writer words it differently in every version)."""
    import io

    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with writing(path, "saving"):
        try:
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)


def reserve(path, nbytes: int) -> None:
    """Allocate ``nbytes`` for ``path`` now. A memory map over a sparse file on a full disk dies of
    SIGBUS at some later page; reserved space fails here, with a message."""
    with writing(path, f"reserving {nbytes / 1e6:.1f} MB"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)


def digest(path) -> str:
    """BLAKE2b-128 of a file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def array_bytes(path) -> int:
    """The size an .npy file must have, from its header."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        return fh.tell() + int(np.prod(shape)) * dtype.itemsize


class Outputs:
    """The output paths of one rule, as the rule declares them; a library function writes each
    file where its field says. A folder (tests, the command line) means the usual ``NAMES`` in it.
    Subclasses are frozen dataclasses of ``Path`` fields named as the rule's outputs."""

    NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls, where):
        if isinstance(where, cls):
            return where
        if isinstance(where, dict):
            return cls(**{k: Path(v) for k, v in where.items()})
        folder = Path(where)
        return cls(**{k: folder / name for k, name in cls.NAMES.items()})

    @classmethod
    def from_rule(cls, output):
        """From a Snakemake job's ``output`` (named like the fields)."""
        return cls(**{k: Path(getattr(output, k)) for k in cls.NAMES})

    def as_dict(self) -> dict:
        return {k: str(getattr(self, k)) for k in self.NAMES}

    def create(self) -> None:
        for k in self.NAMES:
            getattr(self, k).parent.mkdir(parents=True, exist_ok=True)
