"""glibc's allocator tuned for training steps, and freed memory handed back."""
from __future__ import annotations

import os
import sys


MMAP_THRESHOLD = 32 << 20  # glibc's largest; a freed block under it stays in the heap for the next step


TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top instead of handed back (and faulted in again)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep what a step frees for the next one. By default it maps every block above a
    threshold (128 kB, raised only when such a block is freed) afresh and hands it back when freed, so each
    training step's large temporaries (activations, the loss on upsampled logits) fault in their pages again:
    2.7 million page faults and 5 s of system time in a 21 s demo run here, 9 % of its speed (benchmarks/ab_loop.py).
    Fixed thresholds keep those blocks in the heap. Returns whether it applied (glibc only; a no-op elsewhere, and
    when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves)."""
    import ctypes

    if sys.platform != "linux" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD)) and bool(libc.mallopt(-1, TRIM_THRESHOLD))  # M_MMAP_, M_TRIM_
    except (OSError, AttributeError):  # not glibc
        return False


def release_memory() -> None:
    """Hand freed heap back to the operating system: pyarrow's pool (pandas' string columns) and glibc's malloc
    keep what a large read freed (about 250 MB after indexing the competition's train.csv), and data-loader
    workers forked later would each map it."""
    import ctypes
    import gc

    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
