"""Readers (SPEC §3): Lance, Parquet, JSON lines (plain or compressed), CSV, .npy.

Every reader returns a ``Stream``: a lazy Ray dataset plus its schema, read
from metadata (Lance/Parquet footers, the first block of JSON/CSV files,
.npy headers) so later nodes can be checked before any data is read.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.base import Node, NodeError, NodeParams, RunContext, Stream, register
from tasks.rowkeys import named
from tasks.schema import conform, field_at, fit_to_hint, get_path, parse_spark_schema, unify_by_name
from tasks.storage import (
    expand_paths,
    filesystem_for,
    is_object_store,
    normalize_uri,
    path_exists,
    resolve_storage_options,
)

log = logging.getLogger("kaiyuan.nodes")

SPARK_READER_KNOBS = frozenset(
    {"schema", "mergeSchema", "multiLine", "datetimeRebaseModeInRead", "int96RebaseModeInRead"}
)
# ``schema`` is honoured by the path readers (``spark_schema``); the rest have
# no effect on Ray and are logged as ignored.
HONOURED_KNOBS = frozenset({"schema"})

Format = Literal["lance", "parquet", "json", "jsonl", "csv"]


def detect_format(path: str) -> str:
    """SPEC §3 auto format: by suffix/marker, else by looking at the path."""
    p = path.rstrip("/")
    lower = p.lower()
    if lower.endswith(".lance"):
        return "lance"
    if lower.endswith(".parquet") or "/parquets/" in lower or "_parquet" in lower:
        return "parquet"
    for suffix in (".jsonl", ".json", ".ndjson"):
        if suffix in lower.rsplit("/", 1)[-1]:
            return "json"
    if lower.endswith(".csv") or lower.endswith(".csv.gz"):
        return "csv"
    if lower.endswith(".npy"):
        return "npy"
    if not is_object_store(p) and os.path.isdir(p):
        entries = os.listdir(p)
        if "_versions" in entries or "_latest.manifest" in entries:
            return "lance"
        for name in entries:
            if name.endswith(".parquet"):
                return "parquet"
            if ".json" in name:
                return "json"
    # Object-store directories without a suffix: Lance is the house format.
    return "lance"


class ReaderParams(NodeParams):
    input_path: str | list[str]
    num_parallel: int | None = None
    select_cols: list[str] | None = None
    storage_options: dict[str, Any] | None = None
    # Spark's reader schema: DDL text or StructType JSON (text or mapping).
    # Named so because ``schema`` is taken on pydantic models.
    spark_schema: str | dict[str, Any] | None = Field(default=None, alias="schema")


def _paths(params: ReaderParams) -> list[str]:
    raw = params.input_path if isinstance(params.input_path, list) else [params.input_path]
    return [normalize_uri(p) for p in raw]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _select(schema: pa.Schema, select_cols: list[str] | None) -> tuple[list[str] | None, pa.Schema]:
    """Top-level columns to read and the output schema for ``select_cols``
    (dotted names become their leaf name)."""
    if not select_cols:
        return None, schema
    fields, top = [], []
    for name in select_cols:
        try:
            field = field_at(schema, name)
        except KeyError:
            raise KeyError(
                f"select_cols names {name!r}, which is not in the data (columns: {', '.join(schema.names)})"
            ) from None
        fields.append(pa.field(_leaf(name), field.type))
        root = name.split(".", 1)[0]
        if root not in top:
            top.append(root)
    return top, pa.schema(fields)


def _project(select_cols: list[str] | None, schema: pa.Schema, hint: pa.Schema | None = None):
    def column(batch: pa.Table, name: str, field: pa.Field):
        # A path absent from this input (several inputs, unioned by name) is null.
        if name.split(".", 1)[0] not in batch.column_names:
            return pa.nulls(batch.num_rows, field.type)
        return get_path(batch, name)

    def project(batch: pa.Table) -> pa.Table:
        if hint is not None:
            # Checked on every batch, not only on the footer or first block
            # read up front: a value is never cast into a type that changes it.
            batch = conform(batch, fit_to_hint(batch.schema, hint))
        if select_cols:
            batch = pa.Table.from_arrays(
                [column(batch, c, f) for c, f in zip(select_cols, schema)], names=[_leaf(c) for c in select_cols]
            )
        return conform(batch, schema)

    return project


def _lance_schema(uri: str, so: dict) -> pa.Schema:
    import lance

    return lance.dataset(uri, storage_options=so or None).schema


def _parquet_schema(path: str, so: dict) -> pa.Schema:
    import pyarrow.parquet as pq

    fs, inner = filesystem_for(path, so)
    return pq.read_schema(inner, filesystem=fs)


def _csv_types(hint: pa.Schema | None):
    """CSV holds text: with a hint, its flat columns are parsed as the hinted
    type (as Spark does) instead of inferred and then cast."""
    import pyarrow.csv as pacsv

    if hint is None:
        return None
    flat = {f.name: f.type for f in hint if not pa.types.is_nested(f.type)}
    return pacsv.ConvertOptions(column_types=flat)


def _text_schema(path: str, so: dict, fmt: str, hint: pa.Schema | None = None) -> pa.Schema:
    """Infer from the first block of a JSON-lines or CSV file."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fs, inner = filesystem_for(path, so)
    with fs.open_input_stream(inner, compression="detect") as f:
        if fmt == "csv":
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(block_size=1 << 20), convert_options=_csv_types(hint)
            )
        else:
            reader = pajson.open_json(f, read_options=pajson.ReadOptions(block_size=1 << 20))
        return reader.schema


def read_paths(
    node: Node,
    paths: list[str],
    fmt: str,
    select_cols: list[str] | None,
    num_parallel: int | None,
    storage_options: dict,
    ctx: RunContext,
    hint: pa.Schema | None = None,
) -> Stream:
    """Read and union-by-name several paths of one format as one stream;
    with a Spark schema ``hint``, each input is read as ``fit_to_hint`` says."""
    import ray

    so = dict(storage_options)
    concrete = expand_paths(paths, so)
    groups: list[tuple[list[str], str, pa.Schema]] = []
    for path in concrete:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "jsonl":
            kind = "json"
        try:
            if kind == "lance":
                schema = _lance_schema(path, so)
            elif kind == "parquet":
                schema = _parquet_schema(path, so) if not os.path.isdir(path) else None
            elif kind in ("json", "csv"):
                schema = _text_schema(path, so, kind, hint)
            else:
                raise node.error(f"cannot read {path!r} as {kind!r}")
        except NodeError:
            raise
        except Exception as exc:
            raise node.error(f"cannot open {path!r} as {kind}: {exc}") from None
        if kind == "parquet" and schema is None:
            import pyarrow.dataset as pads

            schema = pads.dataset(path, format="parquet").schema
        # Files of one format and schema are read together (one Ray read).
        for group in groups:
            if group[1] == kind and kind != "lance" and group[2].equals(schema):
                group[0].append(path)
                break
        else:
            groups.append(([path], kind, schema))

    fitted = []
    for group_paths, kind, schema in groups:
        try:
            fitted.append(fit_to_hint(schema, hint) if hint is not None else schema)
        except ValueError as exc:
            raise node.error(f"schema does not fit {group_paths[0]!r}: {exc}") from None
    if hint is not None:
        absent = [f.name for f in hint if not any(f.name in g[2].names for g in groups)]
        if absent:
            log.warning("%s: schema names column(s) %s that no input has: read as null", node.path, ", ".join(absent))
    try:
        full = unify_by_name(fitted)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise node.error(f"the inputs cannot be unioned by name: {exc}") from None
    try:
        top, out_schema = _select(full, select_cols)
    except KeyError as exc:
        raise node.error(str(exc.args[0])) from None

    per_group_blocks = None
    if num_parallel and num_parallel > 0:
        per_group_blocks = max(1, num_parallel // len(groups))
    datasets = []
    for (group_paths, kind, schema), read_as in zip(groups, fitted):
        cols = [c for c in (top or read_as.names) if c in schema.names]
        if kind == "lance":
            import lance_ray

            ds = lance_ray.read_lance(
                group_paths[0],
                columns=cols,
                storage_options=so or None,
                override_num_blocks=per_group_blocks,
            )
        else:
            fs = filesystem_for(group_paths[0], so)[0] if is_object_store(group_paths[0]) else None
            common = {"filesystem": fs, "override_num_blocks": per_group_blocks}
            if kind == "parquet":
                # select_columns is pushed down into the Parquet read by Ray's optimizer.
                ds = ray.data.read_parquet(group_paths, **common).select_columns(cols)
            elif kind == "json":
                ds = ray.data.read_json(group_paths, lines=True, **common)
            else:
                ds = ray.data.read_csv(group_paths, convert_options=_csv_types(hint), **common)
        # Conform each group to the unified (and projected) schema so the
        # union has one schema; the node's instrumentation counts the rows.
        project = _project(select_cols, out_schema, hint)
        ds = ds.map_batches(
            node.batch_fn(project, ctx) if len(groups) == 1 else named(node, project),
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
        )
        datasets.append(ds)
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    if len(datasets) > 1:
        ds = node.tap(ds, ctx)
    if num_parallel and num_parallel > 0 and len(datasets) > 1:
        ds = ds.repartition(num_parallel)
    return Stream(ds, out_schema)


class _PathReader(Node):
    """Shared behaviour of the path-based readers."""

    min_children = 0
    max_children = 0
    ignored_params = SPARK_READER_KNOBS - HONOURED_KNOBS
    fixed_format: ClassVar[str] = "auto"

    @classmethod
    def validate_params(cls, p: ReaderParams) -> list[str]:
        raw = p.input_path if isinstance(p.input_path, list) else [p.input_path]
        if not raw or not all(path.strip() for path in raw):
            return ["input_path: give at least one path (an empty list or string reads nothing)"]
        try:
            cls._hint(p)
        except ValueError as exc:
            return [f"schema: not a Spark schema (DDL such as 'a INT, b ARRAY<STRUCT<c: BOOLEAN>>', or StructType JSON): {exc}"]
        return []

    def input_uris(self) -> list[str]:
        # A glob reads inside the directory before its first wildcard.
        return [re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0] if re.search(r"[*?\[]", path) else path
                for path in _paths(self.params)]

    @staticmethod
    def _hint(p: NodeParams) -> pa.Schema | None:
        raw = getattr(p, "spark_schema", None)
        return None if raw is None else parse_spark_schema(raw)

    def _format(self) -> str:
        return self.fixed_format

    def _storage(self, ctx: RunContext) -> dict:
        return resolve_storage_options(self.params.storage_options, ctx.storage_options)

    def check(self, ctx: RunContext) -> None:
        so = self._storage(ctx)
        try:
            concrete = expand_paths(_paths(self.params), so)
        except FileNotFoundError as exc:
            raise self.error(f"input_path: {exc.args[0]}") from None
        except Exception as exc:  # credentials, network: report, never guess
            raise self.error(f"input_path: cannot list: {exc}") from None
        for path in concrete:
            try:
                exists = path_exists(path, so)
            except Exception as exc:
                raise self.error(f"input_path {path!r}: cannot access: {exc}") from None
            if not exists:
                raise self.error(f"input_path {path!r} does not exist")

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        p = self.params
        return read_paths(
            self, _paths(p), self._format(), p.select_cols, p.num_parallel, self._storage(ctx), ctx, self._hint(p)
        )


class LanceReaderParams(ReaderParams):
    input_format: Literal["auto", "lance", "parquet", "json", "jsonl", "csv"] = "auto"


@register
class LanceReader(_PathReader):
    type_name = "LanceReader"
    aliases = ("LanceReaderZstd",)
    Params = LanceReaderParams

    def _format(self) -> str:
        return self.params.input_format


class FormatReaderParams(ReaderParams):
    data_format: Format = "lance"


@register
class FormatReader(_PathReader):
    type_name = "FormatReader"
    Params = FormatReaderParams

    def _format(self) -> str:
        return self.params.data_format


@register
class JsonReader(_PathReader):
    type_name = "JsonReader"
    Params = ReaderParams
    fixed_format = "json"


@register
class JsonlZstReader(_PathReader):
    """JSON lines; compression (zstd, gzip, ...) from the file extension."""

    type_name = "JsonlZstReader"
    Params = ReaderParams
    fixed_format = "json"


class NpyReaderParams(NodeParams):
    input_path: str | list[str]
    column_name: str = "data"
    path_column: str | None = None
    storage_options: dict[str, Any] | None = None
    num_parallel: int | None = None


def _npy_type(dtype: np.dtype, ndim: int) -> pa.DataType:
    t = pa.from_numpy_dtype(dtype)
    for _ in range(max(ndim, 1)):
        t = pa.list_(t)
    return t


@register
class NpyReader(_PathReader):
    """Each .npy file becomes one row holding its array (nested Arrow lists)."""

    type_name = "NpyReader"
    Params = NpyReaderParams
    ignored_params = SPARK_READER_KNOBS  # one array column: nothing for a schema to say

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        import ray

        p = self.params
        so = dict(self._storage(ctx))
        paths = expand_paths(_paths(p), so)
        fs, inner = filesystem_for(paths[0], so)
        try:
            with fs.open_input_stream(inner) as f:
                header = io.BytesIO(f.read(4096))
            fmt = np.lib.format
            version = fmt.read_magic(header)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(header)
        except Exception as exc:
            raise self.error(f"{paths[0]!r} is not a readable .npy file: {exc}") from None
        arr_type = _npy_type(dtype, len(shape))
        fields = [pa.field(p.column_name, arr_type)]
        if p.path_column:
            fields.append(pa.field(p.path_column, pa.string()))
        schema = pa.schema(fields)
        column, path_column = p.column_name, p.path_column

        def decode(batch: pa.Table) -> pa.Table:
            arrays, names = [], []
            for raw, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
                try:
                    arr = np.load(io.BytesIO(raw), allow_pickle=False)
                except Exception as exc:
                    raise ValueError(f"unreadable .npy file {path!r}: {exc}") from None
                arrays.append(arr.tolist() if arr.ndim != 1 else arr)
                names.append(path)
            cols = {column: pa.array(arrays, type=arr_type)}
            if path_column:
                cols[path_column] = pa.array(names, type=pa.string())
            return pa.table(cols, schema=schema)

        ds = ray.data.read_binary_files(
            paths,
            include_paths=True,
            filesystem=fs if is_object_store(paths[0]) else None,
            override_num_blocks=p.num_parallel,
        )
        ds = ds.map_batches(
            self.batch_fn(decode, ctx), batch_format="pyarrow", batch_size=64, zero_copy_batch=True
        )
        return Stream(ds, schema)
