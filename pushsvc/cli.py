"""Command line: ``pushsvc serve | token | publish | bench``.

Every ``serve`` flag overrides the ``PUSHSVC_*`` variable of the same name;
errors in configuration print one line naming the setting and exit with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import logging.config
import os
import secrets
import shutil
import signal
import sys
import tempfile
from typing import Any

import msgspec

from . import __version__, logs, natsconn
from .settings import ENV_PREFIX, Settings, SettingsError

log = logging.getLogger("pushsvc")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pushsvc`` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="pushsvc", description="Real-time push over NATS")
    parser.add_argument("--version", action="version", version=f"pushsvc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the WebSocket/HTTP server")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--dev", action="store_true", default=None, help="development mode")
    serve.add_argument("--nats-url", help="NATS URL(s), comma-separated; unset = bundled server")
    serve.add_argument("--data-dir", help="bundled nats-server store folder (default: temp)")
    serve.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    serve.add_argument("--history-ttl", type=float, help="seconds of history (0 = off)")
    serve.add_argument("--base-path", help="mount routes under this path, e.g. /push")
    serve.add_argument("--log-level", help="debug|info|warning|error")
    serve.add_argument(
        "--ws",
        default="pushsvc.wsprotocol:WebSocketProtocol",
        help="uvicorn WebSocket implementation (default: websockets-sansio with fixes)",
    )

    token = sub.add_parser("token", help="mint a JWT with the configured secret")
    token.add_argument("--sub", required=True, help="user id (JWT sub)")
    token.add_argument("--channel", action="append", default=[], help="subscribe grant")
    token.add_argument("--publish", action="append", default=[], help="publish grant")
    token.add_argument("--ttl", type=float, default=3600, help="lifetime in seconds")
    token.add_argument("--secret", help="HS256 secret (default PUSHSVC_JWT_SECRET)")
    token.add_argument("--private-key", help="PEM private key for RS256/ES256")
    token.add_argument("--algorithm", help="signing algorithm (default HS256 or RS256)")
    token.add_argument("--audience", help="aud claim (default PUSHSVC_JWT_AUDIENCE)")
    token.add_argument("--jti", help="token id (for revocation)")
    token.add_argument(
        "--typ", help="JOSE header typ (default PUSHSVC_JWT_TYPE; PUSHSVC_EMIT_TYPE for emit)"
    )

    publish = sub.add_parser("publish", help="publish a message to a channel through NATS")
    publish.add_argument("channel")
    publish.add_argument("data", help="payload; JSON is delivered as JSON, else as a string")
    publish.add_argument("--nats-url", help="NATS URL (default PUSHSVC_NATS_URL)")
    publish.add_argument("--msg-id", help="idempotency key (Nats-Msg-Id)")
    publish.add_argument("--core", action="store_true", help="core publish (no JetStream ack)")
    natsconn.add_arguments(publish)

    bench = sub.add_parser("bench", help="load-test a running pushsvc")
    from . import bench as bench_module

    bench_module.add_arguments(bench)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "publish":
            return _publish(args)
        return bench_module.main(args)
    except SettingsError as exc:
        print(f"pushsvc: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def settings_to_env(settings: Settings) -> dict[str, str]:
    """``PUSHSVC_*`` variables reproducing ``settings`` (for worker processes)."""
    env = {}
    for name, value in msgspec.structs.asdict(settings).items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[ENV_PREFIX + name.upper()] = str(value)
    return env


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .bus import Bus, Unavailable
    from .embedded import EmbeddedNats, EmbeddedNatsError

    settings = Settings.load(
        host=args.host,
        port=args.port,
        dev=args.dev,
        nats_url=args.nats_url,
        data_dir=args.data_dir,
        workers=args.workers,
        history_ttl=args.history_ttl,
        base_path=args.base_path,
        log_level=args.log_level,
    )
    log_config = logs.log_config(settings.log_format, settings.node_name or "-", settings.log_level)
    logging.config.dictConfig(log_config)
    logging.captureWarnings(True)
    json_logs = settings.log_format == "json"
    dev_secret = None
    if settings.dev and settings.jwt_secret is None and settings.jwt_public_key is None:
        dev_secret = settings.jwt_secret = secrets.token_urlsafe(32)
    embedded = None
    if settings.nats_url is None:
        # The conventional client port when it is free, so `nats pub` and
        # `pushsvc publish` work with their defaults; any free port otherwise.
        port = DEFAULT_NATS_PORT if _port_free(DEFAULT_NATS_PORT) else 0
        embedded = EmbeddedNats(port=port, data_dir=settings.data_dir)
        try:
            embedded.start()
        except EmbeddedNatsError as exc:
            print(f"pushsvc: cannot start the bundled nats-server: {exc}", file=sys.stderr)
            return 1
        settings.nats_url = embedded.url
    try:
        try:
            asyncio.run(_probe_nats(settings, Bus))
        except Unavailable as exc:
            print(f"pushsvc: PUSHSVC_NATS_URL: {exc}", file=sys.stderr)
            return 1
        except natsconn.NatsRefused as exc:
            print(f"pushsvc: {exc}", file=sys.stderr)
            return 1
        base = f"http://{settings.host}:{settings.port}{settings.base_path}"
        ws = f"ws://{settings.host}:{settings.port}{settings.base_path}/ws"
        nats_urls = ", ".join(map(natsconn.display_url, settings.nats_servers))
        if json_logs:  # every line of output is a JSON object: the banner is a log record
            log.info(
                "pushsvc %s serving %s",
                __version__,
                base,
                extra={"websocket": ws, "nats": nats_urls, "bundled": bool(embedded)},
            )
        else:
            print(f"pushsvc {__version__} serving {base}", flush=True)
            print(f"  WebSocket: {ws}", flush=True)
            print(f"  NATS:      {nats_urls}{' (bundled)' if embedded else ''}", flush=True)
        if settings.dev and json_logs:
            log.info("dev mode: demo page at %s/, tokens from %s/dev/token", base, base)
        elif settings.dev:
            from .auth import mint_token

            token = mint_token(
                settings.jwt_secret or "",
                "dev",
                channels=[">"],
                publish=[">"],
                ttl=86400,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            )
            print(f"  Demo page: {base}/", flush=True)
            print(f"  Dev token (user 'dev', all channels, 24 h):\n    {token}", flush=True)
            if dev_secret:
                print("  JWT secret generated for this run (set PUSHSVC_JWT_SECRET to keep one)")
        config: dict[str, Any] = dict(
            host=settings.host,
            port=settings.port,
            ws=args.ws,
            ws_max_size=settings.max_frame_bytes,
            ws_per_message_deflate=False,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            http="httptools",
            loop="uvloop" if sys.platform != "win32" else "asyncio",
            log_level=settings.log_level,
            log_config=log_config,
            lifespan="on",
            timeout_graceful_shutdown=settings.shutdown_timeout,
        )
        os.environ.update(settings_to_env(settings))
        # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into a normal
        # exit so the bundled nats-server is stopped by the `finally` below.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        if settings.workers > 1:
            metrics_dir = _multiprocess_metrics_dir()
            try:
                uvicorn.run(
                    "pushsvc.cli:app_from_env", factory=True, workers=settings.workers, **config
                )
            finally:
                metrics_dir.cleanup()
        else:
            from .app import create_app

            uvicorn.run(create_app(settings), **config)
        return 0
    finally:
        if embedded is not None:
            embedded.cleanup()


DEFAULT_NATS_PORT = 4222


def _port_free(port: int) -> bool:
    """True when ``port`` can be bound on loopback right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _MetricsDir:
    """The prometheus-client multiprocess folder of one ``serve --workers N`` run."""

    def __init__(self, path: str, owned: bool) -> None:
        self.path = path
        self.owned = owned

    def cleanup(self) -> None:
        """Remove the folder (or, when the user chose it, the files this run wrote)."""
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            _wipe_db_files(self.path)


def _multiprocess_metrics_dir() -> _MetricsDir:
    """Set up ``PROMETHEUS_MULTIPROC_DIR`` for the workers about to start.

    A fresh temporary folder, removed after the run; or the folder the user set in
    ``PROMETHEUS_MULTIPROC_DIR``, emptied of ``*.db`` files first (the
    prometheus-client docs: wipe it between runs). Workers inherit the variable
    (uvicorn spawns them after this). This process's own live-gauge files, if it
    wrote any, are removed: the supervisor serves no sockets.
    """
    from . import metrics

    preset = os.environ.get(metrics.MULTIPROC_ENV)
    if preset:
        os.makedirs(preset, exist_ok=True)
        _wipe_db_files(preset)
        return _MetricsDir(preset, owned=False)
    path = tempfile.mkdtemp(prefix="pushsvc-metrics-")
    os.environ[metrics.MULTIPROC_ENV] = path
    return _MetricsDir(path, owned=True)


def _wipe_db_files(path: str) -> None:
    for name in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(OSError):
            os.remove(name)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N``: each worker builds its app from the environment."""
    from .app import create_app

    return create_app(Settings.load())


async def _probe_nats(settings: Settings, bus_cls: Any) -> None:
    """Connect once to fail fast with one line (bounded by ``connect_timeout``)."""
    bus = bus_cls(settings, on_message=lambda *a: None)
    bus.history_enabled = False
    await bus.start()
    await bus.close()


def _token(args: argparse.Namespace) -> int:
    from .auth import mint_token

    if args.private_key:
        with open(args.private_key) as f:
            key = f.read()
        algorithm = args.algorithm or ("ES256" if "EC PRIVATE" in key else "RS256")
        audience = args.audience or os.environ.get("PUSHSVC_JWT_AUDIENCE")
    else:
        key = args.secret or os.environ.get("PUSHSVC_JWT_SECRET")
        if not key:
            raise SettingsError("PUSHSVC_JWT_SECRET", "missing: needed to sign tokens")
        algorithm = args.algorithm or "HS256"
        audience = args.audience or os.environ.get("PUSHSVC_JWT_AUDIENCE")
    print(
        mint_token(
            key,
            args.sub,
            channels=args.channel,
            publish=args.publish,
            ttl=args.ttl,
            algorithm=algorithm,
            audience=audience,
            issuer=os.environ.get("PUSHSVC_JWT_ISSUER"),
            jti=args.jti,
            headers=_typ_header(args.typ or os.environ.get("PUSHSVC_JWT_TYPE")),
        )
    )
    return 0


def _typ_header(typ: str | None) -> dict[str, str] | None:
    return {"typ": typ} if typ else None


def _publish(args: argparse.Namespace) -> int:
    from .bus import Unavailable
    from .channels import InvalidChannel
    from .publisher import Publisher

    url = args.nats_url or os.environ.get("PUSHSVC_NATS_URL") or "nats://127.0.0.1:4222"
    prefix = os.environ.get("PUSHSVC_SUBJECT_PREFIX", "push")
    try:
        data: Any = json.loads(args.data)
        payload = json.dumps(data).encode()
    except ValueError:
        payload = args.data.encode()

    servers = [u.strip() for u in url.split(",") if u.strip()]
    security = msgspec.structs.asdict(natsconn.NatsSecurity.from_args(args))
    # (Publisher checks the security settings: a SettingsError exits 2 with one line)
    pub = Publisher(servers, prefix=prefix, jetstream=not args.core, **security)

    async def run() -> int | None:
        async with pub:
            return await pub.publish(args.channel, payload, msg_id=args.msg_id)

    try:
        seq = asyncio.run(run())
    except (Unavailable, InvalidChannel, natsconn.NatsRefused) as exc:
        print(f"pushsvc: publish failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"channel": args.channel, "seq": seq}))
    return 0
