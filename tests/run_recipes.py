"""Run several recipes in one process, one after the other, as the CLI runs
one (the same Prefect API and Ray start-up, then the flow): one Ray
connection and one API for all of them. Prints one JSON line per recipe:
{"config", "rc", "rows", "output", "error"}. Used by the cluster simulation's
example sweep (tests/test_cluster_sim.py), inside a flow-run pod in k8s mode
and in a plain process for the local reference runs.

    python tests/run_recipes.py MODE CONFIG...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(mode: str, configs: list[str]) -> int:
    from flows import errors, runtime
    from flows.pipeline import kaiyuan_pipeline

    failed = 0
    with runtime.prefect_api(background=True):
        # One Ray for every recipe (the flows find it running): a Ray start
        # per recipe timed out on a loaded machine (Ray 2.60 waits 30 s for
        # its raylet, whatever RAY_raylet_start_wait_time_s says).
        runtime.init_ray(runtime.resolve_ray_address(mode, None, None))
        runtime.wait_for_api()
        runtime.prewarm_workers()
        for config in configs:
            try:
                result = kaiyuan_pipeline(config=config, mode=mode, preview_rows=0)
                line = {"config": config, "rc": 0, "rows": result["num_rows"], "output": result["output_path"]}
            except Exception as exc:  # reported per recipe; the sweep goes on
                failed += 1
                line = {"config": config, "rc": errors.exit_code(exc) or 1,
                        "error": errors.user_message(exc) or f"{type(exc).__name__}: {exc}"}
            print("RECIPE " + json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
