"""Write a phase-mixing recipe of 3 x SOURCES + 3 nodes (the shape of the
paper's mixing recipes: SOURCES x LanceReader -> TokenCounter_v2 -> Selector,
unioned by position, counted again, one writer) and its token sources, plus a
2-node read -> write of one source for comparison. Time both with the CLI:

    python bench/mixing_tree.py --out /tmp/mix --sources 50
    time python flows/run.py --config /tmp/mix/mix.yaml --show-rows 0
    time python flows/run.py --config /tmp/mix/read_write.yaml --show-rows 0
"""

from __future__ import annotations

import argparse
import os

import lance
import numpy as np
import pyarrow as pa
import yaml


def token_source(path: str, seed: int, rows: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 50_000, size=int(n)).astype(np.int32).tolist() for n in rng.integers(0, 40, size=rows)]
    table = pa.table({"id": pa.array(np.arange(rows) + seed * 10_000, pa.int64()),
                      "text_tokenized": pa.array(tokens, pa.list_(pa.int32()))})
    lance.write_dataset(table, path, mode="overwrite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sources", type=int, default=50)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    datasets = []
    for k in range(5):
        path = os.path.join(args.out, f"source{k}.lance")
        token_source(path, k, 200 + 40 * k)
        datasets.append(path)
    branches = []
    for i in range(args.sources):
        selector = {"type": "Selector", "seed": i, **({"selection_ratio": 0.5} if i % 2 else {"num_rows": 60})}
        reader = {"type": "LanceReader", "input_path": datasets[i % 5], "select_cols": ["id", "text_tokenized"]}
        selector["child_configs"] = [{"type": "TokenCounter_v2", "task_name": f"source_{i}", "child_configs": [reader]}]
        branches.append(selector)
    mix = {"ray": {"app_name": "mixing_tree"}, "pipeline": {
        "type": "LanceWriter", "output_path": os.path.join(args.out, "mix_out.lance"), "child_configs": [
            {"type": "TokenCounter_v2", "task_name": "mix_total",
             "child_configs": [{"type": "UnionByPosition", "child_configs": branches}]}]}}
    small = {"ray": {"app_name": "read_write_one_source"}, "pipeline": {
        "type": "LanceWriter", "output_path": os.path.join(args.out, "rw_out.lance"),
        "child_configs": [{"type": "LanceReader", "input_path": datasets[0]}]}}
    for name, cfg in (("mix.yaml", mix), ("read_write.yaml", small)):
        with open(os.path.join(args.out, name), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    print(f"{3 * args.sources + 3} nodes: {os.path.join(args.out, 'mix.yaml')}")


if __name__ == "__main__":
    main()
