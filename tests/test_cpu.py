"""cpu.keep_freed_memory: large freed blocks stay with the process, so the next step reuses their pages."""

import subprocess
import sys

import pytest

PROBE = """
import sys, numpy as np, psutil
from cloc_jax import cpu
if sys.argv[1] == "keep":
    assert cpu.keep_freed_memory()
rss = lambda: psutil.Process().memory_info().rss
block = np.ones(256 * 2**20 // 8)  # 256 MiB, every page touched
held = rss()
del block
print((held - rss()) / 2**20)
"""


def _released_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_go_back_to_the_kernel_by_default_and_stay_with_keep_freed_memory():
    assert _released_mib("default") > 200  # glibc unmaps a freed 256 MiB block at once
    assert _released_mib("keep") < 16  # kept: the next allocation reuses the pages without faulting them in
