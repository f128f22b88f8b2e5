"""Returning freed memory to the operating system (the bounded-memory paths: calibrate.py's engine, streaming)."""

from __future__ import annotations

import sys


def release_freed_memory() -> None:
    """Give memory the process has freed back to the OS (glibc's malloc_trim; nothing elsewhere). Tensors up
    to 32 MB come from malloc's heap, which keeps what they free: without this, a streamed GPTQ on
    Qwen2.5-0.5B held 0.7 GB more at the end of block 0's observation (2,175 vs 1,496 MiB)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None
