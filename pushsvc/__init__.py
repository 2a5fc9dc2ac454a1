"""pushsvc: NATS subjects to authorised WebSocket subscribers.

Public API::

    from pushsvc import create_app, setup_app, Settings, Publisher, NatsSecurity, uvicorn_config
"""

__version__ = "0.1.0"

from .app import Node, create_app, setup_app
from .natsconn import NatsRefused, NatsSecurity
from .publisher import Publisher
from .serving import uvicorn_config
from .settings import Settings, SettingsError

__all__ = [
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
