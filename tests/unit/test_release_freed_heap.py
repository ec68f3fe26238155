"""``platform.release_freed_heap``: freed pages inside the C heap go back to the OS."""

from __future__ import annotations

import ctypes
import sys

import psutil
import pytest

from fipo_trainer.platform import release_freed_heap

MiB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_small_allocations_in_the_middle_of_the_heap_are_returned():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 1600  # 100 MiB of chunks below the mmap threshold: the heap
    chunks = [libc.malloc(size) for _ in range(count)]
    for p in chunks:
        ctypes.memset(p, 1, size)  # resident
    for p in chunks[:-1]:
        libc.free(p)  # the last chunk pins the heap's top: glibc cannot shrink it by itself
    rss = psutil.Process().memory_info().rss
    try:
        assert release_freed_heap()
        assert rss - psutil.Process().memory_info().rss > 50 * MiB
    finally:
        libc.free(chunks[-1])
