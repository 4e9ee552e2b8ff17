"""Fuzzing the config checks (SPEC §1): broken configs derived from the node
parameter models.

For every node type in ``NODE_TYPES`` a valid base tree is built from the
node's ``Params`` model (required parameters filled, every child-count rule
met, credentials planted in every ``storage_options``), then mutated: a
required parameter dropped, a parameter name misspelt, an unknown or non-text
key, a value of the wrong type or out of range (10**30, 1e300, nan, inf,
negatives, empty strings and lists), a misspelt choice, a node type near a
real one, the wrong number of children, ``child_configs`` not a list, a node
that is not a mapping, a ``storage_options`` of the wrong shape holding a
secret, broken ``ray:`` / ``prefect:`` sections and top-level keys.

For each config: ``parse_config`` + ``check_nodes`` accept it or raise
``ConfigError`` (never another exception, never a hang); every problem names
where it is (the node by its path, or the section); no message echoes
``PLANTED``. A mutation that is definitely a mistake (see ``judge``) must be
rejected: an acceptance is an *accepted mistake* and fails the test.

Four drivers of one generator, all deterministic: sweeps (every node type x
every mutation kind; every parameter x every edge value), Hypothesis
(derandomized: the same examples in CI; stacked mutations, shrinking on
failure) and a sample through the real CLI (``--check``: exit 2, no
traceback, the node named, the secret not shown, nothing written).

``KAIYUAN_FUZZ_EXAMPLES=N`` runs N Hypothesis examples (default 300),
``KAIYUAN_FUZZ_SWEEP_SEEDS=N`` N cases per node type and kind (default 2),
``KAIYUAN_FUZZ_RANDOM=1`` new Hypothesis examples each run (not derandomized);
``KAIYUAN_FUZZ_COLLECT=1`` lists every accepted mistake instead of stopping
at the first (``-s`` shows the summary).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.config import ConfigError, check_nodes, parse_config, parse_yaml
from tasks.base import NODE_TYPES
from tests.conftest import ROOT

pytestmark = pytest.mark.xdist_group("fuzz-configs")

PLANTED = "PLANTED-SECRET-9c41"
TYPES = sorted(NODE_TYPES)  # aliases included: they are YAML names too
COMMON_KEYS = {"type", "child_configs", "checkpoint"}
INT64 = (-(2**63), 2**63 - 1)
SEED_MAX = 2**31 - 1  # the range of derived seeds (RunContext.node_seed)
DELETE = object()  # "remove the key" in a list of replacement values


class _Timeout(Exception):
    pass


# ---------------------------------------------------------------------------
# What the models accept, what is a mistake


def keys_of(cls) -> dict[str, tuple[str, Any]]:
    """YAML key -> (field name, FieldInfo) of a node's parameters."""
    return {(info.alias or name): (name, info) for name, info in cls.Params.model_fields.items()}


def accepted_keys(cls) -> set:
    keys = set(keys_of(cls)) | set(cls.without_effect) | COMMON_KEYS
    if cls.Params.model_config.get("populate_by_name"):
        keys |= set(cls.Params.model_fields)
    return keys


def matches(annotation, value) -> bool:
    """Whether a strict pydantic field of ``annotation`` takes ``value``'s type."""
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(a, value) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return type(value) is list and all(matches(args[0], v) for v in value)
    if origin is dict:
        return type(value) is dict and all(matches(args[0], k) and matches(args[1], v) for k, v in value.items())
    if annotation is float:
        return type(value) in (int, float)
    return type(value) is annotation


def numeric_kinds(annotation) -> set[type]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(numeric_kinds(a) for a in args))
    return {annotation} & {int, float}


def literal_values(annotation) -> tuple:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return args
    if origin in (typing.Union, types.UnionType):
        return tuple(v for a in args for v in literal_values(a))
    return ()


def _between(lo, hi, lo_open=False, hi_open=False) -> Callable[[float], bool]:
    def ok(v) -> bool:
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return False
        return not (hi is not None and (v > hi or (hi_open and v == hi)))

    return ok


def _finite(rule):
    return lambda v: math.isfinite(v) and rule(v)


def _num_train(v) -> bool:
    return math.isfinite(v) and v >= 0 and (type(v) is int or v < 1 or float(v).is_integer())


# Values a real run can execute, by (node type or "*", field name); anything
# outside is a mistake. Fields not listed: any int within 64 bits, any float
# but NaN. Bounds come from SPEC and the code that uses the value.
RANGES: dict[tuple[str, str], Callable[[float], bool]] = {
    **{("*", f): _between(1, None) for f in (
        "batch_size", "concurrency", "num_parallel", "num_partitions", "num_output_files", "num_read_partitions",
        "num_train_files", "num_val_files", "type_num", "folding", "merge_count", "ngram_size", "num_labels")},
    **{("*", f): _between(0, None) for f in ("min_length", "num_rows", "selected_index")},
    # Ray's shuffle: RandomState(seed + block index) < 2**32; NumPy's
    # default_rng: no negatives. Other seeds are hashed: any 64-bit value.
    ("LanceWriter", "seed"): _between(0, SEED_MAX),
    ("LanceWriterZstd", "seed"): _between(0, SEED_MAX),
    ("Splitter", "seed"): _between(0, SEED_MAX),
    ("MinHash", "seed"): _between(0, None),
    ("MinHash", "num_permutations"): _between(2, 4096),
    ("MinHash", "threshold"): _between(0, 1, lo_open=True, hi_open=True),
    ("SeqClassifierScorer", "max_length"): _between(1, 512 * 64),
    ("LanceWriterZstd", "compression_level"): _between(1, 22),
    ("*", "keep_ratio"): _between(0, 1),
    ("*", "quantile_error"): _between(0, 1, hi_open=True),
    ("*", "selection_ratio"): _between(0, 1, lo_open=True),
    ("*", "global_sample_rate"): _finite(_between(0, None)),
    ("*", "max_sample"): _between(0, None),
    ("*", "perturb"): _finite(_between(0, None)),
    ("Splitter", "num_train"): _num_train,
}
PATH_FIELDS = {"input_path", "output_path", "train_file", "val_file", "model_path", "tokenizer_name_or_path"}

READERS = ("FormatReader", "JsonReader", "JsonlZstReader", "LanceReader", "NpyReader")

def _applies(bad, value) -> bool:
    try:
        return bool(bad(value))
    except (TypeError, AttributeError):  # a rule for numbers given text, or the reverse
        return False


def judge(cls, key, value) -> tuple[bool, str]:
    """(definitely a mistake?, why) for ``key: value`` on a node of ``cls``."""
    fields = keys_of(cls)
    if cls.Params.model_config.get("populate_by_name"):
        fields.update({name: (name, info) for name, info in cls.Params.model_fields.items()})
    if key not in fields:
        return (key not in accepted_keys(cls), "unknown parameter")
    name, info = fields[key]
    if not matches(info.annotation, value):
        return True, "not one of the choices" if literal_values(info.annotation) and type(value) is str else "wrong type"
    if type(value) is int and numeric_kinds(info.annotation) == {float}:
        value = float(value)  # what the model stores
    if type(value) is float and math.isnan(value):
        return True, "NaN"
    if type(value) is int and not INT64[0] <= value <= INT64[1]:
        return True, "beyond 64 bits"
    rule = RANGES.get((cls.type_name, name)) or RANGES.get(("*", name))
    if rule is not None and type(value) in (int, float) and not rule(value):
        return True, "out of range"
    if isinstance(value, str) and not value.strip() and name in PATH_FIELDS:
        return True, "empty path"
    return False, "plausible"


# ---------------------------------------------------------------------------
# Valid base configs


@dataclasses.dataclass(frozen=True)
class Env:
    root: Path

    @property
    def input(self) -> str:
        return str(self.root / "in.lance")

    @property
    def model(self) -> str:
        return str(self.root / "model")

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    def out(self, name: str) -> str:
        return str(self.out_dir / f"{name}.lance")


SECRETS = {"aws_access_key_id": "AKIA" + PLANTED, "aws_secret_access_key": PLANTED}
# Beyond what the model's types give, what a valid base needs.
EXTRA_BASE = {"Selector": {"num_rows": 10}, "ParseJsonString": {"output_col": "parsed"}}


def sample_value(key: str, annotation, env: Env):
    if key == "input_path":
        return env.input
    if key in ("output_path", "train_file", "val_file"):
        return env.out(key)
    if key in ("model_path", "tokenizer_name_or_path"):
        return env.model
    if key == "storage_options":
        return dict(SECRETS)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return sample_value(key, next(a for a in args if a is not type(None)), env)
    if origin is typing.Literal:
        return args[0]
    if origin is list:
        return [sample_value(key, args[0], env)]
    if origin is dict:
        return {}
    return {bool: True, int: 2, float: 0.5, str: key}.get(annotation, key)


def reader(env: Env) -> dict:
    return {"type": "LanceReader", "input_path": env.input}


def base_node(type_name: str, env: Env) -> dict:
    cls = NODE_TYPES[type_name]
    node: dict = {"type": type_name}
    for key, (_, info) in keys_of(cls).items():
        if info.is_required() or key == "storage_options":
            node[key] = sample_value(key, info.annotation, env)
    node.update(copy.deepcopy(EXTRA_BASE.get(cls.type_name, {})))
    if cls.max_children != 0:
        node["child_configs"] = [reader(env) for _ in range(max(1, cls.min_children))]
    return node


def base_config(type_name: str, env: Env) -> dict:
    """The node under test at ``pipeline > child_configs[0]``, under a writer."""
    return {
        "ray": {"app_name": "fuzz", "storage_options": dict(SECRETS)},
        "pipeline": {"type": "LanceWriter", "output_path": env.out("root"), "child_configs": [base_node(type_name, env)]},
    }


# ---------------------------------------------------------------------------
# Mutations


class Rng:
    """Choices from a seeded ``random.Random`` (the sweep, the CLI sample)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def pick(self, seq):
        seq = list(seq)
        return seq[self.r.randrange(len(seq))]

    def integer(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)


class Draw:
    """Choices drawn by Hypothesis (shrinkable)."""

    def __init__(self, data):
        self.data = data

    def pick(self, seq):
        return self.data.draw(st.sampled_from(list(seq)))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))


@dataclasses.dataclass
class Mutation:
    kind: str
    where: str  # a node path ("pipeline > child_configs[0]") or a section ("ray", "prefect", "top level")
    definite: bool
    detail: str


@dataclasses.dataclass
class Case:
    type_name: str
    cfg: dict
    env: Env
    mutations: list[Mutation] = dataclasses.field(default_factory=list)
    touched: set = dataclasses.field(default_factory=set)

    def describe(self) -> str:
        return f"{self.type_name}: " + "; ".join(f"{m.kind} at {m.where}: {m.detail}" for m in self.mutations)


MAIN, CHILD, ROOT_NODE = (0,), (0, 0), ()


def node_path(idx: tuple) -> str:
    return "pipeline" + "".join(f" > child_configs[{i}]" for i in idx)


def get_node(cfg: dict, idx: tuple):
    node = cfg.get("pipeline")
    for i in idx:
        kids = node.get("child_configs") if isinstance(node, dict) else None
        if not isinstance(kids, list) or len(kids) <= i:
            return None
        node = kids[i]
    return node if isinstance(node, dict) else None


def set_node(cfg: dict, idx: tuple, value) -> None:
    if not idx:
        cfg["pipeline"] = value
    else:
        get_node(cfg, idx[:-1])["child_configs"][idx[-1]] = value


def known(node) -> type | None:
    t = node.get("type") if isinstance(node, dict) else None
    return NODE_TYPES.get(t) if isinstance(t, str) else None


def pick_target(case: Case, ch, want: Callable[[dict, type], bool] = lambda n, c: True) -> tuple | None:
    options = [idx for idx in (MAIN, MAIN, MAIN, CHILD, ROOT_NODE)
               if known(get_node(case.cfg, idx)) is not None and want(get_node(case.cfg, idx), known(get_node(case.cfg, idx)))]
    return ch.pick(options) if options else None


def misspell(word: str, ch) -> str:
    op = ch.pick(["drop", "swap", "double", "replace", "capital", "camel", "dash", "space", "plural"])
    i = ch.integer(0, max(0, len(word) - 1))
    if op == "drop" and len(word) > 1:
        out = word[:i] + word[i + 1:]
    elif op == "swap" and len(word) > 1:
        i = min(i, len(word) - 2)
        out = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    elif op == "double":
        out = word[:i + 1] + word[i:]
    elif op == "replace":
        out = word[:i] + ch.pick("aeiourst_") + word[i + 1:]
    elif op == "capital":
        out = word[:1].swapcase() + word[1:]
    elif op == "camel":
        out = re.sub(r"_(\w)", lambda m: m.group(1).upper(), word)
    elif op == "dash":
        out = word.replace("_", "-")
    elif op == "space":
        out = word + " "
    else:
        out = word + "s"
    return out if out != word else word + "x"


NAN, INF = float("nan"), float("inf")
VALUE_POOL = [
    "12", "0.5", "", "true", "none", 1.5, 0, 7, -1, -3, 10**30, -(10**30), 2**63, 1e300, -1e300, NAN, INF, -INF,
    True, False, None, [], [1], ["a"], ["a", 1], [[]], {}, {"k": "v"}, {"nested": {"a": [1]}},
]
INT_EDGES = [-1, 0, 1, 2, 23, 4096, 4097, 32768, 32769, SEED_MAX, SEED_MAX + 1, -(2**31), 2**32,
             2**63 - 1, 2**63, 10**30, -(10**30)]
FLOAT_EDGES = [-0.5, -1e-9, 0.0, 0.5, 1.0, 1.0000001, 1.5, 1e300, -1e300, NAN, INF, -INF]
UNKNOWN_KEYS = ["colum", "threshhold", "num_partition", "inputpath", "output", "params", "children", "nodes",
                "child_config", "childconfigs", "Type", "checkpoints", "", " ", 1, 0, True, None, 1.5]
BAD_SECRET_SHAPES = [PLANTED, f"aws_secret_access_key={PLANTED}", [PLANTED], [{"aws_secret_access_key": PLANTED}], 5, True]


def _param_target(case: Case, ch, keys_for: Callable[[type], list]) -> tuple | None:
    idx = pick_target(case, ch, lambda n, c: bool(keys_for(c)))
    if idx is None:
        return None
    cls = known(get_node(case.cfg, idx))
    keys = [k for k in keys_for(cls) if (idx, k) not in case.touched]
    return (idx, cls, keys) if keys else None


def m_drop_required(case: Case, ch) -> Mutation | None:
    def required(cls):
        return sorted(k for k, (_, info) in keys_of(cls).items() if info.is_required())

    target = _param_target(case, ch, required)
    if target is None:
        return None
    idx, cls, keys = target
    node = get_node(case.cfg, idx)
    keys = [k for k in keys if k in node]
    if not keys:
        return None
    key = ch.pick(keys)
    del node[key]
    case.touched.add((idx, key))
    return Mutation("drop_required", node_path(idx), True, f"drop {key!r}")


def m_misspell_param(case: Case, ch) -> Mutation | None:
    target = _param_target(case, ch, lambda cls: sorted(keys_of(cls)))
    if target is None:
        return None
    idx, cls, keys = target
    node = get_node(case.cfg, idx)
    key = ch.pick(keys)
    bad = misspell(key, ch)
    was_required = key in node and keys_of(cls)[key][1].is_required()
    value = node.pop(key) if key in node else sample_value(key, keys_of(cls)[key][1].annotation, case.env)
    if (idx, bad) in case.touched or bad in node:
        return None
    node[bad] = value
    case.touched |= {(idx, key), (idx, bad)}
    return Mutation("misspell_param", node_path(idx), bad not in accepted_keys(cls) or was_required, f"{key!r} -> {bad!r}")


def m_unknown_param(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch)
    if idx is None:
        return None
    cls, node = known(get_node(case.cfg, idx)), get_node(case.cfg, idx)
    key = ch.pick(UNKNOWN_KEYS + ["aws_secret_access_key", "storage_option", "aws_session_token"])
    if key in node or (idx, key) in case.touched:
        return None
    if key in ("aws_secret_access_key", "aws_session_token"):
        value = PLANTED
    elif key == "storage_option":
        value = dict(SECRETS)
    else:
        value = copy.deepcopy(ch.pick(VALUE_POOL))
    node[key] = value
    case.touched.add((idx, key))
    definite = not (isinstance(key, str) and key in accepted_keys(cls))
    return Mutation("unknown_param", node_path(idx), definite, f"{key!r}: {value!r}")


def _set_param(case: Case, idx: tuple, cls, key, value, kind: str) -> Mutation:
    node = get_node(case.cfg, idx)
    node[key] = value
    case.touched.add((idx, key))
    definite, why = judge(cls, key, value)
    return Mutation(kind, node_path(idx), definite, f"{key}: {value!r} ({why})")


def m_wrong_value(case: Case, ch) -> Mutation | None:
    target = _param_target(case, ch, lambda cls: sorted(keys_of(cls)))
    if target is None:
        return None
    idx, cls, keys = target
    key = ch.pick(keys)
    value = copy.deepcopy(ch.pick(VALUE_POOL))
    if key == "storage_options" and isinstance(value, (str, list)):
        value = ch.pick(BAD_SECRET_SHAPES)
    return _set_param(case, idx, cls, key, value, "wrong_value")


def m_out_of_range(case: Case, ch) -> Mutation | None:
    def numeric(cls):
        return sorted(k for k, (_, info) in keys_of(cls).items() if numeric_kinds(info.annotation))

    target = _param_target(case, ch, numeric)
    if target is None:
        return None
    idx, cls, keys = target
    key = ch.pick(keys)
    kinds = numeric_kinds(keys_of(cls)[key][1].annotation)
    value = ch.pick((INT_EDGES if int in kinds else []) + (FLOAT_EDGES if float in kinds else []))
    return _set_param(case, idx, cls, key, value, "out_of_range")


def m_bad_choice(case: Case, ch) -> Mutation | None:
    target = _param_target(case, ch, lambda cls: sorted(k for k, (_, i) in keys_of(cls).items() if literal_values(i.annotation)))
    if target is None:
        return None
    idx, cls, keys = target
    key = ch.pick(keys)
    allowed = [v for v in literal_values(keys_of(cls)[key][1].annotation) if isinstance(v, str)]
    choice = ch.pick(allowed)
    value = ch.pick([misspell(choice, ch), choice.upper(), " " + choice, "", choice + "s"])
    return _set_param(case, idx, cls, key, value, "bad_choice")


def m_type_name(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch)
    if idx is None:
        return None
    node = get_node(case.cfg, idx)
    name = node["type"]
    value = ch.pick([misspell(name, ch), misspell(name, ch), name.lower(), name + "s", "", None, 5, [name],
                     {"name": name}, DELETE])
    if isinstance(value, str) and value in NODE_TYPES:
        return None  # another real node: the mutations before may no longer be mistakes
    if value is DELETE:
        del node["type"]
    else:
        node["type"] = value
    return Mutation("type_name", node_path(idx), True, f"type {name!r} -> {'(none)' if value is DELETE else repr(value)}")


def m_reader_child(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch, lambda n, c: c.max_children == 0 and "child_configs" not in n)
    if idx is None:
        return None
    get_node(case.cfg, idx)["child_configs"] = [reader(case.env)]
    return Mutation("reader_child", node_path(idx), True, "a child under a reader")


def m_too_few_children(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch, lambda n, c: c.min_children >= 1)
    if idx is None:
        return None
    node, cls = get_node(case.cfg, idx), known(get_node(case.cfg, idx))
    kids = node.get("child_configs") if isinstance(node.get("child_configs"), list) else []
    value = ch.pick([[], None, DELETE, kids[: cls.min_children - 1]])
    if value is DELETE:
        node.pop("child_configs", None)
    else:
        node["child_configs"] = value
    return Mutation("too_few_children", node_path(idx), True, f"child_configs -> {'(none)' if value is DELETE else value!r}")


def m_children_not_list(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch)
    if idx is None:
        return None
    value = ch.pick(["x", 5, 1.5, True, False, 0, "", {}, reader(case.env), {"0": reader(case.env)}])
    get_node(case.cfg, idx)["child_configs"] = value
    return Mutation("children_not_list", node_path(idx), True, f"child_configs: {value!r}")


def m_not_mapping(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch)
    if idx is None:
        return None
    node = get_node(case.cfg, idx)
    value = ch.pick([[node], node["type"], 5, 1.5, None, True, [], "", [reader(case.env)]])
    set_node(case.cfg, idx, copy.deepcopy(value))
    return Mutation("not_mapping", node_path(idx), True, f"node -> {type(value).__name__}")


def m_checkpoint(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch, lambda n, c: "checkpoint" not in n)
    if idx is None:
        return None
    value = ch.pick(["yes", "true", 1, 0, None, [], {}, 1.5])
    get_node(case.cfg, idx)["checkpoint"] = value
    return Mutation("checkpoint", node_path(idx), True, f"checkpoint: {value!r}")


def m_secret_shape(case: Case, ch) -> Mutation | None:
    idx = pick_target(case, ch, lambda n, c: "storage_options" in keys_of(c))
    if idx is not None and (idx, "storage_options") in case.touched:
        idx = None
    where = ch.pick(["node", "ray", "ray_other"] if idx is not None else ["ray", "ray_other"])
    # Also a block that does not exist (no block resolver here, as in the
    # CLI's --check): not counted as a definite mistake (a writer that does
    # not create resolves nothing), but a rejection must name where.
    shapes = BAD_SECRET_SHAPES + ([{"block": "no-such-block"}] if where != "ray_other" else [])
    value = copy.deepcopy(ch.pick(shapes))
    definite = not isinstance(value, dict)
    if where == "node":
        get_node(case.cfg, idx)["storage_options"] = value
        case.touched.add((idx, "storage_options"))
        return Mutation("secret_shape", node_path(idx), definite, f"storage_options: {type(value).__name__}")
    ray = case.cfg.get("ray")
    if not isinstance(ray, dict) or not touch_section(case, "ray"):
        return None
    key = "storage_options" if where == "ray" else ch.pick(["init_kwargs", "runtime_env"])
    ray[key] = value
    return Mutation("secret_shape", "ray", definite, f"ray.{key}: {type(value).__name__}")


def touch_section(case: Case, name: str) -> bool:
    """Claim a section for one mutation (a second could undo the first)."""
    if (name,) in case.touched:
        return False
    case.touched.add((name,))
    return True


def m_sections(case: Case, ch) -> Mutation | None:
    variant = ch.pick(["ray", "ray_key", "ray_data", "ray_value", "prefect", "prefect_value", "spark"])
    if not touch_section(case, "prefect" if variant.startswith("prefect") else "ray"):
        return None
    ray = case.cfg.get("ray")
    if variant == "ray":
        value = ch.pick(["fast", [1], 5, True])
        case.cfg["ray"] = value
        return Mutation("sections", "top level", True, f"ray: {value!r}")
    if not isinstance(ray, dict):
        return None
    if variant == "ray_key":
        key = ch.pick(["adress", "app-name", "storage_option", 1, None, ""])
        ray[key] = "x"
        return Mutation("sections", "ray", True, f"ray.{key!r}")
    if variant == "ray_data":
        value = ch.pick(["big", [1], 5, {"batchsize": 4}, {"batch_size": "1k"}, {"batch_size": 10**30},
                         {"batch_size": 1.5}, {"shuffle_strategy": "fastest"}, {"concurrency": 2**63}])
        ray["data"] = value
        return Mutation("sections", "ray", True, f"ray.data: {value!r}")
    if variant == "ray_value":
        key, value = ch.pick([("app_name", 5), ("address", 10), ("seed", "42"), ("seed", 10**30), ("seed", 1.5),
                              ("debug_stats", "yes"), ("namespace", []), ("block", {})])
        ray[key] = value
        return Mutation("sections", "ray", True, f"ray.{key}: {value!r}")
    if variant == "spark":
        value = ch.pick([["app"], "x", {"app_name": 5}])
        case.cfg.pop("ray", None)
        case.cfg["spark"] = value
        return Mutation("sections", "spark" if isinstance(value, dict) else "top level", True, f"spark: {value!r}")
    if variant == "prefect":
        value = ch.pick(["on", [1], 3])
        case.cfg["prefect"] = value
        return Mutation("sections", "top level", True, f"prefect: {value!r}")
    key, value = ch.pick([("retries", -1), ("retries", 101), ("retries", "3"), ("retries", 10**30),
                          ("retry_delay_seconds", NAN), ("retry_delay_seconds", -1), ("tags", "a"),
                          ("progress_after_s", NAN), ("flowname", "x"), ("checkpoint_dir", 5)])
    case.cfg["prefect"] = {key: value}
    return Mutation("sections", "prefect", True, f"prefect.{key}: {value!r}")


def m_top_level(case: Case, ch) -> Mutation | None:
    variant = ch.pick(["junk", "junk2", "no_pipeline"])
    if variant == "no_pipeline":
        case.cfg.pop("pipeline", None)
        return Mutation("top_level", "top level", True, "no 'pipeline:'")
    keys = [ch.pick(["pipelines", "Pipeline", "sprak", 1, None, True, "ray ", 1.5])]
    if variant == "junk2":
        keys.append(ch.pick(["rays", 2, False, "prefekt"]))
    for key in keys:
        case.cfg[key] = "x"
    return Mutation("top_level", "top level", True, f"keys {keys!r}")


MUTATIONS: dict[str, Callable[[Case, Any], Mutation | None]] = {
    "drop_required": m_drop_required,
    "misspell_param": m_misspell_param,
    "unknown_param": m_unknown_param,
    "wrong_value": m_wrong_value,
    "out_of_range": m_out_of_range,
    "bad_choice": m_bad_choice,
    "type_name": m_type_name,
    "reader_child": m_reader_child,
    "too_few_children": m_too_few_children,
    "children_not_list": m_children_not_list,
    "not_mapping": m_not_mapping,
    "checkpoint": m_checkpoint,
    "secret_shape": m_secret_shape,
    "sections": m_sections,
    "top_level": m_top_level,
}


def make_case(type_name: str, kinds: list[str], ch, env: Env) -> Case:
    case = Case(type_name, base_config(type_name, env), env)
    for kind in kinds:
        mutation = MUTATIONS[kind](case, ch)
        if mutation is not None:
            case.mutations.append(mutation)
    return case


# ---------------------------------------------------------------------------
# The oracle


@dataclasses.dataclass
class Tally:
    tried: int = 0
    rejected: int = 0
    accepted: int = 0
    accepted_mistakes: list[str] = dataclasses.field(default_factory=list)
    crashes: list[str] = dataclasses.field(default_factory=list)  # other exceptions, hangs
    kinds: Counter = dataclasses.field(default_factory=Counter)

    def summary(self, name: str) -> str:
        lines = [f"{name}: {self.tried} configs, {self.rejected} rejected cleanly, {self.accepted} accepted "
                 f"({len(self.accepted_mistakes)} accepted mistakes, {len(self.crashes)} crashes or hangs)"]
        lines += [f"  ACCEPTED MISTAKE: {m}" for m in self.accepted_mistakes]
        lines += [f"  CRASH: {m}" for m in self.crashes]
        return "\n".join(lines)


COLLECT = bool(os.environ.get("KAIYUAN_FUZZ_COLLECT"))
SECTIONS = {"top level", "ray", "prefect", "spark"}


def names_where(message: str, where: str) -> bool:
    """A problem line of ``message`` is about ``where``: the node by its path
    (optionally followed by its type), or the section."""
    if where in SECTIONS:
        return re.search(rf"(?m)^  - ({re.escape(where)}\b|top level: '{re.escape(where)}:')", message) is not None
    return re.search(rf"(?m)^  - {re.escape(where)}( > (?!child_configs\[)[^\n]*?)?: ", message) is not None


def check_message(error: ConfigError, case: Case) -> None:
    definite = [m for m in case.mutations if m.definite]
    message = str(error)
    assert error.problems, message
    assert PLANTED not in message, f"a planted secret is echoed: {case.describe()}\n{message}"
    for problem in error.problems:
        assert re.match(r"(pipeline\b|top level:|ray\b|prefect\b|spark\b)", problem), \
            f"problem without a location: {problem!r} ({case.describe()})"
    if definite:
        assert any(names_where(message, m.where) for m in definite), \
            f"no problem names {[m.where for m in definite]}: {case.describe()}\n{message}"
    if len(case.mutations) == 1 and definite:
        assert names_where(message, definite[0].where), f"{definite[0].where} not named: {case.describe()}\n{message}"


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def case_yaml(case: Case) -> str:
    return yaml.dump(case.cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _alarm(signum, frame):
    raise _Timeout()


def evaluate(case: Case, tally: Tally, via_yaml: bool = True, timeout_s: float = 30.0) -> ConfigError | None:
    """Validate the case as the CLI does (YAML text, or the mapping it gives
    when ``via_yaml`` is false: the YAML costs ~8 ms a config; then
    parse_config, check_nodes) and check everything the module docstring
    promises. Returns the error (None if accepted)."""
    tally.tried += 1
    tally.kinds.update(m.kind for m in case.mutations)
    text = case_yaml(case) if via_yaml else None
    # SIGALRM may already be pytest-timeout's (the whole test's limit): put
    # its handler and its remaining time back afterwards.
    old = signal.signal(signal.SIGALRM, _alarm)
    start = time.monotonic()
    previous, interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        cfg = parse_config(parse_yaml(text) if via_yaml else copy.deepcopy(case.cfg), "fuzz.yaml")
        check_nodes(cfg)
        error = None
    except ConfigError as exc:
        error = exc
    except _Timeout:
        tally.crashes.append(f"hang (> {timeout_s} s): {case.describe()}")
        if not COLLECT:
            pytest.fail(f"hang (> {timeout_s} s) validating {case.describe()}\n{case_yaml(case)}")
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        import traceback

        tally.crashes.append(f"{type(exc).__name__}: {exc}: {case.describe()}")
        if not COLLECT:
            pytest.fail(f"{type(exc).__name__} (not ConfigError) for {case.describe()}\n{case_yaml(case)}\n"
                        f"{traceback.format_exc()}")
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if previous:
            signal.setitimer(signal.ITIMER_REAL, max(previous - (time.monotonic() - start), 0.001), interval)
    definite = [m for m in case.mutations if m.definite]
    if error is None:
        tally.accepted += 1
        if definite:
            tally.accepted_mistakes.append(case.describe())
            if not COLLECT:
                pytest.fail(f"accepted mistake: {case.describe()}\n{case_yaml(case)}")
        return None
    tally.rejected += 1
    try:
        check_message(error, case)
    except AssertionError as exc:
        tally.crashes.append(f"bad message: {exc}")
        if not COLLECT:
            raise
    return error


# ---------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    import lance
    import pyarrow as pa

    import tasks.storage

    root = tmp_path_factory.mktemp("fuzz")
    lance.write_dataset(pa.table({"text": ["a b c d e f"], "score": [1.0]}), str(root / "in.lance"))
    (root / "model").mkdir()
    # As in the CLI before a run starts: `{block: NAME}` storage options
    # cannot be resolved (flows.pipeline, if imported by another test in
    # this worker, installs a resolver that asks the Prefect API).
    resolver, tasks.storage.BLOCK_RESOLVER = tasks.storage.BLOCK_RESOLVER, None
    try:
        yield Env(root)
    finally:
        tasks.storage.BLOCK_RESOLVER = resolver
    assert not (root / "out").exists(), "validation wrote into the output directory"


@pytest.mark.parametrize("type_name", TYPES)
def test_every_base_config_is_valid(env, type_name):
    """The mutations are judged against a base that passes every check."""
    cfg = parse_config(parse_yaml(yaml.safe_dump(base_config(type_name, env))))
    check_nodes(cfg)


def test_sweep_every_node_and_mutation(env):
    """Each node type x each mutation kind, a few seeds: deterministic."""
    tally = Tally()
    for t, type_name in enumerate(TYPES):
        for k, kind in enumerate(MUTATIONS):
            for seed in range(int(os.environ.get("KAIYUAN_FUZZ_SWEEP_SEEDS", 2))):
                case = make_case(type_name, [kind], Rng(t * 1_000_000 + k * 1000 + seed), env)
                if case.mutations:
                    evaluate(case, tally, via_yaml=False)
    print("\n" + tally.summary("sweep"))
    assert tally.tried > len(TYPES) * len(MUTATIONS)
    assert not tally.accepted_mistakes and not tally.crashes, tally.summary("sweep")


EMPTY_EDGES = ["", " ", None, [], [""], {}]


def test_sweep_edge_values(env):
    """Every parameter of every node type x every edge value: for numbers 0,
    negatives, 2**31, 2**63, 10**30, 1e300, nan, inf, ...; for all, empty
    text, lists and mappings, null. Deterministic."""
    tally = Tally()
    for type_name in TYPES:
        cls = NODE_TYPES[type_name]
        for key, (_, info) in sorted(keys_of(cls).items()):
            kinds = numeric_kinds(info.annotation)
            for value in (INT_EDGES if int in kinds else []) + (FLOAT_EDGES if float in kinds else []) + EMPTY_EDGES:
                case = Case(type_name, base_config(type_name, env), env)
                case.mutations.append(_set_param(case, MAIN, cls, key, copy.deepcopy(value), "edge_value"))
                evaluate(case, tally, via_yaml=False)
    print("\n" + tally.summary("edge values"))
    assert tally.tried > 1000
    assert not tally.accepted_mistakes and not tally.crashes, tally.summary("edge values")


def test_hypothesis_stacked_mutations(env):
    """Hypothesis: a node type and one to three mutations; derandomized."""
    tally = Tally()

    @settings(max_examples=int(os.environ.get("KAIYUAN_FUZZ_EXAMPLES", 300)),
              derandomize=not os.environ.get("KAIYUAN_FUZZ_RANDOM"), deadline=None,
              database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def run(data):
        ch = Draw(data)
        type_name = ch.pick(TYPES)
        kinds = [ch.pick(list(MUTATIONS)) for _ in range(ch.integer(1, 3))]
        case = make_case(type_name, kinds, ch, env)
        evaluate(case, tally)

    run()
    print("\n" + tally.summary("hypothesis"))
    assert tally.tried >= 100
    assert not tally.accepted_mistakes and not tally.crashes, tally.summary("hypothesis")


# Misspelt parameters and child counts already go through the CLI in
# tests/test_config_errors.py.
CLI_KINDS = ["drop_required", "wrong_value", "out_of_range", "bad_choice", "type_name",
             "reader_child", "children_not_list", "not_mapping", "secret_shape", "unknown_param"]


def cli_sample(env: Env) -> list[Case]:
    """One rejected case per kind, node types spread over the catalogue."""
    cases = []
    for i, kind in enumerate(CLI_KINDS):
        for offset in range(len(TYPES)):
            type_name = TYPES[(i * 7 + offset) % len(TYPES)]
            case = make_case(type_name, [kind], Rng(1000 * i + offset), env)
            m = case.mutations[0] if case.mutations else None
            on_node = m is not None and (m.where == node_path(MAIN) or kind in ("reader_child", "secret_shape"))
            if on_node and m.definite:
                if evaluate(case, Tally()) is not None:
                    cases.append(case)
                    break
    return cases


def test_cli_rejects_a_sample(env, tmp_path):
    """The real CLI (`--check`) on a deterministic sample: exit 2, no
    traceback, the node named, the secret never shown, nothing written."""
    cases = cli_sample(env)
    assert len(cases) == len(CLI_KINDS)

    def run(i_case):
        i, case = i_case
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        (cwd / "bad.yaml").write_text(case_yaml(case))
        proc = subprocess.run(
            [sys.executable, str(ROOT / "flows" / "run.py"), "--config", "bad.yaml", "--check", "--no-sample-data"],
            capture_output=True, text=True, cwd=cwd, timeout=180,
        )
        return case, cwd, proc

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, enumerate(cases)))
    for case, cwd, proc in results:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, f"{case.describe()}: exit {proc.returncode}\n{out}"
        assert "Traceback" not in out, f"{case.describe()}\n{out}"
        assert PLANTED not in out, f"{case.describe()}\n{out}"
        assert names_where(proc.stderr.replace("error: ", "", 1), case.mutations[0].where), f"{case.describe()}\n{out}"
        assert sorted(p.name for p in cwd.iterdir()) == ["bad.yaml"], f"{case.describe()}: wrote {list(cwd.iterdir())}"
    assert not env.out_dir.exists()
