"""The node contract shared by every node family.

A node is a declarative class: a YAML type name, a typed parameter model, a
child-count rule and either a pure Arrow batch function (``BatchNode``) or a
dataset-level operation (``Node.apply``). Nodes know nothing about Prefect:
the flow builder in ``flows/`` maps a tree of nodes onto Prefect tasks, and
reads what nodes observed (row counts, sample rows, sums) from ``RunStats``.
What the flow asks of a node beyond that is declared on ``Node``:
``output_uri``, ``storage_options``, ``checkpoint_by_default`` and
``report_metrics``.

Adding a node family is adding a module under ``tasks/`` (every module there
is imported at start, which registers its nodes). This is all of one; it
runs as written (tests/test_node_contract.py)::

    import pyarrow as pa
    import pyarrow.compute as pc
    from pydantic import Field

    from tasks.base import BatchNode, NodeParams, register


    class ClipScoresParams(NodeParams):
        column: str
        low: float = Field(default=0.0, ge=-1e9, le=1e9)
        high: float = Field(default=1.0, ge=-1e9, le=1e9)


    @register
    class ClipScores(BatchNode):
        "Clip a numeric column to [low, high]."

        type_name = "ClipScores"
        Params = ClipScoresParams

        @classmethod
        def validate_params(cls, p):
            return [] if p.low <= p.high else [f"low ({p.low}) must be <= high ({p.high})"]

        def transform(self, batch: pa.Table) -> pa.Table:
            p = self.params
            if p.column not in batch.column_names:
                raise self.error(f"no column {p.column!r}")
            col = batch.column(p.column)  # nulls stay null:
            clipped = pc.min_element_wise(pc.max_element_wise(col, p.low, skip_nulls=False), p.high, skip_nulls=False)
            return batch.set_column(batch.column_names.index(p.column), p.column, clipped)

In a recipe: ``{type: ClipScores, column: score, high: 0.9, child_configs: [...]}``.
The output schema comes from the transform applied to an empty batch, so a
missing column is reported before any data is read.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar, Iterable

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from tasks.metrics import client_for

NODE_TYPES: dict[str, type["Node"]] = {}


def register(cls: type["Node"]) -> type["Node"]:
    """Class decorator: make a node available under its YAML name and aliases."""
    for name in (cls.type_name, *cls.aliases):
        if name in NODE_TYPES and NODE_TYPES[name] is not cls:
            raise RuntimeError(f"node type {name!r} registered twice")
        NODE_TYPES[name] = cls
    return cls


class NodeParams(BaseModel):
    """Base of every node's parameter model.

    Strict: a string where a number belongs is an error, unknown keys are
    errors (the config loader suggests the nearest valid name).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NodeError(Exception):
    """A user-facing failure of one node (bad data, missing column, ...).

    The message always names the node by its path in the tree, so the CLI can
    print it without a traceback.
    """

    def __init__(self, node_path: str, message: str):
        super().__init__(f"{node_path}: {message}")
        self.node_path = node_path
        self.problem = message

    def __reduce__(self):  # keep the two fields across Ray's pickling
        return (NodeError, (self.node_path, self.problem))


def find_in_chain(exc: BaseException, kinds) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``'s chain: causes, contexts
    and the original error a RayTaskError keeps in ``cause`` (Ray and Prefect
    wrap errors)."""
    seen: set[int] = set()
    stack: list = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


_RAY_NODE_ERROR: type | None = None


def node_error_in_ray(node_path: str, problem: str) -> NodeError:
    """A NodeError raised inside a Ray Data task: also Ray's
    UserCodeException, so Ray Data reports it as a user error (one line)
    rather than dumping its traceback as an internal one."""
    global _RAY_NODE_ERROR
    if _RAY_NODE_ERROR is None:
        from ray.exceptions import UserCodeException

        class RayNodeError(NodeError, UserCodeException):
            def __reduce__(self):
                return (node_error_in_ray, (self.node_path, self.problem))

        _RAY_NODE_ERROR = RayNodeError
    return _RAY_NODE_ERROR(node_path, problem)


def name_errors(node_path: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a function run inside Ray tasks (a batch function, a per-block
    summary) so that its failures name the node: any exception becomes a
    NodeError naming ``node_path`` with the cause chained; a NodeError keeps
    its node. Both are raised as Ray's user-code kind (``node_error_in_ray``),
    one line in Ray Data's log rather than a traceback."""

    def run(batch):
        try:
            return fn(batch)
        except NodeError as exc:
            if type(exc) is NodeError:
                raise node_error_in_ray(exc.node_path, exc.problem) from None
            raise
        except Exception as exc:
            raise node_error_in_ray(node_path, f"{type(exc).__name__}: {exc}") from exc

    run.__name__ = f"node[{node_path}]"
    return run


class RunCancelled(Exception):
    """The run was asked to stop (SIGTERM) before its output was committed."""

    def __init__(self, message: str = "the run was cancelled before its output was committed"):
        super().__init__(message)


class Redacted(dict):
    """A dict whose repr never shows its values (storage credentials)."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: '***'" for k in self) + "}"

    __str__ = __repr__


# Ray Data's shuffle for sorts, groupbys and repartitions (ray.data.shuffle_strategy).
# Ray's own default, shuffle_v2, is 4-5x slower here for every sorting node
# (bench/selection_bench.py; see flows/runtime.configure_ray_data).
DEFAULT_SHUFFLE_STRATEGY = "sort_shuffle_pull_based"


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Run-wide settings a node may read. Picklable; holds no live handles."""

    seed: int = 42
    batch_size: int | None = None  # for model-style nodes; None = whole blocks
    target_block_size_mb: int | None = None
    read_parallelism: int | None = None
    shuffle_strategy: str = DEFAULT_SHUFFLE_STRATEGY
    debug_stats: bool = False
    concurrency: int | None = None
    storage_options: Redacted = dataclasses.field(default_factory=Redacted)
    stats_actor: str | None = None  # "<RunStats actor name>/<run key>", if stats are collected
    ray_namespace: str | None = None
    work_dir: str = ".kaiyuan"
    # Writer node path -> where its output comes from (config, flow run, input
    # versions), computed by the flow and recorded with each commit.
    lineage: dict[str, dict] = dataclasses.field(default_factory=dict)

    def node_seed(self, node_seed: int | None, node_path: str) -> int:
        """The node's own seed, else one derived from the run seed and the node's
        position, so two random nodes in one tree do not draw the same stream."""
        if node_seed is not None:
            return int(node_seed)
        import zlib

        return (self.seed * 1_000_003 + zlib.crc32(node_path.encode())) % (2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Observe:
    """What the flow should observe in a node's output stream (no extra pass)."""

    head_rows: int = 0
    sum_columns: tuple[str, ...] = ()
    schema: bool = False


class Node:
    """Base of all nodes. Subclasses set the class attributes and implement
    ``apply`` (dataset level) or, via ``BatchNode``, ``transform``."""

    type_name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[NodeParams]] = NodeParams
    # Several children are unioned by position before ``apply`` (SPEC §1;
    # tasks.combine.apply_to_children) unless the node combines them itself.
    min_children: ClassVar[int] = 1
    max_children: ClassVar[int | None] = None
    combines_children: ClassVar[bool] = False
    # Parameters accepted with no effect on Ray, each with the reason (SPEC
    # §1: logged when a config gives one, never dropped silently). Names
    # outside ``Params`` are Spark-era knobs, dropped when the YAML is read;
    # names inside are validated, and logged when the node runs.
    without_effect: ClassVar[dict[str, str]] = {}
    # Python modules the node needs beyond the core install, and the extra
    # that provides them (checked at validation time).
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    observe: ClassVar[Observe | None] = None
    # True for nodes that write their own output (writers, splitters).
    is_writer: ClassVar[bool] = False
    # Whether the flow persists this node's output as a checkpoint (with
    # ``prefect.checkpoint_dir``) even when the YAML does not ask for it:
    # true for stages far more expensive than reading their output back.
    checkpoint_by_default: ClassVar[bool] = False

    def __init__(self, params: NodeParams, path: str):
        self.params = params
        self.path = path

    # -- validation -------------------------------------------------------
    @classmethod
    def validate_params(cls, params: NodeParams) -> list[str]:
        """Cross-field checks a pydantic model cannot express simply; return
        problems as sentences (empty list: valid)."""
        return []

    def check(self, ctx: RunContext) -> None:
        """Pre-flight checks that may look at metadata (does a path exist?) but
        never read data. Raise NodeError."""

    def input_uris(self) -> list[str]:
        """Datasets the node reads from storage (readers)."""
        return []

    def output_uris(self) -> list[str]:
        """Datasets the node writes (writers, splitters)."""
        return []

    def expected_rows(self, ctx: RunContext) -> int | None:
        """Rows the node will read from storage, told by metadata alone
        (readers; None when the metadata does not say). The run's progress is
        the rows read against these."""
        return None

    # -- what the flow asks of every node ----------------------------------
    def output_uri(self) -> str | None:
        """The dataset this node writes and hands upward as its output (a
        writer's Lance target), or None when its output is a lazy stream. The
        flow records it as the run's output path and, for writers, checkpoints
        it in place rather than copying it."""
        return None

    def storage_options(self, ctx: RunContext) -> dict:
        """Storage options (credentials, endpoint) for this node's own I/O:
        the run's by default. Nodes with a ``storage_options`` parameter
        (readers, writers, model nodes) resolve it over the run's; the flow
        uses the same options to verify and read the node's checkpoint. A
        fresh ``Redacted`` dict: its repr never shows the values."""
        return Redacted(ctx.storage_options)

    def report_metrics(self, ctx: RunContext, sums: dict[str, float]) -> None:
        """Add ``sums`` (name -> number) to this node's metrics for the run:
        they are summed over calls and reach ``report`` as
        ``Observation.sums``. Synchronous, so they are recorded before the
        node's task ends; a no-op when the run collects no stats."""
        client = _stats_client(ctx.stats_actor, ctx.ray_namespace)
        if client is not None:
            client.add_metrics(self.path, {k: float(v) for k, v in sums.items()})

    # -- execution --------------------------------------------------------
    def apply(self, inputs: list["Stream"], ctx: RunContext) -> "Stream":
        raise NotImplementedError

    def short_circuit(self, ctx: RunContext):
        """Return a dataset to use *instead of* computing the children (for
        example a writer in ``read_if_exists`` mode whose target exists)."""
        return None

    def report(self, observed: "Observation") -> "Report | None":
        """Turn what was observed into a report (for reporting nodes)."""
        return None

    def error(self, message: str) -> NodeError:
        return NodeError(self.path, message)

    def batch_fn(self, fn: Callable[[pa.Table], pa.Table], ctx: RunContext):
        """Wrap a pure Arrow batch function: errors name this node, rows in and
        out and the time spent are recorded in the run's stats."""
        return instrument(self.path, fn, ctx, self.observe)

    def tap(self, ds, ctx: RunContext, observe: Observe | None = None):
        """Count (and observe) rows flowing out of a dataset-level operation.
        Takes and returns a ray Dataset."""
        return ds.map_batches(
            instrument(self.path, None, ctx, observe or self.observe),
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
        )


class BatchNode(Node):
    """A node that is a pure function of one Arrow batch."""

    # Whole blocks suit vectorised Arrow code; model nodes set True and use the
    # run's ``ray.data.batch_size``.
    uses_batch_size: ClassVar[bool] = False

    def transform(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The output schema for an input schema, known before any data is
        read: by default the transform applied to an empty batch. Nodes whose
        output depends on the data or a model override this."""
        try:
            return self.transform(schema.empty_table()).schema
        except NodeError:
            raise
        except Exception as exc:
            raise self.error(f"{type(exc).__name__}: {exc}") from exc

    def apply(self, inputs: list["Stream"], ctx: RunContext) -> "Stream":
        (stream,) = inputs
        schema = self.output_schema(stream.schema)
        ds = stream.ds.map_batches(
            self.batch_fn(self.transform, ctx),
            batch_format="pyarrow",
            batch_size=ctx.batch_size if self.uses_batch_size else None,
            zero_copy_batch=True,
        )
        return Stream(ds, schema)


@dataclasses.dataclass
class Stream:
    """A lazy Ray dataset with its schema, known without reading data. This is
    what flows from one node to the next."""

    ds: Any  # ray.data.Dataset (kept untyped so this module imports without Ray)
    schema: pa.Schema
    num_rows: int | None = None  # known without a pass (a written dataset)


@dataclasses.dataclass
class Observation:
    """What the flow saw flowing out of one node during the run."""

    rows_in: int | None = None
    rows_out: int | None = None
    seconds: float = 0.0
    batches: int = 0
    head: pa.Table | None = None
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    schema: pa.Schema | None = None


@dataclasses.dataclass
class Report:
    """A node's human-readable report: markdown text and/or a table."""

    title: str
    markdown: str | None = None
    table: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------
# Instrumentation: runs inside Ray workers, in the node's own batch function.

_HEAD_SENT: dict[tuple[str, str], int] = {}


STATS_ACTOR_NAME = "kaiyuan-run-stats"


def _stats_client(stats_actor: str | None, namespace: str | None):
    """The run's stats client, None when the run collects no stats."""
    return None if stats_actor is None else client_for(stats_actor, namespace)


def _observed(out: pa.Table, observe: Observe, head_key: tuple[str, str]) -> tuple[pa.Table | None, dict[str, float]]:
    """The head rows still to send for this node (in this worker) and the
    sums of the observed columns in one output batch."""
    head = None
    if observe.head_rows:
        sent = _HEAD_SENT.get(head_key, 0)
        if sent < observe.head_rows and out.num_rows:
            head = out.slice(0, observe.head_rows - sent)
            _HEAD_SENT[head_key] = sent + head.num_rows
    sums = {}
    for col in observe.sum_columns:
        if col in out.column_names:
            import pyarrow.compute as pc

            total = pc.sum(out.column(col)).as_py()
            sums[col] = float(total or 0)
    return head, sums


def instrument(
    node_path: str,
    fn: Callable[[pa.Table], pa.Table] | None,
    ctx: RunContext,
    observe: Observe | None,
):
    """Return a batch function that runs ``fn`` (identity if None), names the
    node on failure, and reports rows/time/observations to the run's stats
    actor. The report is synchronous so counts are complete when the root's
    execution returns."""
    observe = observe or Observe()
    call = name_errors(node_path, fn) if fn is not None else None
    stats_name, namespace = ctx.stats_actor, ctx.ray_namespace  # not ctx: it holds credentials

    def run(batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        out = batch if call is None else call(batch)
        elapsed = time.perf_counter() - start
        client = _stats_client(stats_name, namespace)
        if client is None:
            return out
        head, sums = _observed(out, observe, (stats_name, node_path))
        cancelled = client.record_batch(
            node_path,
            rows_in=batch.num_rows if call is not None else None,
            rows_out=out.num_rows,
            seconds=elapsed,
            head=head,
            sums=sums,
            schema=out.schema if observe.schema else None,
            head_limit=observe.head_rows,
        )
        if cancelled:
            raise RunCancelled(f"{node_path}: stopped, the run was cancelled")
        return out

    run.__name__ = f"node[{node_path}]"
    return run


def log_without_effect(logger, where: str, given: Iterable[str], reasons: dict[str, str]) -> None:
    """The one way to say "accepted, no effect": one line naming what was given and why."""
    given = list(given)
    if given:
        why = "; ".join(dict.fromkeys(reasons[n] for n in given))
        logger.info("%s: %s accepted, no effect: %s", where, ", ".join(given), why)


def all_node_types() -> Iterable[str]:
    return sorted(NODE_TYPES)
