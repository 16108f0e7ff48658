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


def test_collect_never_overwrites_what_it_did_not_make(tmp_path, capsys):
    notes = tmp_path / "run"
    notes.mkdir()
    (notes / "notes.txt").write_text("a week of results")
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "2", "--out", str(notes),
                 "--no-progress"]) == 2
    assert "already exists; nothing was written" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]
    assert (notes / "notes.txt").read_text() == "a week of results"
    out = tmp_path / "pm.zarr"
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "3", "--out", str(out), "--no-progress"]) == 0
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "2", "--out", str(out), "--no-progress"]) == 2
    assert ReplayBuffer.load(out).n_episodes == 3
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "2", "--out", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert ReplayBuffer.load(out).n_episodes == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pm.zarr", "run"]  # no temporary sibling left


def test_a_flipped_byte_in_a_dataset_chunk_is_an_error_not_wrong_values(tmp_path):
    import pytest

    from envs.datasets.replay_buffer import DatasetError

    out = tmp_path / "pm.zarr"
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "2", "--out", str(out), "--no-progress"]) == 0
    chunk = next(p for p in (out / "data" / "state").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 40):
        data[i] ^= 0x5A
    chunk.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="data/state cannot be read"):
        ReplayBuffer.load(out)


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_collect_append_adds_new_episodes_and_refuses_another_layout(tmp_path, capsys):
    out = tmp_path / "pm.zarr"
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "3", "--out", str(out), "--no-progress"]) == 0
    first = ReplayBuffer.load(out)
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "2", "--out", str(out), "--append",
                 "--no-progress"]) == 0
    assert "2 expert episodes added, 5 in all" in capsys.readouterr().out
    buf = ReplayBuffer.load(out)
    assert buf.n_episodes == 5 and buf.attrs["episodes"] == 5
    assert buf.attrs["seeds"] == [0, 1, 2, 3, 4]  # the appended run starts after the stored seeds
    for i in range(3):  # the stored episodes are untouched, in order
        for k in buf.keys:
            assert (buf.episode(i)[k] == first.episode(i)[k]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pm.zarr"]

    before = _tree_bytes(out)
    for extra, why in ((["--seed", "1"], "already holds the episodes of seeds [1, 2]"),
                       (["--task", "point_mass/obstacle"], "holds task 'point_mass/reach'"),
                       (["--overwrite"], "pass one")):
        assert main(["collect", "--task", "point_mass/reach", "--episodes", "2", "--out", str(out), "--append",
                     "--no-progress", *extra]) == 2, extra
        assert why in capsys.readouterr().err
        assert _tree_bytes(out) == before
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "1", "--out", str(tmp_path / "none.zarr"),
                 "--append", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
