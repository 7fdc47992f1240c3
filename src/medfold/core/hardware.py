"""What this machine is, for provenance and every benchmark's output: CPU model and the vector
ISA extensions that decide which int8 and float kernels run (AVX2 only, AVX-512 VNNI, AMX)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@lru_cache(maxsize=1)
def cpu() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [f for f in ISA_FLAGS if f in flags]
    level = (
        "amx"
        if "amx_int8" in flags
        else "avx512_vnni"
        if "avx512_vnni" in flags
        else "avx512"
        if "avx512f" in flags
        else "avx2"
        if "avx2" in flags
        else "baseline"
    )
    return {"model": model, "isa": level, "isa_flags": isa, "cores": os.cpu_count()}


def describe() -> str:
    info = cpu()
    return f"{info['model']}, {info['cores']} cores, ISA {info['isa']} ({' '.join(info['isa_flags']) or 'none'})"
