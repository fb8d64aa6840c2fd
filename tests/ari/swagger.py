"""Asterisk's own ARI swagger files (Swagger 1.1, ``/work/shared/ari-api-docs`` or AZIZA_ARI_DOCS) as a
checker: operations by (method, path) and a payload validator for the models."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DOCS_DIR = Path(os.environ.get("AZIZA_ARI_DOCS", "/work/shared/ari-api-docs"))
RESOURCE_FILES = ("channels", "bridges", "applications", "events", "endpoints", "asterisk", "playbacks",
                  "recordings", "sounds", "deviceStates", "mailboxes")


@dataclass(frozen=True)
class SwaggerParam:
    name: str
    param_type: str
    required: bool
    allowed: tuple[str, ...] | None


@dataclass(frozen=True)
class SwaggerOp:
    method: str
    path: str
    params: dict[str, SwaggerParam]


@dataclass(frozen=True)
class Swagger:
    operations: dict[tuple[str, str], SwaggerOp]
    models: dict[str, dict[str, Any]]

    def event_required(self, event_type: str) -> dict[str, dict[str, Any]]:
        """All properties of an event model, including those of ``Event`` and ``Message``."""
        props: dict[str, dict[str, Any]] = {}
        for name in ("Message", "Event", event_type):
            props.update(self.models[name]["properties"])
        return props

    def validate(self, model: str, payload: Any, where: str = "") -> list[str]:
        """Problems with ``payload`` as an instance of ``model`` (required fields, types)."""
        where = where or model
        if not isinstance(payload, dict):
            return [f"{where}: not an object"]
        props = self.event_required(model) if "Event" in self.models and model in self._event_types() \
            else self.models[model]["properties"]
        problems: list[str] = []
        for name, spec in props.items():
            if name not in payload:
                if spec.get("required"):
                    problems.append(f"{where}.{name}: required, missing")
                continue
            problems += self._check_type(spec["type"], payload[name], f"{where}.{name}")
        return problems

    def _event_types(self) -> set[str]:
        return set(self.models["Event"].get("subTypes", []))

    def _check_type(self, type_name: str, value: Any, where: str) -> list[str]:
        if type_name.startswith("List[") and type_name.endswith("]"):
            if not isinstance(value, list):
                return [f"{where}: expected a list"]
            inner = type_name[5:-1]
            return [p for i, v in enumerate(value) for p in self._check_type(inner, v, f"{where}[{i}]")]
        simple: dict[str, type | tuple[type, ...]] = {
            "string": str, "Date": str, "int": int, "long": int, "boolean": bool, "object": dict,
            "double": (int, float),
        }
        if type_name in simple:
            ok = isinstance(value, simple[type_name]) and not (type_name in ("int", "long") and
                                                               isinstance(value, bool))
            return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
        if type_name in self.models:
            return self.validate(type_name, value, where)
        return [f"{where}: unknown type {type_name}"]


@lru_cache(maxsize=1)
def load_swagger() -> Swagger:
    operations: dict[tuple[str, str], SwaggerOp] = {}
    models: dict[str, dict[str, Any]] = {}
    for name in RESOURCE_FILES:
        doc = json.loads((DOCS_DIR / f"{name}.json").read_text())
        models.update(doc.get("models", {}))
        for api in doc.get("apis", []):
            for op in api["operations"]:
                params = {}
                for p in op.get("parameters", []):
                    allowed = p.get("allowableValues")
                    values = None
                    if isinstance(allowed, dict) and "values" in allowed:
                        values = tuple(allowed["values"])
                    required = bool(p.get("required"))
                    params[p["name"]] = SwaggerParam(p["name"], p["paramType"], required, values)
                operations[(op["httpMethod"], api["path"])] = SwaggerOp(op["httpMethod"], api["path"], params)
    return Swagger(operations, models)
