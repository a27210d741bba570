"""Process settings for XLA:CPU that only take effect when the process starts.

    if __name__ == "__main__":
        from model.runtime import use_huge_pages
        use_huge_pages()          # first thing in an entry point: may restart the process once

XLA:CPU takes every step's temporary buffers (hundreds of MB for a 224-px batch) from malloc,
and glibc serves allocations that large with fresh mmap'd memory, released again after the
step: each step page-faults its whole working set back in, 4 KiB at a time. On the 2-core
machine, `bench/profile_step.py` (Lite0, 224 px, batch 32, 7 steps) took 6.3 M page faults and
trained 9.4-11.1 images/s; with glibc's `hugetlb` tunable (2 MiB transparent huge pages for
those mappings) 0.3 M faults and 12.3-15.5 images/s. glibc reads tunables only at start-up,
so the process re-executes itself once with GLIBC_TUNABLES set. Numerics are untouched.
"""
import os
import platform
import sys

TUNABLES = ":".join([
    "glibc.malloc.hugetlb=1",               # madvise(MADV_HUGEPAGE) on the mappings malloc makes
    "glibc.malloc.mmap_threshold=33554432",  # 32 MiB (glibc's maximum): smaller buffers stay in the heap
    "glibc.malloc.trim_threshold=4294967295",  # and the heap is not handed back between steps
])
OPT_OUT = "LESIONLENS_KEEP_MALLOC"   # set to anything to skip the restart (debuggers, profilers)


def glibc_has_hugetlb() -> bool:
    """Linux with glibc >= 2.35, the first with the `hugetlb` tunable."""
    libc, version = platform.libc_ver()
    try:
        return sys.platform == "linux" and libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except ValueError:
        return False


def wanted() -> bool:
    """True where the restart helps and is safe: glibc_has_hugetlb(), no GLIBC_TUNABLES of the
    user's own (never overridden), no opt-out."""
    return os.environ.get("GLIBC_TUNABLES") is None and not os.environ.get(OPT_OUT) and glibc_has_hugetlb()


def use_huge_pages() -> None:
    """Re-execute this Python command with TUNABLES, once; returns at once when not `wanted()`."""
    if not wanted():
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
