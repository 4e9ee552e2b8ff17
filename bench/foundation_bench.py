"""read -> Filter -> ColumnSelect -> LanceWriter, three ways, side by side.

    python bench/foundation_bench.py                 # 1M rows, 6 rounds
    python bench/foundation_bench.py --rows 200000 --rounds 2

1. through the Prefect flow (one task per node on prefect-ray, local API);
2. the same Ray Data plan built by the same node classes, called directly;
3. a single-process pyarrow + Lance lower bound.

Rounds are interleaved (the order rotates each round) and medians compared,
because this machine is noisy: only the ratios printed at the end are meant
to be compared across runs. Every worker process Ray keeps is warmed first
(Prefect imported), so the rounds measure the steady state.
Then peak driver RSS for 100k and 1M rows is measured, each size in a fresh
process (ru_maxrss is a high-water mark), to show it stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

THRESHOLD = 0.3
COLUMNS = ["id", "text", "fasttext_score"]
WAYS = ("flow", "direct", "pyarrow")


def ensure_data(rows: int, work: Path) -> Path:
    from samples.data import TextMaker, chunks, scored_chunk, write_lance

    path = work / f"scored_{rows}.lance"
    if not path.exists():
        t = time.perf_counter()
        write_lance(str(path), chunks(scored_chunk, TextMaker(0), 1, rows))
        print(f"generated {rows:,} rows in {time.perf_counter() - t:.1f}s -> {path}", flush=True)
    return path


def config(src: Path, out: Path) -> dict:
    return {
        "ray": {"app_name": "bench"},
        "pipeline": {
            "type": "LanceWriter", "output_path": str(out),
            "child_configs": [{
                "type": "ColumnSelect", "select_cols": COLUMNS,
                "child_configs": [{
                    "type": "Filter", "column": "fasttext_score", "comparison": "larger", "threshold": THRESHOLD,
                    "child_configs": [{"type": "LanceReader", "input_path": str(src)}],
                }],
            }],
        },
    }


def run_pyarrow(src: Path, out: Path) -> int:
    import lance
    import pyarrow as pa
    import pyarrow.compute as pc

    ds = lance.dataset(str(src))
    schema = ds.schema

    def batches():
        for batch in ds.to_batches(columns=[c for c in schema.names]):
            keep = pc.greater(batch.column("fasttext_score"), THRESHOLD)
            yield batch.filter(keep).select(COLUMNS)

    first = next(iter(ds.to_batches(columns=COLUMNS, limit=1)), None)
    out_schema = pa.schema([schema.field(c) for c in COLUMNS]) if first is None else first.schema
    reader = pa.RecordBatchReader.from_batches(out_schema, batches())
    lance.write_dataset(reader, str(out), mode="overwrite")
    return lance.dataset(str(out)).count_rows()


def run_direct(cfg_path: Path) -> int:
    """The flow's own plan, built node by node, without Prefect."""
    from flows.config import load_config
    from flows.runtime import configure_ray_data
    from tasks.base import RunContext

    cfg = load_config(cfg_path)
    configure_ray_data(cfg.ray.data.target_block_size_mb, read_parallelism=cfg.ray.data.read_parallelism, shuffle_strategy=cfg.ray.data.shuffle_strategy)
    ctx = RunContext()

    def build(spec):
        return spec.build().apply([build(c) for c in spec.children], ctx)

    return build(cfg.root).num_rows


def run_flow(cfg_path: Path) -> int:
    """As `flows/run.py` runs it: the flow run carries its tags from its creation."""
    from prefect import tags

    from flows.config import load_config
    from flows.pipeline import flow_run_tags, kaiyuan_pipeline

    with tags(*flow_run_tags(load_config(cfg_path))):
        return kaiyuan_pipeline(config=str(cfg_path), preview_rows=0)["num_rows"]


def timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    rows = fn()
    return time.perf_counter() - t, rows


def warm_worker_pool() -> int:
    """Import Prefect and the flow module into every worker process that Ray
    keeps idle (one per CPU plus WORKERS_ABOVE_CPUS), so that no measured
    round pays a worker's first Prefect import (2.5-4 s here).

    Node tasks land on whichever idle worker Ray hands out, and between two
    flows the bench's direct runs leave workers that have run only Ray Data
    tasks at the front of the pool: after two warm-up runs each way, most
    probe runs here still had a measured round with that import. A
    long-lived Ray reaches this state by itself after a few runs; a CLI run
    pays the import once.
    Returns the number of distinct worker processes warmed."""
    import ray

    from flows.runtime import WORKERS_ABOVE_CPUS

    @ray.remote(num_cpus=0)
    def import_flow_module(hold_until: float) -> int:
        import flows.pipeline  # noqa: F401  (imports Prefect, prefect-ray, Ray Data, lance-ray)

        # Hold this worker until all have started, so each task gets its own.
        time.sleep(max(0.0, hold_until - time.time()))
        return os.getpid()

    workers = int(ray.cluster_resources().get("CPU", 1)) + WORKERS_ABOVE_CPUS
    pids: set[int] = set()
    for _ in range(3):  # a worker still starting when the hold ends lets a task share
        hold_until = time.time() + 10.0
        pids |= set(ray.get([import_flow_module.remote(hold_until) for _ in range(workers)]))
        if len(pids) >= workers:
            break
    return len(pids)


def flow_phases(runs: int) -> list[dict]:
    """Where each of the last ``runs`` flow runs spent its time, from the
    flow and task runs' own start and end times in the Prefect API: until
    the first node task started, the chain of node tasks up to the root's
    start, the root node task, and from the root's end to the flow run's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    time.sleep(2.5)  # task-run events reach the database in batches, up to a second late
    phases = []
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(limit=runs, sort=FlowRunSort.START_TIME_DESC)
        for flow_run in sorted(flow_runs, key=lambda f: f.start_time):
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            starts = sorted(t.start_time.timestamp() for t in task_runs if t.start_time)
            root = max((t for t in task_runs if t.end_time), key=lambda t: t.end_time, default=None)
            if not starts or root is None or root.start_time is None:
                continue
            begin, end = flow_run.start_time.timestamp(), flow_run.end_time.timestamp()
            phases.append({
                "to_first_node_task": starts[0] - begin,
                "node_task_chain": root.start_time.timestamp() - starts[0],
                "root_node_task": root.end_time.timestamp() - root.start_time.timestamp(),
                "root_end_to_flow_end": end - root.end_time.timestamp(),
            })
    return phases


def compare(rows: int, rounds: int, work: Path) -> dict:
    import ray
    import yaml

    from flows import runtime

    src = ensure_data(rows, work)
    cfg_path = work / "bench.yaml"
    out = work / "out.lance"
    cfg_path.write_text(yaml.safe_dump(config(src, out)))
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    counts = {}
    runners = {"flow": lambda: run_flow(cfg_path), "direct": lambda: run_direct(cfg_path), "pyarrow": lambda: run_pyarrow(src, out)}
    with runtime.prefect_api():
        runtime.init_ray(None, init_kwargs={"num_cpus": os.cpu_count()})
        print(f"warmed {warm_worker_pool()} Ray worker processes (Prefect imported)", flush=True)
        # Warm-up, twice each way: Prefect registration, Ray Data's remote
        # functions, the page cache; the rounds below measure the steady state.
        for _ in range(2):
            for name in ("flow", "direct"):
                shutil.rmtree(out, ignore_errors=True)
                runners[name]()
        for r in range(rounds):
            # The order rotates every round, so that no way always runs right
            # after the same other one (a fixed order would always run the
            # flow right after the in-process pyarrow run and its page cache).
            order = WAYS[r % 3:] + WAYS[:r % 3]
            for name in order:
                shutil.rmtree(out, ignore_errors=True)
                seconds, n = timed(runners[name])
                times[name].append(seconds)
                counts[name] = n
                print(f"round {r + 1}: {name:8s} {seconds:7.2f}s  rows out {n:,}", flush=True)
        phases = flow_phases(rounds)
        ray.shutdown()
    assert len(set(counts.values())) == 1, f"row counts differ: {counts}"
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(f / d for f, d in zip(times["flow"], times["direct"]))
    return {"rows": rows, "median_s": med, "flow/direct": med["flow"] / med["direct"],
            "flow/direct paired": paired, "direct/pyarrow": med["direct"] / med["pyarrow"], "times_s": times, "flow_phases_s": phases}


def peak_rss(rows: int, mode: str, work: Path) -> float:
    """Peak RSS (MiB) of a fresh driver process running one job."""
    code = f"""
import sys, yaml
sys.path.insert(0, {str(ROOT)!r})
sys.argv = ['bench']
from bench.foundation_bench import ensure_data, config, run_direct, run_flow
from pathlib import Path
from flows import runtime
work = Path({str(work)!r})
src = ensure_data({rows}, work)
cfg = work / 'rss_{mode}_{rows}.yaml'
cfg.write_text(yaml.safe_dump(config(src, work / 'rss_{mode}_{rows}.lance')))
with runtime.prefect_api():
    runtime.init_ray(None)
    n = (run_flow if {mode!r} == 'flow' else run_direct)(cfg)
# VmHWM, not ru_maxrss: the latter survives fork+exec and would report the parent's peak.
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print('RSS', int(hwm) / 1024, n)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RSS")]
    if not line:
        raise RuntimeError(proc.stderr[-3000:])
    return float(line[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work", default=str(ROOT / "data" / "bench"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if not args.memory_only:
        result = compare(args.rows, args.rounds, work)
        print("\n== read -> Filter -> ColumnSelect -> LanceWriter, "
              f"{result['rows']:,} rows, median of {args.rounds} ==")
        for name, sec in result["median_s"].items():
            print(f"  {name:8s} {sec:7.2f}s")
        print(f"  flow / direct   = {result['flow/direct']:.2f}   (target <= 1.15)")
        print(f"  flow / direct, median of the rounds' own ratios = {result['flow/direct paired']:.2f}")
        print(f"  flow - direct   = {result['median_s']['flow'] - result['median_s']['direct']:.2f}s  "
              "(Prefect's share: flow and task runs, artifacts; roughly fixed per run)")
        print(f"  direct / pyarrow = {result['direct/pyarrow']:.2f}   (target <= 2.0)")
        print("\n== where each measured flow run spent its time (s, from the Prefect API) ==")
        print("  to first node task | node-task chain | root node task | root end to flow end")
        for p in result["flow_phases_s"]:
            print(f"  {p['to_first_node_task']:18.3f} | {p['node_task_chain']:15.3f} | {p['root_node_task']:14.3f} | {p['root_end_to_flow_end']:.3f}")
    if not args.skip_memory:
        print("\n== peak driver RSS (fresh process per size) ==")
        rss = {}
        for mode in ("direct", "flow"):
            for rows in (100_000, 1_000_000):
                rss[(mode, rows)] = peak_rss(rows, mode, work)
                print(f"  {mode:6s} {rows:>9,} rows: {rss[(mode, rows)]:7.0f} MiB", flush=True)
            print(f"  {mode:6s} 1M / 100k = {rss[(mode, 1_000_000)] / rss[(mode, 100_000)]:.2f}")
        result["peak_rss_mib"] = {f"{m}_{r}": v for (m, r), v in rss.items()}
    (work / "foundation_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
