"""The docs and the code name the same things.

- Every ``PUSHSVC_*`` name in README.md and docs/ is a field of
  :class:`pushsvc.Settings`, a client-side variable the code really reads, or a
  default value of a setting; and every field of ``Settings`` is in the generated
  settings reference (docs/_hooks/reference.py renders it at build time).
- The browser client's page lists every public method and option of
  ``pushsvc/static/pushsvc.js``.
- docs/protocol.md lists every close code and error code of ``pushsvc.protocol``.

``mkdocs build --strict`` (README's test command) checks links, anchors and the
generated pages themselves.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import msgspec
import pytest

from pushsvc import Settings, protocol

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NAME = re.compile(r"\bPUSHSVC_[A-Z0-9_]*[A-Z0-9_]")


@pytest.fixture(scope="module")
def reference():
    """The docs' build hook (docs/_hooks/reference.py) as a module."""
    path = DOCS / "_hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("pushsvc_docs_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def setting_names() -> set[str]:
    return {"PUSHSVC_" + f.name.upper() for f in msgspec.structs.fields(Settings)}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def setting_defaults() -> set[str]:
    """String defaults shaped like names, e.g. the KV bucket ``PUSHSVC_PRESENCE``."""
    return {
        f.default
        for f in msgspec.structs.fields(Settings)
        if isinstance(f.default, str) and NAME.fullmatch(f.default)
    }


def resource_names() -> set[str]:
    """Names of NATS resources the code creates, e.g. the KV bucket ``PUSHSVC_TICKETS``:
    exact string literals in pushsvc/ outside the settings module (whose error
    messages name every setting)."""
    import inspect

    settings_file = Path(inspect.getfile(Settings)).resolve()
    return {
        name
        for path in (ROOT / "pushsvc").rglob("*.py")
        if path.resolve() != settings_file
        for name in re.findall(r"[\"'](PUSHSVC_[A-Z0-9_]+)[\"']", path.read_text())
    }


def test_docs_name_only_real_variables(reference):
    known = setting_names() | set(reference.CLIENT_VARIABLES) | setting_defaults()
    known |= resource_names()
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in doc_files()}
    texts["reference/cli.md (generated)"] = reference.render_cli()
    unknown = set()
    for where, text in texts.items():
        for name in NAME.findall(text):
            if name.endswith("_"):  # a family, e.g. PUSHSVC_NATS_*
                if not any(k.startswith(name) for k in known):
                    unknown.add((where, name + "*"))
            elif name not in known:
                unknown.add((where, name))
    assert not unknown, f"PUSHSVC_* names in the docs that pushsvc does not have: {sorted(unknown)}"


def test_settings_reference_lists_every_setting(reference):
    rendered = reference.render_settings()
    listed = set(re.findall(r"^\| `(PUSHSVC_[A-Z0-9_]+)` \|", rendered, flags=re.M))
    assert listed == setting_names()
    for doc in reference.settings_docs():
        assert doc.meaning and doc.type and doc.default, doc


def test_settings_reference_units_and_defaults(reference):
    docs = {d.variable: d for d in reference.settings_docs()}
    assert docs["PUSHSVC_PING_INTERVAL"].unit == "seconds"
    assert docs["PUSHSVC_PING_INTERVAL"].default == "`25`"
    assert "number (seconds)<br>default `25`" in reference.render_settings()
    assert docs["PUSHSVC_SEND_QUEUE_BYTES"].unit == "bytes"
    assert docs["PUSHSVC_PRESENCE_CHANNELS"].type.startswith("list of strings")
    assert docs["PUSHSVC_NATS_URL"].default.startswith("unset")


def test_client_variables_are_read_by_the_code(reference):
    files = [p for folder in ("pushsvc", "tests") for p in (ROOT / folder).rglob("*.py")]
    for ext in ("ts", "mjs", "js"):  # the JS package's sources and tests
        files += [
            p
            for p in (ROOT / "clients").rglob(f"*.{ext}")
            if "node_modules" not in p.parts and "dist" not in p.parts
        ]
    sources = "\n".join(p.read_text() for p in files)
    for name in reference.CLIENT_VARIABLES:
        assert name not in setting_names(), f"{name} is a setting: drop it from CLIENT_VARIABLES"
        assert re.search(rf"[\"'.]{name}\b", sources), f"nothing reads {name}: drop it"


def test_cli_reference_lists_every_command_and_flag(reference):
    from pushsvc.cli import build_parser

    rendered = reference.render_cli()
    sub = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    for name, command in sub.choices.items():
        assert f"## `pushsvc {name}`" in rendered
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in rendered, (name, flag)


def test_http_reference_lists_every_route(reference):
    rendered = reference.render_http_api()
    for path in reference.openapi_document(dev=True)["paths"]:
        assert f" {path}` |" in rendered, path


def js_client_api() -> tuple[set[str], list[str]]:
    """(public methods and properties of PushsvcClient, its constructor's options), from
    the TypeScript package when the repository has it (clients/js/src), else from the
    classic script pushsvc/static/pushsvc.js."""
    ts = ROOT / "clients" / "js" / "src"
    if (ts / "client.ts").is_file():
        source = (ts / "client.ts").read_text().split("export class PushsvcClient", 1)[1]
        members = r"^  (?:static |get |async )*([a-zA-Z]\w*)(?:<[^>]*>)?\("
        types = (ts / "types.ts").read_text().split("interface PushsvcOptions {", 1)[1]
        options = re.findall(r"^  (\w+)\?:", types.split("\n}", 1)[0], flags=re.M)
    else:
        script = (ROOT / "pushsvc" / "static" / "pushsvc.js").read_text()
        source = script.split("class PushsvcClient {", 1)[1]
        members = r"^    (?:static |get )?([a-zA-Z]\w*)\("
        options = re.findall(r"@property \{[^}]*\} \[(\w+)", script.split("@typedef", 1)[1])
    return set(re.findall(members, source, flags=re.M)) - {"constructor"}, options


def test_js_page_lists_the_client_api(reference):
    page = reference._expand_includes((DOCS / "clients" / "javascript.md").read_text(), ROOT)
    methods, options = js_client_api()
    assert {"connect", "subscribe", "publish", "presence"} <= methods
    assert "getToken" in options
    missing = [m for m in methods if f"`{m}" not in page and f"PushsvcClient.{m}(" not in page]
    missing += [f"option {o}" for o in options if f"| `{o}` |" not in page]
    assert not missing, f"docs/clients/javascript.md does not document: {missing}"


def test_protocol_lists_every_code():
    text = (DOCS / "protocol.md").read_text()
    close = text.split("[start:close-codes]", 1)[1].split("[end:close-codes]", 1)[0]
    errors = text.split("[start:error-codes]", 1)[1].split("[end:error-codes]", 1)[0]
    for name in dir(protocol):
        value = getattr(protocol, name)
        if name.startswith("CLOSE_"):
            assert f"| {value} |" in close, name
    codes = [v for k, v in vars(protocol).items() if isinstance(v, str) and k == v.upper()]
    assert protocol.BAD_REQUEST in codes and protocol.UNAVAILABLE in codes
    for code in codes:
        assert f"| `{code}` |" in errors, code


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Run the tests\n", 1)[1].split("\n## ", 1)[0]
    install, command = section.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in command
    assert command in ci.strip().splitlines()[-1:], "the last line of .ci/run is the README's"
    extras = re.search(r'"\.\[([a-z,]+)\]"', install)
    assert extras and f'".[{extras.group(1)}]"' in ci


def test_readme_links_point_at_files():
    """README is not part of the site, so mkdocs does not check its links: this does."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if link.startswith(("http://", "https://", "#")):
            continue
        assert (ROOT / link.split("#", 1)[0]).is_file(), link


def test_readme_stays_short():
    """Issue 20: README.md is at most 150 lines; the rest belongs in the site."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
