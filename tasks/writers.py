"""Writers (SPEC §3): LanceWriter and LanceWriterZstd.

Ray's own ``write_lance`` is broken with pylance >= 6 (ray-project/ray#65129),
so writes go through ``lance-ray``'s datasink: fragments are written in
parallel by Ray tasks and committed once, on the driver, as one new Lance
version. A failed or killed write therefore never changes what readers see.
We subclass the datasink for two fixes: an empty result still commits an
empty dataset with its schema, and ``create`` refuses an existing target at
commit time too (lance-ray's ``create`` commits an Overwrite).
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from tasks.base import Node, NodeError, NodeParams, RunCancelled, RunContext, Stream, find_in_chain, register
from tasks.lance_leases import WriteLease, sweep_orphans
from tasks.schema import conform, get_path
from tasks.storage import lance_exists, normalize_uri, resolve_storage_options

WriteMode = Literal["overwrite", "append", "create", "ignore", "read_if_exists"]


def _make_datasink_class():
    """lance-ray's datasink with the fixes above (made on first use: lance-ray
    imports Ray, and the CLI validates configs without it)."""
    from lance_ray.datasink import LanceDatasink

    return type(
        "KaiyuanLanceDatasink",
        (LanceDatasink,),
        {
            "min_rows_per_write": property(_no_bundling),
            "write": _sink_write,
            "_write_replacing": _write_replacing,
            "on_write_complete": _on_write_complete,
        },
    )


def _no_bundling(sink):
    """No bundling before the write: a bundled write cannot fuse with the read
    and maps before it, so every block would cross the object store. One
    fragment per block; readers make blocks of fragment size
    (flows/runtime.configure_ray_data)."""
    return None


def _sink_write(sink, blocks, ctx):
    """Write one task's blocks; an all-empty task returns the schema only, so
    that an empty result can still commit."""
    from lance_ray.datasink import LanceDatasink

    seen: list[pa.Schema] = []

    def remember(it):
        for block in it:
            if not seen and isinstance(block, pa.Table):
                seen.append(block.schema)
            if len(block):
                yield block

    if sink.mode in ("create", "overwrite"):
        out = sink._write_replacing(remember(blocks))
    else:
        out = LanceDatasink.write(sink, remember(blocks), ctx)
    if not out and seen:
        out = [(None, pickle.dumps(sink.schema or seen[0]))]
    return out


def _write_replacing(sink, blocks):
    """Fragments for a new version that replaces the dataset: written in
    Lance's overwrite mode, so an existing dataset's schema does not constrain
    them (lance-ray writes them in append mode)."""
    import itertools

    from lance.fragment import write_fragments

    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        return []
    schema = sink.schema or first.schema
    reader = pa.RecordBatchReader.from_batches(
        schema, (b for t in itertools.chain([first], blocks) for b in t.to_batches())
    )
    fragments = write_fragments(
        reader,
        sink.uri,
        schema=schema,
        mode="overwrite",
        max_rows_per_file=sink.max_rows_per_file,
        data_storage_version=sink.data_storage_version,
        storage_options=sink.storage_options,
    )
    return [(pickle.dumps(f), pickle.dumps(schema)) for f in fragments]


def _on_write_complete(sink, write_result):
    """Commit on the driver: refuse when the run was cancelled (the last moment
    to honour it: after this the new version is committed and the run must be
    recorded as completed) or when ``create`` finds a target; an empty result
    commits an empty dataset with its schema."""
    import lance

    _pause_before_commit()
    context = getattr(sink, "run_context", None)
    if context is not None and _cancelled(context):
        raise RunCancelled(f"{sink.uri}: not committed, the run was cancelled")
    results = getattr(write_result, "write_returns", write_result)
    real = [[item for item in batch if item[0] is not None] for batch in results]
    real = [batch for batch in real if batch]
    if sink.mode == "create" and lance_exists(sink.uri, sink.storage_options or {}):
        raise FileExistsError(f"{sink.uri} already exists (mode: create)")
    properties = commit_properties(getattr(sink, "lineage", None), sink.uri, sink.mode)
    if real:
        return _commit(sink, real, properties)
    if sink.mode in ("create", "overwrite"):
        lance.write_dataset(
            sink.schema.empty_table(), sink.uri, mode="overwrite", storage_options=sink.storage_options,
            transaction_properties=properties or None,
        )


def _commit(sink, results, properties: dict[str, str]):
    """lance-ray's commit (``LanceDatasink.on_write_complete``), as one
    ``lance.Transaction`` whose properties carry the lineage: the new version
    and the record of where it came from are one atomic commit."""
    import lance

    if getattr(sink, "initial_bases", None) or getattr(sink, "base_store_params", None):
        from lance_ray.datasink import LanceDatasink

        return LanceDatasink.on_write_complete(sink, results)  # options our writers never set
    fragments, schema = [], None
    for batch in results:
        for fragment, fragment_schema in batch:
            fragments.append(pickle.loads(fragment))
            schema = pickle.loads(fragment_schema)
    if sink.mode in ("create", "overwrite"):
        operation = lance.LanceOperation.Overwrite(schema, fragments)
    else:
        operation = lance.LanceOperation.Append(fragments)
    # An append is checked against the version it read (on_write_start); an
    # overwrite conflicts with nothing, and reading from the latest version
    # spares Lance checking it against every earlier transaction.
    read_version = sink.read_version
    if read_version is None:
        read_version = _latest_version(sink.uri, sink.storage_options)
    lance.LanceDataset.commit(
        sink.uri,
        lance.Transaction(read_version, operation, transaction_properties=properties),
        storage_options=sink.storage_options,
        enable_stable_row_ids=sink.enable_stable_row_ids,
        **getattr(sink, "namespace_kwargs", {}),
    )


def _latest_version(uri: str, storage_options) -> int:
    """The dataset's latest version, 0 when there is none yet."""
    import lance

    if not lance_exists(uri, storage_options or {}):
        return 0
    return lance.dataset(uri, storage_options=storage_options or None).version


# The transaction property that holds a commit's lineage (JSON; see
# flows/lineage.py, which computes and reads it).
LINEAGE_PROPERTY = "kaiyuan.lineage"

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def mask_uri(uri: str) -> str:
    """``uri`` without credentials written into it (``scheme://user:secret@host``)."""
    return _USERINFO.sub(r"\1***@", str(uri))


def commit_properties(lineage: dict | None, uri: str, mode: str) -> dict[str, str]:
    """The transaction properties that record ``lineage`` (the flow's, for
    this writer) for one commit to ``uri``; none without lineage."""
    if not lineage:
        return {}
    import datetime
    import json

    committed = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = dict(lineage, output=mask_uri(uri), mode=mode, committed=committed)
    run = doc.get("flow_run") or {}
    label = run.get("name") or run.get("id")
    message = f"kaiyuan {doc.get('node')}" + (f" (flow run {label})" if label else "")
    return {LINEAGE_PROPERTY: json.dumps(doc, sort_keys=True, default=str), "__lance_commit_message": message}


def _cancelled(ctx: RunContext) -> bool:
    from tasks.metrics import stats_client

    client = stats_client(ctx)
    return client is not None and client.cancelled()


class LanceWriterParams(NodeParams):
    output_path: str
    mode: WriteMode = "overwrite"
    select_cols: list[str] | None = None
    shuffle: bool = False
    # Ray's random_shuffle seeds RandomState(seed + block index): < 2**32.
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    num_output_files: int | None = Field(None, ge=1)
    num_read_partitions: int | None = Field(None, ge=1)
    storage_options: dict[str, Any] | None = None


class LanceWriterZstdParams(LanceWriterParams):
    compression_level: int | None = Field(None, ge=1, le=22)  # zstd's levels
    use_coalesce: bool = False
    merge_count: int = Field(1, ge=1)


ZSTD_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


@register
class LanceWriter(Node):
    type_name = "LanceWriter"
    Params = LanceWriterParams
    is_writer = True
    without_effect = {
        "compression": "a Spark writer option; LanceWriterZstd sets Lance's compression",
        "partition_by": "a Spark writer option; Lance datasets are not partitioned by directory",
    }

    @classmethod
    def validate_params(cls, p: LanceWriterParams) -> list[str]:
        if not p.output_path.strip():
            return ["output_path: give a path (an empty string names the working directory)"]
        return []

    def output_uri(self) -> str:
        return normalize_uri(self.params.output_path)

    def output_uris(self) -> list[str]:
        return [self.output_uri()]

    def storage_options(self, ctx: RunContext) -> dict:
        return resolve_storage_options(self.params.storage_options, ctx.storage_options)


    def check(self, ctx: RunContext) -> None:
        if "://" not in self.output_uri():
            import os

            parent = os.path.dirname(os.path.abspath(self.output_uri()))
            while parent and not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise self.error(f"output_path {self.output_uri()!r}: {parent!r} is a file, not a directory")
        if self.params.mode == "create" and lance_exists(self.output_uri(), self.storage_options(ctx)):
            raise self.error(
                f"output_path {self.output_uri()!r} already exists and mode is 'create' "
                "(use 'overwrite' to replace it or 'append' to add rows)"
            )

    def existing(self, ctx: RunContext) -> Stream:
        import lance
        import lance_ray

        so = self.storage_options(ctx)
        dataset = lance.dataset(self.output_uri(), storage_options=so or None)
        ds = lance_ray.read_lance(
            self.output_uri(),
            storage_options=so or None,
            dataset_options={"version": dataset.version},
            override_num_blocks=self.params.num_read_partitions,
        )
        return Stream(ds, dataset.schema, num_rows=dataset.count_rows())

    def short_circuit(self, ctx: RunContext) -> Stream | None:
        if self.params.mode in ("ignore", "read_if_exists") and lance_exists(self.output_uri(), self.storage_options(ctx)):
            return self.existing(ctx)
        return None

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        cols = self.params.select_cols
        if cols:
            missing = [c for c in cols if c.split(".")[0] not in schema.names]
            if missing:
                raise self.error(f"select_cols: no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)})")
            from tasks.schema import field_at

            schema = pa.schema([pa.field(c.rsplit(".", 1)[-1], field_at(schema, c).type) for c in cols])
        return schema.remove_metadata()

    def _prepare(self, ds, schema: pa.Schema, ctx: RunContext):
        cols = self.params.select_cols

        def prepare(batch: pa.Table) -> pa.Table:
            if cols:
                batch = pa.Table.from_arrays(
                    [get_path(batch, c) for c in cols], names=[c.rsplit(".", 1)[-1] for c in cols]
                )
            return conform(batch, schema)

        return ds.map_batches(
            self.batch_fn(prepare, ctx), batch_format="pyarrow", batch_size=None, zero_copy_batch=True
        )

    def _layout(self, ds):
        """Block layout before the write: shuffle, then the number of files."""
        return ds.repartition(self.params.num_output_files) if self.params.num_output_files else ds

    def _file_schema(self, schema: pa.Schema) -> pa.Schema:
        return schema

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        import lance

        (stream,) = inputs
        p = self.params
        uri, so = self.output_uri(), self.storage_options(ctx)
        schema = self.output_schema(stream.schema)
        exists = lance_exists(uri, so)
        mode = {"ignore": "overwrite", "read_if_exists": "overwrite"}.get(p.mode, p.mode)
        if mode == "append" and exists:
            current = lance.dataset(uri, storage_options=so or None).schema
            if not current.remove_metadata().equals(schema, check_metadata=False):
                raise self.error(
                    f"append: the data's schema differs from {uri!r}:\n  data:   {_fmt(schema)}\n  target: {_fmt(current)}"
                )
            schema = current
        elif mode == "append":
            mode = "create"
        if mode == "create" and exists:
            raise self.error(f"output_path {uri!r} already exists and mode is 'create'")
        ds = self._prepare(stream.ds, schema, ctx)
        if p.shuffle:
            ds = ds.random_shuffle(seed=ctx.node_seed(p.seed, self.path))
        ds = self._layout(ds)
        sink = _make_datasink_class()(
            uri,
            schema=self._file_schema(schema),
            mode=mode,
            storage_options=so or None,
        )
        sink.run_context = ctx
        sink.lineage = ctx.lineage.get(self.path)
        with WriteLease(uri, so) as lease:
            if lease.held:
                sweep_orphans(uri, so)
            try:
                ds.write_datasink(sink)
            except Exception as exc:
                if find_in_chain(exc, (NodeError, RunCancelled)) is not None:
                    raise  # a node below failed, or the run was cancelled: it says so
                io = find_in_chain(exc, OSError)
                while io is not None and isinstance(getattr(io, "cause", None), BaseException):
                    io = io.cause  # Ray's wrapper around the worker's error
                if io is None:
                    raise
                import re

                reason = (str(io).strip().splitlines() or [type(io).__name__])[0]
                reason = re.sub(r", \S+\.rs:\d+:\d+$", "", reason)  # Lance's Rust source location
                raise self.error(f"cannot write {uri!r}: {reason[:300]}") from None
        return self.existing(ctx)


def _pause_before_commit() -> None:
    """Fault injection for the kill tests: ``KAIYUAN_PAUSE_BEFORE_COMMIT=MARKER``
    creates MARKER and waits (up to 10 minutes) while MARKER exists, so a test
    can kill or signal the run at the last moment before a commit."""
    import os
    import time

    marker = os.environ.get("KAIYUAN_PAUSE_BEFORE_COMMIT")
    if not marker:
        return
    open(marker, "w").close()
    deadline = time.monotonic() + 600
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.1)


def _fmt(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


@register
class LanceWriterZstd(LanceWriter):
    """LanceWriter with zstd-compressed text columns and optional coalescing."""

    type_name = "LanceWriterZstd"
    Params = LanceWriterZstdParams

    def _layout(self, ds):
        """SPEC §3: ``num_output_files`` blocks when set, else (coalescing or
        not) max(1, blocks / ``merge_count``)."""
        p = self.params
        if p.num_output_files or p.merge_count == 1:
            return super()._layout(ds)
        # The block count is known only once computed: keep the blocks in
        # Ray's object store (spilled to disk when large, never on the
        # driver) rather than computing the input twice.
        ds = ds.materialize()
        return ds.repartition(max(1, ds.num_blocks() // p.merge_count))

    def _file_schema(self, schema: pa.Schema) -> pa.Schema:
        meta = {"lance-encoding:compression": "zstd"}
        if self.params.compression_level is not None:
            meta["lance-encoding:compression-level"] = str(self.params.compression_level)
        fields = [
            f.with_metadata(meta) if any(test(f.type) for test in ZSTD_TYPES) else f for f in schema
        ]
        return pa.schema(fields)
