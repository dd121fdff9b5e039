"""Product models as data: data points, their value checks, and the JSON model files (sans-I/O).

Model file format (``meterhub/model/data/smart-meter.json`` is the smart meter, transcribed from the
document's table; other products use the same format, one model per ``*.json`` file)::

    {
      "model": "smart-meter",            # registry name: letters, digits, ".", "_", "-"
      "name": "Smart electricity meter",  # human name
      "version": "1.0",
      "source": "...",                    # optional: where the model comes from
      "product_ids": ["..."],             # optional: product ids (sync's product_id) using this model
      "category": "zndb",                 # optional: Tuya's category code (zndb = smart electricity meter)
      "data_points": [
        {"id": 1, "code": "switch", "name": "Switch", "access": "rw", "type": "bool"},
        {"id": 10, "code": "temp_current", "name": "Actual temperature", "access": "ro", "type": "value",
         "min": -100, "max": 1000000000, "step": 1, "scale": 2, "unit": "°C"},
        {"id": 16, "code": "leakage_protection", ..., "type": "enum",
         "labels": [{"label": "no_leak_pro_without_value", "description": "..."}, ...]},
        {"id": 19, "code": "fault", ..., "type": "fault", "labels": ["short_circuit_alarm", ...]},
        {"id": 30, "code": "phase_a", ..., "type": "raw", "layout": "phase", "description": "..."}
      ]
    }

Data point fields: ``id`` (integer >= 1, unique), ``code`` (ASCII identifier, unique), ``name``,
``access`` ("rw" = "Send and report", "ro" = "Report only", "wo" = send only), ``type`` (bool, value,
enum, string, raw, fault), optional ``description``; and per type only:

- value: ``min``, ``max`` (required, raw integers), ``step`` (default 1), ``scale`` (default 0),
  ``unit`` (the document's unit string or null), ``display_unit`` (how to show the unit to people when
  the document's is odd: "kW" -> "kWh", "kV" -> "kVA", "kW·h" -> "kWh", "second (s)" -> "s");
- enum, fault: ``labels``, in order (fault: bit i is ``labels[i]``), each a string or
  ``{"label", "description"}``;
- string: ``max_length`` (characters, default 255);
- raw: ``layout`` ("phase" for the 8-byte phase_a/b/c layout) or ``max_length`` (bytes, default 4096).

Unknown fields, or fields that do not belong to the type, are errors (``ModelError`` names the file and
the field, e.g. ``data_points[3].min``), so typos are caught when the model loads.

Canonical values (what ``DataPoint.coerce`` returns and storage keeps), per CLARIFICATIONS.md. Where it
is silent, these choices were made:

- value: a raw int. Accepted: JSON integer; decimal integer string ("12345", "-5", ASCII digits, no "+",
  no spaces); **a float or string with a zero fraction (5.0, "5.0") is accepted as the int**; a fractional
  float/string, exponent forms, NaN/inf, and bool are 1103. A numeric string too long to parse is 1101.
- bool: True/False from true/false, "true"/"false", 1/0, "1"/"0" (case-sensitive); anything else 1103
  (so 2 and "yes" are 1103, not 1101).
- enum: a label, exactly (case-sensitive). string: at most 255 characters (1101 beyond), and no control
  character other than tab, LF and CR and no lone surrogate (1101; ``meterhub.protocol.text``).
- raw objects: every string in them (keys too) follows the same text rule (1101).
- raw, phase layout: ``{"voltage": V, "current": A, "power": W, "electricity": kWh | None}``, floats,
  voltage rounded to 0.1 V and current to 1 mA (the binary layout's precision), power to 3 decimals,
  electricity to 4. Binary forms: base64 of exactly 8 bytes, or 16 hex digits (other lengths: 1101).
  Object form in real units, numbers or decimal strings: ``voltage``/``current``/``power`` required
  (missing or "" -> 1101 naming the key; null -> 1102), ``electricity`` optional (missing/null/"" ->
  None), values must be finite and >= 0 (1101), other keys are ignored.
- raw, no layout: an object is stored as is (max 4096 bytes of compact JSON); a string is hex when it is
  even-length and all hex digits, else base64 (standard alphabet, padding optional); stored as
  ``{"hex": "<lowercase hex>"}``, max 4096 bytes decoded (1101), neither hex nor base64 is 1103; ""
  is empty raw data. An object that is exactly ``{"hex": <str>}`` is the binary form, validated as hex.
  Arrays are 1103.
- fault: the active labels in model order (a new list). Accepted: int bitmap 0 <= n < 2**len(labels),
  a zero-fraction float, a decimal string bitmap ("8193"), one label, or a list of labels (duplicates
  collapse); an unknown label or out-of-range bitmap is 1101, a non-string list item is 1103.
- ``to_wire`` (command values): value -> int, bool -> bool, enum/string -> str, fault -> int bitmap,
  raw -> the object, or the hex string for ``{"hex": ...}``, phase -> the object form without
  ``electricity`` when it is None.
- ``ProductModel.validate`` / ``validate_command`` raise ``ValueRejected(2002)`` for an unknown data
  point id; ``check_command`` raises 2002 for a report-only data point before looking at the value.
- ``ModelRegistry``: a directory model with the same ``model`` name as a builtin replaces it.
"""

from meterhub.model.coerce import (
    PHASE_BYTES,
    RAW_MAX_BYTES,
    STRING_MAX_LENGTH,
    decode_binary_string,
    decode_phase_bytes,
    encode_phase_bytes,
)
from meterhub.model.datapoint import ACCESS_MODES, DATA_TYPES, DataPoint, ProductModel
from meterhub.model.errors import ModelError, ValueRejected
from meterhub.model.loader import ModelRegistry, builtin_model, builtin_model_names, load_model, parse_model

__all__ = [
    "ACCESS_MODES",
    "DATA_TYPES",
    "PHASE_BYTES",
    "RAW_MAX_BYTES",
    "STRING_MAX_LENGTH",
    "DataPoint",
    "ModelError",
    "ModelRegistry",
    "ProductModel",
    "ValueRejected",
    "builtin_model",
    "builtin_model_names",
    "decode_binary_string",
    "decode_phase_bytes",
    "encode_phase_bytes",
    "load_model",
    "parse_model",
]
