"""The node catalogue, from the node classes themselves: a list of node
types, one node's parameters, and a JSON Schema of the whole recipe format
for editors (YAML language servers complete and check recipes with it)."""

from __future__ import annotations

import copy
import inspect
import json
import re
from typing import Any

from pydantic.json_schema import models_json_schema

import tasks  # noqa: F401  (registers every node family)
from tasks.base import NODE_TYPES, Node


def _families() -> dict[str, list[str]]:
    by_module: dict[str, list[str]] = {}
    for name, cls in sorted(NODE_TYPES.items()):
        if name == cls.type_name:
            by_module.setdefault(cls.__module__.rsplit(".", 1)[-1], []).append(name)
    return by_module


def _summary(cls: type[Node]) -> str:
    """The docstring's first sentence, as plain text."""
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ").replace("``", "")
    return re.split(r"(?<=[.:;])\s", doc, maxsplit=1)[0]


def _children(cls: type[Node]) -> str:
    if cls.max_children == 0:
        return "none (a leaf)"
    if cls.combines_children:
        return f"{cls.min_children} or more, combined by the node itself"
    return "1 or more (several are unioned by position first)"


def list_nodes() -> str:
    lines = []
    for family, names in _families().items():
        lines.append(f"{family}:")
        for name in names:
            cls = NODE_TYPES[name]
            alias = f" (alias {', '.join(cls.aliases)})" if cls.aliases else ""
            lines.append(f"  {name}{alias}: {_summary(cls)}")
    return "\n".join(lines)


def _type_text(annotation: Any) -> str:
    text = re.sub(r"typing\.|<class '([^']+)'>", r"\1", str(annotation))
    return text.replace("NoneType", "None")


def describe(name: str) -> str:
    """One node type: what it does, its children and its parameters."""
    import difflib

    cls = NODE_TYPES.get(name)
    if cls is None:
        match = difflib.get_close_matches(name, list(NODE_TYPES), n=1, cutoff=0.5)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise KeyError(f"unknown node type {name!r}{hint}; --list-nodes lists them")
    doc = (inspect.getdoc(cls) or "").replace("``", "")
    lines = [f"{cls.type_name} ({cls.__module__})", "", doc, "", f"children: {_children(cls)}"]
    if cls.aliases:
        lines.append(f"aliases: {', '.join(cls.aliases)}")
    if cls.extra:
        lines.append(f"needs: pip install -e '.[{cls.extra}]'")
    lines += ["", "parameters:"]
    for field_name, field in cls.Params.model_fields.items():
        shown = field.alias or field_name
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        limits = _limits(field)
        extra = f", {', '.join(limits)}" if limits else ""
        no_effect = f"; accepted, no effect: {cls.without_effect[field_name]}" if field_name in cls.without_effect else ""
        lines.append(f"  {shown}: {_type_text(field.annotation)} ({default}{extra}){no_effect}")
    by_reason: dict[str, list[str]] = {}
    for name in sorted(set(cls.without_effect) - set(cls.Params.model_fields)):
        by_reason.setdefault(cls.without_effect[name], []).append(name)
    for why, names in by_reason.items():
        lines.append(f"  {', '.join(names)}: accepted, no effect: {why}")
    return "\n".join(lines)


_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _limits(field) -> list[str]:
    """A parameter's declared bounds (``Field(ge=..., ...)``), as text."""
    limits = [f"{sign} {getattr(meta, attr)}" for meta in field.metadata for attr, sign in _SIGNS.items()
              if getattr(meta, attr, None) is not None]
    if any(getattr(meta, "allow_inf_nan", None) is False for meta in field.metadata):
        limits.append("finite")
    return limits


def recipe_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a recipe: the sections and every node type."""
    from flows.config import PrefectSection, RaySection

    classes = [cls for name, cls in sorted(NODE_TYPES.items()) if name == cls.type_name]
    models = [(cls.Params, "validation") for cls in classes] + [(RaySection, "validation"), (PrefectSection, "validation")]
    keys, shared = models_json_schema(models, ref_template="#/$defs/{model}", by_alias=True)
    defs: dict[str, Any] = shared.get("$defs", {})
    node_refs = []
    for name, cls in sorted(NODE_TYPES.items()):
        ref = keys[(cls.Params, "validation")]["$ref"]
        params = copy.deepcopy(defs[ref.rsplit("/", 1)[-1]])
        properties = params.setdefault("properties", {})
        properties["type"] = {"const": name}
        properties["checkpoint"] = {"type": "boolean", "description": "persist this node's output and reuse it on re-runs"}
        for param, why in cls.without_effect.items():
            properties.setdefault(param, {})["description"] = f"accepted, no effect: {why}"
        if cls.max_children != 0:
            properties["child_configs"] = {"type": "array", "items": {"$ref": "#/$defs/node"}, "minItems": cls.min_children}
        params["required"] = sorted({"type", *params.get("required", [])})
        params["additionalProperties"] = False
        params["title"] = name
        params["description"] = _summary(cls)
        key = "node_" + re.sub(r"\W", "_", name)
        defs[key] = params
        node_refs.append({"if": {"properties": {"type": {"const": name}}, "required": ["type"]}, "then": {"$ref": f"#/$defs/{key}"}})
    # Dispatch on `type` (if/then) rather than oneOf over every node type:
    # oneOf tries each type at every level of the tree, exponential in its depth.
    defs["node"] = {"type": "object", "required": ["type"], "properties": {"type": {"enum": sorted(NODE_TYPES)}},
                    "allOf": node_refs}
    section = lambda model: keys[(model, "validation")]  # noqa: E731
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Kaiyuan recipe",
        "type": "object",
        "properties": {
            "ray": section(RaySection),
            "spark": {"type": "object", "description": "old configs: only app_name is used"},
            "prefect": section(PrefectSection),
            "pipeline": {"$ref": "#/$defs/node"},
        },
        "required": ["pipeline"],
        "additionalProperties": False,
        "$defs": defs,
    }


def recipe_schema_json() -> str:
    return json.dumps(recipe_schema(), indent=1, sort_keys=True)
