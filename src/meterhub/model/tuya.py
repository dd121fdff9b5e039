"""Product models and Tuya's specifications, both ways (sans-I/O).

- :func:`spec_item` / :func:`specification`: a data point as Tuya's cloud API describes it (``type``
  Boolean, Integer, Enum, String, Raw or Bitmap, and ``values`` as a JSON *string*, as Tuya sends it:
  ``{"unit", "min", "max", "scale", "step"}`` for Integer, ``{"range"}`` for Enum, ``{"label",
  "maxlen"}`` for Bitmap, ``{"maxlen"}`` for String and Raw). Functions are the data points that can be
  commanded (``rw``, ``wo``), status the ones that are reported (``rw``, ``ro``).
- :func:`import_tuya_spec`: a :class:`ProductModel` from a specification a meter maker defined on
  Tuya's platform, in any of the JSON forms Tuya hands out:

  1. the thing model (``{"modelId", "services": [{"properties": [{"abilityId", "code", "name",
     "accessMode", "typeSpec": {"type": "bool"|"value"|"enum"|"bitmap"|"string"|"raw", ...}}]}]}``),
     also wrapped as the cloud API answers it (``{"result": {"model": "<that JSON as a string>"}}``);
  2. the data point schema (``[{"id", "code", "name", "mode": "rw"|"ro"|"wr", "property": {"type",
     ...}}]``), also as the ``schema`` string of a device's details;
  3. a device specification with data point ids (``{"category", "functions": [{"code", "dp_id",
     "type": "Boolean"|..., "values": "<JSON>"}], "status": [...]}``, bare or as ``{"result": ...}``):
     a code in both lists is ``rw``, in functions only ``wo``, in status only ``ro``.

  Tuya's ``bitmap`` becomes a ``fault`` data point (bit i = label i); a ``raw`` data point coded
  ``phase_a``/``phase_b``/``phase_c`` gets the smart meter's 8-byte phase layout. Struct, array and
  JSON data points have no meterhub equivalent and are refused (``ModelError`` naming the code).
"""

from __future__ import annotations

import json
from typing import Any

from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.errors import ModelError

__all__ = ["DEFAULT_CATEGORY", "functions", "import_tuya_spec", "spec_item", "specification"]

#: Tuya's category code for a smart electricity meter, used when a model names none.
DEFAULT_CATEGORY = "zndb"
_PHASE_CODES = frozenset({"phase_a", "phase_b", "phase_c"})
_TUYA_TYPE = {
    "bool": "Boolean",
    "value": "Integer",
    "enum": "Enum",
    "string": "String",
    "raw": "Raw",
    "fault": "Bitmap",
}
_FROM_SPEC_TYPE = {
    "boolean": "bool",
    "integer": "value",
    "enum": "enum",
    "string": "string",
    "raw": "raw",
    "bitmap": "bitmap",
}
_ACCESS = {"rw": "rw", "ro": "ro", "wr": "wo", "wo": "wo"}


def _compact(values: dict[str, Any]) -> str:
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


def _values(dp: DataPoint) -> dict[str, Any]:
    if dp.type == "value":
        unit = dp.display_unit or ""
        return {"unit": unit, "min": dp.min, "max": dp.max, "scale": dp.scale, "step": dp.step}
    if dp.type == "enum":
        return {"range": list(dp.labels)}
    if dp.type == "fault":
        return {"label": list(dp.labels), "maxlen": len(dp.labels)}
    if dp.type == "string":
        return {"maxlen": dp.max_length}
    if dp.type == "raw" and dp.layout is None:
        return {"maxlen": dp.max_length}
    return {}


def spec_item(dp: DataPoint, *, named: bool = False) -> dict[str, Any]:
    """``{"code", "dp_id", "type", "values"}`` (plus ``name`` and ``desc`` when ``named``)."""
    item: dict[str, Any] = {
        "code": dp.code,
        "dp_id": dp.id,
        "type": _TUYA_TYPE[dp.type],
        "values": _compact(_values(dp)),
    }
    if named:
        item["name"] = dp.name
        item["desc"] = dp.description or dp.name
    return item


def specification(model: ProductModel, *, named: bool = False) -> dict[str, Any]:
    """``{"category", "functions", "status"}`` of a model, as Tuya's specification answers."""
    return {
        "category": model.category or DEFAULT_CATEGORY,
        "functions": [spec_item(dp, named=named) for dp in model if dp.access in ("rw", "wo")],
        "status": [spec_item(dp, named=named) for dp in model if dp.access in ("rw", "ro")],
    }


def functions(model: ProductModel) -> dict[str, Any]:
    """``{"category", "functions"}``: the instruction set, with names (Tuya's functions answer)."""
    spec = specification(model, named=True)
    return {"category": spec["category"], "functions": spec["functions"]}


# --- import ----------------------------------------------------------------------------------------


def _decode(data: bytes | str | Any, source: str) -> Any:
    if not isinstance(data, (bytes, str)):
        return data
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ModelError(source, None, f"not JSON: {exc}") from None


def _entries(doc: Any, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``([{"id", "code", "name", "access", "spec", "description"}], {"category", "product_id"})``."""
    meta: dict[str, Any] = {}
    if isinstance(doc, dict) and "result" in doc and isinstance(doc["result"], (dict, list)):
        doc = doc["result"]
    if isinstance(doc, dict) and isinstance(doc.get("model"), str):
        doc = _decode(doc["model"], source)
    if isinstance(doc, dict) and isinstance(doc.get("schema"), str):
        meta["product_id"] = doc.get("product_id")
        meta["category"] = doc.get("category")
        doc = _decode(doc["schema"], source)
    if isinstance(doc, dict) and isinstance(doc.get("services"), list):
        meta.setdefault("product_id", doc.get("productKey") or doc.get("modelId"))
        out = []
        for s, service in enumerate(doc["services"]):
            props = service.get("properties", []) if isinstance(service, dict) else None
            if not isinstance(props, list):
                raise ModelError(source, f"services[{s}].properties", "must be a list")
            for p, prop in enumerate(props):
                where = f"services[{s}].properties[{p}]"
                if not isinstance(prop, dict):
                    raise ModelError(source, where, "must be an object")
                out.append(
                    {
                        "where": where,
                        "id": prop.get("abilityId"),
                        "code": prop.get("code"),
                        "name": prop.get("name"),
                        "access": prop.get("accessMode"),
                        "spec": prop.get("typeSpec"),
                        "description": prop.get("description"),
                    }
                )
        return out, meta
    if isinstance(doc, list):
        out = []
        for i, item in enumerate(doc):
            where = f"[{i}]"
            if not isinstance(item, dict):
                raise ModelError(source, where, "must be an object")
            out.append(
                {
                    "where": where,
                    "id": item.get("id"),
                    "code": item.get("code"),
                    "name": item.get("name"),
                    "access": item.get("mode"),
                    "spec": item.get("property"),
                    "description": item.get("desc"),
                }
            )
        return out, meta
    if isinstance(doc, dict) and ("functions" in doc or "status" in doc):
        meta["category"] = doc.get("category")
        return _from_specification(doc, source), meta
    raise ModelError(
        source, None, "not a Tuya specification (thing model, data point schema or device specification)"
    )


def _from_specification(doc: dict[str, Any], source: str) -> list[dict[str, Any]]:
    by_code: dict[str, dict[str, Any]] = {}
    for key in ("functions", "status"):
        items = doc.get(key) or []
        if not isinstance(items, list):
            raise ModelError(source, key, "must be a list")
        for i, item in enumerate(items):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise ModelError(source, where, "must be an object")
            code = item.get("code")
            if "dp_id" not in item:
                raise ModelError(source, f"{where}.dp_id", "missing: meterhub needs each data point's id")
            raw_values = item.get("values") or "{}"
            values = _decode(raw_values, source) if isinstance(raw_values, str) else raw_values
            if not isinstance(values, dict):
                raise ModelError(source, f"{where}.values", "must be a JSON object")
            kind = _FROM_SPEC_TYPE.get(str(item.get("type", "")).lower())
            if kind is None:
                raise ModelError(source, f"{where}.type", f"unsupported type {item.get('type')!r}")
            entry = by_code.get(code) if isinstance(code, str) else None
            if entry is None:
                entry = {
                    "where": where,
                    "id": item.get("dp_id"),
                    "code": code,
                    "name": item.get("name"),
                    "access": set(),
                    "spec": {**values, "type": kind},
                    "description": item.get("desc"),
                }
                by_code[code if isinstance(code, str) else where] = entry
            entry["access"].add(key)
    out = []
    for entry in by_code.values():
        access = entry["access"]
        entry["access"] = "rw" if len(access) == 2 else ("wo" if "functions" in access else "ro")
        out.append(entry)
    return out


def _data_point(entry: dict[str, Any], source: str) -> DataPoint:
    where, code, spec = entry["where"], entry["code"], entry["spec"]
    if not isinstance(spec, dict):
        raise ModelError(source, where, f"{code!r}: no type specification")
    access = _ACCESS.get(entry["access"]) if isinstance(entry["access"], str) else None
    if access is None:
        raise ModelError(source, where, f"{code!r}: unknown access mode {entry['access']!r}")
    dp_id = entry["id"]
    if isinstance(dp_id, str) and dp_id.isdigit():
        dp_id = int(dp_id)
    kind = spec.get("type")
    name = entry["name"] if isinstance(entry["name"], str) and entry["name"] else str(code)
    desc = entry["description"] if isinstance(entry["description"], str) and entry["description"] else None
    fields: dict[str, Any] = {}
    if kind == "bool":
        dp_type = "bool"
    elif kind == "value":
        dp_type = "value"
        unit = spec.get("unit")
        fields = {
            "min": spec.get("min"),
            "max": spec.get("max"),
            "step": spec.get("step"),
            "scale": spec.get("scale"),
            "unit": unit if isinstance(unit, str) and unit else None,
        }
    elif kind == "enum":
        dp_type = "enum"
        fields = {"labels": spec.get("range")}
    elif kind in ("bitmap", "fault"):
        dp_type = "fault"
        fields = {"labels": spec.get("label") or spec.get("labels")}
    elif kind == "string":
        dp_type = "string"
        fields = {"max_length": spec.get("maxlen")}
    elif kind == "raw":
        dp_type = "raw"
        phase = code in _PHASE_CODES
        fields = {"layout": "phase"} if phase else {"max_length": spec.get("maxlen")}
    else:
        raise ModelError(source, where, f"{code!r}: type {kind!r} has no meterhub equivalent")
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return DataPoint(dp_id, code, name, access, dp_type, description=desc, **fields)
    except ModelError as exc:
        field = f"{where}.{exc.field}" if exc.field else where
        raise ModelError(source, field, f"{exc.reason} (code {code!r})") from None


def import_tuya_spec(
    data: bytes | str | Any,
    *,
    model: str,
    name: str | None = None,
    version: str = "1.0",
    product_ids: list[str] | None = None,
    category: str | None = None,
    source: str = "<memory>",
) -> ProductModel:
    """A product model from Tuya's specification JSON (any of the forms in the module docstring).

    ``product_ids`` defaults to the file's product key, ``category`` to the file's, else ``zndb``.
    """
    entries, meta = _entries(_decode(data, source), source)
    if not entries:
        raise ModelError(source, None, "the specification lists no data points")
    data_points = [_data_point(entry, source) for entry in entries]
    pids = product_ids
    if pids is None:
        pid = meta.get("product_id")
        pids = [pid] if isinstance(pid, str) and pid else []
    cat = category or (meta.get("category") if isinstance(meta.get("category"), str) else None)
    try:
        return ProductModel(
            model,
            name or model,
            version,
            data_points,
            source=f"Tuya specification {source}",
            product_ids=pids,
            category=cat or DEFAULT_CATEGORY,
        )
    except ModelError as exc:
        raise ModelError(source, exc.field, exc.reason) from None
