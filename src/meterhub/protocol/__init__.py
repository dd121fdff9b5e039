"""The edge protocol's message layer (sans-I/O): topics, error codes, uplink decoding, downlink encoding.

Nothing here touches sockets, clocks or storage: callers pass the payload bytes and ``now`` (Unix
seconds) and get a typed message back, or a ``ProtocolError`` whose ``code`` is the protocol's error code
and whose ``request_id``/``cid`` are set whenever they could be read (for the error response).

Envelope rules (CLARIFICATIONS.md), and the choices made where it is silent (marked *choice*):

- Checks run in the order JSON -> request_id -> t -> param -> fields; the first failure is reported.
- Payload not JSON, not a JSON object, or nested too deeply: 1103 with ``request_id`` None. *choice*: JSON
  that msgspec cannot hold (an integer of more than 4300 digits, a float beyond double range such as
  1e400, a lone surrogate escape ``"\ud800"``) is re-read with Python's ``json`` and checked like any
  message, so the answer keeps its request_id: such an integer counts as larger than every bound (``t``
  1001, ``param.id`` / a value 1101), 1e400 is not an integer (``t`` 1001, a value 1103).
- Strings (``meterhub.protocol.text``), the same for every database: *choice*: a control character
  (U+0000-U+001F, U+007F-U+009F) or a lone surrogate in request_id, cid, product_id, ``param.id`` or the
  short sync fields is 1101; in free text (device_name, device_desc, install_location, a string
  ``param.value`` of any data point) tab, LF and CR are allowed, the rest is 1101. An error answer
  echoes ``request_id`` only when it is valid (else null). A command response's ``msg`` is kept with
  such characters replaced by U+FFFD.
- ``request_id``: a string of 1-128 characters. Wrong JSON type 1103, null 1102. *choice*: missing is 1100
  (like any missing required field), and a string of the wrong length ("" or > 128) is 1101 (range), the
  same rule as string data points.
- ``t``: an integer (bool and floats, even 1627280000.0, are not); above 10**11 it is milliseconds.
  Missing, not an integer, more than 300 s in the future or more than 30 days old: 1001. Both bounds are
  inclusive (exactly now+300 s or now-30 days is accepted). Decoded ``t`` is float seconds.
- ``param``: missing, ``{}`` or ``[]``: 1100; *choice*: null is 1102; the wrong kind of container (an array
  for sync/report/command response, an object for status) or a scalar: 1103.
- Required fields inside ``param`` (cid, product_id, id, value, status): *choice*: missing 1100, null 1102,
  wrong JSON type 1103, wrong length 1101.
- ``cid``: a string of 1-128 characters (same codes as request_id). *choice*: it must also be usable as
  one path segment of the REST API: a ``/``, or a cid that is ``.`` or ``..``, is 1101 (in sync, report,
  status items and command responses alike).
- sync: *choice*: ``product_id`` must be a string of 0-128 characters — the document's own sample sends
  ``""``, so empty is accepted and left to the caller. Optional fields (vendor_code, comm_type, device_ip,
  mac_address, device_name, device_desc, install_location, device_server_id, product_sub_type) may be
  absent, null, or a string of at most 255 characters (1103 / 1101 otherwise); ``fields`` holds only the
  keys present (null -> None, "" kept), so a re-sync updates only what it sends. Unknown keys are ignored.
- report: ``param.id`` "1" or 1 -> "1" (*choice*: a string of 1-64 characters, or an integer
  0 <= id < 2**31; "01" is not normalised). ``value`` is returned unvalidated (the model checks it);
  null is 1102 here already.
- status: ``param`` must be a non-empty array; each item ``{cid, status}`` with status true/false
  (*choice*: also "true"/"false", 1/0, "1"/"0"). Invalid items are skipped and described in ``rejected``
  as ``"param[i]: <detail> (<code>)"``; the valid ones are returned in order (duplicates kept: the
  caller applies them in order, so the last one wins).
- command response: top-level ``cid`` required (same rules). *choice*: ``param`` {} / missing is 1100
  like every envelope; ``param.code`` missing **or null** is 0 (success), must otherwise be an integer
  fitting 32 bits (1103 / 1101); ``param.msg`` optional string (1103 otherwise), truncated to 1024
  characters. Errors carry request_id/cid so a pending command can still be resolved as failed.
- Responses: ``{"t": int(now), "request_id", "param": {"cid", "msg", "code"}}`` with ``msg`` the
  document's message for the code (``MESSAGES``). Commands: ``{"t", "cid", "request_id",
  "param": {"id": "<dp id as string>", "value"}}``.
- Topics: ``gateway_id/{gw}/<suffix>``; the gateway id is one non-empty level.
"""

from meterhub.protocol.errors import MESSAGES, ErrorCode, ProtocolError, message_for
from meterhub.protocol.messages import (
    SYNC_FIELDS,
    CommandResponse,
    ReportRequest,
    StatusRequest,
    SyncRequest,
    decode_command_response,
    decode_report,
    decode_status,
    decode_sync,
    encode_command,
    encode_command_response,
    encode_report,
    encode_response,
    encode_status,
    encode_sync,
)
from meterhub.protocol.topics import (
    Kind,
    commands_topic,
    gateway_prefix,
    parse_topic,
    response_topic,
    uplink_topic,
)

__all__ = [
    "MESSAGES",
    "SYNC_FIELDS",
    "CommandResponse",
    "ErrorCode",
    "Kind",
    "ProtocolError",
    "ReportRequest",
    "StatusRequest",
    "SyncRequest",
    "commands_topic",
    "decode_command_response",
    "decode_report",
    "decode_status",
    "decode_sync",
    "encode_command",
    "encode_command_response",
    "encode_report",
    "encode_response",
    "encode_status",
    "encode_sync",
    "gateway_prefix",
    "message_for",
    "parse_topic",
    "response_topic",
    "uplink_topic",
]
