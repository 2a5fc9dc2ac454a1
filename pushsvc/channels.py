"""Channel grammar, grant patterns and the channel <-> NATS subject mapping.

A *channel* is 1..128 characters of dot-separated tokens, each token one or more
of ``[A-Za-z0-9_-]`` (wire contract v1). Channels never contain wildcards, so a
channel name can never widen a NATS subscription. A channel ``C`` lives on the
NATS subject ``<prefix>.C``.

A *pattern* subscription (``orders.*``) uses the same wildcard grammar as a grant
and lives on the NATS subject ``<prefix>.<pattern>``: one NATS subscription per
distinct pattern on a node.

A *grant* (JWT ``channels`` / ``publish`` claims) is a channel pattern with NATS
wildcard semantics (NATS docs, "Subject-Based Messaging: Wildcards"): ``*``
matches exactly one token, ``>`` matches one or more trailing tokens and may
only be the last token.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_CHANNEL_LENGTH = 128

_TOKEN = r"[A-Za-z0-9_-]+"
#: the channel grammar (docs/protocol.md) as an anchored regular expression
CHANNEL_PATTERN = rf"^{_TOKEN}(\.{_TOKEN})*$"
_CHANNEL_RE = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_GRANT_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+|\*|>")

#: First tokens that are reserved by NATS conventions and never valid channels.
RESERVED_FIRST_TOKENS = frozenset({"_INBOX", "_R_", "_JS"})


class InvalidChannel(ValueError):
    """A channel name or grant breaks the grammar. ``str(exc)`` is safe to show a client."""


def validate_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel, else raise.

    Args:
        name: candidate channel (any type; non-strings are rejected).

    Raises:
        InvalidChannel: not a string, empty, longer than 128 characters, has an
            empty token, a wildcard, a ``$``, whitespace/control characters, or a
            reserved first token (``_INBOX``...).
    """
    if not isinstance(name, str):
        raise InvalidChannel("channel must be a string")
    if not name:
        raise InvalidChannel("channel must not be empty")
    if len(name) > MAX_CHANNEL_LENGTH:
        raise InvalidChannel(f"channel longer than {MAX_CHANNEL_LENGTH} characters")
    if _CHANNEL_RE.fullmatch(name) is None:
        raise InvalidChannel(
            "channel must be dot-separated tokens of [A-Za-z0-9_-] (no wildcards, no '$')"
        )
    if name.split(".", 1)[0] in RESERVED_FIRST_TOKENS:
        raise InvalidChannel("channel uses a reserved NATS prefix")
    return name


def is_valid_channel(name: object) -> bool:
    """True when :func:`validate_channel` accepts ``name``."""
    try:
        validate_channel(name)
    except InvalidChannel:
        return False
    return True


def validate_grant(pattern: str) -> str:
    """Return ``pattern`` if it is a valid grant, else raise :class:`InvalidChannel`."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_CHANNEL_LENGTH:
        raise InvalidChannel("grant must be a non-empty string of at most 128 characters")
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if _GRANT_TOKEN_RE.fullmatch(token) is None:
            raise InvalidChannel(f"invalid grant token {token!r}")
        if token == ">" and i != len(tokens) - 1:
            raise InvalidChannel("'>' must be the last token of a grant")
    return pattern


def grant_matches(pattern: str, channel: str) -> bool:
    """True when the grant ``pattern`` covers ``channel`` (NATS wildcard rules).

    A concrete channel is the simplest pattern, so this is :func:`grant_covers`.

    >>> grant_matches("chat.*", "chat.room1"), grant_matches("chat.*", "chat.a.b")
    (True, False)
    >>> grant_matches("chat.>", "chat.a.b"), grant_matches("chat.>", "chat")
    (True, False)
    """
    return grant_covers(pattern, channel)


def any_grant_matches(patterns: tuple[str, ...], channel: str) -> bool:
    """True when any of ``patterns`` covers ``channel``."""
    return any(grant_matches(p, channel) for p in patterns)


def concrete_match(patterns: tuple[str, ...], channel: str) -> bool:
    """True when ``channel`` is a concrete channel (no wildcard) covered by ``patterns``.

    The rule of per-channel features configured by patterns (presence, join/leave
    events): never on for a wildcard subscription.
    """
    return bool(patterns) and not is_pattern(channel) and any_grant_matches(patterns, channel)


def is_pattern(name: object) -> bool:
    """True when ``name`` is a string with a wildcard token (``*`` or ``>``)."""
    return isinstance(name, str) and ("*" in name or ">" in name)


def validate_pattern(name: object) -> str:
    """Return ``name`` if it is a valid wildcard subscription pattern, else raise.

    A pattern is a grant (:func:`validate_grant`) with at least one wildcard whose
    first token is not reserved (``_INBOX``...).

    Raises:
        InvalidChannel: malformed, no wildcard, or a reserved first token.
    """
    if not isinstance(name, str) or not is_pattern(name):
        raise InvalidChannel("a pattern needs a '*' or '>' token")
    validate_grant(name)
    if name.split(".", 1)[0] in RESERVED_FIRST_TOKENS:
        raise InvalidChannel("pattern uses a reserved NATS prefix")
    return name


@lru_cache(maxsize=4096)
def grant_covers(grant: str, pattern: str) -> bool:
    """True when every channel ``pattern`` matches is matched by ``grant`` (NATS rules).

    Token by token: ``>`` in the grant covers any non-empty rest of the pattern
    (wildcards included); ``*`` covers one literal or ``*`` token (not ``>``); a
    literal covers only itself.

    >>> grant_covers("orders.>", "orders.*"), grant_covers("orders.eu", "orders.*")
    (True, False)
    >>> grant_covers("orders.*", "orders.>"), grant_covers("*.eu", "orders.eu")
    (False, True)
    """
    g_tokens = grant.split(".")
    p_tokens = pattern.split(".")
    for i, g in enumerate(g_tokens):
        if g == ">":
            return len(p_tokens) > i
        if i >= len(p_tokens) or p_tokens[i] == ">":
            return False
        if g != "*" and g != p_tokens[i]:
            return False
    return len(g_tokens) == len(p_tokens)


PERSONAL_PREFIX = "user."  # personal channels: user.<sub> (see personal_channel)


def pattern_reaches(pattern: str, channel: str) -> bool:
    """True when a ``pattern`` subscription delivers ``channel``'s messages.

    Personal channels (``user.<sub>``) are reached only by patterns whose first
    token is literally ``user`` (``>`` or ``*.bob`` never deliver them), as for grants.
    """
    return not channel.startswith(PERSONAL_PREFIX) or pattern.startswith(PERSONAL_PREFIX)


def subject_for(prefix: str, channel: str) -> str:
    """NATS subject of ``channel``: ``<prefix>.<channel>``."""
    return f"{prefix}.{channel}"


def channel_for(prefix: str, subject: str) -> str | None:
    """Channel carried by ``subject`` under ``prefix``, or None if it is not one of ours."""
    head = prefix + "."
    if subject.startswith(head):
        return subject[len(head) :]
    return None


def personal_channel(sub: str) -> str:
    """The personal channel of user ``sub``: ``user.<sub>``."""
    return PERSONAL_PREFIX + sub
