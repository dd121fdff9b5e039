"""``DataPoint`` and ``ProductModel``: a product model in memory, with each data point's check compiled."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence
from typing import Any

from meterhub.model import coerce as _c
from meterhub.model.errors import ModelError, ValueRejected
from meterhub.protocol.errors import ErrorCode

__all__ = ["ACCESS_MODES", "DATA_TYPES", "LAYOUTS", "DataPoint", "ProductModel"]

DATA_TYPES = ("bool", "value", "enum", "string", "raw", "fault")
#: rw = "Send and report", ro = "Report only", wo = "Send only" (not used by the smart meter).
ACCESS_MODES = ("rw", "ro", "wo")
LAYOUTS = ("phase",)
#: The largest scale accepted (10**scale must stay an exact float divisor).
MAX_SCALE = 15
#: The most labels a fault bitmap may have.
MAX_FAULT_LABELS = 64

# Optional fields that only make sense for some types.
_TYPE_FIELDS: dict[str, frozenset[str]] = {
    "bool": frozenset(),
    "value": frozenset({"min", "max", "step", "scale", "unit", "display_unit"}),
    "enum": frozenset({"labels"}),
    "fault": frozenset({"labels"}),
    "string": frozenset({"max_length"}),
    "raw": frozenset({"layout", "max_length"}),
}


# ``type`` is shadowed by DataPoint's constructor parameter of the same name (the model file's key).
_typeof = builtins.type


def _identity(value: Any) -> Any:
    return value


class DataPoint:
    """One data point of a product model. Treat instances as read-only.

    ``coerce(value)`` is a pre-built closure for the data point's type: it returns the canonical value or
    raises ``ValueRejected`` (1101/1102/1103). ``to_wire(canonical)`` is the value to put in a command.
    """

    __slots__ = (
        "_divisor",
        "_explicit_display_unit",
        "access",
        "code",
        "coerce",
        "description",
        "display_unit",
        "id",
        "id_str",
        "label_descriptions",
        "labels",
        "layout",
        "max",
        "max_length",
        "min",
        "name",
        "scale",
        "step",
        "to_wire",
        "type",
        "unit",
        "writable",
    )

    id: int
    id_str: str
    code: str
    name: str
    access: str
    type: str
    writable: bool
    min: int | None
    max: int | None
    step: int | None
    scale: int
    unit: str | None
    display_unit: str | None
    labels: tuple[str, ...]
    label_descriptions: tuple[str | None, ...]
    layout: str | None
    max_length: int | None
    description: str | None
    coerce: _c.Coercer
    to_wire: _c.Coercer

    def __init__(
        self,
        id: int,
        code: str,
        name: str,
        access: str,
        type: str,
        *,
        min: int | None = None,
        max: int | None = None,
        step: int | None = None,
        scale: int | None = None,
        unit: str | None = None,
        display_unit: str | None = None,
        labels: Sequence[str] | None = None,
        label_descriptions: Sequence[str | None] | None = None,
        layout: str | None = None,
        max_length: int | None = None,
        description: str | None = None,
    ) -> None:
        where = f"data point {id!r}"

        def bad(field: str, reason: str) -> ModelError:
            return ModelError(where, field, reason)

        if _typeof(id) is not int or id < 1:
            raise bad("id", "must be an integer >= 1")
        if _typeof(code) is not str or not (code.isascii() and code.isidentifier()):
            raise bad("code", "must be an ASCII identifier (letters, digits, _)")
        if _typeof(name) is not str or not name:
            raise bad("name", "must be a non-empty string")
        if access not in ACCESS_MODES:
            raise bad("access", f"must be one of {list(ACCESS_MODES)}")
        if type not in DATA_TYPES:
            raise bad("type", f"must be one of {list(DATA_TYPES)}")
        given = {
            "min": min,
            "max": max,
            "step": step,
            "scale": scale,
            "unit": unit,
            "display_unit": display_unit,
            "labels": labels,
            "layout": layout,
            "max_length": max_length,
        }
        for field, field_value in given.items():
            if field_value is not None and field not in _TYPE_FIELDS[type]:
                raise bad(field, f"not allowed for type {type!r}")
        if label_descriptions is not None and labels is None:
            raise bad("label_descriptions", "given without labels")

        self.id = id
        self.id_str = str(id)
        self.code = code
        self.name = name
        self.access = access
        self.type = type
        self.writable = access != "ro"
        self.min = min
        self.max = max
        self.step = step
        self.scale = scale or 0
        self.unit = unit
        self._explicit_display_unit = display_unit
        self.display_unit = display_unit if display_unit is not None else unit
        self.labels = ()
        self.label_descriptions = ()
        self.layout = layout
        self.max_length = max_length
        self.description = description
        self._divisor = 1
        self.to_wire = _identity
        dp_name = f"{code} (dp {id})"

        if type == "value":
            if _typeof(min) is not int:
                raise bad("min", "required for type 'value': an integer")
            if _typeof(max) is not int:
                raise bad("max", "required for type 'value': an integer")
            if min > max:
                raise bad("max", f"must be >= min ({min})")
            if step is None:
                self.step = step = 1
            elif _typeof(step) is not int or step < 1:
                raise bad("step", "must be an integer >= 1")
            if _typeof(self.scale) is not int or not 0 <= self.scale <= MAX_SCALE:
                raise bad("scale", f"must be an integer in [0, {MAX_SCALE}]")
            for field in ("unit", "display_unit"):
                if given[field] is not None and _typeof(given[field]) is not str:
                    raise bad(field, "must be a string or null")
            self._divisor = 10**self.scale
            self.coerce = _c.value_coercer(dp_name, min, max, step)
        elif type == "bool":
            self.coerce = _c.bool_coercer(dp_name)
        elif type in ("enum", "fault"):
            if labels is None or isinstance(labels, str) or len(labels) == 0:
                raise bad("labels", f"required for type {type!r}: a non-empty list")
            labels = tuple(labels)
            for i, label in enumerate(labels):
                if _typeof(label) is not str or not label:
                    raise bad(f"labels[{i}]", "must be a non-empty string")
                if label in labels[:i]:
                    raise bad(f"labels[{i}]", f"duplicate label {label!r}")
            if type == "fault" and len(labels) > MAX_FAULT_LABELS:
                raise bad("labels", f"a fault bitmap has at most {MAX_FAULT_LABELS} labels")
            descriptions = tuple(label_descriptions) if label_descriptions is not None else ()
            if descriptions and len(descriptions) != len(labels):
                raise bad("label_descriptions", "must have one entry per label")
            self.labels = labels
            self.label_descriptions = descriptions or (None,) * len(labels)
            if type == "enum":
                self.coerce = _c.enum_coercer(dp_name, labels)
            else:
                self.coerce = _c.fault_coercer(dp_name, labels)
                self.to_wire = _c.fault_to_wire(labels)
        elif type == "string":
            if max_length is not None and (_typeof(max_length) is not int or max_length < 1):
                raise bad("max_length", "must be an integer >= 1")
            self.max_length = max_length or _c.STRING_MAX_LENGTH
            self.coerce = _c.string_coercer(dp_name, self.max_length)
        else:  # raw
            if layout is not None and layout not in LAYOUTS:
                raise bad("layout", f"must be one of {list(LAYOUTS)} or absent")
            if layout == "phase":
                if max_length is not None:
                    raise bad("max_length", "not allowed with layout 'phase'")
                self.coerce = _c.phase_coercer(dp_name)
                self.to_wire = _c.phase_to_wire
            else:
                if max_length is not None and (_typeof(max_length) is not int or max_length < 1):
                    raise bad("max_length", "must be an integer >= 1 (bytes)")
                self.max_length = max_length or _c.RAW_MAX_BYTES
                self.coerce = _c.raw_coercer(dp_name, self.max_length)
                self.to_wire = _c.raw_to_wire

    def check_command(self, value: Any) -> Any:
        """The canonical value for a command; ``ValueRejected(2002)`` for a read-only data point."""
        if not self.writable:
            raise ValueRejected(
                ErrorCode.NOT_SUPPORTED, f"{self.code} (dp {self.id}) is report-only and cannot be commanded"
            )
        return self.coerce(value)

    def scaled(self, raw: int) -> float | int:
        """A value data point's raw integer in real units: ``raw / 10**scale`` (``raw`` when scale is 0)."""
        if self.scale:
            return raw / self._divisor
        return raw

    def to_dict(self) -> dict[str, Any]:
        """This data point in the model file format."""
        out: dict[str, Any] = {
            "id": self.id,
            "code": self.code,
            "name": self.name,
            "access": self.access,
            "type": self.type,
        }
        if self.type == "value":
            out.update(min=self.min, max=self.max, step=self.step, scale=self.scale, unit=self.unit)
            if self._explicit_display_unit is not None:
                out["display_unit"] = self._explicit_display_unit
        elif self.type in ("enum", "fault"):
            out["labels"] = [
                {"label": label, "description": desc} if desc is not None else label
                for label, desc in zip(self.labels, self.label_descriptions, strict=True)
            ]
        elif self.type == "string":
            if self.max_length != _c.STRING_MAX_LENGTH:
                out["max_length"] = self.max_length
        elif self.type == "raw":
            if self.layout is not None:
                out["layout"] = self.layout
            elif self.max_length != _c.RAW_MAX_BYTES:
                out["max_length"] = self.max_length
        if self.description is not None:
            out["description"] = self.description
        return out

    def __repr__(self) -> str:
        return f"DataPoint(id={self.id}, code={self.code!r}, type={self.type!r}, access={self.access!r})"


class ProductModel:
    """A product model: its data points, looked up by id (``"1"`` or ``1``) or by code."""

    __slots__ = (
        "_by_code",
        "_by_id",
        "category",
        "data_points",
        "model",
        "name",
        "product_ids",
        "source",
        "version",
    )

    def __init__(
        self,
        model: str,
        name: str,
        version: str,
        data_points: Sequence[DataPoint],
        *,
        source: str | None = None,
        product_ids: Sequence[str] = (),
        category: str | None = None,
    ) -> None:
        where = f"model {model!r}"
        if type(model) is not str or not model or not all(ch.isalnum() or ch in "._-" for ch in model):
            raise ModelError(where, "model", "must be a non-empty name of letters, digits, '.', '_', '-'")
        if not data_points:
            raise ModelError(where, "data_points", "must list at least one data point")
        if category is not None and (
            type(category) is not str or not category or not category.isascii() or not category.isalnum()
        ):
            raise ModelError(where, "category", "must be a Tuya category code (ASCII letters and digits)")
        by_id: dict[str | int, DataPoint] = {}
        by_code: dict[str, DataPoint] = {}
        for i, dp in enumerate(data_points):
            if dp.id in by_id:
                raise ModelError(where, f"data_points[{i}].id", f"duplicate data point id {dp.id}")
            if dp.code in by_code:
                raise ModelError(where, f"data_points[{i}].code", f"duplicate data point code {dp.code!r}")
            by_id[dp.id] = dp
            by_id[dp.id_str] = dp
            by_code[dp.code] = dp
        self.model = model
        self.name = name
        self.version = version
        self.source = source
        self.product_ids = tuple(product_ids)
        #: Tuya's product category code (``zndb`` = smart electricity meter); None: not given.
        self.category = category
        self.data_points = tuple(sorted(data_points, key=lambda dp: dp.id))
        self._by_id = by_id
        self._by_code = by_code

    def get(self, dp_id: str | int) -> DataPoint | None:
        """The data point with this id (``"1"`` or ``1``), or ``None``."""
        return self._by_id.get(dp_id)

    def by_code(self, code: str) -> DataPoint | None:
        """The data point with this code (identifier), or ``None``."""
        return self._by_code.get(code)

    def validate(self, dp_id: str | int, value: Any) -> tuple[DataPoint, Any]:
        """``(data point, canonical value)`` for a report; ``ValueRejected(2002)`` for an unknown id."""
        dp = self._by_id.get(dp_id)
        if dp is None:
            raise ValueRejected(ErrorCode.NOT_SUPPORTED, f"{self.model}: unknown data point id {dp_id!r}")
        return dp, dp.coerce(value)

    def validate_command(self, dp_id: str | int, value: Any) -> tuple[DataPoint, Any]:
        """Like ``validate`` for a command: read-only data points give ``ValueRejected(2002)`` too."""
        dp = self._by_id.get(dp_id)
        if dp is None:
            raise ValueRejected(ErrorCode.NOT_SUPPORTED, f"{self.model}: unknown data point id {dp_id!r}")
        return dp, dp.check_command(value)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(dp.id for dp in self.data_points)

    def __iter__(self) -> Iterator[DataPoint]:
        return iter(self.data_points)

    def __len__(self) -> int:
        return len(self.data_points)

    def __contains__(self, dp_id: object) -> bool:
        return dp_id in self._by_id

    def to_dict(self) -> dict[str, Any]:
        """This model in the model file format (``parse_model(json.dumps(m.to_dict()))`` round-trips)."""
        out: dict[str, Any] = {"model": self.model, "name": self.name, "version": self.version}
        if self.source is not None:
            out["source"] = self.source
        if self.product_ids:
            out["product_ids"] = list(self.product_ids)
        if self.category is not None:
            out["category"] = self.category
        out["data_points"] = [dp.to_dict() for dp in self.data_points]
        return out

    def __repr__(self) -> str:
        return f"ProductModel(model={self.model!r}, version={self.version!r}, data_points={len(self)})"
