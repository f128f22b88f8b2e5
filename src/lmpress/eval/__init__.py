"""Evaluation: perplexity, KL divergence to a base model, zero-shot accuracy, and speed/size benchmarks."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tok"):
    """A progress bar on stderr (a no-op object when disabled)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=not enabled,
                leave=False, dynamic_ncols=True, mininterval=1.0)
