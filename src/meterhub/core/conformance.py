"""The conformance report card: does a gateway speak the edge protocol the way the document says?

Built from what meterhub observed while the gateway was connected (bounded records kept by the MQTT
server and the protocol service, added to the gateway's stored record by
:mod:`meterhub.core.conformance_store`; nothing extra happens per message). Each finding names
the rule, what the document expects, what the gateway did, and a verdict: ``pass``, ``warn``,
``fail``, or ``unknown`` (not enough observed yet, e.g. no command was ever sent).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from meterhub.mqtt.topics import matches
from meterhub.protocol.errors import MESSAGES

PASS, WARN, FAIL, UNKNOWN = "pass", "warn", "fail", "unknown"


@dataclass(slots=True)
class Finding:
    rule: str
    title: str
    verdict: str
    expected: str
    observed: str


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0%"


async def report_card(
    hub: Any, gateway_id: str, *, status_interval: float | None = None
) -> dict[str, Any] | None:
    """The report card of ``gateway_id``, or None if no node ever stored a record of it.

    Built from the stored record (:mod:`meterhub.core.conformance_store`: what every node observed,
    this node's latest flushed first), so it is the same on any node and after a restart; whether
    the gateway is connected, its address and subscriptions come from this node when it holds the
    gateway, else from the database."""
    mqtt = hub.mqtt
    store = getattr(hub, "conformance", None)
    if store is None:
        return None
    stored, row = await store.read(gateway_id)
    if stored is None:
        return None
    client = client_view(stored) if stored.get("client_seen") else None
    gw = gateway_view(stored) if stored.get("gateway_seen") else None
    here = mqtt is not None and mqtt.is_connected(gateway_id)
    connected = here or bool(row is not None and row.connected)
    interval = status_interval or hub.settings.conformance_status_interval
    findings = [
        _sync_before_report(gw),
        _status_heartbeat(gw, interval, connected),
        _qos(client),
        _valid_values(gw),
        _request_ids(gw),
        _commands(gw),
        _subscriptions(mqtt, gateway_id, stored.get("subscriptions") if connected and not here else None),
        _topics(client, gw),
        _keepalive(client),
        _reconnects(client),
    ]
    summary = {v: sum(1 for f in findings if f.verdict == v) for v in (PASS, WARN, FAIL, UNKNOWN)}
    overall = FAIL if summary[FAIL] else WARN if summary[WARN] else PASS
    address = _address(mqtt, gateway_id)
    if address is None and connected and row is not None:
        address = row.client_address
    return {
        "gateway_id": gateway_id,
        "generated_at": time.time(),
        "connected": connected,
        "client_address": address,
        "verdict": overall,
        "summary": summary,
        "findings": [asdict(f) for f in findings],
    }


def gateway_view(stored: dict[str, Any]) -> Any:
    """A :class:`~meterhub.core.service.GatewayRecord` holding a stored record's protocol part."""
    from meterhub.core.service import GatewayRecord

    rec = GatewayRecord()
    for kind in ("sync", "report"):
        rec.codes[kind].update({int(c): n for c, n in stored["codes"][kind].items()})
    rec.request_id_reused = stored["request_id_reused"]
    rec.status_rejected = stored["status_rejected"]
    rec.unknown_topic = stored["unknown_topic"]
    rec.status_times.extend(stored["status_times"])
    rec.commands.update(stored["commands"])
    rec.command_latencies.extend(stored["command_latencies"])
    return rec


def client_view(stored: dict[str, Any]) -> Any:
    """A :class:`~meterhub.mqtt.session.ClientRecord` holding a stored record's wire part."""
    from meterhub.mqtt.session import ClientRecord

    rec = ClientRecord()
    rec.connects.extend((float(t), int(code)) for t, code in stored["connects"])
    rec.keepalive = stored["keepalive"] or 0
    rec.clean_session = bool(stored["clean_session"]) if stored["clean_session"] is not None else True
    rec.qos = list(stored["qos"])
    rec.acl_rejected = stored["acl_rejected"]
    rec.keepalive_expired = stored["keepalive_expired"]
    return rec


def _address(mqtt: Any, gateway_id: str) -> str | None:
    """The connected gateway's address (``host:port``; the PROXY protocol's source behind a balancer)."""
    conn = mqtt.connected.get(gateway_id) if mqtt is not None else None
    return conn.peer if conn is not None else None


def _sync_before_report(gw: Any) -> Finding:
    rule, title = "sync-before-report", "Devices are synced before they report"
    expected = "Sub-devices must be synchronized (devices/sync) before subsequent operations."
    if gw is None or not sum(gw.codes["report"].values()):
        return Finding(rule, title, UNKNOWN, expected, "no property reports seen yet")
    unsynced = gw.codes["report"][2003]
    total = sum(gw.codes["report"].values())
    if unsynced:
        return Finding(
            rule,
            title,
            FAIL,
            expected,
            f"{unsynced} of {total} reports were for devices never synced (answered 2003)",
        )
    return Finding(rule, title, PASS, expected, f"all {total} reports were for synced devices")


def _status_heartbeat(gw: Any, interval: float, connected: bool) -> Finding:
    rule, title = "status-every-minute", "Device status is reported at least once a minute"
    expected = (
        f"devices/status at least every {interval:g} s "
        "('we recommend that the status of the sub-devices be reported at least once every minute')"
    )
    times = list(gw.status_times) if gw is not None else []
    if connected and times:
        times.append(time.time())  # the time since the last one counts too
    if len(times) < 2:
        return Finding(
            rule,
            title,
            UNKNOWN if not times else WARN,
            expected,
            "no devices/status message seen" if not times else "only one devices/status message seen",
        )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    worst = max(gaps)
    median = statistics.median(gaps)
    observed = f"{len(gw.status_times)} status messages; longest gap {worst:.1f} s, median {median:.1f} s"
    if gw.status_rejected:
        observed += f"; {gw.status_rejected} malformed status messages"
    if worst > interval * 1.5:
        return Finding(rule, title, FAIL, expected, observed)
    if worst > interval or gw.status_rejected:
        return Finding(rule, title, WARN, expected, observed)
    return Finding(rule, title, PASS, expected, observed)


def _qos(client: Any) -> Finding:
    rule, title = "qos-1", "Messages are published with QoS 1"
    expected = "QoS 1 for publishing and subscribing ('we recommend that you set the QoS level to 1')"
    if client is None or not sum(client.qos):
        return Finding(rule, title, UNKNOWN, expected, "no messages seen")
    q0, q1, q2 = client.qos
    total = q0 + q1 + q2
    observed = f"QoS 0: {q0}, QoS 1: {q1}, QoS 2: {q2} of {total} messages"
    if q0:
        return Finding(rule, title, FAIL, expected, observed + " (QoS 0 messages can be lost)")
    if q2:
        return Finding(rule, title, WARN, expected, observed + " (QoS 2 works but costs two extra packets)")
    return Finding(rule, title, PASS, expected, observed)


def _valid_values(gw: Any) -> Finding:
    rule, title = "valid-messages", "Messages and values are valid for the product model"
    expected = "Envelopes with t, request_id and param; values of the data point's type, range and step."
    if gw is None:
        return Finding(rule, title, UNKNOWN, expected, "no messages seen")
    total = sum(gw.codes["report"].values()) + sum(gw.codes["sync"].values())
    if not total:
        return Finding(rule, title, UNKNOWN, expected, "no sync or report messages seen")
    errors: dict[int, int] = {}
    for kind in ("sync", "report"):
        for code, n in gw.codes[kind].items():
            if code not in (0, 2003):  # 2003 has its own rule
                errors[code] = errors.get(code, 0) + n
    if not errors:
        return Finding(rule, title, PASS, expected, f"all {total} sync and report messages accepted")
    bad = sum(errors.values())
    detail = ", ".join(f"{code} {MESSAGES.get(code, '')!r}: {n}" for code, n in sorted(errors.items()))
    verdict = FAIL if bad * 100 >= total else WARN
    return Finding(
        rule, title, verdict, expected, f"{bad} of {total} messages refused ({_pct(bad, total)}): {detail}"
    )


def _request_ids(gw: Any) -> Finding:
    rule, title = "request-id-unique", "Each report has its own request_id"
    expected = (
        "A new request_id for every new report; the same one only when the same report is sent again "
        "(a QoS 1 redelivery is answered again and stored once)."
    )
    reports = sum(gw.codes["report"].values()) if gw is not None else 0
    if not reports:
        return Finding(rule, title, UNKNOWN, expected, "no property reports seen yet")
    reused = gw.request_id_reused
    if reused:
        return Finding(
            rule,
            title,
            WARN,
            expected,
            f"{reused} of {reports} reports reused a recent request_id for other content (stored as new "
            "reports; a gateway that restarts its request counter does this)",
        )
    return Finding(
        rule, title, PASS, expected, f"no request_id reused for other content in {reports} reports"
    )


def _commands(gw: Any) -> Finding:
    rule, title = "answers-commands", "Commands are answered, and quickly"
    expected = "Return the execution result on commands/response with the command's request_id, in time."
    sent = gw.commands["sent"] if gw is not None else 0
    if not sent:
        return Finding(rule, title, UNKNOWN, expected, "no command was sent to this gateway yet")
    timeouts = gw.commands["timeout"]
    lat = sorted(gw.command_latencies)
    speed = (
        f"; answer time median {1000 * statistics.median(lat):.0f} ms, max {1000 * lat[-1]:.0f} ms"
        if lat
        else ""
    )
    observed = (
        f"{sent} commands: {gw.commands['ok']} succeeded, {gw.commands['failed']} failed on the device, "
        f"{timeouts} unanswered in time ({gw.commands['late_answer']} answered late){speed}"
    )
    if timeouts:
        return Finding(rule, title, FAIL, expected, observed)
    if lat and lat[-1] > 2.0:
        return Finding(rule, title, WARN, expected, observed + " (slower than 2 s)")
    return Finding(rule, title, PASS, expected, observed)


def _subscriptions(mqtt: Any, gateway_id: str, stored: list[str] | None = None) -> Finding:
    """From the session on this node, else (the gateway held by another node) the filters that
    node stored at its last flush."""
    rule, title = "subscribes-downlink", "Downlink topics are subscribed"
    expected = (
        "After connecting, subscribe to gateway_id/{gateway_id}/commands and the /response topics, "
        "'otherwise the device will not be able to receive the command or response'."
    )
    session = mqtt.sessions.get(gateway_id) if mqtt is not None else None
    if session is not None:
        filters_of = list(session.subscriptions)
    elif stored is not None:
        filters_of = list(stored)
    else:
        return Finding(rule, title, UNKNOWN, expected, "no session (not connected)")
    needed = {
        f"gateway_id/{gateway_id}/commands": "commands",
        f"gateway_id/{gateway_id}/devices/sync/response": "devices/sync/response",
        f"gateway_id/{gateway_id}/properties/report/response": "properties/report/response",
    }
    missing = [name for topic, name in needed.items() if not any(matches(f, topic) for f in filters_of)]
    filters = ", ".join(sorted(filters_of)) or "none"
    if "commands" in missing:
        return Finding(
            rule, title, FAIL, expected, f"subscribed to: {filters}; missing: {', '.join(missing)}"
        )
    if missing:
        return Finding(
            rule, title, WARN, expected, f"subscribed to: {filters}; missing: {', '.join(missing)}"
        )
    return Finding(rule, title, PASS, expected, f"subscribed to: {filters}")


def _topics(client: Any, gw: Any) -> Finding:
    rule, title = "topics", "Only the document's topics are used"
    expected = (
        "Publish only to gateway_id/{own id}/devices/sync, properties/report, devices/status, "
        "commands/response."
    )
    refused = client.acl_rejected if client is not None else 0
    unknown = gw.unknown_topic if gw is not None else 0
    if refused or unknown:
        return Finding(
            rule,
            title,
            FAIL,
            expected,
            f"{refused} messages to other gateways' or foreign topics, {unknown} to unknown topics",
        )
    return Finding(rule, title, PASS, expected, "no message on a foreign or unknown topic")


def _keepalive(client: Any) -> Finding:
    rule, title = "keep-alive", "A sane keep-alive"
    expected = "A keep-alive between 10 and 300 s (the document's samples use 20 and 60 s), kept by pings."
    if client is None:
        return Finding(rule, title, UNKNOWN, expected, "never connected")
    ka = client.keepalive
    observed = f"keep-alive {ka} s; {client.keepalive_expired} connections closed for silence"
    if client.keepalive_expired:
        return Finding(rule, title, FAIL, expected, observed)
    if ka == 0 or ka < 10 or ka > 300:
        return Finding(
            rule,
            title,
            WARN,
            expected,
            observed + (" (0 disables dead-connection detection)" if ka == 0 else ""),
        )
    return Finding(rule, title, PASS, expected, observed)


def _reconnects(client: Any) -> Finding:
    rule, title = "reconnect-politely", "Reconnects are polite"
    expected = (
        "Reconnect with a growing delay after a drop; never hammer the server, and do not keep retrying "
        "refused credentials."
    )
    if client is None or not client.connects:
        return Finding(rule, title, UNKNOWN, expected, "never connected")
    now = time.time()
    recent = [(t, code) for t, code in client.connects if now - t < 600]
    refused = sum(1 for _, code in recent if code != 0)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(recent)]
    fast = sum(1 for g in gaps if g < 1.0)
    observed = (
        f"{len(recent)} connects in the last 10 minutes ({refused} refused), {fast} less than 1 s apart"
    )
    if fast >= 3 or refused >= 5:
        return Finding(rule, title, FAIL, expected, observed)
    if fast or len(recent) > 10:
        return Finding(rule, title, WARN, expected, observed)
    return Finding(rule, title, PASS, expected, observed)
