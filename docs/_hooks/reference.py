"""MkDocs hook: the references that are generated from the code at build time.

A page asks for a generated part with a marker comment on a line of its own:

- ``<!-- pushsvc:settings -->``: every field of :class:`pushsvc.Settings` as
  ``PUSHSVC_*`` variables, grouped as in the source, with type, default, unit and
  meaning. The meaning is the field's own documentation in the code (an
  attribute docstring, else its trailing comment); ``settings_notes.yml`` beside
  this file says more where the code is terse, and gives the default in words
  where the value alone would mislead (``None`` for the bundled nats-server).
- ``<!-- pushsvc:client-variables -->``: the variables the client commands read
  that are not settings of the server (:data:`CLIENT_VARIABLES`).
- ``<!-- pushsvc:http-api -->``: every HTTP route with its summary and answers,
  from the OpenAPI document the app serves at ``GET /openapi.json`` (also
  written into the site as ``reference/openapi.json``).
- ``<!-- pushsvc:cli -->``: every sub-command of ``pushsvc`` from the argparse
  parser (:func:`pushsvc.cli.build_parser`): usage, arguments, help texts.

Only ``from pushsvc import Settings`` and ``pushsvc.cli.build_parser`` are
imported, so the hook keeps working while modules move. A field with no meaning
anywhere, or a note for a field that does not exist, is a build warning, which
``mkdocs build --strict`` turns into a failure. ``tests/test_docs.py`` imports
this module to check that the ``PUSHSVC_*`` names in the docs and in ``Settings``
are the same set.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import logging
import os
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("mkdocs.plugins.pushsvc")

NOTES = Path(__file__).with_name("settings_notes.yml")
MARKERS = {
    "settings": re.compile(r"^<!-- pushsvc:settings -->$", re.M),
    "client-variables": re.compile(r"^<!-- pushsvc:client-variables -->$", re.M),
    "cli": re.compile(r"^<!-- pushsvc:cli -->$", re.M),
    "http-api": re.compile(r"^<!-- pushsvc:http-api -->$", re.M),
}
#: where the site serves the OpenAPI document it was built with
OPENAPI_URI = "reference/openapi.json"

#: Variables read by the client commands (``subscribe``, ``publish``, ``bench``,
#: ``token``) and by the test suite, which are not settings of the server.
#: name -> (who reads it, meaning)
CLIENT_VARIABLES: dict[str, tuple[str, str]] = {
    "PUSHSVC_URL": (
        "`pushsvc subscribe`, `pushsvc bench`",
        "the server to connect to, `http(s)://host:port[/base]` (default `http://127.0.0.1:8000`)",
    ),
    "PUSHSVC_TOKEN": ("`pushsvc subscribe`", "the JWT to present when `--token` is not given"),
    "PUSHSVC_TEST_NATS_URL": (
        "the test suite",
        "run the tests against this NATS instead of a bundled nats-server",
    ),
}

_DURATION = re.compile(r"(timeout|ttl|interval|delay|window|leeway)$")


@dataclass
class SettingDoc:
    """One row of the settings reference."""

    variable: str  # PUSHSVC_...
    field: str  # Settings attribute
    group: str
    type: str
    default: str
    unit: str
    meaning: str


# --------------------------------------------------------------------- settings


def settings_docs() -> list[SettingDoc]:
    """Every ``Settings`` field as a :class:`SettingDoc`, in source order.

    Raises:
        ValueError: a field has no meaning (no docstring, no comment, no note), or
            the notes name a field ``Settings`` does not have.
    """
    import msgspec

    from pushsvc import Settings

    module = importlib.import_module(Settings.__module__)
    prefix = getattr(module, "ENV_PREFIX", "PUSHSVC_")
    source = _source_docs(Settings)
    notes: dict[str, dict[str, str]] = yaml.safe_load(NOTES.read_text()) or {}
    fields = msgspec.structs.fields(Settings)
    variables = {prefix + f.name.upper() for f in fields}
    stale = sorted(set(notes) - variables)
    if stale:
        raise ValueError(f"{NOTES.name} has notes for settings that do not exist: {stale}")
    docs = []
    for f in fields:
        variable = prefix + f.name.upper()
        note = notes.get(variable, {})
        group, code_doc = source.get(f.name, ("Settings", ""))
        meaning = note.get("meaning") or code_doc
        if not meaning:
            raise ValueError(
                f"{variable} has no meaning: document the field in {Settings.__module__} "
                f"or add it to {NOTES.name}"
            )
        if note.get("more"):
            meaning = f"{_sentence(meaning)} {note['more']}"
        docs.append(
            SettingDoc(
                variable=variable,
                field=f.name,
                group=note.get("group", group),
                type=note.get("type") or _type_name(f.type),
                default=note.get("default") or _default(f),
                unit=note.get("unit") or _unit(f.name, f.type),
                meaning=_sentence(meaning),
            )
        )
    return docs


def _source_docs(cls: type) -> dict[str, tuple[str, str]]:
    """field -> (group, doc) from the class source: ``# --- group ---`` lines name the
    group of the fields below them; a field's doc is the string literal right after
    it, else its trailing comment."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    groups: list[tuple[int, str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        heading = re.fullmatch(r"-{2,}\s*(.*?)\s*-*", text)
        if heading and tok.line.strip().startswith("#"):
            groups.append((tok.start[0], heading.group(1)))
        elif not tok.line.strip().startswith("#"):
            comments[tok.start[0]] = text
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    found: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        doc = ""
        following = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            doc = " ".join(following.value.value.split())
        else:
            end = node.end_lineno or node.lineno
            doc = next((comments[n] for n in range(node.lineno, end + 1) if n in comments), "")
        group = next((g for line, g in reversed(groups) if line < node.lineno), "Settings")
        found[node.target.id] = (group[:1].upper() + group[1:], doc)
    return found


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}s, comma-separated" if args else "list"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _default(field: Any) -> str:
    import msgspec

    if field.default is not msgspec.NODEFAULT:
        value = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list):
        return "none" if not value else f"`{','.join(map(str, value))}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def _unit(name: str, tp: Any) -> str:
    if name.endswith("_bytes"):
        return "bytes"
    if name.endswith("_rate"):
        return "per second"
    if tp is float and _DURATION.search(name):
        return "seconds"
    return ""


def _sentence(text: str) -> str:
    """``text`` ending with a full stop (case untouched: ``uvicorn``, ``debug|info``)."""
    text = text.strip()
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_settings() -> str:
    """The settings reference as Markdown: one table per group, one row per variable."""
    out: list[str] = []
    group = None
    for doc in settings_docs():
        if doc.group != group:
            group = doc.group
            out += ["", f"## {group}", "", "| variable | type, default | meaning |"]
            out.append("| --- | --- | --- |")
        kind = f"{doc.type} ({doc.unit})" if doc.unit else doc.type
        out.append(
            f"| `{doc.variable}` | {_cell(kind)}<br>default {_cell(doc.default)} "
            f"| {_cell(doc.meaning)} |"
        )
    return "\n".join(out).lstrip("\n") + "\n"


def render_client_variables() -> str:
    """The non-setting variables as a Markdown table."""
    rows = ["| variable | read by | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{n}` | {who} | {_sentence(m)} |" for n, (who, m) in CLIENT_VARIABLES.items()]
    return "\n".join(rows) + "\n"


# -------------------------------------------------------------------------- CLI


def render_cli() -> str:
    """Every ``pushsvc`` sub-command as Markdown: usage, then a table of its arguments."""
    from pushsvc.cli import build_parser

    saved = {k: v for k, v in os.environ.items() if k.startswith("PUSHSVC_")}
    for key in saved:  # defaults as a fresh shell sees them
        del os.environ[key]
    try:
        parser = build_parser()
    finally:
        os.environ.update(saved)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = []
    out.append("| command | what it does |")
    out.append("| --- | --- |")
    out += [f"| [`{parser.prog} {n}`](#{n}) | {helps.get(n) or ''} |" for n in sub.choices]
    for name, command in sub.choices.items():
        command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=88)
        usage = "\n".join(  # argparse indents continuation lines under "usage: "
            line.removeprefix("usage: ").removeprefix(" " * len("usage: "))
            for line in command.format_usage().strip().splitlines()
        )
        out += [
            "",
            f"## `{parser.prog} {name}` {{ #{name} }}",
            "",
            _sentence(helps.get(name) or ""),
            "",
        ]
        out += ["```text", usage, "```", ""]
        out += ["| argument | meaning |", "| --- | --- |"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out.append(f"| {_cell(_flag(action))} | {_cell(_help(action))} |")
    return "\n".join(out) + "\n"


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{flags}`"
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return f"`{flags} {metavar}`"


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default))
    default = action.default
    if (
        "default" not in text.lower()
        and default not in (None, False, [], argparse.SUPPRESS)
        and action.option_strings
    ):
        text += f" (default {default})"
    if isinstance(action, argparse._AppendAction):
        text += "; repeatable"
    return text


# --------------------------------------------------------------------- HTTP API


def openapi_document(dev: bool = False) -> dict[str, Any]:
    """The OpenAPI document of an app built from default settings (no NATS is contacted)."""
    from pushsvc import Settings, create_app

    settings = Settings.load(env={}, jwt_secret="docs", nats_url="nats://127.0.0.1:4222", dev=dev)
    return create_app(settings).openapi()


def render_http_api() -> str:
    """Every route as a Markdown table row: method, path, summary, answers."""
    plain = openapi_document()["paths"]
    dev = openapi_document(dev=True)["paths"]
    rows = ["| route | what | answers |", "| --- | --- | --- |"]
    for path, operations in dev.items():
        for method, op in operations.items():
            summary = op.get("summary") or ""
            if path not in plain or method not in plain[path]:
                summary += " (`--dev` only)"
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(f"| `{method.upper()} {path}` | {_cell(summary)} | {codes} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------ hooks


def on_files(files: Any, config: Any) -> Any:
    """Add the OpenAPI document, and the repository files the pages link to, to the
    site (MkDocs event)."""
    import json

    from mkdocs.structure.files import File

    text = json.dumps(openapi_document(), indent=2) + "\n"
    files.append(File.generated(config, OPENAPI_URI, content=text))
    docs_dir = Path(config["docs_dir"]).resolve()
    added: set[str] = set()
    for page in docs_dir.rglob("*.md"):
        text = _expand_includes(page.read_text(), docs_dir.parent, page.parent)
        for target in _REPO_LINK.findall(text):
            path = _repo_file(docs_dir, page.parent, target)
            if path is not None and path not in added and not path.endswith(".md"):
                added.add(path)
                root = docs_dir.parent
                files.append(File.generated(config, REPO_DIR + path, abs_src_path=str(root / path)))
    return files


#: a file, or a section of one, included with pymdownx.snippets
#: (``--8<-- "clients/js/README.md"``, ``--8<-- "docs/protocol.md:close-codes"``)
_INCLUDE = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"$', re.M)
_LINK = re.compile(r"\]\(([^)\s#:]+)(#[^)\s]*)?\)")


def _expand_includes(markdown: str, root: Path, page_dir: Path | None = None) -> str:
    """Snippet includes replaced by the text they include, with its relative links
    made relative to ``page_dir`` (the including page's folder), so that a link that
    works in the included file works in the page too."""

    def include(m: re.Match[str]) -> str:
        source = root / m.group(1)
        text = source.read_text()
        if m.group(2):
            start, end = f"[start:{m.group(2)}]", f"[end:{m.group(2)}]"
            text = text.split(start, 1)[1].split("\n", 1)[1].split(end, 1)[0]
            text = text.rsplit("\n", 1)[0] + "\n"  # the end marker's line
        if page_dir is None:
            return text

        def relink(link: re.Match[str]) -> str:
            target = (source.parent / link.group(1)).resolve()
            if not target.exists():
                return link.group(0)
            return f"]({os.path.relpath(target, page_dir)}{link.group(2) or ''})"

        return _LINK.sub(relink, text)

    return _INCLUDE.sub(include, markdown)


#: where the site serves copies of repository files linked from pages (compose.yaml, deploy/...)
REPO_DIR = "repo/"
_REPO_LINK = re.compile(r"\]\((\.\./[^)\s]+)\)")


def _repo_file(docs_dir: Path, page_dir: Path, target: str) -> str | None:
    """``target`` (a link of a page in ``page_dir``) as a path inside the repository,
    when it leaves ``docs_dir`` and names a file there; else None."""
    path = (page_dir / target.split("#", 1)[0]).resolve()
    root = docs_dir.parent
    if path.is_relative_to(docs_dir) or not path.is_relative_to(root) or not path.is_file():
        return None
    return path.relative_to(root).as_posix()


def _rewrite_repo_links(markdown: str, page: Any, config: Any) -> str:
    """Links from a page to repository files outside ``docs/`` point at the site's copies;
    links that leave ``docs/`` and come back (text included from elsewhere, e.g.
    ``../../docs/protocol.md`` in clients/js/README.md) point inside it directly."""
    docs_dir = Path(config["docs_dir"]).resolve()
    page_dir = (docs_dir / page.file.src_uri).parent

    def replace(match: re.Match[str]) -> str:
        target = match.group(1)
        file, _, anchor = target.partition("#")
        anchor = "#" + anchor if anchor else ""
        path = _repo_file(docs_dir, page_dir, target)
        if path == "README.md":  # the repository's front page is the site's
            return f"]({os.path.relpath(docs_dir / 'index.md', page_dir)})"
        if path is not None and not path.endswith(".md"):
            return f"]({os.path.relpath(docs_dir / (REPO_DIR + path), page_dir)}{anchor})"
        inside = (page_dir / file).resolve()
        if inside.is_relative_to(docs_dir) and inside.is_file():
            return f"]({os.path.relpath(inside, page_dir)}{anchor})"
        return match.group(0)

    return _REPO_LINK.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the markers of a page with the generated references, and point links to
    repository files at the site's copies (MkDocs event)."""
    root = Path(config["docs_dir"]).resolve().parent
    page_dir = (Path(config["docs_dir"]).resolve() / page.file.src_uri).parent
    markdown = _rewrite_repo_links(_expand_includes(markdown, root, page_dir), page, config)
    renderers = {
        "settings": render_settings,
        "client-variables": render_client_variables,
        "cli": render_cli,
        "http-api": render_http_api,
    }
    for key, marker in MARKERS.items():
        if marker.search(markdown):
            try:
                text = renderers[key]()
            except ValueError as exc:
                log.warning("%s: %s", page.file.src_uri, exc)
                text = ""
            markdown = marker.sub(lambda _m, text=text: text, markdown)
    return markdown


_RST_ROLE = re.compile(r":(?:meth|class|func|mod|data|attr|exc|obj):(?=<code)")
_RST_SHORT = re.compile(r"<code>~(?:\w+\.)*(\w+)</code>")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Drop the Sphinx roles (``:class:``, ``:meth:``...) the docstrings use for
    cross-references, and show ``~a.b.Name`` as ``Name`` as Sphinx does: mkdocstrings
    renders the name as code already (MkDocs event)."""
    return _RST_SHORT.sub(r"<code>\1</code>", _RST_ROLE.sub("", html))
