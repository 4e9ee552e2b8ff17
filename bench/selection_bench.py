"""Selection/ordering nodes at scale: time relative to a plain Ray Data sort,
and peak driver memory at 100k vs 1M rows (it must stay flat: nothing is
collected on the driver).

    python bench/selection_bench.py                 # 100k and 1M rows
    python bench/selection_bench.py --sizes 100000 1000000 --blocks 8

Data: generated in Ray (id, a score with heavy ties, a group number, a
duplicate count, a token-id list), materialized once before timing, so every
measurement starts from the same blocks in the object store. Each node's
output is materialized (kept in the object store, not fetched) and counted.
Driver memory: RSS of this process sampled every 5 ms during each run; we
report the peak increase over the RSS just before the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    def __enter__(self):
        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.base


def gen(batch: dict) -> pa.Table:
    ids = batch["id"].astype(np.int64)
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    n = len(ids)
    lengths = rng.integers(1, 8, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table(
        {
            "id": ids,
            "score": np.round(rng.beta(2, 5, size=n), 2),  # ~100 distinct values: heavy ties
            "type": (ids % 4).astype(np.int64),
            "duplicate_count": rng.integers(0, 3, size=n).astype(np.float64),
            "tokens": pa.ListArray.from_arrays(offsets, rng.integers(0, 32000, size=int(lengths.sum()), dtype=np.int32)),
        }
    )


def make(ray, n: int, blocks: int):
    ds = ray.data.range(n, override_num_blocks=blocks).map_batches(gen, batch_format="numpy", batch_size=None)
    return ds.materialize()


def nodes():
    from tasks.base import NODE_TYPES

    def mk(name, **kw):
        cls = NODE_TYPES[name]
        return cls(cls.Params(**kw), f"bench > {name}")

    return {
        "FilterByRatio": mk("FilterByRatio", column="score", keep_ratio=0.3),
        "Reorder": mk("Reorder", score_cols=["score"], ascending=False),
        "InterleavedReorder": mk("InterleavedReorder", group_col="type", type_num=4, score_cols=["score", "__random__", "score", "id"], seed=1),
        "Flatten": mk("Flatten", col="duplicate_count"),
        "Selector": mk("Selector", num_rows=10000, method="random", seed=1),
    }


def run_node(node, mat, schema):
    from tasks.base import RunContext, Stream

    out = node.apply([Stream(mat, schema)], RunContext())
    res = out.ds.materialize()
    rows = res.count()
    del res
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--shuffle-strategy", default=None,
                        help="ray.data.shuffle_strategy (default: ours, sort_shuffle_pull_based; Ray's own is shuffle_v2)")
    args = parser.parse_args()

    import ray

    import tasks  # noqa: F401
    from flows.runtime import configure_ray_data

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    configure_ray_data(None, shuffle_strategy=args.shuffle_strategy)
    print(f"shuffle strategy: {ray.data.DataContext.get_current().shuffle_strategy.value}", flush=True)
    schema = gen({"id": np.zeros(0, np.int64)}).schema
    mem: dict[str, dict[int, float]] = {}
    times: dict[int, dict[str, float]] = {}
    for n in args.sizes:
        mat = make(ray, n, args.blocks)
        times[n] = {}
        t0 = time.perf_counter()
        sorted_ = mat.sort("score", descending=True).materialize()
        times[n]["plain sort"] = time.perf_counter() - t0
        del sorted_
        for name, node in nodes().items():
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                rows = run_node(node, mat, schema)
                times[n][name] = time.perf_counter() - t0
            mem.setdefault(name, {})[n] = peak.growth
            print(f"  {n:>9,} rows  {name:<20} {times[n][name]:7.2f} s  out {rows:>9,} rows  driver RSS +{peak.growth:6.1f} MB", flush=True)
        del mat
    big = max(args.sizes)
    t = times[big]
    print(f"\nTime at {big:,} rows ({args.blocks} blocks, {args.num_cpus} CPUs), relative to a plain Ray Data sort by score:")
    print(f"  {'plain sort':<20} {t['plain sort']:7.2f} s   1.00x")
    for name in ("FilterByRatio", "InterleavedReorder", "Reorder"):
        print(f"  {name:<20} {t[name]:7.2f} s   {t[name] / t['plain sort']:.2f}x")
    print("\nPeak driver RSS growth during the node's run (MB):")
    print("  " + f"{'node':<20}" + "".join(f"{n:>12,}" for n in args.sizes) + "   ratio")
    for name, by_n in mem.items():
        vals = [by_n[n] for n in args.sizes]
        print("  " + f"{name:<20}" + "".join(f"{v:12.1f}" for v in vals) + f"   {vals[-1] / max(vals[0], 1.0):.2f}")
    print(f"  (process peak RSS: {__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    ray.shutdown()


if __name__ == "__main__":
    main()
