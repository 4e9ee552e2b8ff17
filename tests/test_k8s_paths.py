"""SPEC §2: the k8s-mode rewrite of local data paths to s3://BUCKET/..."""

from __future__ import annotations

import pytest

from flows.config import parse_config
from flows.k8s_paths import DEFAULT_BUCKET, data_bucket, rewrite_config, rewrite_path


@pytest.mark.parametrize(
    "env,bucket",
    [
        ({}, DEFAULT_BUCKET),
        ({"MINIO_BUCKET": "minio-b"}, "minio-b"),
        ({"K8S_DATA_BUCKET": "k8s-b", "MINIO_BUCKET": "minio-b"}, "k8s-b"),
        ({"K8S_DATA_BUCKET": "", "MINIO_BUCKET": "minio-b"}, "minio-b"),
    ],
)
def test_bucket_precedence(env, bucket):
    assert data_bucket(env) == bucket


@pytest.mark.parametrize(
    "path,expected",
    [
        ("data/sample/pcmind_kaiyuan_2b_sample.lance", "s3://b/sample/pcmind_kaiyuan_2b_sample.lance"),
        ("data/output/read_write.lance", "s3://b/output/read_write.lance"),
        ("data/models/fasttext.bin", "s3://b/models/fasttext.bin"),
        ("./data/sample/x/part-*.parquet", "s3://b/sample/x/part-*.parquet"),
        ("lance.`data/sample/x.lance`", "s3://b/sample/x.lance"),
        ("lance.data/output/y.lance", "s3://b/output/y.lance"),
        ("data/models", "s3://b/models"),
        # Left alone: URIs, absolute paths, other folders, look-alikes.
        ("s3a://other/sample/x.lance", "s3a://other/sample/x.lance"),
        ("s3://other/data/sample/x.lance", "s3://other/data/sample/x.lance"),
        ("/abs/data/sample/x.lance", "/abs/data/sample/x.lance"),
        ("data/bench/x.lance", "data/bench/x.lance"),
        ("data/samples/x.lance", "data/samples/x.lance"),
        ("mydata/sample/x.lance", "mydata/sample/x.lance"),
    ],
)
def test_rewrite_path(path, expected):
    assert rewrite_path(path, "b", "s3") == expected


def test_rewrite_config_every_node_and_list_paths():
    cfg = parse_config(
        {
            "pipeline": {
                "type": "LanceWriter",
                "output_path": "data/output/u.lance",
                "storage_options": {"aws_endpoint": "data/sample/not-a-path"},
                "child_configs": [
                    {
                        "type": "UnionByName",
                        "allow_missing_columns": True,
                        "child_configs": [
                            {"type": "LanceReader", "input_path": ["data/sample/a.lance", "s3://keep/b.lance"]},
                            {"type": "LanceReader", "input_path": "data/sample/c.lance", "select_cols": ["text"]},
                        ],
                    }
                ],
            }
        }
    )
    rewrite_config(cfg, {"MINIO_BUCKET": "kb"})
    by_type = {}
    for spec in cfg.nodes():
        by_type.setdefault(spec.type_name, []).append(spec.params)
    assert by_type["LanceWriter"][0].output_path == "s3://kb/output/u.lance"
    # storage_options are never rewritten, other parameters untouched.
    assert by_type["LanceWriter"][0].storage_options == {"aws_endpoint": "data/sample/not-a-path"}
    readers = by_type["LanceReader"]
    assert readers[0].input_path == ["s3://kb/sample/a.lance", "s3://keep/b.lance"]
    assert readers[1].input_path == "s3://kb/sample/c.lance" and readers[1].select_cols == ["text"]


def test_example_read_write_in_k8s_mode():
    from pathlib import Path

    from flows.config import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = rewrite_config(load_config(root / "examples" / "read_write.yaml"), {})
    paths = sorted(str(getattr(s.params, n)) for s in cfg.nodes() for n in ("input_path", "output_path") if hasattr(s.params, n))
    assert paths == ["s3://kaiyuan-ray/output/read_write.lance", "s3://kaiyuan-ray/sample/pcmind_kaiyuan_2b_sample.lance"]


def test_flow_applies_rewrite_only_in_k8s_mode(tmp_path, monkeypatch):
    """The flow's config (flows.plan.prepare_config) has its data paths
    rewritten in k8s mode; local mode keeps local paths."""
    import yaml

    from flows.plan import prepare_config

    monkeypatch.setenv("K8S_DATA_BUCKET", "demo")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {"type": "LanceWriter", "output_path": "data/output/o.lance",
                                                 "child_configs": [{"type": "LanceReader", "input_path": "data/sample/x.lance"}]}}))
    k8s = prepare_config(str(path), None, "k8s")
    assert [spec.params.model_dump().get("input_path", spec.params.model_dump().get("output_path")) for spec in k8s.nodes()] == [
        "s3://demo/sample/x.lance", "s3://demo/output/o.lance"]
    local = prepare_config(str(path), None, "local")
    assert local.root.params.output_path == "data/output/o.lance"


def _recipe(tmp_path, prefect: dict | None = None) -> str:
    import yaml

    path = tmp_path / "r.yaml"
    recipe = {"pipeline": {"type": "LanceWriter", "output_path": "data/output/o.lance",
                           "child_configs": [{"type": "LanceReader", "input_path": "data/sample/x.lance"}]}}
    if prefect:
        recipe["prefect"] = prefect
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    "mode,yaml_prefect,flag,work_dir,checkpoint_dir",
    [
        # Local: against the process's directory; the flag beats the YAML.
        ("local", None, None, "{cwd}/.kaiyuan", None),
        ("local", {"work_dir": "w", "checkpoint_dir": "c"}, None, "{cwd}/w", "{cwd}/c"),
        ("local", {"work_dir": "w"}, "s3://b/runs", "s3://b/runs", None),
        # k8s: pods share only the object store, so relative paths go to the bucket.
        ("k8s", None, None, "s3://demo/_kaiyuan", None),
        ("k8s", {"work_dir": ".kaiyuan", "checkpoint_dir": "./ckpt/a"}, None, "s3://demo/.kaiyuan", "s3://demo/ckpt/a"),
        ("k8s", {"work_dir": "w"}, "scratch", "s3://demo/scratch", None),
        ("k8s", {"work_dir": "gs://other/w", "checkpoint_dir": "/mnt/shared/ckpt"}, None, "gs://other/w", "/mnt/shared/ckpt"),
    ],
)
def test_where_a_run_keeps_its_state(tmp_path, monkeypatch, mode, yaml_prefect, flag, work_dir, checkpoint_dir):
    import os

    from flows.plan import prepare_config, run_context

    monkeypatch.setenv("K8S_DATA_BUCKET", "demo")
    monkeypatch.chdir(tmp_path)
    cfg = prepare_config(_recipe(tmp_path, yaml_prefect), None, mode, flag)
    cwd = os.getcwd()
    assert cfg.prefect.work_dir == work_dir.format(cwd=cwd)
    assert cfg.prefect.checkpoint_dir == (checkpoint_dir.format(cwd=cwd) if checkpoint_dir else None)
    assert run_context(cfg, None, None, None).work_dir == cfg.prefect.work_dir


def test_k8s_state_outside_the_bucket_is_a_config_error(tmp_path, monkeypatch):
    from flows.errors import ConfigError
    from flows.plan import prepare_config

    monkeypatch.setenv("K8S_DATA_BUCKET", "demo")
    with pytest.raises(ConfigError, match=r"prefect.checkpoint_dir: '../up' leaves the data bucket s3://demo"):
        prepare_config(_recipe(tmp_path, {"checkpoint_dir": "../up"}), None, "k8s")


def test_upload_refuses_paths_outside_the_data_folders(tmp_path, monkeypatch):
    from deployments.upload import upload

    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="not under data/sample"):
        upload(["elsewhere"], environ={})


def test_show_command(capsys, monkeypatch):
    from deployments.upload import main

    monkeypatch.setenv("K8S_DATA_BUCKET", "demo")
    assert main(["--show", "data/sample/x.lance"]) == 0
    assert capsys.readouterr().out.strip() == "data/sample/x.lance -> s3://demo/sample/x.lance"


class _RefusingStore:
    """A filesystem whose PUTs fail when the object is closed (what a full
    SeaweedFS does: the multipart upload is refused at completion), or that
    silently drops the bytes (``truncate``)."""

    def __init__(self, root, truncate: bool = False):
        import pyarrow.fs as pafs

        self.local, self.root, self.truncate = pafs.LocalFileSystem(), str(root), truncate

    def open_output_stream(self, path):
        import io

        store = self

        class Stream(io.BytesIO):
            def close(self):
                if not self.closed and not store.truncate:
                    raise OSError("AWS Error INTERNAL_FAILURE during UploadPart operation")
                with open(f"{store.root}/{path.replace('/', '_')}", "wb"):
                    pass
                super().close()

        return Stream()

    def get_file_info(self, paths):
        return [self.local.get_file_info(f"{self.root}/{p.replace('/', '_')}") for p in paths]


def test_copy_tree_copies_and_checks_sizes(tmp_path):
    import pyarrow.fs as pafs

    from deployments.upload import copy_tree

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.bin").write_bytes(b"x" * 100_000)
    (src / "b.txt").write_text("hello")
    (tmp_path / "dest").mkdir()
    assert copy_tree(str(src), pafs.LocalFileSystem(), str(tmp_path / "dest" / "copy")) == 2
    assert (tmp_path / "dest" / "copy" / "sub" / "a.bin").read_bytes() == b"x" * 100_000
    assert (tmp_path / "dest" / "copy" / "b.txt").read_text() == "hello"


@pytest.mark.parametrize("truncate", [False, True], ids=["refused-put", "short-object"])
def test_copy_tree_fails_loudly_when_the_store_loses_objects(tmp_path, truncate):
    # pyarrow.fs.copy_files logged such failures and returned normally.
    from deployments.upload import UploadError, copy_tree

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "store").mkdir()
    with pytest.raises(UploadError, match="INTERNAL_FAILURE" if not truncate else "wrong size"):
        copy_tree(str(src), _RefusingStore(tmp_path / "store", truncate), "bucket/sample")
