"""MinHash at production parallelism and its signature checkpoint: shuffle
width sized by the data (num_parallel only bounds it), and checkpoints that
concurrent runs can share safely and that are verified before reuse."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from bench.minhash_corpus import make_corpus
from tasks import minhash
from tasks.base import NodeError, RunContext
from tasks.checkpoints import lance_problem
from tasks.minhash import SignatureCheckpoint, shuffle_parts
from tests.conftest import read_lance
from tests.test_minhash import collect, node, stream_of


def survivors(res) -> list[tuple[int, float]]:
    out = collect(res.output)
    return sorted(zip(out.column("id").to_pylist(), out.column("duplicate_count").to_pylist()))


def published(work_dir) -> list:
    return sorted(work_dir.glob("minhash/*/signatures-*.lance"))


def test_shuffle_width_follows_the_data():
    assert shuffle_parts(0, 960) == 1
    assert shuffle_parts(1000, 960) == 1  # a thousand rows: one partition, not 960
    assert shuffle_parts(10_000, 4) == 4  # num_parallel bounds it
    assert shuffle_parts(10_000_000, 960) == 790  # p^2 blocks stay >= 16 rows each
    assert shuffle_parts(10**9, 960) == 960
    assert shuffle_parts(6, 960, nbytes=10 << 30) == 6  # big documents: spread, but never above the rows


def test_num_parallel_960_on_a_thousand_rows_matches_4(run_pipeline, tmp_path):
    """The production setting (num_parallel 960 on the reader and on MinHash)
    through the flow on ~1,000 rows: the survivors of num_parallel 4."""
    corpus = make_corpus(1000, seed=4)
    lance.write_dataset(corpus, str(tmp_path / "in.lance"), max_rows_per_file=125)
    expected = survivors(node(num_parallel=4).run(stream_of(corpus, 4), RunContext(work_dir=str(tmp_path / "w4"))))
    out = tmp_path / "out.lance"
    result = run_pipeline({
        "pipeline": {
            "type": "LanceWriter",
            "output_path": str(out),
            "child_configs": [{
                "type": "MinHash", "num_permutations": 128, "threshold": 0.7, "num_parallel": 960,
                "child_configs": [{"type": "LanceReader", "input_path": str(tmp_path / "in.lance"), "num_parallel": 960}],
            }],
        }
    })
    got = read_lance(out)
    assert sorted(zip(got.column("id").to_pylist(), got.column("duplicate_count").to_pylist())) == expected
    assert result["num_rows"] == len(expected) < corpus.num_rows


def test_more_partitions_than_rows_are_clamped(ray_session, tmp_path, monkeypatch):
    """Data that asks for more partitions than it has rows (here: a byte
    budget of one byte per partition) gets one partition per row, empty
    shuffle partitions included, and the same survivors."""
    corpus = make_corpus(16, seed=6, cluster_fraction=0.5)
    expected = survivors(node(num_parallel=960).run(stream_of(corpus, 2), RunContext(work_dir=str(tmp_path / "a"))))
    monkeypatch.setattr(minhash, "MAX_PART_BYTES", 1)
    res = node(num_parallel=960).run(stream_of(corpus, 2), RunContext(work_dir=str(tmp_path / "b")))
    assert res.stats["partitions"] == corpus.num_rows
    assert survivors(res) == expected
    assert len(expected) < corpus.num_rows


def test_two_runs_at_once_in_one_work_dir(ray_session, tmp_path):
    corpus = make_corpus(800, seed=8)
    ctx = RunContext(work_dir=str(tmp_path))
    results: dict = {}

    def run(name: str, width: int) -> None:
        try:
            results[name] = node(num_parallel=width).run(stream_of(corpus, 3), ctx)
        except BaseException as exc:  # reported below
            results[name] = exc

    threads = [threading.Thread(target=run, args=(f"run{i}", w)) for i, w in enumerate((4, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results["run0"], results["run1"]
    assert not isinstance(a, BaseException), a
    assert not isinstance(b, BaseException), b
    assert survivors(a) == survivors(b)
    # what is published is complete; a third run reuses it
    again = node().run(stream_of(corpus, 2), ctx)
    assert again.resumed and again.checkpoint in (a.checkpoint, b.checkpoint)
    assert survivors(again) == survivors(a)
    assert not list(tmp_path.glob("minhash/*/*.tmp"))


def test_checkpoint_with_a_lost_data_file_is_recomputed(ray_session, tmp_path, caplog):
    corpus = make_corpus(600, seed=9)
    ctx = RunContext(work_dir=str(tmp_path))
    first = node().run(stream_of(corpus, 3), ctx)
    expected = survivors(first)
    data_files = sorted((Path(first.checkpoint) / "data").iterdir())
    data_files[0].unlink()
    with caplog.at_level(logging.WARNING, logger="kaiyuan.minhash"):
        again = node().run(stream_of(corpus, 3), ctx)
    assert "signature checkpoint" in caplog.text and "discarded" in caplog.text and data_files[0].name in caplog.text
    assert not again.resumed and again.checkpoint != first.checkpoint
    assert survivors(again) == expected
    assert published(tmp_path) == [Path(again.checkpoint)]  # the broken one is gone
    assert node().run(stream_of(corpus, 3), ctx).resumed


def _signatures(uri: str, rows: int) -> str:
    lance.write_dataset(pa.table({"x": np.arange(rows)}), uri, max_rows_per_file=max(1, rows // 3))
    return uri


def test_publish_names_only_verified_datasets(tmp_path):
    """Without Ray: the marker is written only for a complete dataset; a run
    that finishes after another published uses theirs and drops its own."""
    ckpt = SignatureCheckpoint(str(tmp_path), None)
    assert ckpt.load(9) is None
    broken = _signatures(ckpt.private_uri(), 9)
    next((tmp_path / broken.rsplit("/", 1)[1] / "data").iterdir()).unlink()
    assert "missing" in lance_problem(broken, 1, 9, None)
    with pytest.raises(NodeError, match="incomplete"):
        ckpt.publish(broken, 9, {})
    assert not (tmp_path / "committed.json").exists()
    mine = _signatures(ckpt.private_uri(), 9)
    assert ckpt.publish(mine, 9, {}) == (mine, 1)
    late = _signatures(ckpt.private_uri(), 9)
    assert ckpt.publish(late, 9, {}) == (mine, 1)  # theirs is kept, the late copy removed
    assert not (tmp_path / late.rsplit("/", 1)[1]).exists()
    assert ckpt.load(9) == (mine, 1)
    assert ckpt.load(10) is None  # wrong row count: not reused
