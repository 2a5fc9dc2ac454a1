"""Connecting to a secured NATS: mutual TLS, user/password, token, NKey, operator-mode creds.

Each case starts a real ``nats-server`` (the bundled binary) with a generated
configuration file, then runs ``pushsvc serve`` as a subprocess with the
``PUSHSVC_NATS_*`` settings, and publishes through ``pushsvc publish`` (flags),
:class:`pushsvc.Publisher` (keyword arguments) and ``pushsvc bench`` (flags):
every message reaches a WebSocket client. With a wrong secret each entry point
stops at once with one line naming the cause, and no secret is ever printed.

The TLS material (a CA, a server and a client certificate) is generated with
``cryptography``; NKeys with ``nkeys``; the operator, account and user JWTs of
operator mode with ``nats-jwt`` (NATS docs: "JWT authentication",
"Memory resolver").
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import nkeys
import pytest
from conftest import SECRET
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats_jwt.nkeys_ext import create_account_pair, create_operator_pair
from nats_jwt.v2.account_claims import AccountClaims
from nats_jwt.v2.operator_claims import OperatorClaims
from nats_jwt.v2.snippets import Account
from wsclient import WSClient

from pushsvc import NatsRefused, NatsSecurity, Publisher
from pushsvc.auth.tokens import mint_token
from pushsvc.config.settings import Settings, SettingsError
from pushsvc.server.embedded import EmbeddedNats, free_port

PUSHSVC = [sys.executable, "-m", "pushsvc"]
KINDS = ["tls", "user", "token", "nkey", "creds"]
# A refused connection must stop `serve` at once, not after PUSHSVC_CONNECT_TIMEOUT.
CONNECT_TIMEOUT = 30


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        PUSHSVC + args, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )


# --------------------------------------------------------------------------- TLS material


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cn: str,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, "pushsvc test CA", ca_key, "pushsvc test CA", ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        server_key,
        "nats",
        ca_key,
        "pushsvc test CA",
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(
        client_key, "pushsvc", ca_key, "pushsvc test CA", usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server": server.public_bytes(serialization.Encoding.PEM),
        "client": client.public_bytes(serialization.Encoding.PEM),
    }
    for name, key in (("server_key", server_key), ("client_key", client_key)):
        files[name] = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


# --------------------------------------------------------------------------- secured NATS


@dataclass
class Secured:
    """A running nats-server and how to connect to it, rightly and wrongly.

    ``env`` are the PUSHSVC_NATS_* settings of a good connection, ``flags`` and
    ``kwargs`` the same for ``pushsvc publish/bench`` and ``Publisher``; ``bad_*``
    a wrong secret; ``cause`` the words the refusal line must contain;
    ``secrets`` what must never be printed.
    """

    server: EmbeddedNats
    url: str
    env: dict[str, str]
    bad_env: dict[str, str]
    cause: str
    secrets: list[str]
    jetstream: bool = True
    flags: list[str] = field(default_factory=list)
    bad_flags: list[str] = field(default_factory=list)
    kwargs: dict[str, str] = field(default_factory=dict)
    bad_kwargs: dict[str, str] = field(default_factory=dict)


def _flags(env: dict[str, str]) -> list[str]:
    out = []
    for key, value in env.items():
        out += ["--" + key.removeprefix("PUSHSVC_").lower().replace("_", "-"), value]
    return out


def _kwargs(env: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("PUSHSVC_NATS_").lower(): v for k, v in env.items()}


def _start(folder: Path, conf: str, jetstream: bool) -> EmbeddedNats:
    path = folder / "nats.conf"
    path.write_text(conf)
    server = EmbeddedNats(port=free_port(), jetstream=jetstream, extra_args=["-c", str(path)])
    return server.start()


def _creds(user_jwt: str, seed: str) -> str:
    # The layout nsc writes and nats-py reads (NATS docs: "Creds files").
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )


def _user_of(account: Account, name: str) -> tuple[str, str]:
    user = account.create_user(name)
    return user.jwt, user.key_pair.seed.decode()


def secured_nats(kind: str, folder: Path, pki: dict[str, Path]) -> Secured:
    """Start nats-server secured the ``kind`` way (one of :data:`KINDS`)."""
    if kind == "tls":
        conf = (
            "tls {\n"
            f'  cert_file: "{pki["server"]}"\n  key_file: "{pki["server_key"]}"\n'
            f'  ca_file: "{pki["ca"]}"\n  verify: true\n'
            "}\n"
        )
        server = _start(folder, conf, jetstream=True)
        good = {
            "PUSHSVC_NATS_TLS_CA": str(pki["ca"]),
            "PUSHSVC_NATS_TLS_CERT": str(pki["client"]),
            "PUSHSVC_NATS_TLS_KEY": str(pki["client_key"]),
        }
        bad = {k: v for k, v in good.items() if k != "PUSHSVC_NATS_TLS_CA"}
        key_text = pki["client_key"].read_text().splitlines()[1]
        return Secured(
            server,
            f"tls://127.0.0.1:{server.port}",
            good,
            bad,
            "TLS certificate verification failed",
            [key_text],
        )
    if kind == "user":
        password, wrong = "pw-" + secrets.token_hex(12), "pw-" + secrets.token_hex(12)
        server = _start(
            folder, f'authorization {{ user: svc, password: "{password}" }}\n', jetstream=True
        )
        good = {"PUSHSVC_NATS_USER": "svc", "PUSHSVC_NATS_PASSWORD": password}
        bad = {**good, "PUSHSVC_NATS_PASSWORD": wrong}
        cause, secret_list = "authorization violation", [password, wrong]
    elif kind == "token":
        token, wrong = "tk-" + secrets.token_hex(12), "tk-" + secrets.token_hex(12)
        server = _start(folder, f'authorization {{ token: "{token}" }}\n', jetstream=True)
        good, bad = {"PUSHSVC_NATS_TOKEN": token}, {"PUSHSVC_NATS_TOKEN": wrong}
        cause, secret_list = "authorization violation", [token, wrong]
    elif kind == "nkey":
        user = nkeys.from_seed(bytearray(_new_user_seed()))
        stranger_seed = _new_user_seed().decode()
        server = _start(
            folder,
            f"authorization {{ users: [ {{ nkey: {user.public_key.decode()} }} ] }}\n",
            jetstream=True,
        )
        (folder / "user.nk").write_text(user.seed.decode() + "\n")
        (folder / "stranger.nk").write_text(stranger_seed + "\n")
        good = {"PUSHSVC_NATS_NKEY": str(folder / "user.nk")}
        bad = {"PUSHSVC_NATS_NKEY": str(folder / "stranger.nk")}
        cause, secret_list = "authorization violation", [user.seed.decode(), stranger_seed]
    elif kind == "creds":
        operator = create_operator_pair()
        operator_jwt = OperatorClaims(operator.public_key.decode(), "pushsvc-test").encode(operator)
        account_kp = create_account_pair()
        account = Account(
            claims=AccountClaims(account_kp.public_key.decode(), "APP"),
            seed=account_kp.seed,
            signer_kp=operator,
        )
        # A user of an account the server does not know: a well-formed but wrong creds file.
        stranger_kp = create_account_pair()
        stranger = Account(
            claims=AccountClaims(stranger_kp.public_key.decode(), "STRANGER"),
            seed=stranger_kp.seed,
            signer_kp=operator,
        )
        conf = (
            f"operator: {operator_jwt}\nresolver: MEMORY\n"
            f"resolver_preload: {{\n  {account_kp.public_key.decode()}: {account.jwt}\n}}\n"
        )
        # JetStream is not enabled for the account: live delivery, history off.
        server = _start(folder, conf, jetstream=False)
        user_jwt, seed = _user_of(account, "svc")
        bad_jwt, bad_seed = _user_of(stranger, "svc")
        (folder / "svc.creds").write_text(_creds(user_jwt, seed))
        (folder / "bad.creds").write_text(_creds(bad_jwt, bad_seed))
        good = {"PUSHSVC_NATS_CREDS": str(folder / "svc.creds")}
        bad = {"PUSHSVC_NATS_CREDS": str(folder / "bad.creds")}
        return Secured(
            server,
            server.url,
            good,
            bad,
            "authorization violation",
            [seed, bad_seed],
            jetstream=False,
        )
    else:  # pragma: no cover
        raise ValueError(kind)
    return Secured(server, server.url, good, bad, cause, secret_list)


def _new_user_seed() -> bytes:
    from nats_jwt.nkeys_ext import create_user_pair

    return bytes(create_user_pair().seed)


@pytest.fixture
def secured(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Callable[[str], Secured]]:
    started: list[Secured] = []

    def start(kind: str) -> Secured:
        s = secured_nats(kind, tmp_path, pki)
        s.flags, s.bad_flags = _flags(s.env), _flags(s.bad_env)
        s.kwargs, s.bad_kwargs = _kwargs(s.env), _kwargs(s.bad_env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.server.cleanup()


# --------------------------------------------------------------------------- pushsvc serve


def serve_env(s: Secured, security: dict[str, str]) -> dict[str, str]:
    return {
        "PUSHSVC_JWT_SECRET": SECRET,
        "PUSHSVC_NATS_URL": s.url,
        "PUSHSVC_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
        "PUSHSVC_HISTORY_TTL": "300" if s.jetstream else "0",
        **security,
    }


async def start_serve(s: Secured, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``pushsvc serve`` with the good settings; returns once /readyz answers 200."""
    port = free_port()
    out = log.open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test
        [*PUSHSVC, "serve", "--port", str(port)],
        env=clean_env(**serve_env(s, s.env)),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            if proc.poll() is not None:
                break
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return proc, port
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    proc.wait()
    text = await asyncio.to_thread(log.read_text)
    raise AssertionError(f"serve did not become ready:\n{text}")


def assert_no_secret(text: str, s: Secured) -> None:
    for secret in s.secrets:
        assert secret not in text, "a secret was printed"


@pytest.mark.parametrize("kind", KINDS)
async def test_secured_nats_delivers_through_every_entry_point(kind, secured, tmp_path):
    s = secured(kind)
    log = tmp_path / "serve.log"
    proc, port = await start_serve(s, log)
    try:
        token = mint_token(SECRET, "alice", channels=[">"], ttl=600)
        client = await WSClient.connect(f"ws://127.0.0.1:{port}/ws", token)
        channel = f"sec{kind}.room"
        await client.subscribe(channel)

        # pushsvc publish, with the matching flags
        core = [] if s.jetstream else ["--core"]
        p = await asyncio.to_thread(
            run,
            ["publish", channel, '{"via": "cli"}', "--nats-url", s.url, *core, *s.flags],
            {},
        )
        assert p.returncode == 0, p.stderr
        (m,) = await client.messages(1)
        assert m["data"] == {"via": "cli"}
        if s.jetstream:
            assert isinstance(m["seq"], int) and json.loads(p.stdout)["seq"] == m["seq"]

        # Publisher(...) keyword arguments, and the same as one NatsSecurity
        async with Publisher(s.url, jetstream=s.jetstream, **s.kwargs) as pub:
            await pub.publish(channel, {"via": "publisher"})
        (m,) = await client.messages(1)
        assert m["data"] == {"via": "publisher"}
        security = NatsSecurity(**s.kwargs)
        async with Publisher(s.url, jetstream=s.jetstream, security=security) as pub:
            await pub.publish(channel, {"via": "security"})
        (m,) = await client.messages(1)
        assert m["data"] == {"via": "security"}

        # pushsvc bench --via nats, with the matching flags
        bench = [
            "bench",
            *("--url", f"http://127.0.0.1:{port}", "--nats-url", s.url, "--secret", SECRET),
            *("--json", "--procs", "1", "--clients", "2", "--messages", "5"),
            *("--timeout", "5", "--duration-limit", "30"),
        ]
        b = await asyncio.to_thread(run, [*bench, *s.flags], {})
        report = json.loads(b.stdout)
        assert b.returncode == 0 and report["lost"] == 0, (b.stdout, b.stderr)
        bad = await asyncio.to_thread(run, [*bench, *s.bad_flags], {})
        assert bad.returncode == 1
        assert s.cause in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert_no_secret(bad.stdout + bad.stderr, s)

        await client.nothing(0.2)  # the bench's own channels are not ours
        proc.send_signal(signal.SIGTERM)
        assert await client.closed(10) == 1012
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = await asyncio.to_thread(log.read_text)
    assert "Traceback" not in output
    assert_no_secret(output, s)


@pytest.mark.parametrize("kind", KINDS)
async def test_wrong_secret_stops_every_entry_point_with_the_cause(kind, secured):
    s = secured(kind)
    started = time.monotonic()
    r = await asyncio.to_thread(run, ["serve", "--port", str(free_port())], serve_env(s, s.bad_env))
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert s.cause in last and s.url in last, r.stderr
    assert "Traceback" not in r.stderr and "TimeoutError" not in r.stderr
    assert elapsed < CONNECT_TIMEOUT / 2, "serve waited for the connect timeout"
    assert_no_secret(r.stdout + r.stderr, s)

    core = [] if s.jetstream else ["--core"]
    p = await asyncio.to_thread(
        run, ["publish", "news", "1", "--nats-url", s.url, *core, *s.bad_flags], {}
    )
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert s.cause in p.stderr and s.url in p.stderr
    assert_no_secret(p.stdout + p.stderr, s)

    with pytest.raises(NatsRefused) as refused:
        async with Publisher(s.url, timeout=CONNECT_TIMEOUT, **s.bad_kwargs):
            pass
    assert s.cause in str(refused.value)
    assert_no_secret(str(refused.value), s)
    with pytest.raises(NatsRefused) as refused:
        bad = NatsSecurity(**s.bad_kwargs)
        async with Publisher(s.url, timeout=CONNECT_TIMEOUT, security=bad):
            pass
    assert s.cause in str(refused.value)


def test_publisher_takes_security_or_keyword_arguments_not_both():
    with pytest.raises(TypeError, match="not both"):
        Publisher(security=NatsSecurity(token="t1"), token="t2")
    with pytest.raises(SettingsError, match="PUSHSVC_NATS_PASSWORD"):  # checked as the kwargs
        Publisher(security=NatsSecurity(user="u"))


async def test_mutual_tls_without_a_client_certificate_is_refused(secured):
    s = secured("tls")
    with pytest.raises(NatsRefused, match="client certificate"):
        async with Publisher(s.url, tls_ca=s.env["PUSHSVC_NATS_TLS_CA"], timeout=10):
            pass


# --------------------------------------------------------------------------- validation


def test_settings_refuse_broken_security(tmp_path, pki):
    base = {"PUSHSVC_JWT_SECRET": "s", "PUSHSVC_NATS_URL": "tls://127.0.0.1:4222"}
    seed = tmp_path / "user.nk"
    seed.write_text(_new_user_seed().decode())
    cases = [
        ({"PUSHSVC_NATS_CREDS": str(tmp_path / "missing.creds")}, "PUSHSVC_NATS_CREDS", "read"),
        ({"PUSHSVC_NATS_CREDS": str(pki["ca"])}, "PUSHSVC_NATS_CREDS", ".creds"),
        ({"PUSHSVC_NATS_NKEY": str(pki["ca"])}, "PUSHSVC_NATS_NKEY", "seed"),
        ({"PUSHSVC_NATS_USER": "svc"}, "PUSHSVC_NATS_USER", "PUSHSVC_NATS_PASSWORD"),
        ({"PUSHSVC_NATS_PASSWORD": "x"}, "PUSHSVC_NATS_PASSWORD", "PUSHSVC_NATS_USER"),
        ({"PUSHSVC_NATS_TLS_CERT": str(pki["client"])}, "PUSHSVC_NATS_TLS_CERT", "TLS_KEY"),
        ({"PUSHSVC_NATS_TLS_KEY": str(pki["client_key"])}, "PUSHSVC_NATS_TLS_KEY", "TLS_CERT"),
        (
            {"PUSHSVC_NATS_TLS_CERT": str(pki["client"]), "PUSHSVC_NATS_TLS_KEY": str(pki["ca"])},
            "PUSHSVC_NATS_TLS_CERT",
            "TLS files",
        ),
        ({"PUSHSVC_NATS_TLS_CA": str(seed)}, "PUSHSVC_NATS_TLS_CA", "PEM CA"),
        (
            {"PUSHSVC_NATS_NKEY": str(seed), "PUSHSVC_NATS_TOKEN": "t0ken-t0ken"},
            "PUSHSVC_NATS_NKEY",
            "PUSHSVC_NATS_TOKEN",
        ),
        (
            {"PUSHSVC_NATS_URL": "nats://svc:pw@127.0.0.1:4222", "PUSHSVC_NATS_TOKEN": "t0ken"},
            "PUSHSVC_NATS_TOKEN",
            "PUSHSVC_NATS_URL",
        ),
    ]
    for env, setting, words in cases:
        with pytest.raises(SettingsError) as exc:
            Settings.load(env={**base, **env})
        assert exc.value.setting == setting, (env, exc.value)
        assert words in str(exc.value), (env, exc.value)
        assert "t0ken" not in str(exc.value)
    # Credentials inside the URL alone keep working; the password is never echoed.
    ok = Settings.load(env={**base, "PUSHSVC_NATS_URL": "nats://svc:pw-secret@127.0.0.1:4222"})
    assert ok.nats_servers == ["nats://svc:pw-secret@127.0.0.1:4222"]
    with pytest.raises(SettingsError) as exc:
        Settings.load(env={**base, "PUSHSVC_NATS_URL": "nats://svc:pw-secret@127.0.0.1:port"})
    assert "pw-secret" not in str(exc.value)


def test_serve_names_the_setting_of_an_unreadable_file(tmp_path):
    r = run(
        ["serve"],
        {
            "PUSHSVC_JWT_SECRET": "s",
            "PUSHSVC_NATS_URL": "nats://127.0.0.1:4222",
            "PUSHSVC_NATS_CREDS": str(tmp_path / "nope.creds"),
        },
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"pushsvc: configuration error: PUSHSVC_NATS_CREDS: cannot read "
        f"{tmp_path / 'nope.creds'}: No such file or directory"
    ]


async def test_url_credentials_keep_working(secured, tmp_path):
    s = secured("user")
    password = s.env["PUSHSVC_NATS_PASSWORD"]
    in_url = replace(s, url=f"nats://svc:{password}@127.0.0.1:{s.server.port}", env={})
    log = tmp_path / "serve.log"
    proc, port = await start_serve(in_url, log)
    try:
        token = mint_token(SECRET, "alice", channels=[">"], ttl=600)
        client = await WSClient.connect(f"ws://127.0.0.1:{port}/ws", token)
        await client.subscribe("sec.url")
        async with Publisher(in_url.url) as pub:
            seq = await pub.publish("sec.url", {"ok": 1})
        (m,) = await client.messages(1)
        assert m["data"] == {"ok": 1} and m["seq"] == seq
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = await asyncio.to_thread(log.read_text)
    assert f"nats://svc:***@127.0.0.1:{s.server.port}" in output  # the start-up banner
    assert_no_secret(output, s)
    bad = f"nats://svc:{s.bad_env['PUSHSVC_NATS_PASSWORD']}@127.0.0.1:{s.server.port}"
    with pytest.raises(NatsRefused) as refused:
        await Publisher(bad).connect()
    assert "authorization violation" in str(refused.value)
    assert_no_secret(str(refused.value), s)


async def test_a_credentials_file_that_vanishes_is_named(secured, tmp_path):
    s = secured("nkey")
    seed = tmp_path / "moved.nk"
    await asyncio.to_thread(shutil.copy, s.env["PUSHSVC_NATS_NKEY"], seed)
    pub = Publisher(s.url, nkey=str(seed), jetstream=False)  # checked here: readable
    await asyncio.to_thread(seed.unlink)
    with pytest.raises(NatsRefused, match=f"file unreadable: {seed}"):
        await pub.connect()


async def _until(predicate: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_a_refusal_after_start_is_logged_and_retried(
    secured, start_server, http, caplog, tmp_path
):
    s = secured("user")
    password = s.env["PUSHSVC_NATS_PASSWORD"]
    srv = await start_server(nats_url=s.url, nats_user="svc", nats_password=password)
    ready = f"{srv.base}/readyz"
    assert (await http.get(ready)).status_code == 200

    async def restart(conf: str) -> None:
        await asyncio.to_thread(s.server.stop)
        await asyncio.to_thread((tmp_path / "nats.conf").write_text, conf)
        await asyncio.to_thread(s.server.start)

    # NATS comes back with another password: the node says why and keeps trying.
    wrong = s.bad_env["PUSHSVC_NATS_PASSWORD"]
    await restart(f'authorization {{ user: svc, password: "{wrong}" }}\n')

    async def refusal_logged() -> bool:
        return "Authorization Violation" in caplog.text

    await _until(refusal_logged)
    assert (await http.get(ready)).status_code == 503
    # The right password again: the node reconnects by itself.
    await restart(f'authorization {{ user: svc, password: "{password}" }}\n')

    async def is_ready() -> bool:
        return (await http.get(ready)).status_code == 200

    await _until(is_ready)
    assert_no_secret(caplog.text, s)
