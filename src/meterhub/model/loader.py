"""Loading product models from JSON files: ``load_model``, ``builtin_model``, ``ModelRegistry``."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

import msgspec

from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.errors import ModelError

__all__ = ["ModelRegistry", "builtin_model", "builtin_model_names", "load_model", "parse_model"]


class _LabelSpec(msgspec.Struct, forbid_unknown_fields=True):
    label: str
    description: str | None = None


class _DataPointSpec(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    code: str
    name: str
    access: Literal["rw", "ro", "wo"]
    type: Literal["bool", "value", "enum", "string", "raw", "fault"]
    min: int | None = None
    max: int | None = None
    step: int | None = None
    scale: int | None = None
    unit: str | None = None
    display_unit: str | None = None
    labels: list[str | _LabelSpec] | None = None
    layout: Literal["phase"] | None = None
    max_length: int | None = None
    description: str | None = None


class _ModelSpec(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    name: str
    version: str
    data_points: list[_DataPointSpec]
    source: str | None = None
    product_ids: list[str] = []
    category: str | None = None


_SPEC_DECODER = msgspec.json.Decoder(_ModelSpec)


def _msgspec_error(source: str, exc: msgspec.DecodeError) -> ModelError:
    text = str(exc)
    reason, sep, path = text.rpartition(" - at `")
    if not sep:
        return ModelError(source, None, text)
    field = path.rstrip("`").removeprefix("$").removeprefix(".") or None
    return ModelError(source, field, reason)


def parse_model(data: bytes | str, source: str = "<memory>") -> ProductModel:
    """A ``ProductModel`` from a model file's JSON text; ``ModelError`` names ``source`` and the field."""
    try:
        spec = _SPEC_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise _msgspec_error(source, exc) from None
    except RecursionError:
        raise ModelError(source, None, "JSON nested too deeply") from None
    data_points = []
    for i, dps in enumerate(spec.data_points):
        labels = descriptions = None
        if dps.labels is not None:
            labels = [lab if isinstance(lab, str) else lab.label for lab in dps.labels]
            descriptions = [None if isinstance(lab, str) else lab.description for lab in dps.labels]
        try:
            data_points.append(
                DataPoint(
                    dps.id,
                    dps.code,
                    dps.name,
                    dps.access,
                    dps.type,
                    min=dps.min,
                    max=dps.max,
                    step=dps.step,
                    scale=dps.scale,
                    unit=dps.unit,
                    display_unit=dps.display_unit,
                    labels=labels,
                    label_descriptions=descriptions,
                    layout=dps.layout,
                    max_length=dps.max_length,
                    description=dps.description,
                )
            )
        except ModelError as exc:
            field = f"data_points[{i}].{exc.field}" if exc.field else f"data_points[{i}]"
            raise ModelError(source, field, f"{exc.reason} (id {dps.id}, code {dps.code!r})") from None
    try:
        return ProductModel(
            spec.model,
            spec.name,
            spec.version,
            data_points,
            source=source,
            product_ids=spec.product_ids,
            category=spec.category,
        )
    except ModelError as exc:
        raise ModelError(source, exc.field, exc.reason) from None


def load_model(path: str | os.PathLike[str]) -> ProductModel:
    """Load one model file; ``ModelError`` (naming the file and the field) when it is invalid."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ModelError(source, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_model(data, source)


def _builtin_files() -> dict[str, Traversable]:
    folder = resources.files("meterhub.model").joinpath("data")
    return {f.name.removesuffix(".json"): f for f in folder.iterdir() if f.name.endswith(".json")}


def builtin_model_names() -> list[str]:
    """Names of the models shipped with meterhub (file stems of ``meterhub/model/data/*.json``)."""
    return sorted(_builtin_files())


def builtin_model(name: str = "smart-meter") -> ProductModel:
    """A model shipped with meterhub (cached: the same object on every call); ``KeyError`` if unknown."""
    return _load_builtin(name)


@functools.cache
def _load_builtin(name: str) -> ProductModel:
    files = _builtin_files()
    if name not in files:
        raise KeyError(f"no builtin product model {name!r} (have {sorted(files)})")
    resource = files[name]
    model = parse_model(resource.read_bytes(), f"builtin:{resource.name}")
    if model.model != name:
        raise ModelError(f"builtin:{resource.name}", "model", f"is {model.model!r}, expected {name!r}")
    return model


class ModelRegistry:
    """The builtin models plus every ``*.json`` in ``directory`` (if given), by model name.

    A file in ``directory`` whose ``model`` equals a builtin's name replaces that builtin (so an operator
    can correct a model without a release); two files in ``directory`` with the same name are a
    ``ModelError``. Every file is loaded and checked in the constructor.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, include_builtin: bool = True
    ) -> None:
        models: dict[str, ProductModel] = {}
        if include_builtin:
            for name in builtin_model_names():
                models[name] = builtin_model(name)
        if directory is not None:
            folder = Path(directory)
            if not folder.is_dir():
                raise ModelError(os.fspath(folder), None, "not a directory")
            seen: dict[str, str] = {}
            for path in sorted(folder.glob("*.json")):
                model = load_model(path)
                if model.model in seen:
                    raise ModelError(
                        os.fspath(path), "model", f"{model.model!r} is already defined by {seen[model.model]}"
                    )
                seen[model.model] = os.fspath(path)
                models[model.model] = model
        self._models = models
        self._by_product: dict[str, ProductModel] = {}
        for model in models.values():
            for pid in model.product_ids:
                self._by_product.setdefault(pid, model)

    def get(self, name: str) -> ProductModel | None:
        """The model called ``name`` (its ``model`` field), or ``None``."""
        return self._models.get(name)

    def for_product(self, product_id: str) -> ProductModel | None:
        """The model listing ``product_id`` in its ``product_ids``, else the model named ``product_id``."""
        model = self._by_product.get(product_id)
        return model if model is not None else self._models.get(product_id)

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self) -> Iterator[ProductModel]:
        return iter([self._models[name] for name in sorted(self._models)])

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"ModelRegistry({self.names()})"
