"""Drain delay: hold the server's SIGTERM handling while load balancers catch up.

With ``PUSHSVC_DRAIN_DELAY`` > 0 a node wraps the SIGTERM handler its server
installed (uvicorn's, which starts the graceful shutdown). On SIGTERM the node is
told at once (readiness turns false: ``/readyz`` answers 503, so load balancers
stop routing new connections here) while every socket keeps working and new
handshakes are still accepted; after the delay the server's own handler runs and
the shutdown proceeds (sessions closed 1012, bounded by
``PUSHSVC_SHUTDOWN_TIMEOUT``). Further SIGTERMs during the delay are ignored
(``systemd`` and process-group kills signal every worker twice); SIGINT is not
delayed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pushsvc")


class SigtermDelay:
    """Delays the running server's SIGTERM handler by ``delay`` seconds.

    Args:
        delay: seconds between SIGTERM and the server's own shutdown.
        on_drain: called (on the event loop) when SIGTERM arrives; returns False
            when the node is already draining (then nothing more happens).
    """

    def __init__(self, delay: float, on_drain: Callable[[], bool]) -> None:
        self.delay = delay
        self._on_drain = on_drain
        self._installed: tuple[Any, Any] | None = None

    def install(self) -> None:
        """Wrap the current SIGTERM handler. Needs the main thread and a Python-level
        handler to wrap; otherwise a warning is logged and the delay is off."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("PUSHSVC_DRAIN_DELAY ignored: the server does not run in the main thread")
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            log.warning("PUSHSVC_DRAIN_DELAY ignored: no SIGTERM handler of the server to delay")
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: Any) -> None:
            # a signal handler may interrupt the loop anywhere: only hand over
            loop.call_soon_threadsafe(self._drain, previous, signum)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._installed = (on_sigterm, previous)

    def _drain(self, shutdown: Any, signum: int) -> None:
        if self._on_drain():
            asyncio.get_running_loop().call_later(self.delay, shutdown, signum, None)

    def uninstall(self) -> None:
        """Put the server's handler back (if ours is still the one installed)."""
        if self._installed is None:
            return
        ours, previous = self._installed
        self._installed = None
        if signal.getsignal(signal.SIGTERM) is ours:
            signal.signal(signal.SIGTERM, previous)
