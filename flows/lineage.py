"""Lineage of the datasets a run writes: which config, flow run and input
versions produced each committed Lance version.

The flow computes one plain dict per writer (``compute``) and hands it to the
nodes in ``RunContext.lineage``; the writer records it in the transaction
properties of the commit that publishes its data (tasks/writers.py), so a
version never exists without its lineage nor lineage without its version
(tasks/writers.commit_properties).
``show`` reads it back for ``python flows/run.py --lineage PATH``.

Nothing secret is recorded: storage options never, and credentials written
into a URI (``scheme://user:password@host``) are masked.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import sys
from typing import Any

from tasks.writers import LINEAGE_PROPERTY, mask_uri

log = logging.getLogger("kaiyuan.lineage")

# The transaction property that holds it, and the writer's half of the
# record (output, mode, commit time), are tasks/writers.py's.
PROPERTY = LINEAGE_PROPERTY
FORMAT = 1


# -- computing (in the flow) ----------------------------------------------


def compute(cfg, seed: int, storage_options: dict) -> dict[str, dict]:
    """Writer node path -> its lineage, for every writer in the tree. Never
    fails the run: what cannot be determined is recorded as unknown."""
    try:
        return _compute(cfg, seed, storage_options)
    except Exception as exc:  # the data matters more than its lineage
        log.warning("no lineage recorded for this run: %s", exc)
        return {}


def _compute(cfg, seed: int, storage_options: dict) -> dict[str, dict]:
    from flows.checkpoint import _input_versions

    writers = [spec for spec in cfg.nodes() if spec.cls.is_writer]
    if not writers:
        return {}
    common = {
        "format": FORMAT,
        "config": dict(_config(cfg.source), overrides=_override_keys()),
        "flow_run": _flow_run(),
        "seed": seed,
        "started": _now(),
    }
    leaves: dict[str, list[dict]] = {}  # each reader's inputs, looked up once

    def inputs_of(spec) -> list[dict]:
        out = []
        for node in spec.walk():
            if node.children or getattr(node.params, "input_path", None) is None:
                continue
            if node.path not in leaves:
                leaves[node.path] = _describe_inputs(
                    node.path, node.params.input_path, _input_versions(node, storage_options)
                )
            out.extend(leaves[node.path])
        return out

    result = {}
    for spec in writers:
        entry = dict(common, node=spec.path, node_type=spec.type_name)
        try:
            entry["inputs"] = inputs_of(spec)
        except Exception as exc:  # lineage must never fail the run
            log.warning("%s: input versions unknown for its lineage: %s", spec.path, exc)
            entry["inputs"] = None
        result[spec.path] = entry
    return result


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _config(source: str | None) -> dict:
    if not source:
        return {"path": None, "sha256": None}
    import os

    path = os.path.abspath(source)
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        digest = None
    return {"path": path, "sha256": digest}


def _override_keys() -> list[str]:
    """The config keys the flow run's ``overrides`` parameter set over the
    file (their values may be credentials: only the keys are recorded)."""
    try:
        from prefect.runtime import flow_run

        overrides = (flow_run.parameters or {}).get("overrides") or {}
    except Exception:
        return []

    def keys(value, prefix=""):
        if isinstance(value, dict) and value:
            return [k for name, v in value.items() for k in keys(v, f"{prefix}{name}.")]
        return [prefix.rstrip(".")]

    return sorted(keys(overrides)) if isinstance(overrides, dict) and overrides else []


def _flow_run() -> dict:
    """The Prefect flow run this is part of (all None outside one)."""
    out: dict[str, Any] = {"id": None, "name": None, "url": None}
    try:
        from prefect.runtime import flow_run

        out["id"] = flow_run.id
        if out["id"]:
            out["name"] = flow_run.name
            from prefect.utilities.urls import url_for

            # The run's page in the UI (PREFECT_UI_URL, else derived from the
            # API's address); the API's record of it where no UI is known.
            out["url"] = url_for("flow-run", obj_id=out["id"]) or flow_run.api_url
    except Exception as exc:
        log.debug("no flow run for the lineage: %s", exc)
    return out


def _describe_inputs(reader: str, raw_paths, versions: list | None) -> list[dict]:
    """flows.checkpoint's input versions as readable entries; a directory is
    summarised (file count, bytes, newest mtime) rather than listed, as the
    lineage travels to every Ray worker in the run context."""
    if versions is None:
        paths = raw_paths if isinstance(raw_paths, list) else [raw_paths]
        return [{"reader": reader, "uri": mask_uri(p), "kind": "unknown"} for p in paths]
    out = []
    for item in versions:
        entry: dict[str, Any] = {"reader": reader, "uri": mask_uri(item[0]), "kind": item[1]}
        if item[1] == "lance":
            entry.update(version=item[2], timestamp=item[3])
        elif item[1] == "file":
            entry.update(size=item[2], mtime=item[3])
        elif item[1] == "dir":
            files = [f for f in item[2] if f[1] is not None]
            entry.update(files=len(files), size=sum(f[1] for f in files), mtime=max((f[2] for f in files), default=None))
        out.append(entry)
    return out


# -- reading back (--lineage) ----------------------------------------------


class LineageError(Exception):
    """PATH is not a Lance dataset, or its version has no lineage."""


def read(uri: str, storage_options: dict | None = None, version: int | None = None) -> tuple[int, int, dict]:
    """(version read, latest version, lineage) of a dataset: the latest
    version's unless ``version`` is given."""
    import lance

    from tasks.storage import lance_exists, normalize_uri, resolve_storage_options

    uri = normalize_uri(uri)
    so = dict(resolve_storage_options(None, storage_options))
    try:
        if not lance_exists(uri, so):
            raise LineageError(f"{uri}: not a Lance dataset")
        ds = lance.dataset(uri, storage_options=so or None)
    except LineageError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LineageError(f"{uri}: not a readable Lance dataset ({reason[:200]})") from None
    latest = ds.version
    version = latest if version is None else version
    try:
        transaction = ds.read_transaction(version)
    except Exception:  # no transaction file (older writers): nothing recorded
        transaction = None
    raw = (getattr(transaction, "transaction_properties", None) or {}).get(PROPERTY)
    if not raw:
        raise LineageError(f"{uri}: version {version} has no lineage (it was not committed by a Kaiyuan flow run)")
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise LineageError(f"{uri}: version {version} has unreadable lineage")
    return version, latest, doc


def text(uri: str, version: int, latest: int, doc: dict) -> str:
    """The lineage as readable text."""
    run = doc.get("flow_run") or {}
    cfg = doc.get("config") or {}
    of = f"version {version}" + ("" if version == latest else f" (latest: {latest})")
    lines = [
        f"lineage of {doc.get('output') or uri}, {of}",
        f"  committed:  {doc.get('committed')} ({doc.get('mode')})",
        f"  node:       {doc.get('node')} ({doc.get('node_type')})",
        f"  config:     {cfg.get('path')}",
        f"  sha256:     {cfg.get('sha256')}",
        *([f"  overrides:  {', '.join(cfg['overrides'])} (set over the file)"] if cfg.get("overrides") else []),
        f"  flow run:   {run.get('name') or '-'} {run.get('id') or '(not in a flow run)'}",
    ]
    if run.get("url"):
        lines.append(f"  url:        {run['url']}")
    lines += [f"  seed:       {doc.get('seed')}", f"  run start:  {doc.get('started')}"]
    inputs = doc.get("inputs")
    if inputs is None:
        lines.append("  inputs:     unknown")
    else:
        lines.append(f"  inputs:     {len(inputs)}" + ("" if inputs else " (none read from storage)"))
    for item in inputs or []:
        lines.append(f"    - {item.get('uri', '?')}  [{_input_text(item)}]")
        lines.append(f"      read by {item.get('reader')}")
    return "\n".join(lines)


def _input_text(item: dict) -> str:
    kind = item.get("kind")
    if kind == "lance":
        return f"lance version {item.get('version')}, {item.get('timestamp')}"
    if kind == "file":
        return f"file, {item.get('size')} bytes, modified {item.get('mtime')}"
    if kind == "dir":
        return f"directory, {item.get('files')} files, {item.get('size')} bytes, newest {item.get('mtime')}"
    return "version unknown"


def artifact_lines(spec, status: str) -> list[str]:
    """Markdown lines for a writer's node artifact: each output's latest
    version and the lineage recorded with it, and the command that prints it
    in full. Never raises (the artifact matters more)."""
    if not spec.cls.is_writer or status in ("failed", "cancelled", "not run"):
        return []
    try:
        from tasks.storage import resolve_storage_options

        node = spec.build()
        so = dict(resolve_storage_options(getattr(spec.params, "storage_options", None), None))
        uris = node.output_uris()
    except Exception:
        return []
    lines = ["", "**Lineage** (recorded with the commit)", ""]
    for uri in uris:
        try:
            version, _, doc = read(uri, so)
            run = (doc.get("flow_run") or {}).get("id") or "-"
            inputs = ", ".join(
                f"{i.get('uri', '?')}" + (f"@v{i['version']}" if i.get("kind") == "lance" else "") for i in doc.get("inputs") or []
            )
            lines.append(
                f"- `{mask_uri(uri)}` version {version}: flow run `{run}`, config sha256 "
                f"`{((doc.get('config') or {}).get('sha256') or '-')[:12]}`, inputs: {inputs or 'none'}"
            )
        except Exception as exc:
            lines.append(f"- `{mask_uri(uri)}`: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
        lines.append(f"  - lineage: `python flows/run.py --lineage {mask_uri(uri)}`")
    return lines


def show(path: str, as_json: bool = False) -> int:
    """``--lineage PATH``: print the latest version's lineage; exit 0, or 2
    with a one-line error."""
    try:
        version, latest, doc = read(path)
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(dict(doc, version=version, latest_version=latest), indent=2, sort_keys=True))
    else:
        print(text(path, version, latest, doc))
    return 0
