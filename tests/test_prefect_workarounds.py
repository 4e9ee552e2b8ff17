"""Every Prefect/prefect-ray workaround has a switch, and the flow gives the
same result with all of them off (flows/prefect_workarounds.py)."""

import pytest

from tests.conftest import read_lance
from tests.test_config_errors import run_cli

pytestmark = pytest.mark.xdist_group("ray")


def test_switches(monkeypatch):
    from flows import prefect_workarounds as w

    monkeypatch.delenv("KAIYUAN_WORKAROUNDS_OFF", raising=False)
    assert all(w.enabled(name) for name in w.WORKAROUNDS)
    monkeypatch.setenv("KAIYUAN_WORKAROUNDS_OFF", "shared_remote_function, loopback_client")
    assert not w.enabled("shared_remote_function") and not w.enabled("loopback_client")
    assert w.enabled("settings_as_object")
    monkeypatch.setenv("KAIYUAN_WORKAROUNDS_OFF", "all")
    assert not any(w.enabled(name) for name in w.WORKAROUNDS)
    assert w.flow_result_storage() is None
    with pytest.raises(KeyError):
        w.enabled("no_such_workaround")
    # Each says why in one line.
    assert all(reason and "\n" not in reason for reason in w.WORKAROUNDS.values())


def test_same_result_with_every_workaround_off(run_pipeline, sample_dir, tmp_path):
    """The CLI with KAIYUAN_WORKAROUNDS_OFF=all (Prefect's own API server and
    client settings, prefect-ray's own submit path) writes what a run with
    them on writes."""
    import textwrap

    def recipe(out):
        return {"ray": {"seed": 7}, "pipeline": {
            "type": "LanceWriter", "output_path": str(out), "mode": "overwrite",
            "child_configs": [{"type": "Shuffler", "child_configs": [{
                "type": "Filter", "column": "fasttext_score", "comparison": "larger", "threshold": 0.3,
                "child_configs": [{"type": "LanceReader", "input_path": str(sample_dir / "scored_input.lance")}]}]}]}}

    on = run_pipeline(recipe(tmp_path / "on.lance"))
    import yaml

    off_dir = tmp_path / "off"
    off_dir.mkdir()
    text = textwrap.dedent(yaml.safe_dump(recipe(off_dir / "off.lance")))
    proc = run_cli(off_dir, text, "--show-rows", "0", "--verbose",
                   env={"PREFECT_HOME": str(off_dir / "prefect-home"), "KAIYUAN_WORKAROUNDS_OFF": "all"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Stopping temporary server" in proc.stderr  # Prefect's own embedded server ran
    a, b = read_lance(tmp_path / "on.lance"), read_lance(off_dir / "off.lance")
    assert on["num_rows"] == a.num_rows == b.num_rows > 0
    assert a.equals(b)
