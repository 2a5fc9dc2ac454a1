"""pushsvc: NATS subjects to authorised WebSocket subscribers.

Public API::

    from pushsvc import create_app, setup_app, Settings, Publisher, NatsSecurity, uvicorn_config
    from pushsvc import Client        # the async Python client (pushsvc.client)
"""

from ._version import __version__
from .app import Node, create_app, setup_app
from .client import Client
from .config.nats import NatsRefused, NatsSecurity
from .config.settings import Settings, SettingsError
from .publisher import Publisher
from .server.serving import uvicorn_config

__all__ = [
    "Client",
    "NatsRefused",
    "NatsSecurity",
    "Node",
    "Publisher",
    "Settings",
    "SettingsError",
    "__version__",
    "create_app",
    "setup_app",
    "uvicorn_config",
]
