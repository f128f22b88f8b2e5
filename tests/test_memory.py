"""lmpress.memory: the heap settings the bounded-memory engine relies on (glibc, Linux only)."""

import os
import subprocess
import sys
import textwrap

import pytest

PATTERN = textwrap.dedent("""
    import sys, torch
    from lmpress.memory import map_large_allocations

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    if sys.argv[1] == "map":
        assert map_large_allocations()
    x = torch.ones(5 << 20); del x  # one freed 20 MB mapping: glibc's default threshold rises to 20 MB
    base, keep, big = rss_mb(), [], []
    for i in range(40):  # 800 MB of 20 MB tensors, each followed by a 256 KB one that stays
        big.append(torch.ones(5 << 20))
        keep.append(torch.ones(1 << 16))
    big.clear()
    print(round(rss_mb() - base))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_map_large_allocations_returns_freed_tensors_to_the_os():
    """The engine's slice intermediates (tens of MB, freed between small tensors that stay) would otherwise
    stay resident as holes in the heap: the same pattern keeps > 400 of 800 MB freed under glibc's default
    and only the 10 MB of small tensors still alive with map_large_allocations."""
    def held(mode):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # a user's setting off
        out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True,
                             env=env)
        return int(out.stdout.split()[-1])

    assert held("default") > 400  # what the setting is for (glibc's dynamic mmap threshold)
    assert held("map") < 32
