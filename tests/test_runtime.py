"""model/runtime.py: the entry points' one restart puts malloc's large buffers on huge pages."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import runtime

ROOT = Path(__file__).resolve().parents[1]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Five 64 MiB malloc/free rounds, touching every byte: 16,384 page faults each with 4 KiB pages.
CHILD = """
import ctypes, os, resource
from model.runtime import use_huge_pages
use_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_child(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    return out[0], int(out[1])


def test_restart_sets_the_tunables_and_cuts_page_faults():
    if not runtime.glibc_has_hugetlb():
        pytest.skip("not Linux with glibc >= 2.35: use_huge_pages() does nothing here")
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    tunables, faults = run_child()
    kept, faults_4k = run_child(**{runtime.OPT_OUT: "1"})
    assert tunables == runtime.TUNABLES and kept == "None"
    assert faults_4k > 5 * 16384 * 0.9      # every 4 KiB page faulted in, every round
    assert faults < faults_4k / 4, (faults, faults_4k)


def test_a_users_own_tunables_are_kept():
    tunables, _ = run_child(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert tunables == "glibc.malloc.check=0"
