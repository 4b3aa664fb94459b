"""Raising glibc's malloc thresholds stops large, repeatedly freed blocks from page-faulting."""

import subprocess
import sys

import pytest

from breastfusion import allocator

PROGRAM = """
import resource, sys, torch
from breastfusion.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
for step in range(30):  # the last 10 rounds count: malloc's heap has settled by then
    if step == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(48 << 18)  # 48 MiB, above glibc's largest dynamic mmap threshold
    del block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reused_blocks_do_not_page_fault_again():
    applied, reused = _faults("reuse")
    _, default = _faults("default")
    assert applied == "True"
    pages = (48 << 20) // 4096
    assert default > 9 * pages  # each of the 10 blocks is mapped and faulted in afresh
    assert reused < pages  # the heap's blocks are reused: no new pages


def test_can_be_left_alone(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "default")
    assert allocator.reuse_freed_memory() is False
