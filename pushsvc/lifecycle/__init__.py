"""Lifecycle events on NATS (``PUSHSVC_EVENTS``): ``<prefix>-events.<type>``.

- ``events``: :class:`~.events.LifecycleEvents`: connect, disconnect, subscribe,
  unsubscribe, published in order with ``Nats-Msg-Id``; connection records;
- ``occupancy``: cluster-wide occupied/vacated by compare-and-set;
- ``lost``: a node that died: its connections' ``disconnect`` (``node_lost``)
  and its channels' ``vacated``, reported once by a survivor.

The contract is docs/server-api.md, "Lifecycle events".
"""
