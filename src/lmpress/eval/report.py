"""Human-readable tables for the CLI and the benchmarks (plain text, aligned, no dependencies)."""

from __future__ import annotations


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "-" if v is None else str(v)


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [all(isinstance(r[i], (int, float)) for r in rows if r[i] is not None) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if al else v.ljust(w) for v, w, al in zip(vals, widths, right)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def key_values(pairs: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v if isinstance(v, str) else fmt(v)}" for k, v in pairs)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tok"):
    """A progress bar on stderr (a no-op object when disabled)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=not enabled,
                leave=False, dynamic_ncols=True, mininterval=1.0)
