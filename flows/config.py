"""Load and validate a Kaiyuan YAML pipeline (SPEC §1) before any data is touched.

Every problem is collected (not just the first) and reported as one
paragraph per problem, each naming the node by its path in the tree, e.g.
``pipeline > child_configs[0] > FilterByRatio: unknown parameter 'keep_ration'
(did you mean 'keep_ratio'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import tasks
from flows.errors import ConfigError
from tasks.base import DEFAULT_SHUFFLE_STRATEGY, NODE_TYPES, Node, log_without_effect

log = logging.getLogger("kaiyuan.config")


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    batch_size: int | None = 1024
    target_block_size_mb: int | None = 128
    concurrency: int | None = None
    max_write_blocks: int | None = 64
    read_parallelism: int | None = None
    shuffle_strategy: Literal["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2"] = DEFAULT_SHUFFLE_STRATEGY


DATA_WITHOUT_EFFECT = {
    "max_write_blocks": "each block streams straight into its own Lance fragment writer, fused with the steps "
                        "before it; LanceWriter's num_output_files sets the number of files",
}


class RaySection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    app_name: str = "kaiyuan"
    address: str | None = None
    init_kwargs: dict[str, Any] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    namespace: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    debug_stats: bool = False
    data: DataSection = Field(default_factory=DataSection)
    seed: int = 42
    block: str | None = None  # a RayCluster Prefect block supplying the above


class PrefectSection(BaseModel):
    """Kaiyuan Flows' own optional section; old configs never have it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    flow_name: str | None = None
    retries: int = Field(default=0, ge=0, le=100)
    retry_delay_seconds: float = Field(default=10, ge=0, le=86_400)
    checkpoint_dir: str | None = None
    # Where the run keeps its own intermediate state (MinHash signatures):
    # default .kaiyuan locally, <scheme>://<bucket>/_kaiyuan in k8s mode
    # (flows.plan.place_run_state).
    work_dir: str | None = None
    tags: list[str] = Field(default_factory=list)
    # The progress artifact appears once a run has lasted this long (seconds).
    progress_after_s: float = Field(default=5.0, ge=0)


@dataclasses.dataclass
class NodeSpec:
    """One validated node of the tree."""

    type_name: str
    cls: type[Node]
    params: Any
    children: list["NodeSpec"]
    path: str
    raw: dict[str, Any]
    # `checkpoint: true` on a node (a common key, not a node parameter):
    # persist its output in prefect.checkpoint_dir and reuse it on re-runs.
    checkpoint: bool = False

    def build(self) -> Node:
        """The node, built once per parameters (a run asks for it from
        validation, checkpoint keys, the flow and the reports)."""
        node = self.__dict__.get("_node")
        if node is None or node.params is not self.params:
            node = self.__dict__["_node"] = self.cls(self.params, self.path)
        return node

    def __getstate__(self) -> dict:
        # Sent to Ray workers without the built node: each builds its own.
        return {k: v for k, v in self.__dict__.items() if k != "_node"}

    def walk(self):
        """Post-order: children before parents."""
        for child in self.children:
            yield from child.walk()
        yield self


@dataclasses.dataclass
class PipelineConfig:
    ray: RaySection
    prefect: PrefectSection
    root: NodeSpec
    source: str | None = None
    # The storage options check_nodes last passed with: a run checks once.
    checked_with: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    def nodes(self) -> list[NodeSpec]:
        return list(self.root.walk())


def _suggest(word: Any, choices) -> str:
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _yaml_names(model: type[BaseModel]) -> list[str]:
    """The keys a YAML file uses for a model's fields (aliases where set)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def _text_keys(raw: dict, where: str, problems: list[str]) -> dict:
    """``raw`` without the keys that are not text (YAML reads ``1:``, ``null:``
    and unquoted ``yes:``/``on:`` as numbers, null and booleans), each
    reported: they cannot name a parameter."""
    for key in raw:
        if not isinstance(key, str):
            hint = " (YAML reads unquoted yes/no/on/off as booleans: quote the key)" if isinstance(key, bool) else ""
            problems.append(f"{where}: {key!r} ({_type_label(key)}) cannot be a parameter name{hint}")
    return {k: v for k, v in raw.items() if isinstance(k, str)}


# Integers in a config end up in Arrow, NumPy or Ray, all 64-bit.
_INT64 = (-(2**63), 2**63 - 1)


def _unusable_numbers(model: BaseModel, where: str) -> list[str]:
    """Values of a validated model that no run can use: integers beyond 64
    bits (also in lists and nested sections) and NaN. Mappings are skipped
    (free-form options, possibly credentials)."""
    problems = []

    def visit(value: Any, loc: str, top: bool) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                visit(getattr(value, name), f"{loc}.{name}" if loc else name, top)
        elif isinstance(value, list):
            for item in value:
                visit(item, loc, False)
        elif type(value) is int and not _INT64[0] <= value <= _INT64[1]:
            problems.append(f"{where}: parameter {loc!r}: {value} does not fit in a 64-bit integer")
        elif top and isinstance(value, float) and value != value:
            problems.append(f"{where}: parameter {loc!r}: NaN is not a usable value")

    visit(model, "", True)
    return problems


def _type_label(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def _pydantic_problems(exc: ValidationError, where: str, model: type[BaseModel]) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
        field = str(err["loc"][0]) if err["loc"] else ""
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(f"{where}: unknown parameter {field!r}{_suggest(field, _yaml_names(model))}")
        elif kind == "missing":
            problems.append(f"{where}: missing required parameter {loc!r}")
        else:
            got = err.get("input")
            if isinstance(got, dict):
                got_text = ""
            elif _may_hold_secrets(err["loc"]):
                got_text = f" (got {_type_label(got)}; value not shown, it may hold credentials)"
            else:
                got_text = f" (got {got!r}, {_type_label(got)})"
            problems.append(f"{where}: parameter {loc!r}: {err['msg']}{got_text}")
    # One union member error per field is enough.
    seen, unique = set(), []
    for p in problems:
        key = p.split(":")[1] if ":" in p else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


_SECRET_WORDS = ("storage_options", "runtime_env", "init_kwargs", "secret", "token", "password", "key", "credential")


def _may_hold_secrets(loc: tuple) -> bool:
    """Parameters whose values an error message must not echo."""
    return any(word in str(part).lower() for part in loc for word in _SECRET_WORDS)


# Deeper than any recipe (the paper's are about 10 levels); bounds the
# recursion of everything that walks the tree.
MAX_TREE_DEPTH = 64


def _node(raw: Any, path: str, problems: list[str], depth: int = 1) -> NodeSpec | None:
    """One node and, recursively, its children; every problem found is
    appended to ``problems`` (the children are checked even when this node
    is not usable, so one pass reports everything)."""
    if depth > MAX_TREE_DEPTH:
        problems.append(f"{path}: the tree is more than {MAX_TREE_DEPTH} nodes deep")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{path}: a node must be a mapping with a 'type', got {_type_label(raw)}")
        return None
    type_name = raw.get("type")
    if not isinstance(type_name, str):
        problems.append(f"{path}: node has no 'type'")
        return None
    where = f"{path} > {type_name}"
    children_raw, children_listed = _children_raw(raw, where, problems)
    children = [child for i, child_raw in enumerate(children_raw)
                if (child := _node(child_raw, f"{path} > child_configs[{i}]", problems, depth + 1)) is not None]
    cls = NODE_TYPES.get(type_name)
    if cls is None:
        problems.append(f"{where}: unknown node type {type_name!r}{_suggest(type_name, NODE_TYPES)}")
        return None
    checkpoint = raw.get("checkpoint", False)
    if not isinstance(checkpoint, bool):
        problems.append(f"{where}: 'checkpoint' must be true or false (got {checkpoint!r}, {_type_label(checkpoint)})")
        checkpoint = False
    params = _params(cls, raw, where, problems)
    if children_listed:
        problems.extend(_child_count_problems(cls, len(children_raw), where))
    missing_modules = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if missing_modules:
        extra = f" install it with: pip install -e '.[{cls.extra}]'" if cls.extra else ""
        problems.append(f"{where}: needs the Python package(s) {', '.join(missing_modules)};{extra}")
    if params is None:
        return None
    return NodeSpec(type_name, cls, params, children, where, raw, checkpoint)


def _children_raw(raw: dict, where: str, problems: list[str]) -> tuple[list, bool]:
    """The raw child nodes, and whether ``child_configs`` was a list (or absent)."""
    children_raw = raw.get("child_configs")
    if children_raw is None:
        return [], True
    if not isinstance(children_raw, list):
        problems.append(f"{where}: child_configs must be a list of nodes, got {_type_label(children_raw)}")
        return [], False
    return children_raw, True


def _params(cls: type[Node], raw: dict, where: str, problems: list[str]):
    """The node's validated parameter model, or None (problems appended)."""
    params_raw = {k: v for k, v in _text_keys(raw, where, problems).items() if k not in ("type", "child_configs", "checkpoint")}
    # Spark-era knobs outside the model are dropped here; the model's own
    # parameters without effect are logged when the node runs.
    dropped = sorted(k for k in params_raw if k in cls.without_effect and k not in cls.Params.model_fields)
    log_without_effect(log, where, dropped, cls.without_effect)
    for k in dropped:
        params_raw.pop(k)
    try:
        params = cls.Params(**params_raw)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, where, cls.Params))
        return None
    unusable = _unusable_numbers(params, where)
    problems.extend(unusable)
    if not unusable:  # validate_params may compute with the values
        problems.extend(f"{where}: {p}" for p in cls.validate_params(params))
    return params


def _child_count_problems(cls: type[Node], n: int, where: str) -> list[str]:
    if n >= cls.min_children and (cls.max_children is None or n <= cls.max_children):
        return []
    if cls.max_children == 0:
        want = "no children"
    elif cls.max_children is None:
        want = f"at least {cls.min_children} child(ren)"
    elif cls.min_children == cls.max_children:
        want = f"exactly {cls.min_children} child(ren)"
    else:
        want = f"{cls.min_children} to {cls.max_children} children"
    return [f"{where}: takes {want} in child_configs, got {n}"]


def apply_overrides(data: Any, overrides: dict[str, Any] | None) -> Any:
    """Overrides (a deployment/flow parameter) on top of the YAML: a nested
    mapping merged key by key, where a key may also be a dotted path
    (``ray.app_name``, ``pipeline.child_configs.0.input_path``)."""
    import copy

    if not overrides:
        return data
    data = copy.deepcopy(data)

    def set_path(target: Any, parts: list[str], value: Any) -> None:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(target, list):
                try:
                    idx = int(part)
                    target[idx]
                except (ValueError, IndexError):
                    raise ConfigError([f"override {'.'.join(parts)!r}: no list item {part!r}"]) from None
                if last:
                    target[idx] = merge(target[idx], value)
                else:
                    target = target[idx]
            elif isinstance(target, dict):
                if last:
                    target[part] = merge(target.get(part), value)
                else:
                    target = target.setdefault(part, {})
            else:
                raise ConfigError([f"override {'.'.join(parts)!r}: {part!r} is not inside a mapping or list"])

    def merge(base: Any, value: Any) -> Any:
        if isinstance(base, dict) and isinstance(value, dict):
            for k, v in value.items():
                set_path(base, str(k).split("."), v)
            return base
        return copy.deepcopy(value)

    if not isinstance(data, dict):
        return data
    return merge(data, overrides)


def parse_config(data: Any, source: str | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    problems: list[str] = []
    data = apply_overrides(data, overrides)
    if not isinstance(data, dict):
        raise ConfigError(["the file must be a YAML mapping with a 'pipeline:' key"], source)
    unknown = sorted((k for k in data if k not in ("ray", "spark", "pipeline", "prefect")), key=repr)
    for key in unknown:
        problems.append(f"top level: unknown section {key!r}{_suggest(key, ['ray', 'spark', 'pipeline', 'prefect'])}")
    for section in ("ray", "spark", "prefect"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            problems.append(f"top level: '{section}:' must be a mapping of settings, got {_type_label(data[section])}")
            data = {**data, section: None}
    ray_raw, ray_where = data.get("ray"), "ray"
    if ray_raw is None and isinstance(data.get("spark"), dict):
        # Old Spark configs: only the app name carries over.
        ray_raw, ray_where = {"app_name": data["spark"].get("app_name", "kaiyuan")}, "spark"
    ray_raw = _text_keys(ray_raw or {}, ray_where, problems)
    ray_section = RaySection()
    try:
        ray_section = RaySection(**ray_raw)
        problems.extend(_unusable_numbers(ray_section, ray_where))
        data_section = ray_section.data
        for name in ("batch_size", "target_block_size_mb", "concurrency", "max_write_blocks", "read_parallelism"):
            value = getattr(data_section, name)
            if value is not None and value <= 0:  # SPEC: <= 0 means unset
                setattr(data_section, name, None)
        given = [name for name in DATA_WITHOUT_EFFECT if name in (ray_raw.get("data") or {})]
        log_without_effect(log, "ray.data", given, DATA_WITHOUT_EFFECT)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, ray_where, RaySection))
    prefect_section = PrefectSection()
    try:
        prefect_section = PrefectSection(**_text_keys(data.get("prefect") or {}, "prefect", problems))
        problems.extend(_unusable_numbers(prefect_section, "prefect"))
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, "prefect", PrefectSection))
    if "pipeline" not in data:
        problems.append("top level: missing the 'pipeline:' key (the root node of the tree)")
        raise ConfigError(problems, source)
    root = _node(data["pipeline"], "pipeline", problems)
    if problems:
        raise ConfigError(problems, source)
    return PipelineConfig(ray_section, prefect_section, root, source)


# Recipes are trees of ~200 nodes at most, a few levels of YAML per node.
MAX_YAML_DEPTH = 200
# Aliases may repeat a fragment; an alias bomb ("billion laughs") expands a
# few lines into billions of nodes for whatever walks the data afterwards.
MAX_YAML_NODES = 200_000


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: nesting depth, the size of the document
    with every alias expanded, and no duplicate keys (PyYAML keeps the last
    one silently)."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError([f"line {mark.line + 1}: the YAML is nested more than {MAX_YAML_DEPTH} levels deep"])
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise ConfigError([
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first at line {seen[key] + 1}); each key may appear once in a mapping"
                ])
            if key is not None:
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _expanded_size(node, budget: int) -> int:
    """Nodes of the document with aliases expanded, counted up to ``budget``
    (iteratively: the composed graph shares nodes, so this is where a bomb
    shows without building it)."""
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        if count > budget:
            break
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return count


def parse_yaml(text: str) -> Any:
    """The YAML document in ``text``, bounded (see ``_RecipeLoader``)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError([
                f"the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases (*name); "
                "recipes do not need aliases this large"
            ])
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error{where}: {problem}"]) from None
    finally:
        loader.dispose()


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"config file {str(path)!r} does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {str(path)!r} is a directory"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {str(path)!r}: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([
            f"the file is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "save it as UTF-8"
        ], str(path)) from None
    if "\x00" in text:
        raise ConfigError(["the file is not text (it holds NUL bytes); save the recipe as UTF-8 YAML"], str(path))
    try:
        data = parse_yaml(text)
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(path)) from None
    return parse_config(data, str(path), overrides)


def check_nodes(cfg: PipelineConfig, ctx=None) -> None:
    """Every check a run makes before touching data, on metadata only:
    inputs exist and globs match, ``create`` targets are free, outputs are
    not inside an input (or the other way round). ``--check`` runs these
    too. ``ctx``: the run's RunContext (its storage options)."""
    from tasks.base import NodeError, RunContext
    from tasks.storage import StorageConfigError, resolve_storage_options

    install_block_resolver()
    if ctx is None:
        try:
            ctx = RunContext(seed=cfg.ray.seed, storage_options=resolve_storage_options(None, cfg.ray.storage_options))
        except StorageConfigError as exc:
            where = "ray.storage_options: " if cfg.ray.storage_options else ""
            raise ConfigError([f"{where}{exc}"], cfg.source) from None
    if cfg.checked_with == dict(ctx.storage_options):
        return
    problems = []
    built = [spec.build() for spec in cfg.nodes()]
    for node in built:
        try:
            node.check(ctx)
        except NodeError as exc:
            problems.append(str(exc))
        except StorageConfigError as exc:  # the node's storage_options
            problems.append(f"{node.path}: {exc}")
    problems.extend(_overlapping_paths(built))
    if problems:
        raise ConfigError(problems, cfg.source)
    cfg.checked_with = dict(ctx.storage_options)


def install_block_resolver() -> None:
    """Let ``storage_options: {block: NAME}`` name a LanceStorage block, in
    this process (the flow's, or a Ray worker running a node task)."""
    import tasks.storage as storage

    if storage.BLOCK_RESOLVER is None:
        storage.BLOCK_RESOLVER = _storage_block


def _storage_block(name: str) -> dict:
    """A LanceStorage block's options. Cached for a while, failures included,
    by tasks.storage.block_options (so rotated credentials are re-read)."""
    from blocks import storage_options_for
    from tasks.storage import StorageConfigError

    try:
        return dict(storage_options_for(name))
    except Exception as exc:  # a missing block, or no Prefect API to ask
        raise StorageConfigError(
            f"storage_options: cannot load the LanceStorage block {name!r} ({type(exc).__name__})"
        ) from None


def _overlapping_paths(nodes: list[Node]) -> list[str]:
    """An output inside an input (or the reverse) would write into the data
    being read."""
    from tasks.storage import normalize_uri

    def norm(uri: str) -> str:
        uri = normalize_uri(uri)
        return uri.rstrip("/") if "://" in uri else str(Path(uri).resolve())

    inputs = [(node, norm(uri)) for node in nodes for uri in node.input_uris()]
    problems = []
    for writer in nodes:
        for out in map(norm, writer.output_uris()):
            for reader, src in inputs:
                if out == src:
                    continue  # a reader of the written dataset (read_if_exists recipes, appends) reads a committed version
                if out.startswith(src.rstrip("/") + "/") or src.startswith(out.rstrip("/") + "/"):
                    inside = "inside" if out.startswith(src) else "around"
                    problems.append(f"{writer.path}: output {out!r} is {inside} the input {src!r} of {reader.path}")
    return problems


def tree_text(root: NodeSpec) -> str:
    """The tree as indented text (for --check and the run summary)."""
    lines: list[str] = []

    def visit(node: NodeSpec, depth: int) -> None:
        shown = {k: v for k, v in node.params.model_dump(exclude_defaults=True).items() if k != "storage_options"}
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        lines.append(f"{'  ' * depth}{node.type_name}({args})")
        for child in node.children:
            visit(child, depth + 1)

    visit(root, 0)
    return "\n".join(lines)


__all__ = ["ConfigError", "PipelineConfig", "NodeSpec", "apply_overrides", "check_nodes", "load_config", "parse_config", "tree_text", "tasks"]
