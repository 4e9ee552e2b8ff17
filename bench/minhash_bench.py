"""MinHash bench: Kaiyuan Flows' distributed MinHash node vs a single-process
reference built on datasketch (MinHash + MinHashLSH + union-find), on the same
generated corpus with planted near-duplicate clusters.

    python bench/minhash_bench.py                      # 200k docs vs datasketch, then 100k and 1M
    python bench/minhash_bench.py --docs 200000 --scale 100000 1000000
    python bench/minhash_bench.py --quality 20000      # recall/precision of both vs exact Jaccard

Prints docs/s for both and the ratio, per-stage wall time of the node, and
the peak driver RSS (ru_maxrss of a fresh driver process per size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NUM_PERM = 128
THRESHOLD = 0.7
NGRAM = 5

_NONWORD = re.compile(r"\W+")
_DIGITS = re.compile(r"\d+")


def reference_dedup(ids, texts, num_perm=NUM_PERM, threshold=THRESHOLD, ngram=NGRAM):
    """datasketch, one process: MinHash per doc (update_batch over shingles),
    MinHashLSH insert + query, union-find; returns (id -> label, seconds by stage)."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs = {}
    proto = MinHash(num_perm=num_perm, seed=1)
    for i, text in zip(ids, texts):
        toks = [t for t in _NONWORD.split(_DIGITS.sub("0", text.lower())) if t]
        if len(toks) < 5:
            continue
        sh = {" ".join(toks[k : k + ngram]).encode() for k in range(max(len(toks) - ngram + 1, 1))}
        m = MinHash(num_perm=num_perm, seed=1, permutations=proto.permutations, scheme=proto.scheme)
        m.update_batch(list(sh))
        sigs[i] = m
    t1 = time.perf_counter()
    with lsh.insertion_session() as session:
        for i, m in sigs.items():
            session.insert(i, m, check_duplication=False)
    t2 = time.perf_counter()
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in sigs.items():
        for j in lsh.query(m):
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    labels = {i: find(i) for i in ids}
    t3 = time.perf_counter()
    return labels, {"signatures": t1 - t0, "lsh_insert": t2 - t1, "query_union_find": t3 - t2}


def write_corpus(path: str, n_docs: int, seed: int = 0, chunk: int = 100_000, fragments: int = 16):
    """The corpus as Lance, generated chunk by chunk (memory flat)."""
    import lance

    from bench.minhash_corpus import make_corpus

    if os.path.exists(os.path.join(path, "_versions")):
        if lance.dataset(path).count_rows() == n_docs:
            return
    shutil.rmtree(path, ignore_errors=True)
    per_file = max(1, n_docs // fragments)
    for k, start in enumerate(range(0, n_docs, chunk)):
        table = make_corpus(min(chunk, n_docs - start), seed=seed * 1000 + k, start_id=start)
        lance.write_dataset(table, path, mode="create" if k == 0 else "append", max_rows_per_file=per_file)


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_node(path: str, work_dir: str, parts: int) -> dict:
    """One MinHash run through Ray (this process is the driver)."""
    import lance
    import lance_ray
    import ray
    from ray.data.context import DataContext

    import tasks  # noqa: F401 - registers nodes
    from tasks.base import RunContext, Stream
    from tasks.minhash import MinHash, MinHashParams

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    schema = lance.dataset(path).schema
    node = MinHash(MinHashParams(num_permutations=NUM_PERM, threshold=THRESHOLD, num_parallel=parts), "bench/MinHash")
    t0 = time.perf_counter()
    res = node.run(Stream(lance_ray.read_lance(path, override_num_blocks=parts), schema), RunContext(work_dir=work_dir))
    t1 = time.perf_counter()
    rows = 0
    for batch in res.output.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
    t2 = time.perf_counter()
    stages = {k: round(v, 2) for k, v in node.timings.items() if k != "total_before_output"}
    stages["survivors (output stream)"] = round(t2 - t1, 2)
    ray.shutdown()
    return {
        "docs": res.stats["documents_considered"],
        "rows_out": rows,
        "seconds": t2 - t0,
        "stages": stages,
        "stats": res.stats,
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a
        # child would inherit the parent's peak (the datasketch reference's data)
        "peak_driver_rss_mb": _vm_hwm_mb(),
    }


def node_in_subprocess(path: str, parts: int) -> dict:
    work = os.path.join(ROOT, ".kaiyuan", "bench-minhash")
    shutil.rmtree(work, ignore_errors=True)  # measure signatures too (no resume)
    out = subprocess.run(
        [sys.executable, __file__, "--_node", path, "--parts", str(parts), "--work", work],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_on(path: str) -> tuple[dict, float]:
    import lance

    table = lance.dataset(path).to_table(columns=["id", "text"])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    del table
    t0 = time.perf_counter()
    labels, stages = reference_dedup(ids, texts)
    secs = time.perf_counter() - t0
    removed = len(labels) - len(set(labels.values()))
    return {"docs": len(ids), "removed": removed, "stages": {k: round(v, 2) for k, v in stages.items()}}, secs


def quality(n_docs: int) -> None:
    """Both implementations vs exact Jaccard on one corpus."""
    import tempfile

    import lance

    from bench.minhash_corpus import evaluate, ground_truth_pairs, make_corpus

    corpus = make_corpus(n_docs, seed=3)
    pairs = ground_truth_pairs(corpus, n_random=20_000)
    ids, texts = corpus.column("id").to_pylist(), corpus.column("text").to_pylist()
    labels, _ = reference_dedup(ids, texts)
    removed = {i for i, lab in labels.items() if lab != i}
    print("datasketch  ", evaluate(corpus, labels, removed, pairs))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.lance")
        lance.write_dataset(corpus, path, max_rows_per_file=n_docs // 8)
        out = subprocess.run(
            [sys.executable, __file__, "--_labels", path, "--work", os.path.join(tmp, "w")],
            check=True, capture_output=True, text=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
    label_of = {int(k): v for k, v in got["labels"].items()}
    print("kaiyuan     ", evaluate(corpus, label_of, set(got["removed"]), pairs))


def labels_subprocess(path: str, work: str) -> None:
    import lance
    import lance_ray
    import pyarrow as pa
    import ray
    from ray.data.context import DataContext

    import tasks  # noqa: F401
    from tasks.base import RunContext, Stream
    from tasks.minhash import KEY, MinHash, MinHashParams

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    node = MinHash(MinHashParams(num_permutations=NUM_PERM, threshold=THRESHOLD, num_parallel=8), "bench/MinHash")
    res = node.run(Stream(lance_ray.read_lance(path, override_num_blocks=8), lance.dataset(path).schema), RunContext(work_dir=work))
    keys = pa.concat_tables(res.prepped.select_columns(["id", KEY]).iter_batches(batch_format="pyarrow", batch_size=None))
    lab = [b for b in res.labels.iter_batches(batch_format="pyarrow", batch_size=None)]
    of = {}
    for b in lab:
        of.update(zip(b.column("u").to_pylist(), b.column("v").to_pylist()))
    labels = {i: of.get(k, k) for i, k in zip(keys.column("id").to_pylist(), keys.column(KEY).to_pylist())}
    kept = set()
    for b in res.output.iter_batches(batch_format="pyarrow", batch_size=None):
        kept.update(b.column("id").to_pylist())
    print(json.dumps({"labels": labels, "removed": sorted(set(labels) - kept)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200_000, help="corpus size for the head-to-head")
    ap.add_argument("--scale", type=int, nargs="*", default=[100_000, 1_000_000], help="sizes for the memory/stage runs")
    ap.add_argument("--parts", type=int, default=8, help="num_parallel of the node")
    ap.add_argument("--quality", type=int, default=0, help="also compare recall/precision on a corpus of this size")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "bench"))
    ap.add_argument("--_node", help=argparse.SUPPRESS)
    ap.add_argument("--_labels", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._node:
        print(json.dumps(run_node(args._node, args.work, args.parts)))
        return
    if args._labels:
        labels_subprocess(args._labels, args.work)
        return
    os.makedirs(args.data, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; MinHash {NUM_PERM} permutations, threshold {THRESHOLD}, {NGRAM}-gram shingles")
    if args.quality:
        quality(args.quality)
    if args.docs:
        path = os.path.join(args.data, f"minhash_{args.docs}.lance")
        write_corpus(path, args.docs)
        print(f"\n== {args.docs:,} documents, same corpus (load average {os.getloadavg()[0]:.1f}) ==", flush=True)
        ours = node_in_subprocess(path, args.parts)
        ours_rate = ours["docs"] / ours["seconds"]
        print(f"Kaiyuan MinHash (Ray)  : {ours['seconds']:8.1f} s  {ours_rate:9.0f} docs/s  removed {ours['stats']['removed']:,}  "
              f"peak driver RSS {ours['peak_driver_rss_mb']:.0f} MB  stages {ours['stages']}", flush=True)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        ref, ref_secs = reference_on(path)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        ref_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        ref_rate = ref["docs"] / ref_secs
        print(f"datasketch (1 process) : {ref_secs:8.1f} s  {ref_rate:9.0f} docs/s  removed {ref['removed']:,}  "
              f"(CPU {ref_cpu:.1f} s: {ref['docs'] / ref_cpu:.0f} docs per CPU-second)  stages {ref['stages']}")
        print(f"ratio (Kaiyuan / datasketch docs/s, wall): {ours_rate / ref_rate:.2f}x  (load average now {os.getloadavg()[0]:.1f})", flush=True)
    for n in args.scale:
        path = os.path.join(args.data, f"minhash_{n}.lance")
        write_corpus(path, n)
        print(f"\n-- scale run {n:,} docs starting (load average {os.getloadavg()[0]:.1f})", flush=True)
        r = node_in_subprocess(path, args.parts)
        print(
            f"\n== scale {n:,} docs: {r['seconds']:.1f} s, {r['docs'] / r['seconds']:.0f} docs/s, rows out {r['rows_out']:,}, "
            f"peak driver RSS {r['peak_driver_rss_mb']:.0f} MB\n   stages (s): {r['stages']}\n   stats: {r['stats']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
