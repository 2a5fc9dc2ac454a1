"""Free C-heap pages go back to the OS: glibc's ``malloc_trim(3)`` on a timer.

CPython takes objects of up to 512 bytes from its own arenas (pymalloc, which
unmaps an arena once it is empty) and everything larger from the C library's
``malloc``: coalesced batches, read buffers, the tables of big dicts and
sets (one entry per connection). glibc gives memory back to the OS only from
the top of its heap (above ``M_TRIM_THRESHOLD``, mallopt(3)); pages freed in
the middle stay resident. Under connection churn the heap's free part grows
in holes between live blocks, so the process's RSS climbs for a while although
nothing it uses grows. ``malloc_trim(0)`` releases every whole free page of the heap
(``MADV_DONTNEED``, glibc 2.8 and later); the next use of such a page costs a
page fault.

Measured (docs/capacity.md, "Where the warm-up went"): 19,000 connections, 1 %
churn a minute, 15 minutes. Without trimming, glibc's heap grew from 70.3 to
73.3 MiB resident with 64.8 -> 66.1 MiB in use. With a trim every 60 s its
resident size stayed at 69.1-69.2 MiB from the second minute on; one trim took 0.3-0.7 ms
(at most 11 ms) in a thread that does not hold the GIL (ctypes releases it).

``pushsvc serve`` starts the trimmer in each worker (``PUSHSVC_HEAP_TRIM_INTERVAL``,
seconds; ``0`` turns it off); an app that embeds pushsvc can call
:func:`start_heap_trimmer` itself. Only glibc has ``malloc_trim``: with another C
library (musl on Alpine, macOS) :func:`trim_heap` does nothing and no thread is
started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

THREAD_NAME = "pushsvc-trim"  # what threading, top -H and /proc/<pid>/task/*/comm show
_PR_SET_NAME = 15  # prctl(2): the calling thread's name, at most 15 bytes


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Return the C heap's whole free pages to the OS now (``malloc_trim(0)``).

    Returns:
        ``True`` if glibc released memory, ``False`` if it had none to release or
        the C library has no ``malloc_trim`` (not glibc). Never raises.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def start_heap_trimmer(interval: float) -> threading.Thread | None:
    """Start a daemon thread that calls :func:`trim_heap` every ``interval`` seconds.

    Args:
        interval: seconds between two trims; ``0`` (or less) starts nothing.

    Returns:
        The thread (named :data:`THREAD_NAME`, also in ``/proc``), or ``None`` when
        ``interval`` is 0 or the C library has no ``malloc_trim``. The thread is a
        daemon: it ends with the process and holds nothing that needs closing.
    """
    if interval <= 0:
        return None
    if _malloc_trim() is None:
        log.debug("no malloc_trim in this C library: the heap is not trimmed")
        return None
    thread = threading.Thread(target=_trim_every, args=(interval,), name=THREAD_NAME, daemon=True)
    thread.start()
    log.info(
        "free heap memory goes back to the OS every %g s (PUSHSVC_HEAP_TRIM_INTERVAL)", interval
    )
    return thread


def _trim_every(interval: float) -> None:
    _name_os_thread(THREAD_NAME)
    never = threading.Event()
    while not never.wait(interval):
        trim_heap()


def _name_os_thread(name: str) -> None:
    """Name the calling OS thread (prctl ``PR_SET_NAME``), so ``top -H`` and ``ps -L`` show it."""
    libc = _libc()
    prctl = getattr(libc, "prctl", None) if libc is not None else None
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
