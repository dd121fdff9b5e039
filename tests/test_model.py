"""meterhub.model: the smart meter model against the document, value checks per type, model loading."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterhub.model import (
    DataPoint,
    ModelError,
    ModelRegistry,
    ProductModel,
    ValueRejected,
    builtin_model,
    builtin_model_names,
    decode_binary_string,
    decode_phase_bytes,
    encode_phase_bytes,
    load_model,
    parse_model,
)
from meterhub.protocol import ErrorCode

RANGE, NULL, TYPE, NOT_SUPPORTED = 1101, 1102, 1103, 2002

ALL_IDS = [1, 2, 3, *range(5, 22), *range(30, 60)]

# The document's table, transcribed independently of the JSON file:
# id | code | access | type [| min | max | step | scale | unit | display unit]   ("-" = none)
DOCUMENT_TABLE = """
1 | switch | rw | bool
2 | breaker_id | ro | string
3 | power_current | ro | value | 0 | 1000000000 | 1 | 4 | W | -
5 | voltage_current | rw | value | 0 | 1000000000 | 1 | 4 | V | -
6 | current_max | rw | value | 0 | 1000000000 | 1 | 4 | A | -
7 | cur_current | ro | value | 0 | 1000000000 | 1 | 4 | mA | -
8 | device_info | rw | raw
9 | status_query | rw | raw
10 | temp_current | ro | value | -100 | 1000000000 | 1 | 2 | °C | -
11 | voltage_under | rw | value | 0 | 1000000000 | 1 | 4 | V | -
12 | voltage_over | rw | value | 0 | 1000000000 | 1 | 4 | V | -
13 | leakage_warn_value | rw | value | 0 | 1000000000 | 1 | 4 | mA | -
14 | leakage_fault_value | rw | value | 0 | 1000000000 | 1 | 4 | mA | -
15 | leakage_current | rw | value | 0 | 1000000000 | 1 | 4 | mA | -
16 | leakage_protection | ro | enum
17 | switch_enabled | rw | bool
18 | over_current_duration | rw | value | 0 | 1000000000 | 1 | 2 | second (s) | s
19 | fault | ro | fault
20 | alarm_level | ro | enum
21 | device_alarm | ro | string
30 | phase_a | ro | raw
31 | phase_b | ro | raw
32 | phase_c | ro | raw
33 | leakage_action_value | rw | value | 0 | 1000000000 | 1 | 4 | - | -
34 | over_temp_value | rw | value | -100 | 1000000000 | 1 | 4 | - | -
35 | over_vol_protect_time | rw | value | 0 | 1000000000 | 1 | 4 | min | -
36 | over_vol_recovery_time | rw | value | 0 | 1000000000 | 1 | 4 | min | -
37 | power_effective | rw | value | 0 | 1000000000 | 1 | 4 | W | -
38 | power_reactive | rw | value | 0 | 1000000000 | 1 | 4 | W | -
39 | daily_energy | rw | raw
40 | power_factor | rw | value | 0 | 1000000000 | 1 | 4 | - | -
41 | supply_frequency | rw | value | 0 | 1000000000 | 1 | 4 | - | -
42 | switch_times | ro | value | 0 | 1000000000 | 1 | 0 | - | -
43 | short_times | ro | value | 0 | 1000000000 | 1 | 0 | - | -
44 | electric_total | rw | value | 0 | 1000000000 | 1 | 4 | kW·h | kWh
45 | electric_daily | rw | value | 0 | 1000000000 | 1 | 4 | kW·h | kWh
46 | electric_month | rw | value | 0 | 1000000000 | 1 | 4 | kW·h | kWh
47 | residual_electricity | rw | value | 0 | 1000000000 | 1 | 4 | kW·h | kWh
48 | power_limit | rw | value | 0 | 1000000000 | 1 | 4 | W | -
49 | electric_warm_value | rw | value | 0 | 1000000000 | 1 | 4 | kW | kWh
50 | forward_energy_total | ro | value | 0 | 999999999 | 1 | 4 | kW | kWh
51 | energy_reactive | ro | value | 0 | 999999999 | 1 | 4 | kW | kWh
52 | power_apparent | ro | value | 0 | 999999999 | 1 | 4 | kV | kVA
53 | cold_stall_userdata | ro | value | 0 | 999999999 | 1 | 4 | - | -
54 | cold_stall_type | rw | enum
55 | hot_stall_userdata | ro | value | 0 | 999999999 | 1 | 4 | - | -
56 | hot_stall_type | rw | enum
57 | switch_state | rw | bool
58 | d_end_time | ro | string
59 | m_end_time | ro | string
"""

FAULT_LABELS = [
    "short_circuit_alarm",
    "surge_alarm",
    "overload_alarm",
    "ov_vol",
    "undervoltage_alarm",
    "temp_dif_fault",
    "leakagecurr_alarm",
    "self_test_alarm",
    "fire_alarm",
    "high_power_alarm",
    "ov_cr",
    "outage_alarm",
    "magnetism_alarm",
    "credit_alarm",
]
STALL_LABELS = ["square_area", "ignore", "consumption", "proportion", "lease", "power"]
PHASE_B64 = "CIsAK8MACWo="
PHASE_HEX = "088b002bc300096a"
PHASE_VALUE = {"voltage": 218.7, "current": 11.203, "power": 2410.0, "electricity": None}

SPEC_FILE = Path("/work/shared/spec/edge-gateway-smart-meter.txt")


@pytest.fixture(scope="module")
def model() -> ProductModel:
    return builtin_model()


def dp(model: ProductModel, dp_id: int) -> DataPoint:
    found = model.get(str(dp_id))
    assert found is not None
    return found


def rejected(func: Any, value: Any) -> int:
    with pytest.raises(ValueRejected) as info:
        func(value)
    return int(info.value.code)


# ------------------------------------------------------------------------------------ the transcription


def test_every_data_point_present(model: ProductModel) -> None:
    assert len(ALL_IDS) == 50
    assert list(model.ids) == ALL_IDS
    assert len(model) == 50
    assert [d.id for d in model] == ALL_IDS
    assert model.model == "smart-meter"
    assert model.name and model.version


def test_builtin_model_is_cached_and_listed() -> None:
    assert builtin_model() is builtin_model("smart-meter")
    assert "smart-meter" in builtin_model_names()
    with pytest.raises(KeyError):
        builtin_model("no-such-model")


@pytest.mark.parametrize("row", [r for r in DOCUMENT_TABLE.strip().splitlines()], ids=lambda r: r.split()[0])
def test_data_point_matches_document(model: ProductModel, row: str) -> None:
    cells = [c.strip() for c in row.split("|")]
    dp_id, code, access, dp_type = int(cells[0]), cells[1], cells[2], cells[3]
    point = dp(model, dp_id)
    assert (point.id, point.id_str, point.code, point.access, point.type) == (
        dp_id,
        str(dp_id),
        code,
        access,
        dp_type,
    )
    assert point.writable is (access == "rw")
    assert model.by_code(code) is point
    assert model.get(dp_id) is point
    if dp_type == "value":
        lo, hi, step, scale = map(int, cells[4:8])
        unit = None if cells[8] == "-" else cells[8]
        display = unit if cells[9] == "-" else cells[9]
        assert (point.min, point.max, point.step, point.scale) == (lo, hi, step, scale)
        assert point.unit == unit
        assert point.display_unit == display


def test_sample_data_points_field_by_field(model: ProductModel) -> None:
    temp = dp(model, 10)
    assert (temp.code, temp.name, temp.min, temp.max, temp.scale, temp.unit) == (
        "temp_current",
        "Actual temperature",
        -100,
        1_000_000_000,
        2,
        "°C",
    )
    assert temp.access == "ro"
    total = dp(model, 44)
    assert (total.code, total.scale, total.unit, total.display_unit) == ("electric_total", 4, "kW·h", "kWh")
    assert dp(model, 50).unit == "kW" and dp(model, 50).display_unit == "kWh"
    assert dp(model, 52).unit == "kV" and dp(model, 52).display_unit == "kVA"
    assert dp(model, 18).unit == "second (s)" and dp(model, 18).display_unit == "s"
    assert dp(model, 33).unit is None and dp(model, 33).display_unit is None
    assert dp(model, 3).display_unit == "W"
    fault = dp(model, 19)
    assert fault.type == "fault" and len(fault.labels) == 14
    assert list(fault.labels) == FAULT_LABELS
    assert fault.label_descriptions[0] == "short circuit alarm"
    assert fault.label_descriptions[13] == "insufficient balance alarm"
    assert list(dp(model, 54).labels) == STALL_LABELS
    assert list(dp(model, 56).labels) == STALL_LABELS
    assert dp(model, 54).label_descriptions[0] == "the area in square meters"
    assert list(dp(model, 16).labels) == [
        "no_leak_pro_without_value",
        "no_leak_pro_with_value",
        "leak_pro_with_value",
    ]
    assert list(dp(model, 20).labels) == ["general", "serious", "urgent"]
    for phase in (30, 31, 32):
        assert dp(model, phase).type == "raw" and dp(model, phase).layout == "phase"
    for raw in (8, 9, 39):
        assert dp(model, raw).type == "raw" and dp(model, raw).layout is None


@pytest.mark.skipif(not SPEC_FILE.exists(), reason="protocol document not available")
def test_model_against_document_text(model: ProductModel) -> None:
    """Every DP header line of the document agrees with the model (id, name, code, access, type)."""
    text = SPEC_FILE.read_text(encoding="utf-8")
    head = re.compile(
        r"^(\d+) (.+?) ([a-z_]+) (Send and report \(read-write\)|Report only \(read-only\)) "
        r"(bool|value|enum|string|raw|fault)\b",
        re.M,
    )
    rows = head.findall(text)
    assert [int(r[0]) for r in rows] == ALL_IDS
    for dp_id, name, code, access, dp_type in rows:
        point = dp(model, int(dp_id))
        assert (point.name, point.code, point.type) == (name, code, dp_type)
        assert point.access == ("rw" if access.startswith("Send") else "ro")


def test_model_file_round_trips(model: ProductModel) -> None:
    again = parse_model(msgspec.json.encode(model.to_dict()), "again")
    assert again.to_dict() == {**model.to_dict(), "source": "again"}


# ------------------------------------------------------------------------------------ value


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (123456, 123456), ("12345", 12345), ("-5", -5), (-100, -100), (5.0, 5), ("5.0", 5), ("007", 7)],
)
def test_value_accepted(model: ProductModel, value: Any, expected: int) -> None:
    result = dp(model, 10).coerce(value)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (-101, RANGE),
        (1_000_000_001, RANGE),
        ("-101", RANGE),
        ("9" * 5000, RANGE),
        (5.5, TYPE),
        ("5.5", TYPE),
        ("1e3", TYPE),
        ("+5", TYPE),
        (" 5", TYPE),
        ("", TYPE),
        ("abc", TYPE),
        ("١٢", TYPE),
        (True, TYPE),
        (False, TYPE),
        ([1], TYPE),
        ({"v": 1}, TYPE),
        (float("nan"), TYPE),
        (float("inf"), TYPE),
        (None, NULL),
    ],
)
def test_value_rejected(model: ProductModel, value: Any, code: int) -> None:
    assert rejected(dp(model, 10).coerce, value) == code


def test_huge_integers(model: ProductModel) -> None:
    huge = 10**5000  # more digits than Python will print: error messages must not crash
    assert rejected(dp(model, 10).coerce, huge) == RANGE
    assert rejected(dp(model, 10).coerce, -huge) == RANGE
    assert rejected(dp(model, 19).coerce, huge) == RANGE
    assert rejected(dp(model, 1).coerce, huge) == TYPE
    assert rejected(dp(model, 30).coerce, {"voltage": huge, "current": 1, "power": 1}) == RANGE
    assert rejected(dp(model, 10).coerce, 1e300) == RANGE


def test_value_step() -> None:
    point = DataPoint(1, "level", "Level", "rw", "value", min=-3, max=100, step=5)
    assert point.coerce(-3) == -3 and point.coerce(2) == 2 and point.coerce(97) == 97
    assert rejected(point.coerce, 96) == RANGE
    assert rejected(point.coerce, 0) == RANGE  # 0 - (-3) is not a multiple of 5
    assert rejected(point.coerce, 102) == RANGE  # a multiple, but above max


def test_scaled(model: ProductModel) -> None:
    assert dp(model, 44).scaled(123456) == 12.3456
    assert dp(model, 10).scaled(-100) == -1.0
    assert dp(model, 10).scaled(2345) == 23.45
    count = dp(model, 42).scaled(17)
    assert count == 17 and type(count) is int


# ------------------------------------------------------------------------------------ bool / enum / string


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("false", False),
        (1, True),
        (0, False),
        ("1", True),
        ("0", False),
    ],
)
def test_bool_accepted(model: ProductModel, value: Any, expected: bool) -> None:
    assert dp(model, 1).coerce(value) is expected


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (2, TYPE),
        (-1, TYPE),
        ("yes", TYPE),
        ("True", TYPE),
        ("run", TYPE),
        (1.0, TYPE),
        ([], TYPE),
        (None, NULL),
    ],
)
def test_bool_rejected(model: ProductModel, value: Any, code: int) -> None:
    assert rejected(dp(model, 1).coerce, value) == code


def test_enum(model: ProductModel) -> None:
    point = dp(model, 54)
    for label in STALL_LABELS:
        assert point.coerce(label) == label
    assert rejected(point.coerce, "Power") == RANGE
    assert rejected(point.coerce, "unknown") == RANGE
    assert rejected(point.coerce, 1) == TYPE
    assert rejected(point.coerce, ["power"]) == TYPE
    assert rejected(point.coerce, None) == NULL


def test_string(model: ProductModel) -> None:
    point = dp(model, 2)
    assert point.coerce("") == ""
    assert point.coerce("x" * 255) == "x" * 255
    assert rejected(point.coerce, "x" * 256) == RANGE
    assert rejected(point.coerce, 12) == TYPE
    assert rejected(point.coerce, {"a": 1}) == TYPE
    assert rejected(point.coerce, None) == NULL


def test_string_and_raw_values_follow_the_text_rule(model: ProductModel) -> None:
    """NUL (PostgreSQL refuses it), other control characters and lone surrogates (not encodable):
    1101 for every database alike; tab, LF and CR are text. Commands go through the same check."""
    string, raw = dp(model, 2), dp(model, 39)
    for bad in ("a\x00b", "\ud800", "esc\x1b[0m", "\x7f", "\x9b"):
        assert rejected(string.coerce, bad) == RANGE, repr(bad)
        assert rejected(raw.coerce, {"note": bad}) == RANGE, repr(bad)
        assert rejected(raw.coerce, {bad: 1}) == RANGE, repr(bad)
        assert rejected(raw.coerce, {"days": [{"x": [bad]}]}) == RANGE, repr(bad)
    assert string.coerce("two\nlines\tand\r\n") == "two\nlines\tand\r\n"
    assert raw.coerce({"note": "a\nb", "n": [1, "ü"]}) == {"note": "a\nb", "n": [1, "ü"]}


# ------------------------------------------------------------------------------------ phase


def test_phase_binary_forms(model: ProductModel) -> None:
    assert base64.b64decode(PHASE_B64).hex() == PHASE_HEX
    for dp_id in (30, 31, 32):
        point = dp(model, dp_id)
        assert point.coerce(PHASE_B64) == PHASE_VALUE
        assert point.coerce(PHASE_HEX) == PHASE_VALUE
        assert point.coerce(PHASE_HEX.upper()) == PHASE_VALUE
        assert point.coerce(PHASE_B64.rstrip("=")) == PHASE_VALUE  # unpadded base64


def test_phase_object_equals_binary(model: ProductModel) -> None:
    point = dp(model, 30)
    from_object = point.coerce({"voltage": "218.7", "current": "11.203", "power": "2410"})
    assert from_object == point.coerce(PHASE_B64) == PHASE_VALUE
    assert point.coerce({"voltage": 218.7, "current": 11.203, "power": 2410}) == PHASE_VALUE
    assert (
        point.coerce({"voltage": 218.7, "current": 11.203, "power": 2410, "electricity": ""}) == PHASE_VALUE
    )
    with_energy = point.coerce({"voltage": "230", "current": "0.5", "power": "115", "electricity": "12.34"})
    assert with_energy == {"voltage": 230.0, "current": 0.5, "power": 115.0, "electricity": 12.34}
    # float noise is rounded away
    noisy = point.coerce({"voltage": 218.70000000000002, "current": 11.2030000001, "power": 2410})
    assert noisy == PHASE_VALUE
    # extra keys are ignored
    assert point.coerce({"voltage": "218.7", "current": "11.203", "power": "2410", "x": 1}) == PHASE_VALUE


def test_phase_round_trip_helpers() -> None:
    data = encode_phase_bytes(218.7, 11.203, 2410)
    assert data.hex() == PHASE_HEX
    assert decode_phase_bytes(data) == PHASE_VALUE
    with pytest.raises(OverflowError):
        encode_phase_bytes(7000, 0, 0)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("CIsAK8MACQ==", RANGE),  # 7 bytes
        ("088b002bc300096a00", RANGE),  # 9 bytes of hex
        ("", RANGE),
        ("not base64!", TYPE),
        ("ÿÿÿÿ", TYPE),
        ({"current": "1", "power": "1"}, RANGE),
        ({"voltage": "1", "power": "1"}, RANGE),
        ({"voltage": "1", "current": "1"}, RANGE),
        ({"voltage": "", "current": "1", "power": "1"}, RANGE),
        ({"voltage": None, "current": "1", "power": "1"}, NULL),
        ({"voltage": "abc", "current": "1", "power": "1"}, TYPE),
        ({"voltage": "1e3", "current": "1", "power": "1"}, TYPE),
        ({"voltage": True, "current": "1", "power": "1"}, TYPE),
        ({"voltage": [1], "current": "1", "power": "1"}, TYPE),
        ({"voltage": "-1", "current": "1", "power": "1"}, RANGE),
        ({"voltage": 1, "current": 1, "power": float("inf")}, RANGE),
        ({"voltage": 1, "current": 1, "power": 10**400}, RANGE),
        ({"voltage": 1, "current": 1, "power": 1, "electricity": "x"}, TYPE),
        (12, TYPE),
        ([1, 2], TYPE),
        (None, NULL),
    ],
)
def test_phase_rejected(model: ProductModel, value: Any, code: int) -> None:
    assert rejected(dp(model, 31).coerce, value) == code


def test_phase_missing_key_is_named(model: ProductModel) -> None:
    with pytest.raises(ValueRejected, match="current"):
        dp(model, 30).coerce({"voltage": "1", "power": "1"})


# ------------------------------------------------------------------------------------ raw


def test_raw_forms(model: ProductModel) -> None:
    point = dp(model, 39)
    obj = {"day": "2024-01-01", "kwh": [1, 2, 3]}
    assert point.coerce(obj) is obj
    assert point.coerce("0A0b") == {"hex": "0a0b"}
    assert point.coerce(PHASE_B64) == {"hex": PHASE_HEX}
    assert point.coerce("AQID") == {"hex": "010203"}  # not hex (no: 'Q', 'I'): base64
    assert point.coerce("12345678") == {"hex": "12345678"}  # valid as both: hex wins
    assert point.coerce("abc") == {"hex": "69b7"}  # odd length: base64 (unpadded)
    assert point.coerce("") == {"hex": ""}
    assert point.coerce({"hex": "ABCD"}) == {"hex": "abcd"}
    assert point.to_wire(point.coerce("0A0b")) == "0a0b"
    assert point.to_wire(obj) is obj


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("00" * 4097, RANGE),
        (base64.b64encode(b"x" * 4097).decode(), RANGE),
        ({"blob": "x" * 5000}, RANGE),
        ("!!!", TYPE),
        ("ab cd", TYPE),
        ("é", TYPE),
        ({"hex": "zz"}, TYPE),
        ({"hex": "abc"}, TYPE),
        ({"hex": 12}, TYPE),
        ([1, 2], TYPE),
        (12, TYPE),
        (True, TYPE),
        (None, NULL),
    ],
)
def test_raw_rejected(model: ProductModel, value: Any, code: int) -> None:
    assert rejected(dp(model, 8).coerce, value) == code


def test_raw_size_limit_is_inclusive(model: ProductModel) -> None:
    assert dp(model, 8).coerce("00" * 4096) == {"hex": "00" * 4096}


def test_decode_binary_string() -> None:
    assert decode_binary_string("ff00") == b"\xff\x00"
    assert decode_binary_string("/w==") == b"\xff"
    with pytest.raises(ValueError):
        decode_binary_string("@@@@")
    with pytest.raises(OverflowError):
        decode_binary_string("00" * 9, max_bytes=8)


# ------------------------------------------------------------------------------------ fault


def test_fault(model: ProductModel) -> None:
    point = dp(model, 19)
    assert point.coerce(8193) == ["short_circuit_alarm", "credit_alarm"]
    assert point.coerce(0) == []
    assert point.coerce([]) == []
    assert point.coerce(1) == ["short_circuit_alarm"]
    assert point.coerce(2**14 - 1) == FAULT_LABELS
    assert point.coerce("8193") == ["short_circuit_alarm", "credit_alarm"]
    assert point.coerce(8193.0) == ["short_circuit_alarm", "credit_alarm"]
    assert point.coerce("ov_vol") == ["ov_vol"]
    assert point.coerce(["credit_alarm", "short_circuit_alarm", "credit_alarm"]) == [
        "short_circuit_alarm",
        "credit_alarm",
    ]
    for bit, label in enumerate(FAULT_LABELS):
        assert point.coerce(1 << bit) == [label]
        assert point.coerce(label) == [label]
    assert point.to_wire(["short_circuit_alarm", "credit_alarm"]) == 8193
    assert point.to_wire([]) == 0


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (2**14, RANGE),
        (-1, RANGE),
        ("-1", RANGE),
        ("fire", RANGE),
        (["ov_vol", "nope"], RANGE),
        ([1], TYPE),
        ([None], NULL),
        (1.5, TYPE),
        (True, TYPE),
        ({"ov_vol": True}, TYPE),
        (None, NULL),
    ],
)
def test_fault_rejected(model: ProductModel, value: Any, code: int) -> None:
    assert rejected(dp(model, 19).coerce, value) == code


# ------------------------------------------------------------------------------------ commands


def test_check_command_read_only(model: ProductModel) -> None:
    for point in model:
        if point.access == "ro":
            with pytest.raises(ValueRejected) as info:
                point.check_command("anything")
            assert info.value.code == NOT_SUPPORTED == ErrorCode.NOT_SUPPORTED


def test_check_command_and_wire_forms(model: ProductModel) -> None:
    assert dp(model, 1).check_command("1") is True
    assert dp(model, 1).to_wire(True) is True
    assert dp(model, 44).check_command("123456") == 123456
    assert dp(model, 44).to_wire(123456) == 123456
    assert dp(model, 54).to_wire(dp(model, 54).check_command("lease")) == "lease"
    assert dp(model, 9).to_wire(dp(model, 9).check_command("AQID")) == "010203"
    assert dp(model, 8).to_wire(dp(model, 8).check_command({"fw": "1.2"})) == {"fw": "1.2"}
    assert rejected(dp(model, 44).check_command, -1) == RANGE
    assert dp(model, 30).to_wire(PHASE_VALUE) == {"voltage": 218.7, "current": 11.203, "power": 2410.0}


def test_model_validate_helpers(model: ProductModel) -> None:
    point, value = model.validate("44", "10")
    assert point.code == "electric_total" and value == 10
    assert rejected(lambda v: model.validate("4", v), 1) == NOT_SUPPORTED
    assert rejected(lambda v: model.validate("1", v), "run") == TYPE
    assert rejected(lambda v: model.validate_command("10", v), 1) == NOT_SUPPORTED
    assert rejected(lambda v: model.validate_command("99", v), 1) == NOT_SUPPORTED
    assert model.validate_command(1, "false")[1] is False
    assert model.get("4") is None and model.get("01") is None and model.by_code("nope") is None
    assert "44" in model and 44 in model and "4" not in model


# ------------------------------------------------------------------------------------ loading


WATER_METER = {
    "model": "water-meter",
    "name": "Water meter",
    "version": "0.1",
    "product_ids": ["pid-water-1"],
    "data_points": [
        {"id": 1, "code": "valve", "name": "Valve", "access": "rw", "type": "bool"},
        {
            "id": 2,
            "code": "volume",
            "name": "Volume",
            "access": "ro",
            "type": "value",
            "min": 0,
            "max": 99999,
            "step": 2,
            "scale": 3,
            "unit": "m³",
        },
        {"id": 3, "code": "state", "name": "State", "access": "ro", "type": "enum", "labels": ["ok", "leak"]},
        {"id": 4, "code": "alarm", "name": "Alarm", "access": "ro", "type": "fault", "labels": ["a", "b"]},
        {"id": 5, "code": "note", "name": "Note", "access": "rw", "type": "string", "max_length": 8},
        {"id": 6, "code": "blob", "name": "Blob", "access": "rw", "type": "raw", "max_length": 4},
    ],
}


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_load_second_model_from_directory(tmp_path: Path) -> None:
    write(tmp_path / "water.json", WATER_METER)
    (tmp_path / "notes.txt").write_text("ignored")
    registry = ModelRegistry(tmp_path)
    assert registry.names() == ["smart-meter", "water-meter"]
    assert len(registry) == 2 and "water-meter" in registry
    water = registry.get("water-meter")
    assert water is not None and registry.get("smart-meter") is builtin_model()
    assert registry.get("nope") is None
    assert registry.for_product("pid-water-1") is water
    assert registry.for_product("smart-meter") is builtin_model()
    assert registry.for_product("unknown") is None
    assert water.get("2").coerce(100) == 100
    assert rejected(water.get("2").coerce, 101) == RANGE  # step 2
    assert water.get("2").scaled(1500) == 1.5
    assert water.by_code("alarm").coerce(3) == ["a", "b"]
    assert rejected(water.by_code("alarm").coerce, 4) == RANGE
    assert rejected(water.by_code("note").coerce, "123456789") == RANGE
    assert rejected(water.by_code("blob").coerce, "0011223344") == RANGE
    assert load_model(tmp_path / "water.json").to_dict()["data_points"] == water.to_dict()["data_points"]
    assert [m.model for m in registry] == ["smart-meter", "water-meter"]


def test_registry_without_directory_and_override(tmp_path: Path) -> None:
    assert ModelRegistry().names() == ["smart-meter"]
    assert ModelRegistry(include_builtin=False).names() == []
    patched = builtin_model().to_dict()
    patched["version"] = "1.0-patched"
    write(tmp_path / "meter.json", patched)
    registry = ModelRegistry(tmp_path)
    assert registry.get("smart-meter").version == "1.0-patched"


def test_registry_duplicate_names(tmp_path: Path) -> None:
    write(tmp_path / "a.json", WATER_METER)
    write(tmp_path / "b.json", WATER_METER)
    with pytest.raises(ModelError) as info:
        ModelRegistry(tmp_path)
    assert "b.json" in str(info.value) and "a.json" in str(info.value)


def test_registry_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a directory"):
        ModelRegistry(tmp_path / "missing")


def _with_dp(change: dict[str, Any], index: int = 1, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    doc = json.loads(json.dumps(WATER_METER))
    doc["data_points"][index].update(change)
    for key in drop:
        del doc["data_points"][index][key]
    return doc


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", None),
        ("[]", None),
        ({**WATER_METER, "data_points": []}, "data_points"),
        ({k: v for k, v in WATER_METER.items() if k != "version"}, None),
        ({**WATER_METER, "model": "bad/name"}, "model"),
        ({**WATER_METER, "colour": "red"}, None),
        (_with_dp({"min": "0"}), "data_points[1].min"),
        (_with_dp({"min": 1.5}), "data_points[1].min"),
        (_with_dp({"min": 10, "max": 5}), "data_points[1].max"),
        (_with_dp({"step": 0}), "data_points[1].step"),
        (_with_dp({"scale": -1}), "data_points[1].scale"),
        (_with_dp({}, drop=("max",)), "data_points[1].max"),
        (_with_dp({"type": "number"}), "data_points[1].type"),
        (_with_dp({"access": "rx"}), "data_points[1].access"),
        (_with_dp({"uint": "W"}), "data_points[1]"),
        (_with_dp({"labels": ["a"]}), "data_points[1].labels"),
        (_with_dp({"id": 1}), "data_points[1].id"),
        (_with_dp({"id": 0}), "data_points[1].id"),
        (_with_dp({"code": "valve"}), "data_points[1].code"),
        (_with_dp({"code": "not valid"}), "data_points[1].code"),
        (_with_dp({"labels": []}, index=2), "data_points[2].labels"),
        (_with_dp({"labels": ["ok", "ok"]}, index=2), "data_points[2].labels[1]"),
        (_with_dp({"layout": "triangle"}, index=5), "data_points[5].layout"),
        (_with_dp({"layout": "phase"}, index=5), "data_points[5].max_length"),
    ],
)
def test_bad_model_files(tmp_path: Path, content: Any, field: str | None) -> None:
    path = write(tmp_path / "broken.json", content)
    with pytest.raises(ModelError) as info:
        load_model(path)
    err = info.value
    assert err.source == str(path)
    assert str(path) in str(err)
    if field is not None:
        assert err.field is not None and err.field.startswith(field), err
        assert field in str(err)
    with pytest.raises(ModelError):
        ModelRegistry(tmp_path)


def test_unreadable_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        load_model(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------ fuzz

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "0", "1", "-5", "5.0", "true", "ov_vol", PHASE_B64, PHASE_HEX, "lease", "8193"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
PHASE_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "voltage": JSON_SCALARS,
        "current": JSON_SCALARS,
        "power": JSON_SCALARS,
        "electricity": JSON_SCALARS,
    },
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES | PHASE_OBJECTS)
def test_coerce_never_crashes(value: Any) -> None:
    for point in builtin_model():
        for check in (point.coerce, point.check_command):
            try:
                result = check(value)
            except ValueRejected as exc:
                assert exc.code in (RANGE, NULL, TYPE, NOT_SUPPORTED)
            else:
                # a canonical value is a fixed point of coerce
                assert point.coerce(point.to_wire(result)) == result


@settings(max_examples=200, deadline=None)
@given(
    voltage=st.integers(0, 65535),
    current=st.integers(0, 2**24 - 1),
    power=st.integers(0, 2**24 - 1),
)
def test_phase_forms_agree(voltage: int, current: int, power: int) -> None:
    data = voltage.to_bytes(2, "big") + current.to_bytes(3, "big") + power.to_bytes(3, "big")
    point = builtin_model().get("30")
    from_b64 = point.coerce(base64.b64encode(data).decode())
    from_hex = point.coerce(data.hex())
    from_object = point.coerce(
        {"voltage": f"{voltage / 10:.1f}", "current": f"{current / 1000:.3f}", "power": str(power)}
    )
    assert from_b64 == from_hex == from_object
    assert encode_phase_bytes(from_object["voltage"], from_object["current"], from_object["power"]) == data
