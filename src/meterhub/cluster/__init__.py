"""Cluster mode: several meterhub nodes on one PostgreSQL with a bus between them (docs/cluster.md).

- :mod:`.bus`: the :class:`~.bus.Bus` interface, in process (a cluster of one) or NATS;
- :mod:`.store`: nodes, heartbeats, gateway ownership and the dead-node sweep in the database;
- :mod:`.node`: one node (heartbeat, takeover, routed commands); :mod:`.handler`: the MQTT-facing
  handler that claims gateways; :mod:`.events`: events to the other nodes' subscribers;
- :mod:`.api` and :mod:`.cli`: ``GET /api/v1/cluster`` and ``meterhub cluster status``.
"""
