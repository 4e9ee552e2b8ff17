"""FastTextScorer throughput on Ray Data, and how often the model is loaded.

    python bench/scoring_bench.py                  # 200k docs
    python bench/scoring_bench.py --rows 1000000 --actors 2 --blocks 64

Generates the sample ``scored_input`` dataset (Lance) and the sample fastText
model into a scratch directory, then scores every document three ways and
prints docs/s side by side:

1. ``FastTextScorer`` as the flow runs it: an actor pool of ``--actors``
   actors, the model loaded once per actor (counted by the run's stats actor);
2. a task per block that loads the model itself (one load per block: the
   cost the actor pool avoids);
3. one process calling ``model.predict`` on in-memory lists (the ceiling).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=0, help="rows per model call (0: whole blocks, like the per-block path)")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    return parser.parse_args()


def prepare(args) -> tuple[str, str, str]:
    """(scratch dir, dataset path, model path): generated unless already there."""
    import lance

    from samples.data import generate_all

    work = args.work or tempfile.mkdtemp(prefix="scoring-bench-")
    t0 = time.perf_counter()
    data = os.path.join(work, "scored_input.lance")
    model_path = os.path.join(work, "models", "fasttext_quality.bin")
    if not (os.path.exists(model_path) and os.path.exists(data) and lance.dataset(data).count_rows() == args.rows):
        generate_all(work, rows=args.rows, seed=0, only=["scored_input.lance"])
    print(f"data: {args.rows:,} docs at {data} ({time.perf_counter() - t0:.1f}s to generate or find)")
    return work, data, model_path


def time_node(read, schema, model_path: str, args) -> tuple[int, float, int, int]:
    """1. The node as the flow runs it: (rows, seconds, model loads, batches)."""
    import ray

    from tasks.base import NODE_TYPES, RunContext, Stream
    from tasks.stats import RunStats

    cls = NODE_TYPES["FastTextScorer"]
    batch_size = args.batch_size or None
    node = cls(cls.Params(model_path=model_path, output_col="q", concurrency=args.actors, batch_size=batch_size), "bench > FastTextScorer")
    name = f"bench-stats-{uuid.uuid4().hex[:8]}"
    ns = ray.get_runtime_context().namespace
    stats = RunStats.options(name=name, namespace=ns).remote()
    ctx = RunContext(stats_actor=f"{name}/run", ray_namespace=ns, batch_size=batch_size)
    start = time.perf_counter()
    out = node.apply([Stream(read(), schema)], ctx)
    rows = sum(b.num_rows for b in out.ds.iter_batches(batch_format="pyarrow", batch_size=None))
    seconds = time.perf_counter() - start
    obs = ray.get(stats.snapshot.remote("run"))[node.path]
    ray.kill(stats)
    loads = int(obs.sums.get("model_loads", 0))
    return rows, seconds, loads, obs.batches - loads


def time_per_block(read, model_path: str, work: str) -> tuple[int, float, int]:
    """2. Every block loads the model: (rows, seconds, model loads)."""
    import pyarrow as pa

    from tasks.scoring import fasttext_scores, load_fasttext

    loads_path = os.path.join(work, "per_block_loads.txt")
    if os.path.exists(loads_path):
        os.unlink(loads_path)

    def per_block(batch: pa.Table) -> pa.Table:
        model = load_fasttext(model_path)
        with open(loads_path, "a") as fh:
            fh.write("1\n")
        scores = fasttext_scores(model, batch.column("text").to_pylist(), 2, "__label__hq")
        return batch.append_column("q", pa.array(scores))

    start = time.perf_counter()
    ds = read().map_batches(per_block, batch_format="pyarrow", batch_size=None)
    rows = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    seconds = time.perf_counter() - start
    return rows, seconds, sum(1 for _ in open(loads_path))


def time_in_memory(data: str, model_path: str) -> tuple[int, float]:
    """3. One process over in-memory lists (the ceiling): (rows, seconds)."""
    import lance

    from tasks.scoring import fasttext_scores, load_fasttext

    texts = lance.dataset(data).to_table(columns=["text"]).column("text").to_pylist()
    model = load_fasttext(model_path)
    start = time.perf_counter()
    fasttext_scores(model, texts, 2, "__label__hq")
    return len(texts), time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import lance
    import lance_ray
    import pyarrow as pa
    import ray

    work, data, model_path = prepare(args)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    print(f"ray: {cpus} CPUs; actors={args.actors} blocks={args.blocks} batch_size={args.batch_size}")

    def read():
        return lance_ray.read_lance(data, columns=["id", "text"], override_num_blocks=args.blocks)

    schema = lance.dataset(data).schema
    schema = pa.schema([schema.field("id"), schema.field("text")])
    # Warm-up: one read pass, so no method pays for cold caches or Ray's worker start.
    sum(b.num_rows for b in read().iter_batches(batch_format="pyarrow", batch_size=None))
    n_pool, pool_s, loads, batches = time_node(read, schema, model_path, args)
    n_block, block_s, block_loads = time_per_block(read, model_path, work)
    n_mem, mem_s = time_in_memory(data, model_path)
    ray.shutdown()

    assert n_pool == n_block == args.rows
    print()
    print(f"{'method':<44} {'docs/s':>10} {'seconds':>8} {'model loads':>12}")
    print(f"{'FastTextScorer (actor pool, %d actors)' % args.actors:<44} {n_pool / pool_s:>10,.0f} {pool_s:>8.2f} {loads:>12}")
    print(f"{'model loaded per block (old port)':<44} {n_block / block_s:>10,.0f} {block_s:>8.2f} {block_loads:>12}")
    print(f"{'one process, in memory (ceiling)':<44} {n_mem / mem_s:>10,.0f} {mem_s:>8.2f} {1:>12}")
    print()
    print(f"model loads {loads} == actors {args.actors}: {loads == args.actors} "
          f"(batches scored: {batches}; blocks: {args.blocks})")
    print(f"actor pool vs per-block loading: {block_s / pool_s:.2f}x faster")


if __name__ == "__main__":
    main()
