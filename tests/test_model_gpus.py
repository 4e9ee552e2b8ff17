"""Model nodes' actor pools and devices (issue 19, GPUs): ``num_gpus``,
``min_actors``/``max_actors``, and where the actors ran, in a log line and
in the node's report.

This machine has no GPU. The session's Ray has no GPU resource, so the
tests of a GPU cluster run in a subprocess on a Ray started with a fake
``num_gpus=1``: Ray reserves that GPU for the actor, torch in the actor
finds no CUDA device, and the node must say it ran on CPU.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.base import NODE_TYPES, NodeError, RunContext, Stream

ROOT = Path(__file__).resolve().parent.parent
GOOD = "Research study results show that the new method improves energy efficiency in city water systems."
JUNK = "click here buy now free cheap deal casino winner prize !!!"
TEXTS = pa.table({"id": pa.array(range(300), pa.int64()), "text": [GOOD, JUNK, ""] * 100})


def node(type_name, **params):
    cls = NODE_TYPES[type_name]
    return cls(cls.Params(**params), f"pipeline > {type_name}")


def pool_of(stream: Stream) -> tuple[object, dict]:
    """The compute strategy and remote args of the map a model node's apply()
    added: what Ray Data will ask of the cluster (read off its logical plan)."""
    op = stream.ds._logical_plan.dag
    return op.compute, dict(op.ray_remote_args)


def applied(ray, node_obj, ctx: RunContext | None = None) -> Stream:
    ds = ray.data.from_arrow(TEXTS).repartition(3)
    return node_obj.apply([Stream(ds, TEXTS.schema)], ctx or RunContext(batch_size=50))


def run_with_stats(ray, node_obj):
    """Execute the node over TEXTS with a real RunStats actor; return
    (rows out, observation)."""
    from tasks.stats import RunStats

    name = f"test-stats-{uuid.uuid4().hex[:8]}"
    ns = ray.get_runtime_context().namespace
    stats = RunStats.options(name=name, namespace=ns).remote()
    try:
        out = applied(ray, node_obj, RunContext(stats_actor=f"{name}/run", ray_namespace=ns, batch_size=50))
        rows = out.ds.count()
        return rows, ray.get(stats.snapshot.remote("run"))[node_obj.path]
    finally:
        ray.kill(stats)


@pytest.fixture(scope="module")
def models(sample_dir):
    return sample_dir / "models"


# -- on a Ray with a (fake) GPU: in a subprocess ----------------------------


def on_fake_gpu_ray(models_dir: str) -> dict:
    """What model nodes ask of, and report on, a Ray whose only node has
    one GPU resource; run by the ``fake_gpu`` fixture in a fresh process."""
    import ray
    import torch

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    # What the actor should find (a machine with a real GPU gives Ray's fake one a CUDA device).
    cuda = torch.cuda.is_available()
    out = {"device": f"GPU (1 actor, {torch.cuda.get_device_name(0)})" if cuda else "CPU (1 actor)"}
    seq = str(Path(models_dir) / "seq_classifier")
    fasttext = str(Path(models_dir) / "fasttext_quality.bin")
    default = node("SeqClassifierScorer", model_path=seq, output_col="s")
    out["seq_default_args"] = pool_of(applied(ray, default))[1]
    rows, obs = run_with_stats(ray, default)
    out["seq_default_rows"], out["seq_default_report"] = rows, default.report(obs).markdown
    forced = node("SeqClassifierScorer", model_path=seq, output_col="s", num_gpus=0)
    out["seq_cpu_args"] = pool_of(applied(ray, forced))[1]
    out["fasttext_args"] = pool_of(applied(ray, node("FastTextScorer", model_path=fasttext, output_col="q")))[1]
    try:
        node("SeqClassifierScorer", model_path=seq, output_col="s", num_gpus=2).check(RunContext())
        out["two_gpus_error"] = None
    except NodeError as exc:
        out["two_gpus_error"] = str(exc)
    ray.shutdown()
    return out


@pytest.fixture(scope="module")
def fake_gpu(models) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from tests.test_model_gpus import on_fake_gpu_ray; "
            "print('RESULT ' + json.dumps(on_fake_gpu_ray(sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(models)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_default_asks_a_gpu_per_actor_and_reports_cpu_honestly(fake_gpu):
    # (a) the cluster has a GPU: one per actor, as SPEC §8 asks ...
    assert fake_gpu["seq_default_args"]["num_gpus"] == 1
    # ... the run completes, and the report says what torch in the actor
    # found: here no CUDA, so CPU, although Ray reserved its (fake) GPU.
    assert fake_gpu["seq_default_rows"] == TEXTS.num_rows
    report = fake_gpu["seq_default_report"]
    assert f"**ran on:** {fake_gpu['device']}\n" in report


def test_num_gpus_zero_forces_cpu_and_fasttext_never_asks(fake_gpu):
    # (b) the same cluster, num_gpus: 0: no GPU asked; fastText is CPU-only.
    assert not fake_gpu["seq_cpu_args"].get("num_gpus")
    assert not fake_gpu["fasttext_args"].get("num_gpus")


def test_more_gpus_than_any_node_has_is_an_error(fake_gpu):
    assert fake_gpu["two_gpus_error"] == (
        "pipeline > SeqClassifierScorer: num_gpus: 2 GPUs per actor asked, but no node of the Ray cluster "
        "has that many (the largest has 1, 1 in all)")


# -- on the session's Ray (2 CPUs, no GPU) ----------------------------------


def test_num_gpus_on_a_cluster_without_gpus_is_a_clear_error(ray_session, run_pipeline, models, tmp_path):
    # (c) before the run (the flow's check, with Ray up), naming the node ...
    import lance

    from flows.config import ConfigError, check_nodes, parse_config

    lance.write_dataset(TEXTS, str(tmp_path / "in.lance"))
    seq = str(models / "seq_classifier")
    cfg = {"pipeline": {"type": "LanceWriter", "output_path": str(tmp_path / "o.lance"), "child_configs": [{
        "type": "SeqClassifierScorer", "model_path": seq, "output_col": "s", "num_gpus": 1,
        "child_configs": [{"type": "LanceReader", "input_path": str(tmp_path / "in.lance")}]}]}}
    expected = ("child_configs[0] > SeqClassifierScorer: num_gpus: 1 GPU(s) per actor asked, but the Ray cluster "
                "has no GPUs (its resources: CPU=2); set num_gpus: 0 to run on CPU")
    with pytest.raises(ConfigError, match=r"SeqClassifierScorer: num_gpus: 1 GPU\(s\) per actor asked") as err:
        check_nodes(parse_config(cfg), RunContext())
    assert expected in str(err.value)
    # ... and again where the plan is built (the CLI checks before Ray starts).
    with pytest.raises(NodeError, match="the Ray cluster has no GPUs"):
        applied(ray_session, node("SeqClassifierScorer", model_path=seq, output_col="s", num_gpus=0.5))
    # Through the flow: the same error, not a run waiting for a GPU ...
    with pytest.raises(ConfigError) as run_err:
        run_pipeline(cfg)
    assert expected in str(run_err.value)
    # ... also when the config was checked before Ray started (the CLI hands
    # it over checked): the node's task stops the run before any data flows.
    from flows.plan import hand_over
    from tests.conftest import write_config

    path = write_config(tmp_path, cfg, "checked.yaml")
    parsed = parse_config(cfg)
    parsed.checked_with = {}
    hand_over(str(path), None, parsed)
    with pytest.raises(NodeError) as task_err:
        run_pipeline(path)
    assert str(task_err.value) == "pipeline > " + expected


def test_min_max_actors_reach_the_actor_pool(ray_session, models):
    # (d) an autoscaling pool from min_actors to max_actors; concurrency still fixes the size.
    fasttext = str(models / "fasttext_quality.bin")
    shapes = {
        (1, 2): {"min_actors": 1, "max_actors": 2},
        (1, 3): {"max_actors": 3},
        (2, 2): {"concurrency": 2},
        (1, 1): {},  # the default on 2 CPUs, as before: half the CPUs
    }
    for (lo, hi), params in shapes.items():
        compute, args = pool_of(applied(ray_session, node("FastTextScorer", model_path=fasttext, output_col="q", **params)))
        assert (type(compute).__name__, compute.min_size, compute.max_size) == ("ActorPoolStrategy", lo, hi), params
        assert args["num_cpus"] == round(min(1.0, 2 / (4 * hi)), 3) and not args.get("num_gpus"), params


def test_report_and_log_say_where_the_model_ran(ray_session, models, caplog):
    # (e) the artifact's text names the device, one entry per actor load.
    scorer = node("FastTextScorer", model_path=str(models / "fasttext_quality.bin"), output_col="q", min_actors=1, max_actors=2)
    rows, obs = run_with_stats(ray_session, scorer)
    assert rows == TEXTS.num_rows
    loads = int(obs.sums["model_loads"])
    assert obs.sums["model_device:CPU"] == loads >= 1
    assert f"**ran on:** CPU ({loads} actor{'s' if loads > 1 else ''})" in scorer.report(obs).markdown
    # The actor's INFO line (here in this process: actors log to their workers).
    from tasks._models import ModelActor

    with caplog.at_level(logging.INFO, logger="kaiyuan.models"):
        ModelActor(scorer, RunContext())
    lines = [r.getMessage() for r in caplog.records if r.name == "kaiyuan.models" and r.levelno == logging.INFO]
    assert any(line.startswith("pipeline > FastTextScorer: model loaded in") and "runs on CPU" in line for line in lines), lines


def test_pool_parameters_are_validated():
    from flows.config import ConfigError, parse_config

    def problems(type_name, **params) -> str:
        model = {"FastTextScorer": "m.bin", "SeqClassifierScorer": "m"}[type_name]
        cfg = {"pipeline": {"type": type_name, "model_path": model, **params,
                            "child_configs": [{"type": "LanceReader", "input_path": "x.lance"}]}}
        with pytest.raises(ConfigError) as err:
            parse_config(cfg)
        return str(err.value)

    assert "num_gpus must be 0: FastTextScorer runs on CPU only" in problems("FastTextScorer", num_gpus=1)
    assert "min_actors (3) must be <= max_actors (2)" in problems("SeqClassifierScorer", min_actors=3, max_actors=2)
    assert "not both" in problems("SeqClassifierScorer", concurrency=2, max_actors=4)
    assert "num_gpus above 1 must be a whole number" in problems("SeqClassifierScorer", num_gpus=1.5)
    assert "num_gpus must be 0 or at least 0.0001" in problems("SeqClassifierScorer", num_gpus=1e-9)
    assert "num_gpus" in problems("SeqClassifierScorer", num_gpus=-1)
    assert "min_actors" in problems("FastTextScorer", min_actors=0)
    # Old recipes are unchanged: none of them set, every default as before.
    p = NODE_TYPES["SeqClassifierScorer"].Params(model_path="m")
    assert (p.num_gpus, p.min_actors, p.max_actors) == (None, None, None)
    assert NODE_TYPES["FastTextFilter"].Params(model_path="m", num_gpus=0, min_actors=2).min_actors == 2
