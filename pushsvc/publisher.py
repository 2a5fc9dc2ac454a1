"""The producer-side publisher (``from pushsvc import Publisher``); its NATS code lives in
:mod:`pushsvc.bus.producer` (only ``pushsvc.bus`` talks to nats-py)."""

from .bus.producer import Publisher

__all__ = ["Publisher"]
