import json

from envs.datasets import ReplayBuffer
from rtdp.cli import main


def test_collect_writes_a_dataset_with_provenance(tmp_path, capsys):
    out = tmp_path / "pm.zarr"
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "4", "--seed", "5", "--out", str(out),
                 "--no-progress", "--report", str(tmp_path / "c.json")]) == 0
    buf = ReplayBuffer.load(out)
    assert buf.n_episodes == 4 and buf.keys == ["action", "state"]
    assert buf.attrs["task"] == "point_mass/reach" and buf.attrs["seeds"] == [5, 6, 7, 8]
    assert buf.attrs["expert_success_rate"] == 1.0
    assert json.loads((tmp_path / "c.json").read_text())["episodes"] == 4
    assert "point_mass/reach: 4 expert episodes" in capsys.readouterr().out


def test_collect_unknown_task_lists_known_tasks(tmp_path, capsys):
    assert main(["collect", "--task", "metaworld/fly-v3", "--out", str(tmp_path / "x.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'metaworld/fly-v3'" in err and "metaworld/drawer-open-v3" in err
