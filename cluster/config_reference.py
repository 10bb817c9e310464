"""The config reference in README.md, generated from the pydantic models' field descriptions.

`inference-cluster config reference` prints it; a unit test fails when README.md's copy is stale.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cluster.config import ClusterConfig

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def render() -> str:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    _rows(ClusterConfig, "", rows)
    return "\n".join(rows)


def _rows(model: type[BaseModel], prefix: str, rows: list[str]) -> None:
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _nested_model(info.annotation)
        suffix = "[]" if typing.get_origin(info.annotation) is list else ""
        # GitHub's tables end a cell at any unescaped pipe, even inside backticks.
        description = (info.description or "").replace("|", "\\|")
        rows.append(
            f"| `{path}{suffix}` | {_type_name(info.annotation)} | {_default(info)} | "
            f"{description} |"
        )
        if nested is not None:
            _rows(nested, f"{path}{suffix}.", rows)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            # Profiles are documented in deployments/engines/profiles.py, not field by field.
            return None if candidate.__name__ == "PerformanceProfile" else candidate
        if typing.get_origin(candidate) is list:
            return _nested_model(typing.get_args(candidate)[0])
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return "{}" if isinstance(value, dict) and not value else "(see below)"
    if info.default is PydanticUndefined:
        return "required"
    return f"`{info.default}`" if info.default is not None else "none"
