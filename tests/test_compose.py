"""compose.yaml refers only to things that exist, and its NATS cluster config works.

No Docker engine exists here, so the file cannot be run: it is parsed and every
route, URL, port, ``PUSHSVC_*`` setting, mounted file and service name in it (and
in the files it mounts) is checked against the code and the repository. The NATS
config it mounts is validated by the bundled nats-server (``-t``) and booted as a
3-member JetStream cluster on loopback with pushsvc on top (stream replicas 3).
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats
import pytest
import yaml

from pushsvc import Settings, create_app
from pushsvc.cli import main
from pushsvc.server.embedded import EmbeddedNats, find_binary, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
NATS_SERVICES = ["nats-1", "nats-2", "nats-3"]
PUSHSVC_SERVICES = ["pushsvc-1", "pushsvc-2"]
SETTING = re.compile(r"\bPUSHSVC_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def conf_value(key: str) -> str:
    """A top-level or block ``key: value`` of deploy/nats/nats.conf (first match)."""
    match = re.search(rf"^\s*{key}:\s*(\S+)", NATS_CONF.read_text(), re.MULTILINE)
    assert match, f"{key} missing from {NATS_CONF}"
    return match.group(1)


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def app_paths() -> set[str]:
    """The HTTP paths pushsvc serves, from its own OpenAPI document."""
    settings = Settings.load(env={}, jwt_secret="x", nats_url="nats://nats-1:4222")
    return set(create_app(settings).openapi()["paths"])


def documented_settings() -> set[str]:
    fields = {"PUSHSVC_" + f.name.upper() for f in msgspec.structs.fields(Settings)}
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return fields | {name for path in docs for name in SETTING.findall(path.read_text())}


def container_port(mapping: str) -> int:
    """``"8001:8000"`` -> 8000."""
    return int(str(mapping).split(":")[-1].split("/")[0])


def serve_flags() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["serve", "--help"])
    return out.getvalue()


def test_services_and_their_references(compose):
    services = compose["services"]
    assert set(services) == {*NATS_SERVICES, *PUSHSVC_SERVICES, "prometheus"}
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in named_volumes, (name, source)
        build = service.get("build")
        if build:
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file()
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (ROOT / build["context"] / source).exists(), source


def test_every_setting_name_exists():
    known = documented_settings()
    texts = [COMPOSE, *sorted((ROOT / "deploy").rglob("*"))]
    used = {n for p in texts if p.is_file() for n in SETTING.findall(p.read_text())}
    assert "PUSHSVC_STREAM_REPLICAS" in used and "PUSHSVC_NATS_CREDS" in used
    assert not used - known, f"not a setting nor documented: {sorted(used - known)}"


def test_pushsvc_replicas_reach_every_nats_member_and_are_scraped(compose):
    services = compose["services"]
    client_port = port_of(conf_value("listen"))
    routes = app_paths()
    flags = serve_flags()
    for name in PUSHSVC_SERVICES:
        service = services[name]
        env = service["environment"]
        urls = env["PUSHSVC_NATS_URL"].split(",")
        assert sorted(urlsplit(u).hostname for u in urls) == NATS_SERVICES
        assert {urlsplit(u).port for u in urls} == {client_port}
        assert env["PUSHSVC_STREAM_REPLICAS"] == str(len(NATS_SERVICES))
        # the values are valid settings (the secret comes from the shell)
        fields = {"PUSHSVC_" + f.name.upper() for f in msgspec.structs.fields(Settings)}
        values = {k: str(v) for k, v in env.items() if k in fields}
        Settings.load(env={**values, "PUSHSVC_JWT_SECRET": "from-the-shell"})
        command = service["command"]
        assert command[0] == "serve"
        for flag in command[1:]:
            if flag.startswith("--"):
                assert flag in flags, flag
        port = int(command[command.index("--port") + 1])
        assert [container_port(p) for p in service["ports"]] == [port]
        probe = re.search(r"https?://[^'\"]+", " ".join(service["healthcheck"]["test"]))
        assert probe, service["healthcheck"]
        url = urlsplit(probe.group(0))
        assert url.port == port and url.path in routes, url
    nodes = [services[n]["environment"].get("PUSHSVC_NODE_NAME") for n in PUSHSVC_SERVICES]
    assert nodes == PUSHSVC_SERVICES  # operators tell the replicas apart
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    mounted = [v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v]
    assert mounted == ["./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] in routes
    targets = [t for config in job["static_configs"] for t in config["targets"]]
    assert sorted(t.split(":")[0] for t in targets) == PUSHSVC_SERVICES
    for target in targets:
        host, port = target.split(":")
        assert int(port) == int(services[host]["command"][-1])


def test_nats_members_share_the_checked_config(compose):
    services = compose["services"]
    names = set()
    store = conf_value("store_dir")
    for name in NATS_SERVICES:
        service = services[name]
        config_path = service["command"][service["command"].index("-c") + 1]
        assert f"./deploy/nats/nats.conf:{config_path}:ro" in service["volumes"]
        assert any(v.endswith(f":{store}") for v in service["volumes"]), "store not on a volume"
        names.add(service["environment"]["NATS_SERVER_NAME"])
        for mapping in service.get("ports", []):
            assert container_port(mapping) in {
                port_of(conf_value("listen")),
                port_of(conf_value("http")),
            }
    assert names == set(NATS_SERVICES)
    routes = re.findall(r"nats-route://([\w-]+):(\d+)", NATS_CONF.read_text())
    assert sorted(host for host, _ in routes) == NATS_SERVICES
    cluster_port = port_of(re.search(r"cluster\s*{[^}]*listen:\s*(\S+)", NATS_CONF.read_text())[1])
    assert {int(port) for _, port in routes} == {cluster_port}
    for name in NATS_SERVICES:  # nats-server itself validates the file
        check = subprocess.run(
            [find_binary(), "-t", "-c", str(NATS_CONF)],
            env={"NATS_SERVER_NAME": name},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr + check.stdout


def wait_jetstream(monitor_ports: list[int], timeout: float = 30.0) -> None:
    """Wait until every member's ``/healthz`` says JetStream is current (NATS monitoring)."""
    deadline = time.monotonic() + timeout
    pending = list(monitor_ports)
    while pending and time.monotonic() < deadline:
        port = pending[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.2)
    assert not pending, f"JetStream not healthy on monitor ports {pending}"


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """deploy/nats/nats.conf booted 3 times on loopback: ports, routes and store rewired."""
    cluster_ports = [free_port() for _ in NATS_SERVICES]
    monitor_ports = [free_port() for _ in NATS_SERVICES]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
    text = NATS_CONF.read_text()
    assert "store_dir: /data" in text
    members = []
    try:
        for i, name in enumerate(NATS_SERVICES):
            conf = tmp_path / f"{name}.conf"  # only the store folder differs from the file
            conf.write_text(text.replace("store_dir: /data", f"store_dir: {tmp_path / name}"))
            monkeypatch.setenv("NATS_SERVER_NAME", name)
            member = EmbeddedNats(
                port=free_port(),
                jetstream=False,  # the config turns it on
                extra_args=[
                    *("-c", str(conf), "-m", str(monitor_ports[i])),
                    *("--cluster", f"nats://127.0.0.1:{cluster_ports[i]}", "--routes", routes),
                ],
            )
            members.append(member.start())
        wait_jetstream(monitor_ports)
        yield members
    finally:
        for member in members:
            member.cleanup()


async def test_the_compose_cluster_serves_pushsvc_with_three_replicas(
    cluster, start_server, http, channel
):
    urls = ",".join(m.url for m in cluster)
    env = yaml.safe_load(COMPOSE.read_text())["services"]["pushsvc-1"]["environment"]
    replicas = int(env["PUSHSVC_STREAM_REPLICAS"])
    srv = await start_server(
        nats_url=urls, stream_replicas=replicas, stream="COMPOSE", connect_timeout=10
    )
    client = await srv.client()
    await client.subscribe(channel)
    token = srv.token("svc", publish=[channel])
    r = await http.post(
        f"{srv.base}/emit/{channel}",
        content=b'{"n":1}',
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 202, r.text
    (message,) = await client.messages(1)
    assert message["data"] == {"n": 1} and message["seq"] == r.json()["seq"]
    nc = await nats.connect(servers=urls.split(","))
    try:
        info = await nc.jetstream().stream_info("COMPOSE")
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        await nc.close()
