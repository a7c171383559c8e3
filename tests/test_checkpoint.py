"""Checkpoint I/O: layout, weights_only loading of numpy/RNG state, crash safety, pruning, resolving."""
import json
import random

import numpy as np
import pytest
import torch

from fm9g.training import checkpoint as ck


def _save(run, step, **kw):
    return ck.save_checkpoint(
        run, step, model_state={"w": torch.full((2, 2), float(step))}, optimizer_state={"state": {}, "param_groups": []},
        loader_state={"used": np.array([True, False, True]), "pos": np.int64(step)},
        trainer_state={"step": step, "tokens": 10 * step, "task_tokens": {"a": step}, "rng": ck.get_rng_state()},
        model_config={"dim_model": 8}, train_config={"lr": 1e-4}, **kw,
    )


def test_layout_and_round_trip(tmp_path):
    run = tmp_path / "run"
    path = _save(run, 5)
    assert path == run / "5"
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert names == {"fm9g_live_checkpoint-5.pt", "fm9g_live_checkpoint-5.rank-0.opt", "fm9g_live_checkpoint-5.log_ckpt",
                     "trainer_state.pt", "dataset_ckpt/loader_state.pt", "config.json", "train_config.json"}
    assert json.loads((path / "fm9g_live_checkpoint-5.log_ckpt").read_text()) == {
        "iteration": 5, "global_token_pass": 50, "global_total_task_token": {"a": 5}}
    # every .pt loads with weights_only=True; the model file is a flat state dict in original names
    for f in path.rglob("*.p*"):
        torch.load(f, weights_only=True)
    assert torch.equal(torch.load(path / "fm9g_live_checkpoint-5.pt", weights_only=True)["w"], torch.full((2, 2), 5.0))
    loaded = ck.load_checkpoint(path)
    assert loaded.step == 5 and loaded.model_config == {"dim_model": 8}
    assert loaded.loader_state["used"].dtype == np.bool_ and loaded.loader_state["used"].tolist() == [True, False, True]
    assert loaded.loader_state["pos"] == 5


def test_rng_state_round_trip():
    state = ck.get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    saved = ck.from_safe(ck.to_safe(state))
    ck.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_safe_objects_cover_numpy_dtypes():
    obj = {"a": np.arange(6, dtype=np.uint32).reshape(2, 3), "b": [np.float32(1.5), (np.zeros(0), "x")]}
    back = ck.from_safe(ck.to_safe(obj))
    assert back["a"].dtype == np.uint32 and back["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["b"][0] == 1.5 and back["b"][1][0].shape == (0,) and back["b"][1][1] == "x"


@pytest.mark.parametrize("fail_at", range(7))
def test_crash_at_any_file_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    run = tmp_path / "run"
    _save(run, 2)
    calls = {"n": 0}
    real = ck._write_file

    def flaky(path, write, binary=True):
        if calls["n"] == fail_at:
            calls["n"] += 1
            # leave a half-written file behind, as a crash would
            path.write_bytes(b"partial")
            raise OSError(f"injected fault writing {path.name}")
        calls["n"] += 1
        return real(path, write, binary)

    monkeypatch.setattr(ck, "_write_file", flaky)
    with pytest.raises(OSError, match="injected fault"):
        _save(run, 4)
    monkeypatch.setattr(ck, "_write_file", real)
    assert [s for s, _ in ck.list_checkpoints(run)] == [2]
    assert ck.resolve_checkpoint(run, "latest") == run / "2"
    with pytest.raises(ck.CheckpointError, match="available steps: \\[2\\]"):
        ck.resolve_checkpoint(run, 4)
    assert torch.equal(ck.load_checkpoint(run / "2").model_state["w"], torch.full((2, 2), 2.0))
    # a later save still works and cleans the leftovers
    _save(run, 4)
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4]
    assert not list(run.glob(".tmp-*"))


def test_a_killed_process_leaves_only_an_ignored_tmp_folder(tmp_path):
    run = tmp_path / "run"
    _save(run, 1)
    (run / ".tmp-3-999").mkdir()
    (run / ".tmp-3-999" / "fm9g_live_checkpoint-3.pt").write_bytes(b"x")
    (run / "7").mkdir()  # a numeric folder without the files (e.g. copied by hand, half-way)
    assert [s for s, _ in ck.list_checkpoints(run)] == [1]
    assert ck.resolve_checkpoint(run, "latest") == run / "1"


def test_keep_last_and_resave(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 3, 4):
        _save(run, s, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(run)] == [3, 4]
    _save(run, 4, keep_last=2)  # the same step again replaces it
    assert [s for s, _ in ck.list_checkpoints(run)] == [3, 4]


def test_resolve_by_path_and_errors(tmp_path):
    run = tmp_path / "run"
    _save(run, 3)
    assert ck.resolve_checkpoint(None, str(run / "3")) == run / "3"
    assert ck.resolve_checkpoint(None, str(run / "3" / "fm9g_live_checkpoint-3.pt")) == run / "3"
    assert ck.resolve_checkpoint(run, "3") == run / "3"
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path / "empty", "latest")
    with pytest.raises(ck.CheckpointError, match="not a step number"):
        ck.resolve_checkpoint(run, str(tmp_path / "nothing"))


def _strip_lineage(folder):
    """Make a checkpoint look like one written before lineage records (or by the original stack)."""
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    state.pop("lineage", None)
    torch.save(state, folder / "trainer_state.pt")


def _steps(run):
    return [s for s, _ in ck.list_checkpoints(run)]


def test_a_rollback_moves_the_abandoned_branch_aside_and_latest_follows_the_new_one(tmp_path):
    run = tmp_path / "run"
    _save(run, 2)
    _save(run, 4)
    old_four = ck.read_lineage(run / "4")
    branch = ck.read_lineage(run / "2").chain          # resume from 2 ...
    _save(run, 3, history=branch, keep_last=1, protect=[run / "2"])    # ... and save 3
    assert _steps(run) == [2, 3]                       # the written one and the resumed-from one stay
    assert ck.resolve_checkpoint(run, "latest") == run / "3"
    aside = list((run / "abandoned").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["4"] and ck.read_lineage(aside[0]) == old_four
    # the branch reaches step 4 again: a new folder 4 of this lineage, the old 4 is still aside
    _save(run, 4, history=ck.read_lineage(run / "3").chain, keep_last=2)
    assert _steps(run) == [3, 4] and ck.read_lineage(run / "4").ancestors[-1][1] == 3
    assert ck.resolve_checkpoint(run, "latest") == run / "4" and len(list((run / "abandoned").iterdir())) == 1


def test_latest_is_the_checkpoint_written_last_not_the_highest_step(tmp_path):
    run = tmp_path / "run"
    _save(run, 2)
    _save(run, 4)
    # a second run folder's checkpoint copied in by hand is a branch of its own; latest is still 4
    (run / "4").rename(tmp_path / "four")
    _save(run, 3, history=ck.read_lineage(run / "2").chain)
    (tmp_path / "four").rename(run / "4")              # put back by hand: written before 3
    assert ck.read_lineage(run / "3").serial > ck.read_lineage(run / "4").serial
    assert ck.resolve_checkpoint(run, "latest") == run / "3"


def test_checkpoints_without_lineage_count_as_one_lineage(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 4):
        _save(run, s)
        _strip_lineage(run / str(s))
    assert ck.read_lineage(run / "4") == ck.Lineage(id="legacy-4", step=4, ancestors=(("legacy-1", 1), ("legacy-2", 2)))
    assert ck.resolve_checkpoint(run, "latest") == run / "4"
    _save(run, 3, history=ck.read_lineage(run / "2").chain, keep_last=2)
    assert _steps(run) == [2, 3] and [p.name[:2] for p in (run / "abandoned").iterdir()] == ["4-"]
    assert ck.load_checkpoint(run / "2").step == 2     # an old checkpoint still loads


def test_all_finite_sees_inf_and_nan_but_not_large_finite_values():
    big = torch.full((4, 4), 3e38)
    assert ck.all_finite([big, torch.zeros(3, dtype=torch.bfloat16), torch.arange(3)])
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(5)
        t[3] = bad
        assert not ck.all_finite([torch.ones(2), t])


class _Pickled:
    """An arbitrary Python object inside a checkpoint (weights_only loading refuses it)."""


def test_a_refused_pickle_in_pretrained_model_names_the_file(tmp_path):
    """A .pt holding Python objects (not only tensors) is refused without running it, naming the file."""
    from fm9g.training.builders import pretrained_state
    from fm9g.training.config import TrainConfig

    bad = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "extra": _Pickled()}, bad)
    with pytest.raises(ck.CheckpointError, match=r"pytorch_model\.bin") as err:
        pretrained_state(TrainConfig(model="tiny", pretrained_model=str(bad)))
    assert "_Pickled" in str(err.value)


def test_a_full_disk_during_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from fm9g._io import DiskFullError

    run = tmp_path / "run"
    state = {"w": torch.ones(3)}
    ck.save_checkpoint(run, 1, model_state=state, trainer_state={"step": 1})
    real_save = torch.save

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-file
        if isinstance(obj, dict) and "w" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"fm9g_live_checkpoint-2\.pt") as err:
        ck.save_checkpoint(run, 2, model_state=state, trainer_state={"step": 2})
    assert "disk" in str(err.value).lower()
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in ck.list_checkpoints(run)] == [1]
    assert torch.equal(ck.load_checkpoint(run / "1").model_state["w"], state["w"])
