"""Arrow schema helpers shared by readers and union nodes."""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def unify_by_name(schemas: list[pa.Schema]) -> pa.Schema:
    """Union of fields in first-seen order; types promoted where Arrow can
    (int -> float, null -> anything, large/small strings)."""
    return pa.unify_schemas(
        [s.remove_metadata() for s in schemas], promote_options="permissive"
    )


def union_conflict(named: list[tuple[str, pa.Schema]]) -> str | None:
    """Why ``unify_by_name`` fails for these (source, schema) pairs: the first
    column whose type in a source cannot be unioned with its type in the
    sources before it, naming both sources; None if they unify."""
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for source, schema in named:
        for field in schema.remove_metadata():
            if field.name not in seen:
                seen[field.name] = (field.type, source)
                continue
            before, first = seen[field.name]
            try:
                merged = unify_by_name([pa.schema([pa.field(field.name, before)]), pa.schema([field])])
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                return f"column {field.name!r} is {before} in {first!r} but {field.type} in {source!r}"
            seen[field.name] = (merged.field(field.name).type, first)
    return None


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast ``batch`` to ``schema``; absent columns become nulls."""
    columns = []
    for field in schema:
        if field.name in batch.column_names:
            col = batch.column(field.name)
            if col.type != field.type:
                col = col.cast(field.type)
            columns.append(col)
        else:
            columns.append(pa.nulls(batch.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def get_path(table: pa.Table, dotted: str) -> pa.ChunkedArray:
    """Column by dotted path into struct fields (``metadata.score``)."""
    head, *rest = dotted.split(".")
    col = table.column(head)
    for part in rest:
        col = pc.struct_field(col, part)
    return col


def field_at(schema: pa.Schema, dotted: str) -> pa.Field:
    head, *rest = dotted.split(".")
    field = schema.field(head)
    for part in rest:
        if not pa.types.is_struct(field.type):
            raise KeyError(f"{dotted!r}: {field.name!r} is not a struct")
        field = field.type.field(part)
    return field


# ---------------------------------------------------------------------------
# Spark schema hints (SPEC §3 readers: ``schema``)

_SPARK_SIMPLE = {
    "string": pa.string(),
    "varchar": pa.string(),
    "char": pa.string(),
    "boolean": pa.bool_(),
    "byte": pa.int8(),
    "tinyint": pa.int8(),
    "short": pa.int16(),
    "smallint": pa.int16(),
    "int": pa.int32(),
    "integer": pa.int32(),
    "long": pa.int64(),
    "bigint": pa.int64(),
    "float": pa.float32(),
    "real": pa.float32(),
    "double": pa.float64(),
    "date": pa.date32(),
    # Spark timestamps are instants; a column present in the data keeps its
    # own timestamp type (see fit_to_hint), so this only types absent ones.
    "timestamp": pa.timestamp("us", tz="UTC"),
    "timestamp_ltz": pa.timestamp("us", tz="UTC"),
    "timestamp_ntz": pa.timestamp("us"),
    "binary": pa.binary(),
    "void": pa.null(),
}

_TOKEN = re.compile(r"\s*(?:(`(?:[^`]|``)*`)|('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|([A-Za-z_][A-Za-z0-9_]*|\d+)|([<>(),:]))")


class _DDL:
    """Recursive-descent parser of Spark DDL (``a INT, b ARRAY<STRUCT<c: STRING>>``)."""

    def __init__(self, text: str):
        self.tokens: list[tuple[str, str]] = []  # (kind, text): name, str, word, sym
        pos = 0
        while pos < len(text):
            if not text[pos:].strip():
                break
            m = _TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"unexpected character {text[pos:].lstrip()[0]!r} at position {pos}")
            quoted, string, word, sym = m.groups()
            if quoted:
                self.tokens.append(("name", quoted[1:-1].replace("``", "`")))
            elif string:
                self.tokens.append(("str", string))
            elif word:
                self.tokens.append(("word", word))
            else:
                self.tokens.append(("sym", sym))
            pos = m.end()
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.tokens[j][1] if j < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError(f"unexpected end, expected {expected or 'more'}")
        if expected is not None and tok.lower() != expected:
            raise ValueError(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def fields(self, end: str | None) -> list[pa.Field]:
        out: list[pa.Field] = []
        while self.peek() != end:
            if out:
                self.take(",")
            kind, name = self.tokens[self.i] if self.i < len(self.tokens) else ("", "")
            if kind not in ("name", "word"):
                raise ValueError(f"expected a field name, got {name or 'the end'!r}")
            self.i += 1
            if self.peek() == ":":
                self.i += 1
            out.append(pa.field(name, self.type()))
            if (self.peek() or "").lower() == "not":
                self.take()
                self.take("null")
            if (self.peek() or "").lower() == "comment":
                self.take()
                if self.i >= len(self.tokens) or self.tokens[self.i][0] != "str":
                    raise ValueError("COMMENT needs a quoted string")
                self.i += 1
        return out

    def type(self) -> pa.DataType:
        word = self.take().lower()
        if word == "array":
            self.take("<")
            item = self.type()
            self.take(">")
            return pa.list_(item)
        if word == "map":
            self.take("<")
            key = self.type()
            self.take(",")
            value = self.type()
            self.take(">")
            return pa.map_(key, value)
        if word == "struct":
            self.take("<")
            fields = self.fields(">")
            self.take(">")
            return pa.struct(fields)
        if word in ("decimal", "dec", "numeric"):
            precision, scale = 10, 0
            if self.peek() == "(":
                self.take()
                precision = int(self.take())
                if self.peek() == ",":
                    self.take()
                    scale = int(self.take())
                self.take(")")
            return pa.decimal128(precision, scale)
        if word in ("varchar", "char") and self.peek() == "(":
            self.take()
            self.take()
            self.take(")")
        if word not in _SPARK_SIMPLE:
            raise ValueError(f"unknown or unsupported Spark type {word!r}")
        return _SPARK_SIMPLE[word]

    def done(self) -> None:
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")


def _json_type(t: Any) -> pa.DataType:
    if isinstance(t, str):
        parser = _DDL(t)
        out = parser.type()
        parser.done()
        return out
    if not isinstance(t, dict):
        raise ValueError(f"a type must be a name or a mapping, got {t!r}")
    kind = t.get("type")
    if kind == "struct":
        return pa.struct(_json_fields(t))
    if kind == "array":
        return pa.list_(_json_type(t.get("elementType")))
    if kind == "map":
        return pa.map_(_json_type(t.get("keyType")), _json_type(t.get("valueType")))
    raise ValueError(f"unknown or unsupported Spark type {kind!r}")


def _json_fields(struct: dict) -> list[pa.Field]:
    fields = struct.get("fields")
    if not isinstance(fields, list):
        raise ValueError("a struct needs a list of 'fields'")
    out = []
    for f in fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "type" not in f:
            raise ValueError(f"a field needs a 'name' and a 'type', got {f!r}")
        out.append(pa.field(f["name"], _json_type(f["type"])))
    return out


def parse_spark_schema(hint: str | dict) -> pa.Schema:
    """An Arrow schema from a Spark schema: DDL (``a INT, b STRUCT<c: STRING>``)
    or the JSON of a StructType (as text or as a mapping). Nullability is not
    kept: Spark reads every file column as nullable. ValueError if unparseable."""
    if isinstance(hint, str) and hint.lstrip().startswith("{"):
        try:
            hint = json.loads(hint)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    if isinstance(hint, dict):
        if hint.get("type") != "struct":
            raise ValueError("a JSON schema must be a struct ({\"type\": \"struct\", \"fields\": [...]})")
        fields = _json_fields(hint)
    else:
        parser = _DDL(hint)
        # ``STRUCT<a: INT, ...>`` is accepted for the whole schema too.
        if (parser.peek() or "").lower() == "struct" and parser.peek(1) == "<":
            struct = parser.type()
            fields = list(struct)
        else:
            fields = parser.fields(None)
        parser.done()
    if not fields:
        raise ValueError("the schema has no columns")
    names = [f.name for f in fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate column(s) {', '.join(dupes)}")
    return pa.schema(fields)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _converts(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether a value of ``src`` keeps its meaning as ``dst``. Arrow's safe
    cast then checks the values (overflow, lost digits) and fails rather than
    change one; casts that reinterpret (number <-> boolean, text <-> number)
    are never allowed."""
    t = pa.types
    if t.is_integer(src):
        return t.is_integer(dst) or t.is_floating(dst) or t.is_decimal(dst)
    if t.is_floating(src):
        return t.is_floating(dst)
    if t.is_decimal(src):
        return t.is_decimal(dst)
    if t.is_string(src) or t.is_large_string(src):
        return t.is_string(dst) or t.is_large_string(dst)
    if t.is_binary(src) or t.is_large_binary(src):
        return t.is_binary(dst) or t.is_large_binary(dst)
    if t.is_date(src):
        return t.is_date(dst)
    return False


def _fit(src: pa.DataType | None, dst: pa.DataType, where: str) -> pa.DataType:
    t = pa.types
    if src is None or t.is_null(src):
        return dst
    if t.is_dictionary(src):
        src = src.value_type
    if t.is_struct(dst):
        if not t.is_struct(src):
            raise ValueError(f"{where}: the schema says a struct, the data has {src}")
        return pa.struct(_fit_fields(list(src), list(dst), where + "."))
    if _is_list(dst):
        if not _is_list(src):
            raise ValueError(f"{where}: the schema says an array, the data has {src}")
        # Keep the data's list layout and item name (Parquet calls it "element").
        item = pa.field(src.value_field.name, _fit(src.value_type, dst.value_type, where + "[]"))
        if t.is_large_list(src):
            return pa.large_list(item)
        return pa.list_(item, src.list_size) if t.is_fixed_size_list(src) else pa.list_(item)
    if t.is_map(dst):
        if not t.is_map(src):
            raise ValueError(f"{where}: the schema says a map, the data has {src}")
        return pa.map_(_fit(src.key_type, dst.key_type, where + "{key}"), _fit(src.item_type, dst.item_type, where + "{}"))
    if src.equals(dst) or (t.is_timestamp(src) and t.is_timestamp(dst)):
        return src
    if _converts(src, dst):
        return dst
    raise ValueError(f"{where}: the schema says {dst}, the data has {src}")


def _fit_fields(data: list[pa.Field], hint: list[pa.Field], prefix: str) -> list[pa.Field]:
    by_name = {f.name: f for f in data}
    out = []
    for h in hint:
        src = by_name.get(h.name)
        if src is None:
            near = [f.name for f in data if f.name.lower() == h.name.lower()]
            if near:
                raise ValueError(f"{prefix}{h.name}: not in the data, which has {near[0]!r} (names are case-sensitive)")
        out.append(pa.field(h.name, _fit(src.type if src else None, h.type, prefix + h.name)))
    return out


def fit_to_hint(data: pa.Schema, hint: pa.Schema) -> pa.Schema:
    """What data of schema ``data`` reads as under a Spark schema hint: the
    hint's columns and nested fields in the hint's order (absent ones null,
    others dropped). A type the data already has is kept as the data has it;
    otherwise the hint's type, if the values convert without changing
    meaning. ValueError naming the field when they do not."""
    return pa.schema(_fit_fields(list(data), list(hint), ""))
