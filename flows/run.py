"""Command line: run a Kaiyuan YAML pipeline as a Prefect flow.

    python flows/run.py --config examples/read_write.yaml
    python flows/run.py --config examples/read_write.yaml --check
    python flows/run.py --config X.yaml --mode k8s --ray-address auto

Exit codes: 0 success, 2 invalid config or input (no traceback), 1 a node
failed while running (the message names the node), 3 internal error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# `python flows/run.py` puts flows/ on sys.path, not the project root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from flows import runtime, warm  # noqa: E402  (runtime sets telemetry-off env first)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flows/run.py", description="Run a Kaiyuan YAML pipeline as a Prefect flow.")
    parser.add_argument("--config", help="pipeline YAML file")
    parser.add_argument("--list-nodes", action="store_true", help="list the node types and exit")
    parser.add_argument("--describe", metavar="NODE", help="a node type's parameters, types and defaults, and exit")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of the recipe format and exit")
    parser.add_argument("--lineage", metavar="PATH", help="print the lineage of a Lance dataset a run wrote, and exit")
    parser.add_argument("--check", action="store_true", help="validate the config and print the tree; run nothing")
    parser.add_argument("--mode", choices=("local", "k8s"), default="local")
    parser.add_argument("--ray-address", default=None, help="Ray address (k8s default: RAY_ADDRESS, else auto)")
    parser.add_argument("--work-dir", default=None,
                        help="where the run keeps intermediate state (default: prefect.work_dir, else .kaiyuan; "
                             "k8s: s3://<bucket>/_kaiyuan)")
    parser.add_argument("--seed", type=int, default=None, help="run-level seed (default: ray.seed or 42)")
    parser.add_argument("--show-rows", type=int, default=20, help="rows of the result to print")
    parser.add_argument("--no-sample-data", action="store_true", help="do not generate missing sample data")
    parser.add_argument("--verbose", action="store_true",
                        help="show Prefect's, Ray's and the nodes' log lines here too (they are in the run's Prefect logs either way)")
    args = parser.parse_args(argv)
    if not (args.config or args.list_nodes or args.describe or args.schema or args.lineage):
        parser.error("--config is required (or --list-nodes, --describe NODE, --schema)")
    return args


def catalogue(args: argparse.Namespace) -> int:
    """--list-nodes, --describe, --schema: the node catalogue, from the node classes."""
    from flows import catalog

    if args.list_nodes:
        print(catalog.list_nodes())
    if args.describe:
        try:
            print(catalog.describe(args.describe))
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
    if args.schema:
        print(catalog.recipe_schema_json())
    return 0


def _sample_inputs_missing(cfg) -> bool:
    """True if a node reads (data or a model) from data/sample/ and it is missing."""
    for spec in cfg.nodes():
        for value in spec.params.model_dump().values():
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, str) and path.startswith("data/sample/") and not Path(path.split("*")[0]).exists():
                    return True
    return False


class _progress_bar:
    """Rows read against the inputs' row counts, on a terminal (rich)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            from flows.report import PROGRESS_LISTENERS

            self.bar = Progress(TextColumn("rows read"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task("rows", total=None)
            self.bar.start()
            PROGRESS_LISTENERS.append(self.update)
        return self

    def update(self, read: int, total: int) -> None:
        self.bar.update(self.task, completed=read, total=total or None)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            from flows.report import PROGRESS_LISTENERS

            PROGRESS_LISTENERS.remove(self.update)
            self.bar.stop()


def _print_nodes(result: dict) -> None:
    """One line per node: rows in and out, time, and how it ended."""
    for row in result.get("nodes", []):
        counts = f"rows in {_count(row['rows_in'])} -> out {_count(row['rows_out'])}"
        status = "" if row["status"] == "ran" else f"  [{row['status']}]"
        print(f"{row['node']}: {counts}, {row['task_seconds']:.2f}s{status}", file=sys.stderr)


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _print_result(result: dict, show_rows: int) -> None:
    import pyarrow as pa

    from tasks.reports import markdown_table

    preview = result["preview"][:show_rows]
    if preview:
        table = pa.Table.from_pylist(preview)
        print(markdown_table(table, width=60))
    print(f"rows: {result['num_rows']}")
    if result.get("output_path"):
        print(f"output: {result['output_path']}")


def _setup_logging(verbose: bool) -> None:
    """Quiet by default: the console shows warnings, a progress bar, one line
    per node and the result; every log line still reaches the run's Prefect
    logs (and Ray's session logs). ``--verbose`` shows them here too."""
    from flows.errors import quiet_user_errors

    if not verbose:
        # Read when Prefect configures logging (first import) and by init_ray.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("KAIYUAN_QUIET", "1")
        import warnings

        warnings.filterwarnings("ignore", message="lance is not fork-safe")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # the handler, not the loggers: INFO lines still reach the Prefect API
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    quiet_user_errors()


def load_and_check(args: argparse.Namespace):
    """The config, loaded and checked on metadata before any start-up (and
    sample data generated when a local run needs it). Raises ConfigError."""
    from flows.config import check_nodes, load_config

    cfg = load_config(args.config)
    if not args.no_sample_data and args.mode == "local" and _sample_inputs_missing(cfg):
        from samples.data import ensure_sample_data

        print("sample data missing: generating data/sample/ ...", file=sys.stderr)
        ensure_sample_data("data/sample")
    check_nodes(cfg)
    return cfg


def run_flow(args: argparse.Namespace, cfg) -> dict:
    """Start (or find) the Prefect API and Ray side by side, then run the flow."""
    from prefect import tags

    from flows.pipeline import flow_run_tags, kaiyuan_pipeline, process_tag
    from flows.plan import hand_over

    with runtime.prefect_api(background=True) as api_url:
        if not cfg.ray.block:  # a RayCluster block is read from Prefect inside the flow
            # Ray starts while the local Prefect API starts (two ~5-10 s
            # start-ups overlap); the flow then finds Ray running.
            address = runtime.resolve_ray_address(args.mode, args.ray_address, cfg.ray.address, cfg.ray.init_kwargs)
            runtime.init_ray(address, init_kwargs=cfg.ray.init_kwargs, runtime_env=cfg.ray.runtime_env,
                             namespace=cfg.ray.namespace)
            if address and args.mode == "local":
                print(f"using the running Ray at {address}", file=sys.stderr)
        if not runtime.embedded_api():
            print(f"using the Prefect API at {runtime.without_credentials(api_url)}", file=sys.stderr)
        runtime.wait_for_api()
        if not cfg.ray.block:
            runtime.prewarm_workers()
        hand_over(args.config, None, cfg)
        with tags(*flow_run_tags(cfg), process_tag()):  # on the flow run from its creation: no later API call
            return kaiyuan_pipeline(
                config=args.config,
                mode=args.mode,
                ray_address=args.ray_address,
                seed=args.seed,
                work_dir=args.work_dir,
                preview_rows=max(args.show_rows, 0),
            )


def report_failure(exc: BaseException) -> int:
    """Print a user error as one paragraph (no traceback); return the exit code."""
    from prefect.exceptions import CancelledRun

    from flows import errors

    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    if isinstance(exc, CancelledRun):
        print(f"cancelled: {exc}", file=sys.stderr)
        return errors.EXIT_CANCELLED
    message = errors.user_message(exc)
    if message is None:
        if os.environ.get("KAIYUAN_DEBUG"):
            raise exc
        print(f"internal error: {type(exc).__name__}: {exc}\n(set KAIYUAN_DEBUG=1 for the traceback)", file=sys.stderr)
        return errors.EXIT_INTERNAL
    print(f"error: {message}", file=sys.stderr)
    return errors.exit_code(exc)


def main(argv: list[str] | None = None, *, warm_runner: bool = False) -> int:
    """``warm_runner``: called by the warm runner (flows/warm.py) for a CLI."""
    args = parse_args(argv)
    if not warm_runner and warm.may_delegate(args):
        code = warm.delegate(sys.argv[1:] if argv is None else list(argv))
        if code is not None:
            return code
    if args.lineage:
        from flows import lineage

        return lineage.show(args.lineage)
    if args.list_nodes or args.describe or args.schema:
        try:
            return catalogue(args)
        except BrokenPipeError:  # `| head`
            return 0
    _setup_logging(args.verbose)
    from flows.errors import CONFIG_ERRORS, EXIT_INVALID

    try:
        cfg = load_and_check(args)
    except CONFIG_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if warm_runner:
        reason = warm.declines(cfg)
        if reason:
            raise warm.Declined(reason)
        print(f"using the warm runner (pid {os.getpid()})", file=sys.stderr)
    if args.check:
        from flows.config import tree_text

        print(tree_text(cfg.root))
        print(f"config OK: {len(cfg.nodes())} nodes")
        return 0
    try:
        with _progress_bar(enabled=not args.verbose and sys.stderr.isatty()):
            result = run_flow(args, cfg)
    except BaseException as exc:  # noqa: BLE001 - report, don't dump, user errors
        return report_failure(exc)
    _print_nodes(result)
    _print_result(result, args.show_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
