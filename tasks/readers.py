"""Readers (SPEC §3): Lance, Parquet, JSON lines (plain or compressed), CSV, .npy.

Every reader returns a ``Stream``: a lazy Ray dataset plus its schema, read
from metadata (Lance/Parquet footers, the first block of JSON/CSV files,
.npy headers) so later nodes can be checked before any data is read.

Bad inputs are reported naming the reader and the file: what metadata shows
(a Lance dataset missing data files, a file that is not Parquet or is cut
short, files whose schemas cannot be unioned, empty files) by ``check()``
before the run; what only the contents show (invalid UTF-8, a malformed
JSON line or CSV row) by the read task that meets it (``node_error_in_ray``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.base import Node, NodeError, NodeParams, RunContext, Stream, node_error_in_ray, register
from tasks.rowkeys import named
from tasks.schema import conform, field_at, fit_to_hint, get_path, parse_spark_schema, unify_by_name, union_conflict
from tasks.storage import (
    expand_paths,
    file_size,
    files_under,
    filesystem_for,
    is_directory,
    is_object_store,
    normalize_uri,
    path_exists,
    relative_files,
    resolve_storage_options,
)

log = logging.getLogger("kaiyuan.nodes")

SPARK_READER_KNOBS = frozenset(
    {"schema", "mergeSchema", "multiLine", "datetimeRebaseModeInRead", "int96RebaseModeInRead"}
)
# ``schema`` is honoured by the path readers (``spark_schema``); the rest
# are Spark reader options with no effect on Ray.
HONOURED_KNOBS = frozenset({"schema"})
SPARK_KNOB_REASON = "a Spark reader option; Ray Data and Lance read the files as they are"

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
    num_parallel: int | None = Field(default=None, ge=1, le=1_000_000)
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


class _Damaged(ValueError):
    """An input whose metadata says it is incomplete."""


def _lance_schema(uri: str, so: dict, verify_files: bool = False) -> pa.Schema:
    """The schema from the manifest; with ``verify_files``, also that every
    data file the manifest lists is there (one listing, no data read)."""
    import lance

    ds = lance.dataset(uri, storage_options=so or None)
    if verify_files:
        listed = [(frag.fragment_id, df.path) for frag in ds.get_fragments() for df in frag.data_files()
                  if getattr(df, "base_id", None) is None]  # files under another base path are not listed here
        if listed:
            present = relative_files(uri.rstrip("/") + "/data", so)
            missing = [(fid, path) for fid, path in listed if path not in present]
            if missing:
                shown = ", ".join(f"data/{path} (fragment {fid})" for fid, path in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise _Damaged(f"the Lance dataset is damaged: data file(s) missing: {shown}{more}")
    return ds.schema


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


def _text_schema(path: str, so: dict, fmt: str, hint: pa.Schema | None = None) -> pa.Schema | None:
    """Infer from the first block of a JSON-lines or CSV file; None if the
    file holds nothing (no rows, no header)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fs, inner = filesystem_for(path, so)
    with fs.open_input_stream(inner, compression="detect") as f:
        try:
            if fmt == "csv":
                reader = pacsv.open_csv(
                    f, read_options=pacsv.ReadOptions(block_size=1 << 20), convert_options=_csv_types(hint)
                )
            else:
                reader = pajson.open_json(f, read_options=pajson.ReadOptions(block_size=1 << 20))
        except pa.ArrowInvalid as exc:
            if str(exc).startswith(("Empty JSON", "Empty CSV")):
                return None
            raise
        return reader.schema


def _reason(exc: BaseException) -> str:
    """One line on why a read failed: the innermost cause (Ray wraps Arrow's
    errors in its own advice), UTF-8 errors in words."""
    while exc.__cause__ is not None and not isinstance(exc, UnicodeDecodeError):
        exc = exc.__cause__
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 text ({exc.reason}: {exc.object[exc.start:exc.end]!r})"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


# ---------------------------------------------------------------------------
# Errors inside Ray read tasks. Ray imports lazily (the CLI validates configs
# without it), so the classes that subclass Ray's are made on first use and
# then live here under their names (pickled by reference, like any class).

_LAZY_LOCK = threading.Lock()


class _NamesFiles:
    """Mixin for Ray's file datasources: a failure while reading a file is a
    NodeError naming the node (``node_path``, set on the instance) and the
    file. Costs one generator frame per file."""

    node_path = "reader"
    name = "Files"

    def get_name(self) -> str:
        return self.name

    def _read_stream(self, f, path: str):
        try:
            yield from super()._read_stream(f, path)
        except NodeError:
            raise
        except Exception as exc:
            # Ray's retry of transient I/O errors matches on this message,
            # so the original reason stays in it.
            raise node_error_in_ray(self.node_path, f"cannot read {path!r}: {_reason(exc)}") from None


def _make_json_source():
    from ray.data._internal.datasource.json_datasource import PandasJSONDatasource

    return type("_JsonLinesSource", (_NamesFiles, PandasJSONDatasource), {"name": "JSONLines"})


def _make_csv_source():
    from ray.data._internal.datasource.csv_datasource import CSVDatasource

    return type("_CsvSource", (_NamesFiles, CSVDatasource), {"name": "CSV"})


_LAZY_CLASSES = {"_JsonLinesSource": _make_json_source, "_CsvSource": _make_csv_source}


def _lazy(name: str):
    cls = globals().get(name)
    if cls is not None:
        return cls
    with _LAZY_LOCK:
        if name not in globals():
            cls = _LAZY_CLASSES[name]()
            cls.__module__, cls.__name__, cls.__qualname__ = __name__, name, name
            globals()[name] = cls
    return globals()[name]


def __getattr__(name: str):
    if name in _LAZY_CLASSES:
        return _lazy(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_text_files(node: Node, kind: str, paths: list[str], fs, blocks: int | None, hint: pa.Schema | None):
    """Ray's JSON-lines / CSV reader, each file's failure naming the file."""
    import ray

    try:
        source_cls = _lazy("_JsonLinesSource" if kind == "json" else "_CsvSource")
    except ImportError:  # a Ray without these datasources: its reader, failures not attributed to a file
        if kind == "json":
            return ray.data.read_json(paths, lines=True, filesystem=fs, override_num_blocks=blocks)
        return ray.data.read_csv(paths, convert_options=_csv_types(hint), filesystem=fs, override_num_blocks=blocks)
    if kind == "json":
        source = source_cls(
            paths, target_output_size_bytes=ray.data.DataContext.get_current().target_max_block_size, filesystem=fs
        )
    else:
        source = source_cls(paths, arrow_csv_args={"convert_options": _csv_types(hint)}, filesystem=fs)
    source.node_path = node.path
    return ray.data.read_datasource(source, override_num_blocks=blocks)


# ---------------------------------------------------------------------------
# What the inputs are, from metadata


def _kind(path: str, fmt: str) -> str:
    kind = detect_format(path) if fmt == "auto" else fmt
    return "json" if kind == "jsonl" else kind


def _input_files(node: Node, concrete: list[str], fmt: str, so: dict) -> list[tuple[str, str]]:
    """(file, format) per input; a Parquet directory stands for its files,
    so that every file's footer is read and files of different schemas are
    read (and reported) separately."""
    out = []
    for path in concrete:
        kind = _kind(path, fmt)
        if kind == "parquet":
            try:
                directory = is_directory(path, so)
                files = files_under(path, so, ".parquet") if directory else [path]
            except Exception as exc:
                raise node.error(f"cannot list {path!r}: {exc}") from None
            if not files:
                raise node.error(f"{path!r} holds no .parquet files")
            out.extend((f, kind) for f in files)
        else:
            out.append((path, kind))
    return out


def _metadata_rows(path: str, kind: str, so: dict) -> int:
    """A file's or Lance dataset's row count from its metadata; raises when
    the format keeps none."""
    if kind == "lance":
        import lance

        return lance.dataset(path, storage_options=dict(so) or None).count_rows()
    if kind == "parquet":
        import pyarrow.parquet as pq

        fs, inner = filesystem_for(path, so)
        with fs.open_input_file(inner) as f:
            return pq.ParquetFile(f).metadata.num_rows
    raise ValueError(f"{kind}: no row count in metadata")


def _input_schemas(
    node: Node, files: list[tuple[str, str]], so: dict, hint: pa.Schema | None, peek_text: bool, verify_files: bool
) -> list[pa.Schema | None]:
    """Each file's schema from its metadata (Lance manifest, Parquet footer;
    JSON/CSV: the first block, only with ``peek_text``). None for an empty
    text file, ``...`` for a text file not looked at. Footers are read
    concurrently; the first failure in input order is reported."""

    def one(item: tuple[str, str]):
        path, kind = item
        try:
            if kind == "lance":
                return _lance_schema(path, so, verify_files)
            if kind == "parquet":
                return _parquet_schema(path, so)
            if kind in ("json", "csv"):
                if not peek_text:
                    return None if file_size(path, so) == 0 else ...
                return _text_schema(path, so, kind, hint)
            return node.error(f"cannot read {path!r} as {kind!r}")
        except NodeError as exc:
            return exc
        except _Damaged as exc:
            return node.error(f"{path!r}: {exc}")
        except Exception as exc:
            return node.error(f"cannot open {path!r} as {kind}: {_reason(exc)}")

    if len(files) > 1:  # footers (and sizes) of many files: object stores answer slowly, one at a time
        with ThreadPoolExecutor(max_workers=min(16, len(files)), thread_name_prefix="kaiyuan-footers") as pool:
            results = list(pool.map(one, files))
    else:
        results = [one(item) for item in files]
    for result in results:
        if isinstance(result, NodeError):
            raise result
    return results


def plan_inputs(
    node: Node,
    paths: list[str],
    fmt: str,
    select_cols: list[str] | None,
    so: dict,
    hint: pa.Schema | None,
    *,
    peek_text: bool = True,
    verify_files: bool = False,
    concrete: list[str] | None = None,
):
    """From metadata only: the read groups (files of one format and schema,
    read together), each group's schema as read (under the hint), and the
    output schema. With ``peek_text=False`` (``check()``), JSON/CSV files are
    not opened: what can be told without them is checked and None returned."""
    concrete = expand_paths(paths, so) if concrete is None else concrete
    files = _input_files(node, concrete, fmt, so)
    schemas = _input_schemas(node, files, so, hint, peek_text, verify_files)
    empty = [path for (path, _), schema in zip(files, schemas) if schema is None]
    present = [(path, kind, schema) for (path, kind), schema in zip(files, schemas) if schema is not None]
    _check_empty(node, empty, bool(present), hint, peek_text)
    groups = _read_groups(present)
    fitted, full = _unified_schema(node, groups, hint)
    if any(schema is ... for _, _, schema in present):
        return None
    if hint is not None and peek_text:
        absent = [f.name for f in hint if not any(f.name in g[2].names for g in groups)]
        if absent and groups:
            log.warning("%s: schema names column(s) %s that no input has: read as null", node.path, ", ".join(absent))
    try:
        top, out_schema = _select(full, select_cols)
    except KeyError as exc:
        raise node.error(str(exc.args[0])) from None
    return groups, fitted, top, out_schema


def _check_empty(node: Node, empty: list[str], any_present: bool, hint: pa.Schema | None, peek_text: bool) -> None:
    """Empty input files are skipped; only empty files and no schema to read
    them under is an error."""
    if empty and not any_present and hint is None:
        shown = ", ".join(repr(p) for p in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise node.error(
            f"{shown}: empty, so there are no rows and no columns to read "
            "(give a schema to read an empty input as an empty table)"
        )
    if empty and peek_text:
        log.warning("%s: skipping empty input file(s): %s", node.path, ", ".join(empty))


def _read_groups(present: list[tuple[str, str, Any]]) -> list[tuple[list[str], str, pa.Schema]]:
    """Files of one format and schema, read together (one Ray read each
    group; every Lance dataset is its own group). Files not looked at are
    left out."""
    groups: list[tuple[list[str], str, pa.Schema]] = []
    for path, kind, schema in present:
        if schema is ...:
            continue
        for group in groups:
            if group[1] == kind and kind != "lance" and group[2].equals(schema):
                group[0].append(path)
                break
        else:
            groups.append(([path], kind, schema))
    return groups


def _unified_schema(node: Node, groups, hint: pa.Schema | None) -> tuple[list[pa.Schema], pa.Schema]:
    """Each group's schema as read (fitted to the hint), and their union by name."""
    fitted = []
    for group_paths, kind, schema in groups:
        try:
            fitted.append(fit_to_hint(schema, hint) if hint is not None else schema)
        except ValueError as exc:
            raise node.error(f"schema does not fit {group_paths[0]!r}: {exc}") from None
    try:
        full = unify_by_name(fitted) if fitted else (hint if hint is not None else pa.schema([]))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        why = union_conflict([(g[0][0], s) for g, s in zip(groups, fitted)]) or str(exc)
        raise node.error(f"the inputs cannot be unioned by name: {why}") from None
    return fitted, full


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
    groups, fitted, top, out_schema = plan_inputs(node, paths, fmt, select_cols, so, hint)
    if not groups:  # only empty files, read under a schema: an empty table of it
        ds = ray.data.from_arrow(out_schema.empty_table())
        return Stream(node.tap(ds, ctx), out_schema)

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
            if kind == "parquet":
                # select_columns is pushed down into the Parquet read by Ray's optimizer.
                ds = ray.data.read_parquet(group_paths, filesystem=fs, override_num_blocks=per_group_blocks)
                ds = ds.select_columns(cols)
            else:
                ds = _read_text_files(node, kind, group_paths, fs, per_group_blocks, hint)
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
    without_effect = dict.fromkeys(sorted(SPARK_READER_KNOBS - HONOURED_KNOBS), SPARK_KNOB_REASON)
    fixed_format: ClassVar[str] = "auto"
    checks_metadata: ClassVar[bool] = True

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

    def storage_options(self, ctx: RunContext) -> dict:
        return resolve_storage_options(self.params.storage_options, ctx.storage_options)

    def check(self, ctx: RunContext) -> None:
        so = self.storage_options(ctx)
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
        if self.checks_metadata:
            # Metadata only (Lance manifests and their data files, Parquet
            # footers, file sizes): damaged or conflicting inputs are found
            # before the run. JSON/CSV contents are checked as they are read.
            p = self.params
            plan_inputs(self, _paths(p), self._format(), p.select_cols, dict(so), self._hint(p),
                        peek_text=False, verify_files=True, concrete=concrete)

    def expected_rows(self, ctx: RunContext) -> int | None:
        """From Lance manifests and Parquet footers; None when an input is
        another format (its row count is not in metadata) or cannot be read."""
        so = self.storage_options(ctx)
        try:
            files = _input_files(self, expand_paths(_paths(self.params), so), self._format(), so)
            return sum(_metadata_rows(path, kind, so) for path, kind in files)
        except Exception:  # progress is best effort: the run reports real problems
            return None

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        p = self.params
        return read_paths(
            self, _paths(p), self._format(), p.select_cols, p.num_parallel, self.storage_options(ctx), ctx, self._hint(p)
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
    num_parallel: int | None = Field(default=None, ge=1, le=1_000_000)


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
    without_effect = {**dict.fromkeys(sorted(SPARK_READER_KNOBS), SPARK_KNOB_REASON),
                      "schema": "each file is one array column: nothing for a schema to say"}
    checks_metadata = False

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        import ray

        p = self.params
        so = dict(self.storage_options(ctx))
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
