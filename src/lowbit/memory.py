"""Hand freed heap memory back to the operating system.

glibc's allocator keeps freed memory inside the process: after a large block is freed it raises
its mmap threshold, so later blocks of that size come from the heap, whose free pages are only
returned by ``malloc_trim``. A loop that allocates and frees a layer's worth of tensors per step
therefore grows its resident set step after step without holding any more data. Calling
:func:`trim` after each step keeps the resident set at what is really in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def trim() -> None:
    """``malloc_trim(0)`` where the C library has it; nothing elsewhere."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
