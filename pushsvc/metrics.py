"""Prometheus collectors (served at ``GET /metrics``). Labels never carry tokens or users."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONNECTIONS = Gauge("pushsvc_connections", "Open authenticated WebSocket sessions")
MESSAGES_RECEIVED = Counter(
    "pushsvc_messages_received_total", "NATS messages received for channels with local subscribers"
)
DELIVERIES = Counter("pushsvc_deliveries_total", "Message frames handed to sessions (fan-out)")
REPLAYED = Counter("pushsvc_replayed_total", "Messages replayed from history on subscribe")
CLOSES = Counter("pushsvc_closes_total", "Sessions closed by the server", ["code"])
SLOW_CONSUMERS = Counter(
    "pushsvc_slow_consumers_total", "Sessions closed because their send buffer overflowed"
)
EMITS = Counter("pushsvc_emits_total", "HTTP emits by outcome", ["status"])
COMMANDS = Counter("pushsvc_commands_total", "Client commands by op", ["op"])
RATE_LIMITED = Counter("pushsvc_rate_limited_total", "Client commands and emits refused by limits")
HANDSHAKES_REJECTED = Counter(
    "pushsvc_handshakes_rejected_total", "WebSocket handshakes refused", ["reason"]
)
PRESENCE_ENTRIES = Gauge(
    "pushsvc_presence_entries", "Presence entries this node owns (present sessions x channels)"
)
JOIN_LEAVE_PUBLISHED = Counter(
    "pushsvc_join_leave_published_total", "join/leave events published by this node", ["event"]
)
