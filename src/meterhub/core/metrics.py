"""Prometheus metrics, read from the counters the components already keep, at scrape time.

Nothing here runs per message: :class:`HubCollector` reads ``MQTTServer.stats``,
``ProtocolService.stats``, ``GroupCommitWriter.stats`` and a few sizes when ``/metrics`` is scraped
(the endpoint runs in the event loop, so it reads them safely). The only metric observed as it
happens is the command round-trip histogram, fed by the API's command path.

Metrics (all prefixed ``meterhub_``):

- MQTT: ``mqtt_connections_opened_total``, ``mqtt_connections_closed_total``,
  ``mqtt_messages_received_total``, ``mqtt_messages_sent_total``, ``mqtt_connack_total{code}``,
  ``mqtt_rejections_total{reason}`` (refused publishes/subscriptions, protocol errors, closes for
  keep-alive / slow client / connect timeout, CONNACK codes other than 0), ``mqtt_events_total{event}``
  (every counter of the server, raw), gauges ``mqtt_connected_clients``, ``mqtt_sessions``,
  ``mqtt_session_queue_messages`` (queued for offline or slow clients), ``mqtt_inflight_messages``.
- Protocol: ``protocol_responses_total{kind,code}`` (answers sent, e.g. kind="report", code="0"),
  ``protocol_events_total{event}`` (the service's other counters), gauges ``devices{state}``,
  ``pending_commands``, ``alarms_active``, ``alarm_cache_devices``, ``alarm_cache_total{event}``.
- Storage: ``storage_batches_total``, ``storage_operations_total``, ``storage_failures_total``,
  ``storage_rows_refused_total`` (groups whose data the database refused, answered 500),
  ``storage_transient_retries_total`` (batches tried again after a deadlock or serialization failure),
  ``storage_commit_seconds_total``, gauges ``storage_last_batch_size``, ``storage_last_commit_seconds``,
  ``storage_commit_seconds_max`` (the longest batch since start), ``storage_queue_depth``,
  ``storage_outstanding``, ``storage_healthy``; back-pressure: ``storage_pressure`` (1 while gateways
  are not read because too much waits for storage) and ``storage_pressure_episodes_total``.
- Storage maintenance (meterhub.storage.maintenance): ``storage_partitions_created_total``,
  ``storage_partitions_dropped_total``, ``storage_retention_rows_deleted_total``,
  ``storage_rollup_rebuilds_total``, ``storage_rollup_runs_total``, ``storage_rollup_failures_total``,
  ``storage_rollup_dirty_buckets_total``, ``storage_maintenance_failures_total``, gauges
  ``storage_partitions``, ``storage_oldest_report_timestamp``, ``storage_retention_raw_days``,
  ``storage_rollup_done_timestamp``.
- Python: ``gc_collections_total{generation}``, ``gc_pause_seconds_total{generation}``, gauge
  ``gc_pause_seconds_max{generation}`` (the longest stop since start), from :mod:`meterhub.core.gcwatch`.
- Commands: histogram ``command_duration_seconds{status}`` (commands sent through the API that reached
  a gateway: ok, failed, timeout).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meterhub.core import gcwatch

_RESPONSE_KEY = re.compile(r"^([a-z_]+)\.code\.(-?\d+)$")
_REJECTION_PREFIXES = ("rejected.", "protocol_error.", "closed.")


class HubCollector(Collector):
    """Builds the metric families from a running :class:`meterhub.app.Hub` at scrape time."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        yield from self._mqtt()
        yield from self._protocol()
        yield from self._storage()
        yield from self._gc()
        yield from self._homeassistant()
        yield from self._cluster()

    def _homeassistant(self) -> Iterator[Metric]:
        publisher = getattr(self.hub, "homeassistant", None)
        if publisher is None:
            return
        events = CounterMetricFamily(
            "meterhub_homeassistant_events",
            "Home Assistant publisher counters (published, dropped, coalesced, commands, connects).",
            labels=["event"],
        )
        for key, value in sorted(dict(publisher.stats).items()):
            events.add_metric([key.removeprefix("ha.")], value)
        yield events
        for name, value, doc in (
            ("homeassistant_connected", int(publisher.connected), "1 while connected to the broker."),
            ("homeassistant_pending", len(publisher.pending), "Meters with updates waiting to be sent."),
        ):
            g = GaugeMetricFamily(f"meterhub_{name}", doc)
            g.add_metric([], value)
            yield g

    def _cluster(self) -> Iterator[Metric]:
        """Cluster mode (meterhub.cluster): gateways held by this node, routed commands, takeovers."""
        node = getattr(self.hub, "cluster", None)
        if node is None:
            return
        g = GaugeMetricFamily("meterhub_cluster_gateways_held", "Gateways whose connection this node holds.")
        g.add_metric([], len(node.held))
        yield g
        events = CounterMetricFamily(
            "meterhub_cluster_events", "Counters of this cluster node.", labels=["event"]
        )
        relay = node.relay.stats if node.relay is not None else {}
        for key, value in sorted({**dict(node.stats), **dict(relay)}.items()):
            events.add_metric([key], value)
        yield events

    def _gc(self) -> Iterator[Metric]:
        watch = gcwatch.WATCH
        collections = CounterMetricFamily(
            "meterhub_gc_collections", "Python garbage collections.", labels=["generation"]
        )
        pauses = CounterMetricFamily(
            "meterhub_gc_pause_seconds",
            "Time the process stood still in garbage collections.",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "meterhub_gc_pause_seconds_max", "Longest garbage collection since start.", labels=["generation"]
        )
        for gen in range(3):
            collections.add_metric([str(gen)], watch.collections[gen])
            pauses.add_metric([str(gen)], watch.seconds[gen])
            longest.add_metric([str(gen)], watch.max_seconds[gen])
        yield from (collections, pauses, longest)

    def _mqtt(self) -> Iterator[Metric]:
        mqtt = getattr(self.hub, "mqtt", None)
        if mqtt is None:
            return
        stats = dict(mqtt.stats)
        simple = (
            ("mqtt_connections_opened", "connections.opened", "MQTT connections accepted at TCP level."),
            ("mqtt_connections_closed", "connections.closed", "MQTT connections closed."),
            ("mqtt_messages_received", "publish.in", "PUBLISH packets received from clients."),
            ("mqtt_messages_sent", "publish.out", "PUBLISH packets queued or sent to clients."),
        )
        for name, key, doc in simple:
            c = CounterMetricFamily(f"meterhub_{name}", doc)
            c.add_metric([], stats.get(key, 0))
            yield c
        connack = CounterMetricFamily("meterhub_mqtt_connack", "CONNACK return codes sent.", labels=["code"])
        rejections = CounterMetricFamily(
            "meterhub_mqtt_rejections", "Refusals and forced closes, by reason.", labels=["reason"]
        )
        events = CounterMetricFamily(
            "meterhub_mqtt_events", "Every counter of the MQTT server.", labels=["event"]
        )
        for key, value in sorted(stats.items()):
            events.add_metric([key], value)
            if key.startswith("connack."):
                code = key[len("connack.") :]
                connack.add_metric([code], value)
                if code != "0":
                    rejections.add_metric([key], value)
            elif key.startswith(_REJECTION_PREFIXES):
                rejections.add_metric([key], value)
        yield connack
        yield rejections
        yield events
        queued = inflight = 0
        for session in list(mqtt.sessions.values()):
            if session.queue:
                queued += len(session.queue)
            inflight += len(session.inflight)
        for name, value, doc in (
            ("mqtt_connected_clients", len(mqtt.connected), "Clients connected now."),
            ("mqtt_sessions", len(mqtt.sessions), "MQTT sessions (connected or kept for offline clients)."),
            ("mqtt_session_queue_messages", queued, "Messages queued in sessions (offline or slow)."),
            ("mqtt_inflight_messages", inflight, "Outbound QoS 1/2 messages awaiting acknowledgement."),
        ):
            g = GaugeMetricFamily(f"meterhub_{name}", doc)
            g.add_metric([], value)
            yield g

    def _protocol(self) -> Iterator[Metric]:
        handler = getattr(self.hub, "handler", None)
        stats = getattr(handler, "stats", None)
        if stats is None:
            return
        responses = CounterMetricFamily(
            "meterhub_protocol_responses",
            "Protocol answers sent to gateways, by message kind and result code.",
            labels=["kind", "code"],
        )
        events = CounterMetricFamily(
            "meterhub_protocol_events", "Other counters of the protocol service.", labels=["event"]
        )
        for key, value in sorted(dict(stats).items()):
            m = _RESPONSE_KEY.match(key)
            if m:
                responses.add_metric([m.group(1), m.group(2)], value)
            else:
                events.add_metric([key], value)
        yield responses
        yield events
        devices = getattr(handler, "devices", None)
        if devices is not None:
            online = sum(1 for d in devices.values() if d.online)
            g = GaugeMetricFamily(
                "meterhub_devices",
                "Devices in this node's memory, by presence (every device online here is in memory).",
                labels=["state"],
            )
            g.add_metric(["online"], online)
            g.add_metric(["offline"], len(devices) - online)
            yield g
        cache = getattr(handler, "cache", None)
        if cache is not None:
            g = GaugeMetricFamily(
                "meterhub_device_cache_max", "Most devices kept in memory (device_cache_max)."
            )
            g.add_metric([], cache.max_size)
            yield g
            c = CounterMetricFamily(
                "meterhub_device_cache",
                "Device cache: lookup jobs, cids fetched, devices evicted.",
                labels=["event"],
            )
            for event in ("lookups", "misses", "evicted"):
                c.add_metric([event], getattr(cache, event))
            yield c
        pending = getattr(handler, "pending_commands", None)
        if pending is not None:
            g = GaugeMetricFamily("meterhub_pending_commands", "Commands sent and awaiting an answer.")
            g.add_metric([], len(pending))
            yield g
        alarms = getattr(self.hub, "alarms", None)
        if alarms is not None:
            g = GaugeMetricFamily(
                "meterhub_alarms_active", "Alarms raised and not cleared (stored, every node's)."
            )
            g.add_metric([], alarms.active_total)
            yield g
            g = GaugeMetricFamily("meterhub_alarm_cache_devices", "Devices whose alarm state is in memory.")
            g.add_metric([], len(alarms.devices))
            yield g
            c = CounterMetricFamily(
                "meterhub_alarm_cache",
                "Alarm state: devices read on demand, evicted, reports dropped while waiting for a read.",
                labels=["event"],
            )
            for event in ("loaded", "evicted", "dropped"):
                c.add_metric([event], getattr(alarms, event))
            yield c

    def _retention(self) -> Iterator[Metric]:
        maint = getattr(self.hub, "storage_maintenance", None)
        if maint is None:
            return
        st = maint.stats
        for name, value, doc in (
            ("storage_partitions_created", st.partitions_created, "Partitions created ahead of time."),
            ("storage_partitions_dropped", st.partitions_dropped, "Expired partitions dropped (retention)."),
            ("storage_retention_rows_deleted", st.rows_deleted, "Expired raw rows deleted (SQLite)."),
            ("storage_rollup_rebuilds", st.rollup_rebuilds, "Rollups rebuilt from the raw reports."),
            ("storage_maintenance_failures", st.failures, "Storage maintenance runs that failed."),
            ("storage_rollup_runs", st.rollup_runs, "Runs of the rollup job."),
            ("storage_rollup_failures", st.rollup_failures, "Runs of the rollup job that failed."),
            (
                "storage_rollup_dirty_buckets",
                st.rollup_dirty_buckets,
                "5-minute buckets recomputed for late reports.",
            ),
        ):
            c = CounterMetricFamily(f"meterhub_{name}", doc)
            c.add_metric([], value)
            yield c
        oldest = st.oldest_partition if st.oldest_partition is not None else st.oldest_report
        for name, value, doc in (
            ("storage_partitions", st.partitions, "Range partitions of the reports table (PostgreSQL)."),
            ("storage_oldest_report_timestamp", oldest or 0, "Start of the oldest kept raw data (Unix s)."),
            ("storage_retention_raw_days", maint.raw_days or 0, "Days raw reports are kept (0: forever)."),
            ("storage_rollup_done_timestamp", st.rollup_done or 0, "Rollups hold every report before this."),
        ):
            g = GaugeMetricFamily(f"meterhub_{name}", doc)
            g.add_metric([], value)
            yield g

    def _storage(self) -> Iterator[Metric]:
        yield from self._retention()
        writer = getattr(self.hub, "writer", None)
        if writer is None:
            return
        st = writer.stats
        for name, value, doc in (
            ("storage_batches", st.batches, "Group commits done."),
            (
                "storage_operations",
                st.operations,
                "Write groups committed (a group is one message's writes).",
            ),
            ("storage_failures", st.failures, "Write groups that could not be stored."),
            (
                "storage_rows_refused",
                st.rows_refused,
                "Write groups the database refused (their batch-mates were stored; storage stays healthy).",
            ),
            (
                "storage_transient_retries",
                st.transient_retries,
                "Batches tried again after the database aborted them for another transaction (a deadlock).",
            ),
            (
                "storage_pressure_episodes",
                st.pressure_episodes,
                "Times the write queue passed max_queued_writes and gateways stopped being read.",
            ),
            (
                "storage_commit_seconds",
                st.commit_seconds_total,
                "Time spent applying and committing batches.",
            ),
        ):
            c = CounterMetricFamily(f"meterhub_{name}", doc)
            c.add_metric([], value)
            yield c
        for name, value, doc in (
            ("storage_last_batch_size", st.last_batch_size, "Write groups in the last commit."),
            ("storage_last_commit_seconds", st.last_commit_seconds, "Duration of the last commit."),
            ("storage_commit_seconds_max", st.max_commit_seconds, "Longest commit since start."),
            ("storage_queue_depth", writer.depth, "Write groups waiting for the writer."),
            ("storage_outstanding", writer.outstanding, "Write groups submitted and not yet finished."),
            ("storage_pressure", 1 if writer.pressed else 0, "1 while intake is paused for storage."),
            ("storage_healthy", 1 if writer.healthy else 0, "1 while the last commit succeeded."),
        ):
            g = GaugeMetricFamily(f"meterhub_{name}", doc)
            g.add_metric([], value)
            yield g


class Metrics:
    """A registry per hub (tests run several hubs in one process), with the command histogram."""

    def __init__(self, hub: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(hub))
        self.command_duration = Histogram(
            "meterhub_command_duration_seconds",
            "Command round trip (sent to the gateway -> answer or timeout), commands sent via the API.",
            labelnames=["status"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    def observe_command(self, status: str, elapsed: float | None) -> None:
        if elapsed is not None and status in ("ok", "failed", "timeout"):
            self.command_duration.labels(status).observe(elapsed)
