"""Log hygiene: tokens never reach a log line.

:class:`RedactTokens` rewrites ``token=...`` (query strings) and ``Bearer ...``
in every record of the loggers it is installed on (uvicorn's access and error
loggers log request paths, which may carry ``?token=``).
"""

from __future__ import annotations

import logging
import re

_PATTERNS = (
    (re.compile(r"(?i)(token=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
)
_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "pushsvc")


class RedactTokens(logging.Filter):
    """A logging filter that redacts tokens from the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern, repl in _PATTERNS:
            redacted = pattern.sub(repl, redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def install_redaction() -> None:
    """Install :class:`RedactTokens` on uvicorn's and pushsvc's loggers (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
