"""Log hygiene: tokens, cookies and secrets never reach a log line.

:class:`RedactTokens` rewrites, in the message *and* in any traceback text of a
record:

- ``token=...`` (query strings such as ``/ws?token=``; also ``access_token=``),
- ``Bearer ...`` (``Authorization`` headers, logged by ``websockets`` at DEBUG),
- passwords inside URLs (``nats://user:password@host``),
- ``Cookie:`` / ``Set-Cookie:`` header lines (the cookie named by
  ``PUSHSVC_AUTH_COOKIE`` may be called anything),
- anything shaped like a JWS compact serialisation (``eyJ...``.``...``.``...``,
  RFC 7515 7.1), wherever it appears,
- the literal values registered with :func:`install_redaction` (the JWT secret,
  the API keys, the NATS password and token).

It is installed on the loggers uvicorn and pushsvc log to, and on every handler
attached to them and to the root logger when :func:`install_redaction` runs
(the app calls it at creation and again at start-up, after uvicorn configured
logging), so child loggers (``pushsvc.core.client``...) are covered too. OWASP
Logging Cheat Sheet: session identifiers, access tokens and secrets are never
logged.

Formats (``PUSHSVC_LOG_FORMAT``): :class:`TextFormatter` (default) and
:class:`JsonFormatter` (one JSON object per line), both naming the node
(``PUSHSVC_NODE_NAME``) on every line and carrying the event's fields (the
``extra=`` of the logging call: client id, close code, reason, channel count).
:func:`log_config` is the ``logging.config.dictConfig`` dictionary ``serve``
hands to uvicorn, so uvicorn's own and access logs use them too.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import msgspec

REDACTED = "[redacted]"

_PATTERNS = (
    (re.compile(r"(?i)(token=)[^&\s\"';]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    (re.compile(r"(?im)((?:set-)?cookie:\s*)[^\r\n]*"), r"\1" + REDACTED),
    (re.compile(r"(?i)(\"(?:token|access_token|api_key)\"\s*:\s*\")[^\"]*"), r"\1" + REDACTED),
    # passwords in URLs (nats://user:secret@host)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    # JWS compact serialisations, also when a logger shortened them ("eyJhb...Xyz")
    (re.compile(r"eyJ[A-Za-z0-9_.-]*"), REDACTED),
)
_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "pushsvc", "websockets")
_literals: set[str] = set()


def redact(text: str) -> str:
    """``text`` with every token, cookie and registered secret replaced by ``[redacted]``."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    for secret in _literals:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactTokens(logging.Filter):
    """A logging filter that redacts tokens from the formatted message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler
            return True
        redacted = redact(message)
        if redacted != message:
            # redact the arguments one by one (keeps the access log's fields for
            # JsonFormatter); if that does not clean the message, flatten it
            if isinstance(record.args, tuple) and record.args:
                record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
                try:
                    clean = record.getMessage() == redacted
                except Exception:
                    clean = False
                if not clean:
                    record.msg, record.args = redacted, ()
            else:
                record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(secrets: Iterable[str | None] = ()) -> None:
    """Install :class:`RedactTokens` on uvicorn's and pushsvc's loggers and handlers.

    Idempotent; call again after logging is (re)configured to cover new handlers.

    Args:
        secrets: literal values never to log (JWT secret, API keys); ``None`` and
            values shorter than 8 characters are ignored (too likely to match
            ordinary text).
    """
    _literals.update(s for s in secrets if s and len(s) >= 8)
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        _add(logger)
    for logger in [logging.getLogger(), *loggers]:
        for handler in logger.handlers:
            _add(handler)


def _add(target: logging.Filterer) -> None:
    if not any(isinstance(f, RedactTokens) for f in target.filters):
        target.addFilter(RedactTokens())


# attributes every LogRecord has: anything else was passed as ``extra=`` (an event field)
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured duplicate of the message
    "node",
    "taskName",
}
# uvicorn.access logs '%s - "%s %s HTTP/%s" %d' with these arguments
_ACCESS_FIELDS = ("peer", "method", "path", "http_version", "status")


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event's own fields of ``record``: its ``extra=`` values, strings redacted.

    For uvicorn's access log (``uvicorn.access``), the request's ``peer``,
    ``method``, ``path`` (query redacted), ``http_version`` and ``status``.
    """
    fields: dict[str, Any] = {}
    if (
        record.name == "uvicorn.access"
        and isinstance(record.args, tuple)
        and len(record.args) == len(_ACCESS_FIELDS)
    ):
        fields.update(zip(_ACCESS_FIELDS, record.args, strict=True))
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            fields[key] = value
    for key, value in fields.items():
        if isinstance(value, str):
            fields[key] = redact(value)
    return fields


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <node> <logger>: <message> key=value ...`` (the default format).

    Args:
        node: the node name written on every line.
    """

    def __init__(self, node: str = "-") -> None:
        super().__init__("%(asctime)s %(levelname)s %(node)s %(name)s: %(message)s")
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        """The record as one text line (plus a redacted traceback, if any)."""
        record.node = self.node
        text = super().format(record)
        fields = event_fields(record)
        if record.name == "uvicorn.access":
            fields = {}  # already in the message
        if fields:
            pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
            head, sep, tail = text.partition("\n")
            text = f"{head} {pairs}{sep}{tail}"
        return redact(text)


def _text_value(value: Any) -> str:
    """``value`` for a ``key=value`` pair: quoted (JSON string rules) when it has spaces."""
    text = str(value)
    if not text or any(c.isspace() or c in '="' for c in text):
        return msgspec.json.encode(text).decode()
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (``PUSHSVC_LOG_FORMAT=json``).

    Keys: ``time`` (RFC 3339, UTC, milliseconds), ``level`` (``info``...),
    ``logger``, ``node``, ``pid``, ``event`` (the message, redacted), then the
    event's fields (:func:`event_fields`), and ``exc`` with the traceback text
    when there is one. Values that are not JSON types are written with ``str``.
    Encoded by msgspec, so quotes and newlines in messages are escaped as JSON
    requires (RFC 8259 7): a line is always one object.

    Args:
        node: the node name written on every line.
    """

    def __init__(self, node: str = "-") -> None:
        super().__init__()
        self.node = node
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        ms = int(record.msecs)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        body: dict[str, Any] = {
            "time": f"{stamp}.{ms:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node,
            "pid": record.process,
            "event": redact(record.getMessage()),
        }
        for key, value in event_fields(record).items():
            body.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            body["exc"] = redact(record.exc_text)
        if record.stack_info:
            body["stack"] = redact(record.stack_info)
        try:
            return self._encoder.encode(body).decode()
        except (TypeError, ValueError, OverflowError):
            body = {k: v if isinstance(v, str | int | bool) else str(v) for k, v in body.items()}
            return self._encoder.encode(body).decode()


def log_config(log_format: str, node: str, level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary for ``serve`` (uvicorn's ``log_config``).

    Every record of every logger (pushsvc, uvicorn, uvicorn's access log, NATS
    client, Python warnings via the root logger) goes through one formatter,
    :class:`TextFormatter` or :class:`JsonFormatter`, and the :class:`RedactTokens`
    filter. uvicorn's access log goes to stdout, everything else to stderr (as
    uvicorn does by default).

    Args:
        log_format: ``"text"`` or ``"json"`` (``PUSHSVC_LOG_FORMAT``).
        node: ``PUSHSVC_NODE_NAME``.
        level: ``PUSHSVC_LOG_LEVEL``.
    """
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    level = level.upper()
    handler = {"formatter": "pushsvc", "filters": ["redact"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"pushsvc": {"()": f"{__name__}.{formatter.__name__}", "node": node}},
        "filters": {"redact": {"()": f"{__name__}.RedactTokens"}},
        "handlers": {
            "default": {
                **handler,
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
            "access": {
                **handler,
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level},
    }
