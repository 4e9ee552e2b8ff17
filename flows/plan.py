"""A run's plan: the config, loaded and validated once, and everything decided
before the first node task starts (run context, checkpoints to reuse or
save). The flow builds one ``RunPlan`` and hands it to the builder and the
reports; nothing else re-reads the YAML.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from flows.config import NodeSpec, PipelineConfig, check_nodes, install_block_resolver, load_config
from flows.errors import ConfigError
from tasks.base import RunContext

log = logging.getLogger("kaiyuan.plan")

# A config the CLI has loaded and checked, handed to the flow it calls in
# this process (flow parameters stay a path, as deployments need).
_HANDED_OVER: dict[str, PipelineConfig] = {}


def _handover_key(path: str, overrides: dict | None) -> str:
    return json.dumps([str(path), overrides or {}], sort_keys=True, default=repr)


def hand_over(path: str, overrides: dict | None, cfg: PipelineConfig) -> None:
    """Give the next flow run of ``path`` in this process the config already loaded."""
    _HANDED_OVER[_handover_key(path, overrides)] = cfg


def config_for_run(path: str, overrides: dict | None, *, keep: bool = False) -> PipelineConfig:
    """The config handed over for this run (by the CLI, or by the flow run's
    name with ``keep``), else loaded from ``path``."""
    key = _handover_key(path, overrides)
    cfg = _HANDED_OVER.pop(key, None)
    if cfg is None:
        cfg = load_config(path, overrides)
    if keep:  # the flow run's name is asked for first; the flow body takes the same config
        _HANDED_OVER[key] = cfg
    return cfg


def prepare_config(path: str, overrides: dict | None, mode: str, work_dir: str | None = None) -> PipelineConfig:
    """The config as the run uses it: a RayCluster block fills what the YAML
    leaves unset, in k8s mode local data paths become object-store ones, and
    the run's own state has its place (``work_dir`` overrides the YAML's)."""
    cfg = config_for_run(path, overrides)
    if cfg.ray.block:
        from blocks import apply_ray_block

        apply_ray_block(cfg.ray)
    if mode == "k8s":  # SPEC §2: data/{sample,output,models}/ -> s3://BUCKET/...
        from flows.k8s_paths import rewrite_config

        cfg = rewrite_config(cfg)
        cfg.checked_with = None  # paths changed: check again
    return place_run_state(cfg, mode, work_dir)


DEFAULT_WORK_DIR = ".kaiyuan"  # local mode, against the CLI's directory
K8S_WORK_DIR = "_kaiyuan"  # k8s mode, in the data bucket


def place_run_state(cfg: PipelineConfig, mode: str, work_dir: str | None = None) -> PipelineConfig:
    """Where the run keeps what it writes besides its outputs (in place):
    ``prefect.work_dir`` (MinHash signatures) and ``prefect.checkpoint_dir``
    (node checkpoints). Locally: absolute paths, the work dir ``.kaiyuan``
    by default. In k8s mode pods share nothing but the object store, so a
    relative path is put in the data bucket (``.kaiyuan`` ->
    ``s3://BUCKET/.kaiyuan``) and the default work dir is
    ``s3://BUCKET/_kaiyuan``; an absolute path (a volume every pod mounts)
    and a URI stay as they are."""
    import os

    prefect = cfg.prefect
    chosen = work_dir or prefect.work_dir
    if mode == "k8s":
        from flows.k8s_paths import data_bucket, data_scheme

        bucket = f"{data_scheme()}://{data_bucket()}"

        def place(key: str, value: str) -> str:
            if "://" in value or os.path.isabs(value):
                return value
            relative = os.path.normpath(value)
            if relative.startswith(".."):
                raise ConfigError([f"prefect.{key}: {value!r} leaves the data bucket {bucket}; give a path inside it or a URI"])
            return bucket if relative == "." else f"{bucket}/{relative}"

        prefect.work_dir = place("work_dir", chosen or K8S_WORK_DIR)
    else:
        def place(key: str, value: str) -> str:
            return value if "://" in value else os.path.abspath(value)

        prefect.work_dir = place("work_dir", chosen or DEFAULT_WORK_DIR)
    if prefect.checkpoint_dir:
        prefect.checkpoint_dir = place("checkpoint_dir", prefect.checkpoint_dir)
    return cfg


# Node parameters that name local files or datasets.
PATH_PARAMS = ("input_path", "output_path", "model_path", "tokenizer_name_or_path", "train_file", "val_file")


def absolute_local_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Relative local paths made absolute against this process's directory
    (in place): the workers of a Ray cluster started elsewhere (``ray start
    --head`` in another directory) resolve them against their own. A
    tokenizer name that is no local path (a Hub name) stays as it is."""
    import os

    def absolute(value: Any, must_exist: bool) -> Any:
        if isinstance(value, list):
            return [absolute(v, must_exist) for v in value]
        if (not isinstance(value, str) or not value or "://" in value or "`" in value or os.path.isabs(value)
                or (must_exist and not os.path.exists(value))):
            return value
        return os.path.abspath(value)

    for spec in cfg.nodes():
        updates = {}
        for name in PATH_PARAMS:
            value = getattr(spec.params, name, None)
            new = absolute(value, must_exist=name == "tokenizer_name_or_path")
            if new != value:
                updates[name] = new
        if updates:
            spec.params = spec.params.model_copy(update=updates)
    return cfg


def run_context(cfg: PipelineConfig, seed: int | None, stats_actor: str | None, namespace: str | None) -> RunContext:
    from flows.runtime import default_read_parallelism
    from tasks.storage import resolve_storage_options

    install_block_resolver()
    data = cfg.ray.data
    return RunContext(
        seed=cfg.ray.seed if seed is None else seed,
        batch_size=data.batch_size,
        target_block_size_mb=data.target_block_size_mb,
        # Resolved once here: each node task would otherwise ask the GCS.
        read_parallelism=data.read_parallelism or default_read_parallelism(),
        shuffle_strategy=data.shuffle_strategy,
        debug_stats=cfg.ray.debug_stats,
        concurrency=data.concurrency,
        storage_options=resolve_storage_options(None, cfg.ray.storage_options),
        stats_actor=stats_actor,
        ray_namespace=namespace,
        work_dir=cfg.prefect.work_dir or DEFAULT_WORK_DIR,
    )


@dataclasses.dataclass
class CheckpointPlan:
    """What a node task does about its checkpoint (see flows/checkpoint.py)."""

    store: Any  # flows.checkpoint.CheckpointStore
    key: str
    kind: str  # "data" (write the output to the store) or "writer" (record the written dataset)
    marker: dict | None = None  # set when an existing checkpoint is reused


def checkpoint_plans(cfg: PipelineConfig, ctx: RunContext, logger=log) -> dict[str, CheckpointPlan]:
    """Checkpoint plans for the nodes that materialise (only with prefect.checkpoint_dir)."""
    from flows.checkpoint import CheckpointStore, is_plain_writer, materialises, node_keys

    if not cfg.prefect.checkpoint_dir:
        return {}
    store = CheckpointStore(cfg.prefect.checkpoint_dir, dict(ctx.storage_options))
    keys = node_keys(cfg, ctx.seed, dict(ctx.storage_options))
    plans = {}
    for spec in cfg.nodes():
        key = keys.get(spec.path)
        if key is None or not materialises(spec):
            continue
        kind = "writer" if is_plain_writer(spec) else "data"
        marker = store.lookup(spec, key, node_storage(spec, ctx))
        plans[spec.path] = CheckpointPlan(store, key, kind, marker)
        if marker is not None:
            logger.info("%s: reusing checkpoint %s (key %s, %s rows)", spec.path, marker["uri"], key, marker["rows"])
    return plans


def node_storage(spec: NodeSpec, ctx: RunContext) -> dict:
    """The storage options of a node's own I/O."""
    return dict(spec.build().storage_options(ctx))


@dataclasses.dataclass
class RunPlan:
    """One run, decided: what the builder submits and the reports describe."""

    cfg: PipelineConfig
    ctx: RunContext
    preview_rows: int = 20
    checkpoints: dict[str, CheckpointPlan] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> NodeSpec:
        return self.cfg.root

    def nodes(self) -> list[NodeSpec]:
        return self.cfg.nodes()


def make_plan(cfg: PipelineConfig, ctx: RunContext, preview_rows: int = 20, logger=log) -> RunPlan:
    """Check every node against metadata (once per config and storage
    settings) and decide the checkpoints."""
    check_nodes(cfg, ctx)
    from flows import lineage

    ctx = dataclasses.replace(ctx, lineage=lineage.compute(cfg, ctx.seed, dict(ctx.storage_options)))
    return RunPlan(cfg, ctx, preview_rows, checkpoint_plans(cfg, ctx, logger))


def expected_rows(cfg: PipelineConfig, ctx: RunContext) -> dict[str, int]:
    """Each reader's row count from its inputs' metadata, asked concurrently
    (object stores answer one request at a time). Asked by the progress
    thread while the nodes run, never on the way to the first node task."""
    from concurrent.futures import ThreadPoolExecutor

    readers = [spec for spec in cfg.nodes() if not spec.children and spec.cls.max_children == 0]
    if not readers:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(readers)), thread_name_prefix="kaiyuan-rows") as pool:
        counts = list(pool.map(lambda spec: spec.build().expected_rows(ctx), readers))
    return {spec.path: n for spec, n in zip(readers, counts) if n is not None}
