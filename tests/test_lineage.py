"""Lineage on real Lance datasets: what a writer records with each commit
(config, flow run, node, input versions, seed) and ``--lineage PATH``."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import lance
import pyarrow as pa

from flows import lineage
from tests.conftest import ROOT
from tests.test_config_errors import run_cli

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def table(start: int, n: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()), "text": [f"row {i}" for i in range(start, start + n)]})


def show(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / "run.py"), "--lineage", str(path)],
        capture_output=True, text=True, timeout=120,
    )


def recorded(path, version: int) -> dict:
    return lineage.read(str(path), version=version)[2]


def test_cli_run_records_lineage_and_lineage_prints_it(tmp_path):
    src, out = tmp_path / "in.lance", tmp_path / "out.lance"
    lance.write_dataset(table(0, 50), str(src))
    lance.write_dataset(table(50, 10), str(src), mode="append")  # input at version 2
    proc = run_cli(tmp_path, f"""
        ray:
          seed: 7
        pipeline:
          type: LanceWriter
          output_path: {out}
          child_configs:
            - type: LanceReader
              input_path: {src}
        """)
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "bad.yaml"  # run_cli's config file
    digest = hashlib.sha256(config.read_bytes()).hexdigest()

    printed = show(out)
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    assert "version 1" in text
    assert str(config) in text and digest in text
    assert "pipeline > LanceWriter" in text
    assert UUID.search(text), text  # the flow run id
    assert str(src) in text and "lance version 2" in text
    assert "read by pipeline > child_configs[0] > LanceReader" in text
    assert "seed:       7" in text

    doc = recorded(out, 1)
    assert doc["config"] == {"path": str(config), "sha256": digest, "overrides": []}
    assert doc["node"] == "pipeline > LanceWriter" and doc["node_type"] == "LanceWriter"
    assert doc["seed"] == 7 and doc["mode"] == "overwrite" and doc["output"] == str(out)
    assert UUID.fullmatch(doc["flow_run"]["id"]) and doc["flow_run"]["url"]
    assert [(i["uri"], i["kind"], i["version"]) for i in doc["inputs"]] == [(str(src), "lance", 2)]
    assert doc["started"] and doc["committed"]
    # Recorded in the commit itself, with its message.
    props = lance.dataset(str(out)).read_transaction(1).transaction_properties
    assert "pipeline > LanceWriter" in props["__lance_commit_message"]


def test_append_records_each_versions_lineage(run_pipeline, tmp_path):
    """The input changes between two runs: each output version names the
    input version it was made from; --lineage prints the latest."""
    src, out = tmp_path / "in.lance", tmp_path / "out.lance"
    lance.write_dataset(table(0, 20), str(src))
    config = {
        "pipeline": {
            "type": "LanceWriter", "output_path": str(out), "mode": "append",
            "child_configs": [{"type": "LanceReader", "input_path": str(src)}],
        }
    }
    run_pipeline(config)
    lance.write_dataset(table(20, 5), str(src), mode="append")
    run_pipeline(config, overrides={"ray": {"app_name": "second"}})

    assert lance.dataset(str(out)).version == 2
    first, second = recorded(out, 1), recorded(out, 2)
    assert first["inputs"][0]["version"] == 1 and second["inputs"][0]["version"] == 2
    assert first["mode"] == "create" and second["mode"] == "append"  # the first append creates the dataset
    assert first["flow_run"]["id"] != second["flow_run"]["id"]
    assert first["config"]["overrides"] == [] and second["config"]["overrides"] == ["ray.app_name"]
    printed = show(out)
    assert printed.returncode == 0, printed.stderr
    assert "version 2" in printed.stdout and "lance version 2" in printed.stdout
    assert second["flow_run"]["id"] in printed.stdout


def test_splitter_and_zstd_writer_record_lineage(run_pipeline, tmp_path):
    src = tmp_path / "in.lance"
    lance.write_dataset(table(0, 40), str(src))
    train, val, out = tmp_path / "train.lance", tmp_path / "val.lance", tmp_path / "out.lance"
    run_pipeline({
        "pipeline": {
            "type": "LanceWriterZstd", "output_path": str(out),
            "child_configs": [{
                "type": "Splitter", "train_file": str(train), "val_file": str(val), "num_train": 30,
                "child_configs": [{"type": "LanceReader", "input_path": str(src)}],
            }],
        }
    })
    for path in (train, val):
        doc = recorded(path, lance.dataset(str(path)).version)
        assert doc["node"] == "pipeline > child_configs[0] > Splitter" and doc["output"] == str(path)
        assert [(i["uri"], i["version"]) for i in doc["inputs"]] == [(str(src), 1)]
    top = recorded(out, lance.dataset(str(out)).version)
    assert top["node"] == "pipeline > LanceWriterZstd" and top["node_type"] == "LanceWriterZstd"
    assert [i["reader"] for i in top["inputs"]] == ["pipeline > child_configs[0] > child_configs[0] > LanceReader"]
    assert top["flow_run"]["id"] == recorded(train, lance.dataset(str(train)).version)["flow_run"]["id"]


def test_no_lineage_is_a_one_line_error(tmp_path):
    plain = tmp_path / "plain.lance"
    lance.write_dataset(table(0, 3), str(plain))
    proc = show(plain)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {plain}: version 1 has no lineage (it was not committed by a Kaiyuan flow run)"

    for path in (tmp_path / "missing.lance", __file__):
        proc = show(path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == f"error: {path}: not a Lance dataset", proc.stderr


def test_lineage_holds_no_secrets(tmp_path):
    """Storage options never reach the lineage; credentials in a URI are masked."""
    from flows.config import parse_config
    from tasks.writers import mask_uri

    src = tmp_path / "in.lance"
    lance.write_dataset(table(0, 3), str(src))
    secret = "s3cr3t-value-never-recorded"
    raw = {
        "ray": {"storage_options": {"aws_secret_access_key": secret, "aws_access_key_id": "AKIA-ID"}},
        "pipeline": {
            "type": "LanceWriter", "output_path": str(tmp_path / "out.lance"),
            "storage_options": {"aws_secret_access_key": secret},
            "child_configs": [{"type": "LanceReader", "input_path": str(src), "storage_options": {"aws_secret_access_key": secret}}],
        },
    }
    cfg = parse_config(raw, str(tmp_path / "x.yaml"))
    docs = lineage.compute(cfg, 42, {"aws_secret_access_key": secret})
    text = json.dumps(docs)
    assert secret not in text and "AKIA-ID" not in text
    assert docs["pipeline > LanceWriter"]["inputs"][0]["version"] == 1
    assert mask_uri("https://user:pw@host/x.lance") == "https://***@host/x.lance"
    assert mask_uri("s3://bucket/x.lance") == "s3://bucket/x.lance"


def test_artifact_lines_name_the_dataset_version_and_command(tmp_path):
    from flows.config import parse_config
    from tasks.writers import commit_properties

    out = tmp_path / "out.lance"
    cfg = parse_config({"pipeline": {
        "type": "LanceWriter", "output_path": str(out),
        "child_configs": [{"type": "LanceReader", "input_path": str(tmp_path / "in.lance")}],
    }})
    spec = cfg.root
    doc = {"node": spec.path, "flow_run": {"id": "run-1"}, "config": {"sha256": "ab" * 32}, "inputs": []}
    lance.write_dataset(table(0, 3), str(out), transaction_properties=commit_properties(doc, str(out), "overwrite"))
    lines = "\n".join(lineage.artifact_lines(spec, "ran"))
    assert f"`{out}` version 1" in lines and "run-1" in lines
    assert f"python flows/run.py --lineage {out}" in lines
    assert lineage.artifact_lines(spec, "failed") == []
