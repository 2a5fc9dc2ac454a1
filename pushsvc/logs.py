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
logging), so child loggers (``pushsvc.session``...) are covered too. OWASP
Logging Cheat Sheet: session identifiers, access tokens and secrets are never
logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

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
