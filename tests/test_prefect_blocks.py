"""Unit tests (no server) for blocks/, config overrides, checkpoint keys and redaction."""

from __future__ import annotations

import copy

import pytest
from pydantic import SecretStr

from blocks import LanceStorage, RayCluster, apply_ray_block
from flows.checkpoint import materialises, node_keys, node_parameters, redact
from flows.config import ConfigError, parse_config


def test_lance_storage_block_options_and_repr_hide_secrets():
    block = LanceStorage(endpoint="minio:9000", region="eu", access_key_id=SecretStr("AKIA-x"), secret_access_key=SecretStr("s3cr3t"))
    opts = block.storage_options()
    assert opts == {
        "aws_endpoint": "http://minio:9000",
        "aws_region": "eu",
        "aws_access_key_id": "AKIA-x",
        "aws_secret_access_key": "s3cr3t",
        "aws_allow_http": "true",
    }
    assert "s3cr3t" not in repr(block) and "s3cr3t" not in block.model_dump_json()
    assert LanceStorage(endpoint="s3.example.com", allow_http=False).storage_options()["aws_endpoint"] == "https://s3.example.com"


def test_ray_block_fills_only_what_the_yaml_leaves_unset(monkeypatch):
    cfg = parse_config({"ray": {"block": "prod", "namespace": "mine"}, "pipeline": {"type": "LanceReader", "input_path": "x"}})
    block = RayCluster(address="auto", namespace="theirs", init_kwargs={"num_cpus": 0}, runtime_env={"env_vars": {"A": "1"}})
    monkeypatch.setattr(RayCluster, "load", classmethod(lambda cls, name: block))
    apply_ray_block(cfg.ray)
    assert (cfg.ray.address, cfg.ray.namespace, cfg.ray.init_kwargs, cfg.ray.runtime_env) == (
        "auto", "mine", {"num_cpus": 0}, {"env_vars": {"A": "1"}}
    )


def test_overrides_nested_and_dotted():
    data = {"ray": {"app_name": "a"}, "pipeline": {"type": "LanceWriter", "output_path": "o", "child_configs": [{"type": "LanceReader", "input_path": "x"}]}}
    before = copy.deepcopy(data)
    cfg = parse_config(data, overrides={"ray.app_name": "b", "pipeline": {"child_configs.0.input_path": "y"}, "prefect": {"retries": 3}})
    assert cfg.ray.app_name == "b" and cfg.root.children[0].params.input_path == "y" and cfg.prefect.retries == 3
    assert data == before
    with pytest.raises(ConfigError, match="no list item"):
        parse_config(data, overrides={"pipeline.child_configs.5.input_path": "z"})


def _tree(threshold=0.3, checkpoint=True):
    return parse_config({
        "pipeline": {"type": "LanceWriter", "output_path": "/tmp/none.lance", "child_configs": [
            {"type": "ColumnAlias", "input_col": "text", "output_col": "doc", "child_configs": [
                {"type": "Filter", "column": "s", "threshold": threshold, "checkpoint": checkpoint, "child_configs": [
                    {"type": "LanceReader", "input_path": "/tmp/does-not-matter.parquet"}]}]}]}})


def test_checkpoint_keys_change_for_the_node_and_above_only(tmp_path):
    src = tmp_path / "in.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"s": [1.0]}), src)

    def keys(**kw):
        cfg = _tree(**kw)
        cfg.root.children[0].children[0].children[0].params = cfg.root.children[0].children[0].children[0].params.model_copy(update={"input_path": str(src)})
        return cfg, {spec.type_name: k for spec in cfg.nodes() for p, k in node_keys(cfg, 42, {}).items() if p == spec.path}

    cfg, a = keys()
    _, b = keys(threshold=0.5)
    assert a["LanceReader"] == b["LanceReader"]
    assert all(a[t] != b[t] for t in ("Filter", "ColumnAlias", "LanceWriter"))
    assert [s.type_name for s in cfg.nodes() if materialises(s)] == ["Filter", "LanceWriter"]
    _, c = keys(checkpoint=False)
    assert [s.type_name for s in _tree(checkpoint=False).nodes() if materialises(s)] == ["LanceWriter"]


def test_parameters_are_redacted():
    cfg = parse_config({"pipeline": {"type": "LanceReader", "input_path": "s3://b/x.lance",
                                     "storage_options": {"aws_secret_access_key": "zzz", "aws_region": "eu"}}})
    shown = node_parameters(cfg.root)
    assert shown["storage_options"] == {"aws_secret_access_key": "***", "aws_region": "***"}
    assert redact({"storage_options": {"block": "minio"}}) == {"storage_options": {"block": "minio"}}
    assert redact({"tokenizer_name_or_path": "t", "api_key": "k"}) == {"tokenizer_name_or_path": "t", "api_key": "***"}


def test_checkpoint_key_must_be_boolean():
    with pytest.raises(ConfigError, match="'checkpoint' must be true or false"):
        parse_config({"pipeline": {"type": "LanceReader", "input_path": "x", "checkpoint": "yes"}})
