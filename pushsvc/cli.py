"""Command line: ``pushsvc serve | token | publish | subscribe | api | bench``.

Every ``serve`` flag overrides the ``PUSHSVC_*`` variable of the same name;
errors in configuration print one line naming the setting and exit with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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

from . import logs
from ._version import __version__
from .config import nats as natsconfig
from .config.settings import ENV_PREFIX, Settings, SettingsError, check_nats_url, split_servers
from .server.heaptrim import start_heap_trimmer

log = logging.getLogger("pushsvc")

#: where ``pushsvc subscribe`` connects without --url / PUSHSVC_URL
DEFAULT_URL = "http://127.0.0.1:8000"
#: where ``pushsvc publish`` goes without --nats-url / PUSHSVC_NATS_URL: the bundled
#: nats-server of ``pushsvc serve`` when port 4222 was free (NATS's default port)
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pushsvc`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import bench as bench_module

    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "publish":
            return _publish(args)
        if args.command == "subscribe":
            return _subscribe(args)
        if args.command == "api":
            from .serverapi import command as api_command

            return api_command.run(args)
        return bench_module.main(args)
    except SettingsError as exc:
        print(f"pushsvc: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The ``pushsvc`` argument parser with every sub-command (``serve``, ``token``, ...).

    :func:`main` parses with it; the docs site renders its CLI reference from it
    (``docs/_hooks/reference.py``), so flags and help texts have one source.

    Returns:
        A new parser; sub-command parsers are reachable through its subparsers action.
    """
    parser = argparse.ArgumentParser(prog="pushsvc", description="Real-time push over NATS")
    parser.add_argument("--version", action="version", version=f"pushsvc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_serve_parser(sub)

    token = sub.add_parser("token", help="mint a JWT with the configured secret")
    token.add_argument("--sub", required=True, help="user id (JWT sub)")
    token.add_argument("--channel", action="append", default=[], help="subscribe grant")
    token.add_argument("--publish", action="append", default=[], help="publish grant")
    token.add_argument(
        "--presence", action="append", default=[], help="presence grant (channels whose presence)"
    )
    token.add_argument(
        "--subs", action="append", default=[], help="server-side subscription (channel/pattern)"
    )
    token.add_argument("--rpc", action="append", default=[], help="rpc grant (method pattern)")
    token.add_argument("--info", help='info claim, a JSON object (e.g. \'{"name":"Ann"}\')')
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
    publish.add_argument(
        "--nats-url", help="NATS URL(s) (default PUSHSVC_NATS_URL, else nats://127.0.0.1:4222)"
    )
    publish.add_argument("--msg-id", help="idempotency key (Nats-Msg-Id)")
    publish.add_argument("--core", action="store_true", help="core publish (no JetStream ack)")
    natsconfig.add_arguments(publish)

    subscribe = sub.add_parser(
        "subscribe",
        help="print a channel's messages, one JSON object per line (resumes after disconnects)",
    )
    subscribe.add_argument("channel", help="a channel, or a pattern: 'orders.*', 'orders.>'")
    subscribe.add_argument(
        "--url",
        default=os.environ.get("PUSHSVC_URL") or DEFAULT_URL,
        help="server URL: http(s)://host:port[/base], ws(s)://..., or the /ws endpoint "
        f"(default PUSHSVC_URL, else {DEFAULT_URL})",
    )
    subscribe.add_argument(
        "--since", type=int, help="replay what came after this seq first (0 = all history)"
    )
    subscribe.add_argument("--epoch", help="stream epoch the --since seq belongs to")
    subscribe.add_argument("--token", help="JWT to present (default PUSHSVC_TOKEN)")
    subscribe.add_argument(
        "--secret", help="mint the token with this HS256 secret (default PUSHSVC_JWT_SECRET)"
    )
    subscribe.add_argument("--sub", help="user id of the minted token (with --secret)")
    subscribe.add_argument("--raw", action="store_true", help="print only each message's data")

    from .serverapi import command as api_command

    api_command.add_arguments(
        sub.add_parser("api", help="call the server API over NATS (docs/server-api.md)")
    )

    bench = sub.add_parser("bench", help="load-test a running pushsvc")
    from . import bench as bench_module

    bench_module.add_arguments(bench)
    return parser


def _add_serve_parser(sub: Any) -> None:
    """The ``serve`` sub-command's flags (each overrides its ``PUSHSVC_*`` setting)."""
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
        default="pushsvc.ws.protocol:WebSocketProtocol",
        help="uvicorn WebSocket implementation (default: websockets-sansio with fixes)",
    )


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
    from uvicorn.supervisors import Multiprocess

    from .bus import Bus, Unavailable
    from .server.embedded import EmbeddedNatsError, start_default
    from .server.serving import ListenError, listen_socket, uvicorn_config

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
    # The listen address first: a busy port fails before NATS starts or anything is printed.
    try:
        sock = listen_socket(settings.host, settings.port)
    except ListenError as exc:
        print(f"pushsvc: {exc}", file=sys.stderr)
        return 1
    settings.port = sock.getsockname()[1]  # the real port when 0 (any free port) was asked
    dev_secret = None
    if settings.dev and settings.jwt_secret is None and settings.jwt_public_key is None:
        dev_secret = settings.jwt_secret = secrets.token_urlsafe(32)
    embedded = None
    try:
        if settings.nats_url is None:
            try:
                embedded = start_default(settings.data_dir)
            except EmbeddedNatsError as exc:
                print(f"pushsvc: cannot start the bundled nats-server: {exc}", file=sys.stderr)
                return 1
            settings.nats_url = embedded.url
        try:
            asyncio.run(_probe_nats(settings, Bus))
        except Unavailable as exc:
            source = "bundled nats-server" if embedded else "PUSHSVC_NATS_URL"
            print(f"pushsvc: {source}: {exc}", file=sys.stderr)
            return 1
        except natsconfig.NatsRefused as exc:
            print(f"pushsvc: {exc}", file=sys.stderr)
            return 1
        _banner(settings, embedded is not None, dev_secret is not None, json_logs)
        config: dict[str, Any] = uvicorn_config(settings)
        config["ws"] = args.ws
        config["log_config"] = log_config
        os.environ.update(settings_to_env(settings))
        # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into a normal
        # exit so the bundled nats-server is stopped by the `finally` below.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        if settings.workers > 1:
            uv = uvicorn.Config(
                "pushsvc.cli:app_from_env", factory=True, workers=settings.workers, **config
            )
            metrics_dir = _multiprocess_metrics_dir()
            try:
                Multiprocess(uv, sockets=[sock]).run()
            finally:
                metrics_dir.cleanup()
            return 0
        from .app import create_app, serve_app

        app = serve_app(create_app(settings))
        server = uvicorn.Server(uvicorn.Config(app, **config))  # logging configured here
        tune_process(settings)
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        sock.close()
        if embedded is not None:
            embedded.cleanup()


def _banner(settings: Settings, bundled: bool, generated_secret: bool, json_logs: bool) -> None:
    """What ``pushsvc serve`` prints once NATS answered and the port is bound."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"http://{host}:{settings.port}{settings.base_path}"
    ws = f"ws://{host}:{settings.port}{settings.base_path}/ws"
    nats_urls = ", ".join(map(natsconfig.display_url, settings.nats_servers))
    if json_logs:  # every line of output is a JSON object: the banner is a log record
        log.info(
            "pushsvc %s serving %s",
            __version__,
            base,
            extra={"websocket": ws, "nats": nats_urls, "bundled": bundled},
        )
        if settings.dev:
            log.info("dev mode: demo page at %s/, tokens from %s/dev/token", base, base)
        return
    print(f"pushsvc {__version__} serving {base}", flush=True)
    print(f"  WebSocket: {ws}", flush=True)
    print(f"  NATS:      {nats_urls}{' (bundled)' if bundled else ''}", flush=True)
    if settings.dev:
        from .auth.tokens import mint_token

        token = mint_token(
            settings.jwt_secret or "",
            "dev",
            channels=[">"],
            publish=[">"],
            presence=[">"],
            rpc=[">"],
            ttl=86400,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
        print(f"  Demo page: {base}/", flush=True)
        print(
            f"  Dev token (user 'dev', all channels, presence and rpc, 24 h):\n    {token}",
            flush=True,
        )
        if generated_secret:
            print("  JWT secret generated for this run (set PUSHSVC_JWT_SECRET to keep one)")


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
    from .app import create_app, serve_app

    settings = Settings.load()
    app = serve_app(create_app(settings))
    tune_process(settings)
    return app


def tune_process(settings: Settings) -> None:
    """What ``pushsvc serve`` sets up in each worker process, once its app is built.

    The collector's thresholds (:func:`tune_gc`) and the heap trimmer
    (:func:`pushsvc.server.heaptrim.start_heap_trimmer`, every
    ``PUSHSVC_HEAP_TRIM_INTERVAL`` seconds). Both act on the whole process, so an
    app that embeds pushsvc decides on them itself (docs/backend/embedding.md).
    """
    tune_gc()
    start_heap_trimmer(settings.heap_trim_interval)


GC_OLDEST_THRESHOLD = 1000  # CPython's default is 10


def tune_gc() -> None:
    """Garbage-collector settings of a ``pushsvc serve`` process (not of embedding apps).

    Every connection keeps a few hundred container objects alive for its whole
    life, and CPython runs a full collection (over every object of the process)
    each time 10 young-generation collections have happened and the old
    generation grew by 25%: while thousands of sockets connect, that was most of
    the server's CPU per connection (docs/benchmarks.md, "Reconnect"). Full
    collections now wait for ``GC_OLDEST_THRESHOLD`` young collections (the 25%
    rule still applies); the young generations keep their defaults, so short-lived
    cycles are freed as promptly as before. ``gc.freeze()`` moves what the process
    built at start (imports, app, routes) out of the collector's way for good.
    """
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, GC_OLDEST_THRESHOLD)
    gc.collect()
    gc.freeze()


async def _probe_nats(settings: Settings, bus_cls: Any) -> None:
    """Connect once to fail fast with one line (bounded by ``connect_timeout``)."""
    bus = bus_cls(settings, on_message=lambda *a: None)
    bus.history_enabled = False
    await bus.start()
    await bus.close()


def _token(args: argparse.Namespace) -> int:
    from .auth.tokens import mint_token

    if args.private_key:
        with open(args.private_key) as f:
            key = f.read()
        algorithm = args.algorithm or ("ES256" if "EC PRIVATE" in key else "RS256")
    else:
        key = args.secret or os.environ.get("PUSHSVC_JWT_SECRET")
        if not key:
            raise SettingsError("PUSHSVC_JWT_SECRET", "missing: needed to sign tokens")
        algorithm = args.algorithm or "HS256"
    audience = args.audience or os.environ.get("PUSHSVC_JWT_AUDIENCE")
    info = None
    if args.info is not None:
        try:
            info = json.loads(args.info)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise SettingsError("--info", 'must be a JSON object, e.g. \'{"name":"Ann"}\'')
    print(
        mint_token(
            key,
            args.sub,
            channels=args.channel,
            publish=args.publish,
            presence=args.presence,
            subs=args.subs,
            rpc=args.rpc,
            info=info,
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

    if args.nats_url:
        url = args.nats_url
        setting = "--nats-url"
    else:
        url = os.environ.get("PUSHSVC_NATS_URL") or DEFAULT_NATS_URL
        setting = "PUSHSVC_NATS_URL"
    servers = [check_nats_url(u, setting) for u in split_servers(url)]
    prefix = os.environ.get("PUSHSVC_SUBJECT_PREFIX", "push")
    try:
        data: Any = json.loads(args.data)
        payload = json.dumps(data).encode()
    except ValueError:
        payload = args.data.encode()

    security = natsconfig.NatsSecurity.from_args(args)
    # (Publisher checks the security settings: a SettingsError exits 2 with one line)
    pub = Publisher(servers, prefix=prefix, jetstream=not args.core, security=security)

    async def run() -> int | None:
        async with pub:
            return await pub.publish(args.channel, payload, msg_id=args.msg_id)

    try:
        seq = asyncio.run(run())
    except (Unavailable, InvalidChannel, natsconfig.NatsRefused) as exc:
        print(f"pushsvc: publish failed: {exc}", file=sys.stderr)
        return 1
    # The server it went to, so a publish to another NATS than the one pushsvc uses
    # (another bundled server, a stale PUSHSVC_NATS_URL) is visible.
    print(json.dumps({"channel": args.channel, "seq": seq, "nats": pub.url}))
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    from .auth.tokens import mint_token
    from .channels import InvalidChannel, is_pattern, validate_channel, validate_pattern
    from .serverurl import parse_server_url
    from .subscriber import SubscribeError, Subscriber

    try:
        if is_pattern(args.channel):
            channel = validate_pattern(args.channel)
        else:
            channel = validate_channel(args.channel)
    except InvalidChannel as exc:
        print(f"pushsvc: subscribe: {exc}", file=sys.stderr)
        return 2
    try:
        parse_server_url(args.url)
    except ValueError as exc:
        raise SettingsError("--url", str(exc)) from None
    if args.since is not None and args.since < 0:
        raise SettingsError("--since", f"must be >= 0, got {args.since}")
    token = args.token or (None if args.sub else os.environ.get("PUSHSVC_TOKEN"))
    renewable = False
    if token is not None:
        fixed = token

        def make_token() -> str:
            return fixed

    elif args.sub:
        secret = args.secret or os.environ.get("PUSHSVC_JWT_SECRET")
        if not secret:
            raise SettingsError("--secret", "missing: needed with --sub to mint a token")
        sub, audience = args.sub, os.environ.get("PUSHSVC_JWT_AUDIENCE")

        def make_token() -> str:
            return mint_token(
                secret,
                sub,
                channels=[channel],
                ttl=3600,
                audience=audience,
                issuer=os.environ.get("PUSHSVC_JWT_ISSUER"),
                headers=_typ_header(os.environ.get("PUSHSVC_JWT_TYPE")),
            )

        renewable = True
    else:
        raise SettingsError("--token", "missing: give --token T (or PUSHSVC_TOKEN), or --sub NAME")
    try:
        subscriber = Subscriber(
            args.url,
            channel,
            make_token,
            since=args.since,
            epoch=args.epoch,
            raw=args.raw,
            renewable=renewable,
        )
        asyncio.run(subscriber.run())
    except SubscribeError as exc:
        print(f"pushsvc: subscribe: {exc}", file=sys.stderr)
        return 1
    return 0
