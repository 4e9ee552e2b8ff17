"""Combining nodes (SPEC §7): unions. Children are combined lazily; each
child's batches are conformed to one schema so the union has one schema."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from tasks.base import Node, NodeParams, RunContext, Stream, register
from tasks.schema import conform, unify_by_name
from tasks.storage import lance_exists

log = logging.getLogger("kaiyuan.nodes")


def union_streams(
    node: Node, streams: list[Stream], schema: pa.Schema, renames: list[list[str] | None], ctx: RunContext, count: bool = True
) -> Stream:
    datasets = []
    for stream, names in zip(streams, renames):

        def fit(batch: pa.Table, names=names) -> pa.Table:
            if names is not None:
                batch = batch.rename_columns(names)
            return conform(batch, schema)

        datasets.append(stream.ds.map_batches(fit, batch_format="pyarrow", batch_size=None, zero_copy_batch=True))
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    return Stream(node.tap(ds, ctx) if count else ds, schema)


def apply_to_children(node: Node, inputs: list[Stream], ctx: RunContext) -> Stream:
    """What the flow calls: ``node.apply`` on its children's outputs, first
    unioned by position when there are several and the node does not
    combine them itself (``combines_children``; SPEC §1)."""
    if len(inputs) > 1 and not node.combines_children:
        inputs = [union_by_position(node, inputs, ctx, count=False)]
    return node.apply(inputs, ctx)


def union_by_position(node: Node, inputs: list[Stream], ctx: RunContext, count: bool = True) -> Stream:
    """Union; later inputs take the first input's column names by position,
    types promoted where Arrow can (int -> float). A different column count
    or types that cannot be unified are errors naming both children.
    ``count``: record the union's rows as the node's output (False when the
    union only feeds the node's own operation, which counts them)."""
    first = inputs[0].schema
    renames: list[list[str] | None] = [None]
    types = list(first.types)

    def listing(schema: pa.Schema) -> str:
        return ", ".join(f"{f.name}: {f.type}" for f in schema)

    for i, stream in enumerate(inputs[1:], start=1):
        if len(stream.schema) != len(first):
            raise node.error(
                f"children are combined by position, but child_configs[{i}] has {len(stream.schema)} columns "
                f"({listing(stream.schema)}) and child_configs[0] has {len(first)} ({listing(first)})"
            )
        if stream.schema.names != first.names:
            # Swapped columns would silently mix: say so.
            log.warning(
                "%s: child_configs[%d] column names %s differ from child_configs[0]'s %s; combining by position",
                node.path, i, stream.schema.names, first.names,
            )
        renames.append(list(first.names))
        for j, t in enumerate(stream.schema.types):
            try:
                types[j] = unify_by_name([pa.schema([("c", types[j])]), pa.schema([("c", t)])]).field("c").type
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise node.error(
                    f"children are combined by position, but column {j} is {first.names[j]!r}: {types[j]} in "
                    f"child_configs[0] and {stream.schema.names[j]!r}: {t} in child_configs[{i}]"
                ) from None
    schema = pa.schema([pa.field(n, t) for n, t in zip(first.names, types)])
    return union_streams(node, inputs, schema, renames, ctx, count)


@register
class UnionByPosition(Node):
    """Union; later inputs take the first input's column names by position."""

    type_name = "UnionByPosition"
    Params = NodeParams
    combines_children = True

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        return union_by_position(self, inputs, ctx)


class UnionByNameParams(NodeParams):
    allow_missing_columns: bool = False


@register
class UnionByName(Node):
    """Union by column name; with ``allow_missing_columns`` missing columns
    are filled with null (first-seen column order)."""

    type_name = "UnionByName"
    Params = UnionByNameParams
    combines_children = True

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        schema = unify_by_name([s.schema for s in inputs])
        if not self.params.allow_missing_columns:
            for i, stream in enumerate(inputs):
                missing = [n for n in schema.names if n not in stream.schema.names]
                if missing:
                    raise self.error(
                        f"child {i} lacks column(s) {', '.join(missing)}; set allow_missing_columns: true to fill them with null"
                    )
        return union_streams(self, inputs, schema, [None] * len(inputs), ctx)


# ---------------------------------------------------------------------------
# Joiner: positional zip.

class JoinerParams(NodeParams):
    join_type: Literal["inner"] = "inner"


@register
class Joiner(Node):
    """Zip two or more children row by row (a position join). ``inner``: the
    result has as many rows as the shortest child. A column name already
    used by an earlier child gets the suffix ``_<child index>``. Each child
    is materialized once (its row count is needed); Ray Data's zip aligns
    the blocks, never on the driver."""

    type_name = "Joiner"
    Params = JoinerParams
    min_children = 2
    combines_children = True

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        used: set[str] = set()
        fields, renames = [], []
        for i, stream in enumerate(inputs):
            names = []
            for field in stream.schema:
                name = field.name
                if name in used:
                    name = f"{field.name}_{i}"
                    k = 2
                    while name in used:
                        name = f"{field.name}_{i}_{k}"
                        k += 1
                used.add(name)
                names.append(name)
                fields.append(pa.field(name, field.type))
            renames.append(names)
        mats = [s.ds.materialize() for s in inputs]
        counts = [m.count() for m in mats]
        rows = min(counts)
        if len(set(counts)) > 1:
            log.info("%s: children have %s rows; inner position join keeps %d", self.path, counts, rows)
        datasets = []
        for mat, count, names, stream in zip(mats, counts, renames, inputs):
            ds = mat.limit(rows) if count > rows else mat
            if names != stream.schema.names:
                ds = ds.map_batches(
                    lambda b, names=names: b.rename_columns(names), batch_format="pyarrow", batch_size=None, zero_copy_batch=True
                )
            datasets.append(ds)
        ds = datasets[0].zip(*datasets[1:])
        return Stream(self.tap(ds, ctx), pa.schema(fields))


# ---------------------------------------------------------------------------
# Splitter: train/validation Lance outputs, both or neither.


def _deferred_sink_class():
    """The writers' Lance datasink, except that the commit waits: fragments
    are written by the Ray write, and ``commit()`` publishes them later."""
    from tasks.writers import _make_datasink_class

    base = _make_datasink_class()

    class DeferredLanceDatasink(base):
        pending: Any = None

        def on_write_complete(self, write_result):
            self.pending = write_result

        def commit(self):
            base.on_write_complete(self, self.pending)

        def written_files(self) -> list[str]:
            import pickle

            files = []
            for batch in getattr(self.pending, "write_returns", self.pending) or []:
                for fragment, _ in batch:
                    if fragment is None:
                        continue
                    for data_file in pickle.loads(fragment).files:
                        files.append(f"{self.uri.rstrip('/')}/data/{data_file.path}")
            return files

    return DeferredLanceDatasink


class SplitterParams(NodeParams):
    train_file: str
    val_file: str
    num_train: int | float = Field(ge=0)
    split_method: Literal["exact", "fast_approximate"] = "exact"
    shuffle: bool = False
    num_train_files: int | None = Field(None, ge=1)
    num_val_files: int | None = Field(None, ge=1)
    mode: Literal["overwrite", "create", "append"] = "overwrite"
    select_cols: list[str] | None = None
    shuffle_train: bool = False
    storage_options: dict[str, Any] | None = None
    # Ray's shuffle seeds RandomState(seed + 1 or 2 + block index): < 2**32.
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


@register
class Splitter(Node):
    """Split rows at random into a train and a validation Lance dataset and
    return the validation part.

    ``num_train``: a row count, or a fraction of the rows when in (0, 1).
    ``exact``: exactly that many train rows, chosen uniformly at random (the
    rows with the smallest seeded content hash); ``fast_approximate``: each
    row goes to train with probability num_train / N (one pass, approximate
    size, still random). ``shuffle`` shuffles both outputs, ``shuffle_train``
    the train output (seeded). ``num_train_files`` / ``num_val_files`` set
    the file counts.

    Both outputs land or neither: the fragments of both are written first
    and committed only when both writes succeeded; if the second commit
    fails the first is rolled back to its previous version (or removed if it
    is new). A failed write deletes the fragments it wrote, and any output
    directory this node created."""

    type_name = "Splitter"
    Params = SplitterParams
    is_writer = True

    @classmethod
    def validate_params(cls, p: SplitterParams) -> list[str]:
        problems = []
        if not math.isfinite(p.num_train):
            return [f"num_train must be a row count or a fraction in [0, 1), got {p.num_train}"]
        if isinstance(p.num_train, float) and not 0.0 <= p.num_train < 1.0 and p.num_train != int(p.num_train):
            problems.append(f"num_train must be a row count or a fraction in [0, 1), got {p.num_train}")
        for name in ("train_file", "val_file"):
            if not getattr(p, name).strip():
                problems.append(f"{name}: give a path (an empty string names no dataset)")
        if p.train_file == p.val_file:
            problems.append("train_file and val_file must differ")
        return problems

    def _writers(self):
        from tasks.writers import LanceWriter, LanceWriterParams

        p = self.params
        out = []
        for path, files in ((p.train_file, p.num_train_files), (p.val_file, p.num_val_files)):
            params = LanceWriterParams(
                output_path=path, mode=p.mode, select_cols=p.select_cols, num_output_files=files, storage_options=p.storage_options
            )
            out.append(LanceWriter(params, self.path))
        return out

    def check(self, ctx: RunContext) -> None:
        for writer in self._writers():
            writer.check(ctx)

    def output_uris(self) -> list[str]:
        return [uri for writer in self._writers() for uri in writer.output_uris()]

    def _train_count(self, n: int) -> int:
        v = self.params.num_train
        if isinstance(v, float) and v < 1.0:
            return int(v * n + 0.5)
        return min(int(v), n)

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        from tasks.rowkeys import drop_internal, top_k_threshold
        from tasks.selection import H_COL, S_COL, keyed

        (stream,) = inputs
        p = self.params
        seed = ctx.node_seed(p.seed, self.path)
        writers = self._writers()
        schema = writers[0].output_schema(stream.schema)
        mat = keyed(self, stream, None, seed=seed)
        if p.split_method == "exact":
            threshold, kept, total = top_k_threshold(mat, self._train_count, S_COL, H_COL, 0, self)

            def is_train(batch: pa.Table):
                return threshold.mask(batch.column(S_COL).to_numpy(), batch.column(H_COL).to_numpy())
        else:
            total = mat.count()
            prob = 0.0 if total == 0 else min(1.0, self._train_count(total) / total)

            def is_train(batch: pa.Table):
                import numpy as np

                u = (batch.column(H_COL).to_numpy() >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
                return u < prob

        select = p.select_cols

        def part(train: bool):
            def fn(batch: pa.Table) -> pa.Table:
                mask = is_train(batch)
                batch = drop_internal(batch.filter(pa.array(mask if train else ~mask)))
                if select:
                    from tasks.schema import get_path

                    batch = pa.Table.from_arrays([get_path(batch, c) for c in select], names=[c.rsplit(".", 1)[-1] for c in select])
                return conform(batch, schema)

            return fn

        from tasks.rowkeys import named

        parts = []
        for train, writer in zip((True, False), writers):
            ds = mat.map_batches(named(self, part(train)), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
            if p.shuffle or (train and p.shuffle_train):
                ds = ds.random_shuffle(seed=seed + (1 if train else 2))
            parts.append(writer._layout(ds))
        self._write_both(writers, parts, schema, ctx)
        val = writers[1].existing(ctx)
        log.info("%s: wrote %s (train) and %s (validation, %s rows)", self.path, writers[0].output_uri(), writers[1].output_uri(), val.num_rows)
        return Stream(self.tap(val.ds, ctx), val.schema, num_rows=val.num_rows)

    # -- both or neither -------------------------------------------------
    def _write_part(self, writer, ds, schema: pa.Schema, ctx: RunContext):
        """Write one output's fragments (not committed); return the sink."""
        import lance

        uri, so = writer.output_uri(), writer.storage_options(ctx)
        mode = self.params.mode
        exists = lance_exists(uri, so)
        file_schema = schema
        if mode == "append" and exists:
            current = lance.dataset(uri, storage_options=so or None).schema
            if not current.remove_metadata().equals(schema, check_metadata=False):
                raise self.error(f"append: the data's schema differs from {uri!r}")
            file_schema = current
        elif mode == "append":
            mode = "create"
        if mode == "create" and exists:
            raise self.error(f"{uri!r} already exists and mode is 'create'")
        sink = _deferred_sink_class()(
            uri,
            schema=file_schema,
            mode=mode,
            storage_options=so or None,
        )
        sink.lineage = ctx.lineage.get(self.path)  # recorded by the commit, with the data
        ds.write_datasink(sink)
        return sink

    def _write_both(self, writers, parts, schema: pa.Schema, ctx: RunContext) -> None:
        import lance

        before = []
        for writer in writers:
            uri, so = writer.output_uri(), writer.storage_options(ctx)
            existed_dir = _dir_exists(uri, so)
            version = lance.dataset(uri, storage_options=so or None).version if lance_exists(uri, so) else None
            before.append((existed_dir, version))
        sinks = []
        try:
            for writer, ds in zip(writers, parts):
                sinks.append(self._write_part(writer, ds, schema, ctx))
        except BaseException:
            for writer, sink, (existed_dir, _) in zip(writers, sinks + [None] * 2, before):
                _discard(writer.output_uri(), writer.storage_options(ctx), sink, existed_dir)
            raise
        committed = []
        try:
            for writer, sink in zip(writers, sinks):
                sink.commit()
                committed.append(writer)
        except BaseException:
            for writer, (existed_dir, version) in zip(committed, before):
                _roll_back(writer.output_uri(), writer.storage_options(ctx), existed_dir, version)
            for writer, sink, (existed_dir, _) in list(zip(writers, sinks, before))[len(committed):]:
                _discard(writer.output_uri(), writer.storage_options(ctx), sink, existed_dir)
            raise


def _dir_exists(uri: str, so: dict) -> bool:
    from tasks.storage import path_exists

    try:
        return path_exists(uri, so)
    except Exception:
        return True  # unknown: never delete it


def _delete_dir(uri: str, so: dict) -> None:
    from tasks.storage import filesystem_for

    fs, inner = filesystem_for(uri, so)
    try:
        fs.delete_dir(inner)
    except FileNotFoundError:
        pass


def _discard(uri: str, so: dict, sink, existed_dir: bool) -> None:
    """Remove what an uncommitted write left behind."""
    try:
        if not existed_dir:
            _delete_dir(uri, so)
            return
        if sink is not None and sink.pending is not None:
            from tasks.storage import filesystem_for

            for path in sink.written_files():
                fs, inner = filesystem_for(path, so)
                try:
                    fs.delete_file(inner)
                except FileNotFoundError:
                    pass
    except Exception as exc:  # cleanup is best effort; readers never see these files
        log.warning("could not clean up uncommitted files under %s: %s", uri, exc)


def _roll_back(uri: str, so: dict, existed_dir: bool, version: int | None) -> None:
    import lance

    try:
        if version is None:
            if not existed_dir:
                _delete_dir(uri, so)
            return
        lance.dataset(uri, version=version, storage_options=so or None).restore()
    except Exception as exc:
        log.error("could not roll back %s to version %s: %s", uri, version, exc)
