"""Checks node modules share: a column's presence and kind, and parameters a
node accepts without effect.

Every column check raises ``node.error`` in one wording, naming the
parameter, the column and what was expected:

* absent: ``input_col: no column 'text' (columns: id, body)``
* wrong kind: ``input_col 'text' is int64, not numeric``

Nodes that read struct fields pass ``path=True``: the name is then a dotted
path into struct columns (``meta.score``).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import pyarrow as pa

from tasks.schema import field_at

log = logging.getLogger("kaiyuan.nodes")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_numeric(t: pa.DataType) -> bool:
    """Types a numeric column may have: they cast to float64 with their meaning
    (null-typed columns are all-null, booleans count as 0/1)."""
    is_ = pa.types
    return is_.is_integer(t) or is_.is_floating(t) or is_.is_boolean(t) or is_.is_decimal(t) or is_.is_null(t)


def is_text(t: pa.DataType) -> bool:
    """Strings, or bytes that nodes decode as UTF-8."""
    is_ = pa.types
    return is_.is_string(t) or is_.is_large_string(t) or is_.is_binary(t) or is_.is_large_binary(t)


def is_token_ids(t: pa.DataType) -> bool:
    return _is_list(t) and pa.types.is_integer(t.value_type)


# kind -> (accepts the type?, what the message says was expected)
KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "numeric": (is_numeric, "numeric"),
    "text": (is_text, "text"),
    "list": (_is_list, "a list"),
    "token ids": (is_token_ids, "a list of integer token ids"),
}


def _field(schema: pa.Schema, name: str, path: bool) -> pa.Field | None:
    if not path:
        return schema.field(name) if name in schema.names else None
    try:
        return field_at(schema, name)
    except KeyError:
        return None


def _absent(node, names: list[str], schema: pa.Schema, param: str):
    available = ", ".join(schema.names) or "none"
    return node.error(f"{param}: no column {', '.join(map(repr, names))} (columns: {available})")


def require_columns(node, schema: pa.Schema, names: Iterable[str], *, param: str, path: bool = False) -> None:
    """Every one of ``names`` is a column of ``schema``; else one error naming
    all that are absent."""
    missing = [n for n in names if _field(schema, n, path) is None]
    if missing:
        raise _absent(node, missing, schema, param)


def require_column(
    node, schema: pa.Schema, name: str, *, param: str, kind: str | None = None, path: bool = False
) -> pa.Field:
    """The field ``name`` of ``schema`` (a batch's ``.schema`` too), checked to
    be of ``kind`` (a key of ``KINDS``) when one is given. ``param`` is the
    parameter that named the column."""
    field = _field(schema, name, path)
    if field is None:
        raise _absent(node, [name], schema, param)
    if kind is not None:
        accepts, expected = KINDS[kind]
        if not accepts(field.type):
            raise node.error(f"{param} {name!r} is {field.type}, not {expected}")
    return field


def log_without_effect(node) -> None:
    """Log the node's model parameters that have no effect on Ray (declared
    with the reason in ``Node.without_effect``) when a config gave them."""
    from tasks.base import log_without_effect as log_given

    given = [n for n in node.without_effect if n in node.params.model_fields_set]
    log_given(log, node.path, given, node.without_effect)
