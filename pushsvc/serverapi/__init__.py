"""The server API: backends act on connections cluster-wide, over NATS and HTTP.

- ``schemas``: request and reply bodies, :class:`~.schemas.ApiError`, the op table;
- ``local``: what one node does on its own connections;
- ``nodes``: the registry of live nodes (who a request waits for);
- ``cluster``: :class:`~.cluster.ServerAPI`: NATS responders on
  ``<prefix>-api.<op>``, the scatter to every node, the aggregation.

The HTTP route ``POST /api/<op>`` is :mod:`pushsvc.api.serverapi`; the contract is
docs/server-api.md.
"""
