"""Settings loading/validation, channel grammar and grants."""

from __future__ import annotations

import re
import socket

import pytest

from pushsvc.channels import (
    InvalidChannel,
    grant_covers,
    grant_matches,
    validate_channel,
    validate_grant,
    validate_pattern,
)
from pushsvc.config.settings import Settings, SettingsError


def test_env_and_overrides():
    s = Settings.load(
        env={
            "PUSHSVC_JWT_SECRET": "x",
            "PUSHSVC_PORT": "9001",
            "PUSHSVC_HISTORY_TTL": "0",
            "PUSHSVC_ALLOWED_ORIGINS": "https://a.example, https://b.example",
            "PUSHSVC_DEV": "true",
        },
        port=9002,
        host=None,
    )
    assert s.port == 9002 and s.host == "127.0.0.1" and not s.history and s.dev
    assert s.allowed_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({}, "PUSHSVC_JWT_SECRET"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_PORT": "-1"}, "PUSHSVC_PORT"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_NATS_URL": "nats://:4222"}, "PUSHSVC_NATS_URL"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_SUBJECT_PREFIX": "a.b"}, "PUSHSVC_SUBJECT_PREFIX"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_AUTH_COOKIE": "t"}, "PUSHSVC_AUTH_COOKIE"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_WRITE_DELAY": "-0.01"}, "PUSHSVC_WRITE_DELAY"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_WRITE_DELAY": "5"}, "PUSHSVC_WRITE_DELAY"),
        (
            {"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_JWT_ALGORITHMS": "HS256,RS256"},
            "PUSHSVC_JWT_ALGORITHMS",
        ),
        (
            {"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_ALLOWED_ORIGINS": "a.example"},
            "PUSHSVC_ALLOWED_ORIGINS",
        ),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_LOG_FORMAT": "xml"}, "PUSHSVC_LOG_FORMAT"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_DRAIN_DELAY": "-1"}, "PUSHSVC_DRAIN_DELAY"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_SHUTDOWN_TIMEOUT": "0"}, "PUSHSVC_SHUTDOWN_TIMEOUT"),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_NODE_NAME": "a b"}, "PUSHSVC_NODE_NAME"),
        (
            {"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_HEAP_TRIM_INTERVAL": "-1"},
            "PUSHSVC_HEAP_TRIM_INTERVAL",
        ),
        ({"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_COMPRESSION": "gzip"}, "PUSHSVC_COMPRESSION"),
        (
            {"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_COMPRESSION_MIN_BYTES": "-1"},
            "PUSHSVC_COMPRESSION_MIN_BYTES",
        ),
        (
            {"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_COMPRESSION_MIN_BYTES": "big"},
            "PUSHSVC_COMPRESSION_MIN_BYTES",
        ),
    ],
)
def test_invalid_settings_name_the_setting(env, setting):
    with pytest.raises(SettingsError) as info:
        Settings.load(env=env)
    assert info.value.setting == setting


def test_node_name_defaults_to_the_host_name():
    host = socket.gethostname()
    name = Settings.load(env={"PUSHSVC_JWT_SECRET": "x"}).node_name
    assert name is not None and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", host):
        assert name == host
    chosen = Settings.load(env={"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_NODE_NAME": "web-3"})
    assert chosen.node_name == "web-3"


def test_cluster_urls():
    s = Settings.load(env={"PUSHSVC_JWT_SECRET": "x", "PUSHSVC_NATS_URL": "nats://a:1,nats://b:2"})
    assert s.nats_servers == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize("name", ["news", "chat.room-1", "a_b.C.9", "user.alice", "x" * 128])
def test_valid_channels(name):
    assert validate_channel(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".a", "a.", "a..b", "a.*", "a.>", "$SYS", "a b", "a\tb", "é", "x" * 129, "_INBOX.x"],
)
def test_invalid_channels(name):
    with pytest.raises(InvalidChannel):
        validate_channel(name)


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("chat.*", "chat.a", True),
        ("chat.*", "chat.a.b", False),
        ("chat.*", "chat", False),
        ("chat.>", "chat.a.b", True),
        ("chat.>", "chat", False),
        (">", "anything.at.all", True),
        ("*.x", "a.x", True),
        ("news", "news", True),
        ("news", "news2", False),
    ],
)
def test_grants(pattern, channel, expected):
    assert grant_matches(validate_grant(pattern), channel) is expected


@pytest.mark.parametrize("pattern", ["a.>.b", "", "a..b", "a.b*"])
def test_invalid_grants(pattern):
    with pytest.raises(InvalidChannel):
        validate_grant(pattern)


@pytest.mark.parametrize(
    ("grant", "pattern", "expected"),
    [
        ("orders.>", "orders.*", True),
        ("orders.>", "orders.>", True),
        ("orders.>", "orders.*.x", True),
        ("orders.*", "orders.*", True),
        ("orders.*", "orders.>", False),  # > reaches deeper than one token
        ("orders.eu", "orders.*", False),
        ("*.eu", "*.eu", True),
        ("*.eu", "*.*", False),
        (">", ">", True),
        ("a.>", ">", False),
    ],
)
def test_grant_covers_a_wildcard_subscription(grant, pattern, expected):
    assert grant_covers(grant, validate_pattern(pattern)) is expected


@pytest.mark.parametrize("name", ["orders", "_INBOX.*", "a.>.b", "a..*", ""])
def test_invalid_patterns(name):
    with pytest.raises(InvalidChannel):
        validate_pattern(name)


def test_presence_settings_are_validated():
    base = {"PUSHSVC_JWT_SECRET": "x"}
    for env, setting in (
        ({"PUSHSVC_PRESENCE_TTL": "0.5"}, "PUSHSVC_PRESENCE_TTL"),
        ({"PUSHSVC_PRESENCE_BUCKET": "a.b"}, "PUSHSVC_PRESENCE_BUCKET"),
        ({"PUSHSVC_PRESENCE_CHANNELS": "chat.>.x"}, "PUSHSVC_PRESENCE_CHANNELS"),
        ({"PUSHSVC_JOIN_LEAVE_CHANNELS": "a..b"}, "PUSHSVC_JOIN_LEAVE_CHANNELS"),
        ({"PUSHSVC_PRESENCE_LIMIT": "0"}, "PUSHSVC_PRESENCE_LIMIT"),
    ):
        with pytest.raises(SettingsError) as err:
            Settings.load(env={**base, **env})
        assert err.value.setting == setting
    s = Settings.load(env={**base, "PUSHSVC_PRESENCE_CHANNELS": "chat.>, rooms.*"})
    assert s.presence_channels == ["chat.>", "rooms.*"]
