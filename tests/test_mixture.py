"""MixtureLoader: token shares, shards, end of data, exact resume, bad input (real SmolLM2 tokenizer)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fm9g._io import ConfigError
from fm9g.data import mixture as mixture_module
from fm9g.data.indexed import build_index
from fm9g.data.mixture import (
    DatasetEntry,
    MixtureConfigError,
    MixtureLoader,
    MixtureStateError,
    load_dataset_config,
)
from fm9g.data.tokenize import SampleTokenizer
from fm9g.data.tokenizers import VocabTxtTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(smollm2_tokenizer_dir) -> Path:
    """SmolLM2's tokenizer directory (conftest), for subprocesses and tokenizer-by-path."""
    return smollm2_tokenizer_dir


WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which this be or has had "
    "not first new one their its also after two who but river city music people school world water light"
).split()


def _text(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def _write_index(root: Path, name: str, n: int, lo: int, hi: int, *, prompt: bool, seed: int) -> Path:
    r = random.Random(seed)
    src = root / f"{name}.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"input": _text(r, 6) if prompt else "", "output": f"{name} {i} " + _text(r, r.randint(lo, hi))}
            f.write(json.dumps(rec) + "\n")
    build_index(src, root / name, language="en", num_workers=1)
    return root / name


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Index dirs with very different sample lengths (about 15, 110 and 450 tokens; `long` is longer
    than max_length=256 half of the time, so it is cut into windows)."""
    root = tmp_path_factory.mktemp("mix")
    _write_index(root, "short", 1500, 4, 20, prompt=True, seed=1)
    _write_index(root, "mid", 400, 70, 130, prompt=True, seed=2)
    _write_index(root, "long", 150, 200, 700, prompt=False, seed=3)
    _write_index(root, "tiny", 9, 3, 8, prompt=True, seed=4)
    _write_index(root, "small", 40, 5, 20, prompt=True, seed=5)
    _write_index(root, "few", 60, 5, 20, prompt=True, seed=6)
    (root / "tf").mkdir()
    (root / "tf" / "upper.py").write_text(
        "def transform(data, num_sample, r):\n    return {'input': data['input'], 'output': data['output'].upper()}\n"
    )
    return root


def _cfg(root: Path, spec: list[tuple[str, float, bool]], **extra: Any) -> list[dict[str, Any]]:
    return [
        {"dataset_name": n, "task_name": n, "path": str(root / n), "abs_weight": w, "allow_repeat": rep, **extra}
        for n, w, rep in spec
    ]


MIX = [("short", 0.5, True), ("mid", 0.3, True), ("long", 0.2, True)]
# for resume: `small` repeats quickly (epoch boundaries), `few` runs out early, `long` has windows
RESUME_MIX = [("small", 0.3, True), ("few", 0.1, False), ("long", 0.4, True), ("mid", 0.2, True)]


def _take(loader: MixtureLoader, n: int) -> list[dict[str, Any]]:
    out = []
    it = iter(loader)
    for _ in range(n):
        out.append(next(it))
    return out


def _assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), f"batch {i}: {k} differs"
            else:
                assert x[k] == y[k], f"batch {i}: {k} differs"


# ---------------------------------------------------------------------------------------------
# semantics
# ---------------------------------------------------------------------------------------------
def test_token_shares_follow_abs_weight(data_root, smollm2_tokenizer):
    """Over >= 200k tokens each dataset's token share is within 2 points of its abs_weight share,
    although the average sample lengths differ more than 10x."""
    loader = MixtureLoader(_cfg(data_root, MIX), smollm2_tokenizer, 512, 4)
    tokens = torch.zeros(3, dtype=torch.long)
    for batch in loader:
        t = batch["task_ids"][batch["task_ids"] >= 0]
        tokens += torch.bincount(t, minlength=3)
        assert batch["num_tokens"] == int((batch["task_ids"] >= 0).sum())
        if tokens.sum() >= 200_000:
            break
    shares = (tokens / tokens.sum()).tolist()
    for share, (_, w, _) in zip(shares, MIX):
        assert abs(share - w) < 0.02, shares
    st = loader.stats()
    assert [st[n]["tokens"] for n, _, _ in MIX] == tokens.tolist()
    avg = {n: st[n]["avg_tokens"] for n, _, _ in MIX}
    assert avg["short"] * 10 < avg["long"], avg  # really different lengths
    assert st["short"]["epoch"] >= 1  # repeating datasets started new epochs


def test_random_sampler_is_roughly_right(data_root, smollm2_tokenizer):
    """The original rule (independent draws, p ∝ abs_weight / avg tokens) is unbiased but noisier."""
    loader = MixtureLoader(_cfg(data_root, MIX[:2]), smollm2_tokenizer, 256, 8, sampler="random")
    tokens = torch.zeros(2, dtype=torch.long)
    for batch in loader:
        tokens += torch.bincount(batch["task_ids"][batch["task_ids"] >= 0], minlength=2)
        if tokens.sum() >= 60_000:
            break
    assert abs(tokens[0] / tokens.sum() - 0.5 / 0.8) < 0.06


def test_without_abs_weight_weight_times_nlines_are_sample_shares(data_root, smollm2_tokenizer):
    cfg = [{k: v for k, v in e.items() if k != "abs_weight"} for e in _cfg(data_root, [("small", 0, True), ("few", 0, True)])]
    cfg[1]["weight"] = 2.0  # 40 x 1 : 60 x 2 -> sample shares 0.25 : 0.75
    loader = MixtureLoader(cfg, smollm2_tokenizer, 256, 2)
    batches = _take(loader, 40)
    lines = torch.cat([b["sample_lines"] for b in batches])
    assert abs(float((lines[:, 0] == 0).float().mean()) - 0.25) < 0.02
    assert loader.stats()["few"]["weight"] == pytest.approx(0.75)


def test_deterministic_and_seed_dependent(data_root, smollm2_tokenizer):
    cfg = _cfg(data_root, MIX)
    a = _take(MixtureLoader(cfg, smollm2_tokenizer, 256, 2, seed=7), 6)
    b = _take(MixtureLoader(cfg, smollm2_tokenizer, 256, 2, seed=7), 6)
    _assert_same(a, b)
    c = _take(MixtureLoader(cfg, smollm2_tokenizer, 256, 2, seed=8), 6)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    assert a[0]["task_names"] == ["short", "mid", "long"]
    assert set(a[0]) >= {"input_ids", "labels", "position_ids", "task_ids", "cu_seqlens", "sample_lines"}


def test_non_repeating_ends_after_every_line_once(data_root, smollm2_tokenizer):
    """All datasets non-repeating: iteration ends when all are used up; every line appears once and
    the tokens equal tokenizing each line once (no line lost or duplicated, none counted twice)."""
    cfg = _cfg(data_root, [("mid", 0.5, False), ("tiny", 0.5, False)])
    loader = MixtureLoader(cfg, smollm2_tokenizer, 256, 2)
    batches = list(loader)
    assert loader.finished and list(loader) == []
    lines = torch.cat([b["sample_lines"] for b in batches])
    for d, n in enumerate([400, 9]):
        got = lines[lines[:, 0] == d, 1]
        assert sorted(set(got.tolist())) == list(range(n))
    tok = SampleTokenizer(smollm2_tokenizer, 256)
    from fm9g.data.indexed import IndexedDataset

    expect = sum(len(s) for wins in tok.batch(list(IndexedDataset(data_root / "mid"))) for s in wins)
    st = loader.stats()
    assert st["mid"]["tokens"] == expect and st["mid"]["exhausted"] and st["tiny"]["exhausted"]


def test_max_epochs_makes_repeating_finite(data_root, smollm2_tokenizer):
    loader = MixtureLoader(_cfg(data_root, [("tiny", 1.0, True)]), smollm2_tokenizer, 64, 1, max_epochs=3)
    lines = torch.cat([b["sample_lines"] for b in loader])[:, 1]
    assert sorted(lines.tolist()) == sorted(list(range(9)) * 3)
    assert loader.stats()["tiny"]["epoch"] == 2
    # each epoch is a new order
    assert lines[:9].tolist() != lines[9:18].tolist()


def test_dropped_lines_are_counted_and_an_all_dropping_repeat_dataset_fails(data_root, smollm2_tokenizer, tmp_path):
    (tmp_path / "skip_odd.py").write_text(
        "def transform(data, num_sample, r):\n    return None if int(data['output'].split()[1]) % 2 else data\n"
    )
    (tmp_path / "skip_all.py").write_text("def transform(data, num_sample, r):\n    return None\n")
    cfg = _cfg(data_root, [("tiny", 1.0, False)], transforms=str(tmp_path / "skip_odd.py"))
    loader = MixtureLoader(cfg, smollm2_tokenizer, 64, 1)
    lines = torch.cat([b["sample_lines"] for b in loader])[:, 1]
    assert sorted(lines.tolist()) == [0, 2, 4, 6, 8] and loader.stats()["tiny"]["dropped_lines"] == 4
    cfg = _cfg(data_root, [("tiny", 1.0, True)], transforms=str(tmp_path / "skip_all.py"))
    with pytest.raises(RuntimeError, match=r"task 'tiny' .*a whole epoch .*\(9 lines\) produced no sample"):
        next(iter(MixtureLoader(cfg, smollm2_tokenizer, 64, 1)))


def test_dropped_lines_are_counted_by_reason_and_the_counts_survive_resume(data_root, smollm2_tokenizer, tmp_path):
    """Each dropped line is counted under its reason: odd lines return None from the transform,
    line 4 has an empty output, line 6 a prompt longer than max_length; a loader resumed from a
    state saved part-way counts the rest on top, as the loader that read straight on."""
    (tmp_path / "drops.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    n = int(data['output'].split()[1])\n"
        "    if n % 2:\n        return None\n"
        "    if n == 4:\n        return {'input': 'q', 'output': ''}\n"
        "    if n == 6:\n        return {'input': 'word ' * 200, 'output': data['output']}\n"
        "    return data\n")
    cfg = _cfg(data_root, [("tiny", 1.0, False)], transforms=str(tmp_path / "drops.py"))
    straight = MixtureLoader(cfg, smollm2_tokenizer, 64, 1)
    list(straight)
    want = {"the transform returned None": 4, "empty output": 1, "prompt longer than max_length": 1}
    assert straight.stats()["tiny"]["drop_reasons"] == want and straight.stats()["tiny"]["dropped_lines"] == 6
    first = MixtureLoader(cfg, smollm2_tokenizer, 64, 1)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert sum(first.stats()["tiny"]["drop_reasons"].values()) > 0  # counted before the save: only the state carries them
    again = MixtureLoader(cfg, smollm2_tokenizer, 64, 1)
    again.load_state_dict(state)
    list(again)
    assert again.stats()["tiny"]["drop_reasons"] == want


def test_transform_error_mid_run_names_task_and_line(data_root, smollm2_tokenizer, tmp_path):
    (tmp_path / "fail7.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    if data['output'].split()[1] == '7':\n        raise ValueError('bad record')\n    return data\n"
    )
    cfg = _cfg(data_root, [("tiny", 1.0, False)], transforms=str(tmp_path / "fail7.py"))
    with pytest.raises(RuntimeError, match=r"task 'tiny', .*tiny line 7: ValueError: bad record"):
        list(MixtureLoader(cfg, smollm2_tokenizer, 64, 1))


def test_rank_shards_are_disjoint_and_cover_the_dataset(data_root, smollm2_tokenizer):
    cfg = _cfg(data_root, [("mid", 0.6, False), ("tiny", 0.4, False)])
    per_rank = []
    for rank in range(3):
        loader = MixtureLoader(cfg, smollm2_tokenizer, 256, 2, rank=rank, world_size=3)
        lines = torch.cat([b["sample_lines"] for b in loader])
        per_rank.append({d: set(lines[lines[:, 0] == d, 1].tolist()) for d in (0, 1)})
    for d, n in [(0, 400), (1, 9)]:
        sets = [r[d] for r in per_rank]
        assert sum(len(s) for s in sets) == n  # disjoint ...
        assert set().union(*sets) == set(range(n))  # ... and together the whole dataset
        assert all(abs(len(s) - n / 3) <= 2 for s in sets)  # 2 lanes a rank (batch_size 2), each n / 6 +- 1


def test_repeating_dataset_smaller_than_world(data_root, smollm2_tokenizer):
    cfg = _cfg(data_root, [("tiny", 1.0, True)])
    loader = MixtureLoader(cfg, smollm2_tokenizer, 64, 1, rank=11, world_size=12)
    assert len(_take(loader, 2)) == 2


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
N_REF = 70


@pytest.fixture(scope="module")
def resume_ref(data_root, smollm2_tokenizer):
    """An uninterrupted run, and per batch the loader stats after it."""
    loader = MixtureLoader(_cfg(data_root, RESUME_MIX), smollm2_tokenizer, 256, 2)
    batches, stats, states = [], [], []
    for batch in loader:
        batches.append(batch)
        stats.append(loader.stats())
        states.append(loader.state_dict())
        if len(batches) == N_REF:
            break
    return batches, stats, states


def _resume_points(stats: list[dict], states: list[dict]) -> dict[str, int]:
    pts = {"early": 2}
    pts["mid_document"] = next(k + 1 for k, s in enumerate(states) if bool((s["lanes"]["cur_window"][:, 2] > 0).any()))
    pts["after_epoch_boundary"] = next(k + 1 for k, s in enumerate(stats) if s["small"]["epoch"] >= 1)
    pts["after_exhausted"] = next(k + 1 for k, s in enumerate(stats) if s["few"]["exhausted"]) + 1
    assert pts["after_exhausted"] < N_REF - 5, pts
    return pts


def test_resume_is_bit_identical(data_root, smollm2_tokenizer, resume_ref):
    ref, stats, states = resume_ref
    pts = _resume_points(stats, states)
    assert len(set(pts.values())) == len(pts), pts
    for name, k in pts.items():
        cut = MixtureLoader(_cfg(data_root, RESUME_MIX), smollm2_tokenizer, 256, 2)
        _take(cut, k)
        state = cut.state_dict()
        fresh = MixtureLoader(_cfg(data_root, RESUME_MIX), smollm2_tokenizer, 256, 2)
        fresh.load_state_dict(state)
        m = min(6, N_REF - k)
        _assert_same(_take(fresh, m), ref[k : k + m])
        assert fresh.stats() == stats[k + m - 1], name


def test_state_is_small_and_weights_only_safe(data_root, resume_ref, tmp_path):
    _, _, states = resume_ref
    path = tmp_path / "loader.pt"
    torch.save(states[20], path)
    assert path.stat().st_size < 64 * 1024  # per lane a few arrays of length #datasets + one pending row
    loaded = torch.load(path, weights_only=True)
    assert loaded["lanes"]["next_line"].tolist() == states[20]["lanes"]["next_line"].tolist()


def test_resume_from_file_in_a_fresh_process_with_workers(data_root, tok_dir, resume_ref, tmp_path):
    """Save the state after k batches, continue in a new Python process (with 2 worker processes):
    the batches equal the uninterrupted run's."""
    ref, stats, states = resume_ref
    k = _resume_points(stats, states)["after_epoch_boundary"]
    torch.save(states[k - 1], tmp_path / "state.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(_cfg(data_root, RESUME_MIX)))
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoTokenizer
        from fm9g.data.mixture import MixtureLoader

        if __name__ == "__main__":
            tok = AutoTokenizer.from_pretrained({str(tok_dir)!r})
            loader = MixtureLoader.from_config({str(tmp_path / 'cfg.json')!r}, tok, 256, 2, num_workers=2)
            loader.load_state_dict(torch.load({str(tmp_path / 'state.pt')!r}, weights_only=True))
            it = iter(loader)
            out = [next(it) for _ in range(8)]
            torch.save({{"batches": out, "state": loader.state_dict()}}, {str(tmp_path / 'out.pt')!r})
            loader.close()
        """
    )
    (tmp_path / "run.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    _assert_same(out["batches"], ref[k : k + 8])
    # the state reflects the 8 batches handed out, not what the workers prepared ahead
    assert out["state"]["rows"] == 2 * (k + 8)  # batch_size 2: two rows of the stream a batch
    assert out["state"]["lanes"]["next_line"].tolist() == states[k + 7]["lanes"]["next_line"].tolist()


def test_background_state_counts_only_consumed_batches(data_root, smollm2_tokenizer, resume_ref):
    ref, _, states = resume_ref
    loader = MixtureLoader(_cfg(data_root, RESUME_MIX), smollm2_tokenizer, 256, 2, num_workers=1, prefetch=8)
    try:
        got = _take(loader, 5)
        _assert_same(got, ref[:5])
        state = loader.state_dict()
        assert state["rows"] == 10 and state["lanes"]["step"].tolist() == states[4]["lanes"]["step"].tolist()
        _assert_same(_take(loader, 3), ref[5:8])  # iter() again continues where the consumer stopped
    finally:
        loader.close()


def test_a_state_resumes_on_other_ranks_and_other_mixtures_are_refused(data_root, smollm2_tokenizer):
    """The global stream: the states of 2 ranks (batch 2) resume on 1 rank (batch 4) and on 4 ranks
    (batch 1) with the same rows; one rank's state alone lacks the other's lanes; another mixture
    or seed is refused, and an old per-rank state (fm9g.mixture/1) still needs its rank and world size."""
    cfg = _cfg(data_root, MIX)

    def rows(batches):
        return sorted(tuple(r.tolist()) for b in batches for r in b["input_ids"])

    two = [MixtureLoader(cfg, smollm2_tokenizer, 256, 2, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        _take(loader, 1)
    states = [loader.state_dict() for loader in two]
    expected = rows(_take(two[0], 1) + _take(two[1], 1))
    one = MixtureLoader(cfg, smollm2_tokenizer, 256, 4)
    one.load_state_dict(states)
    assert rows(_take(one, 1)) == expected and "same global batch of 4 rows" in one.resume_note
    four = [MixtureLoader(cfg, smollm2_tokenizer, 256, 1, rank=r, world_size=4) for r in range(4)]
    for loader in four:
        loader.load_state_dict(states)
    assert rows([b for loader in four for b in _take(loader, 1)]) == expected
    with pytest.raises(MixtureStateError, match=r"lane 2 of the stream has no state.*every rank"):
        MixtureLoader(cfg, smollm2_tokenizer, 256, 4).load_state_dict(states[0])
    d = MixtureLoader(cfg[:2], smollm2_tokenizer, 256, 2, rank=0, world_size=2)
    with pytest.raises(MixtureStateError, match="same dataset config"):
        d.load_state_dict(states)
    e = MixtureLoader(cfg, smollm2_tokenizer, 256, 2, rank=0, world_size=2, seed=1)
    with pytest.raises(MixtureStateError, match="seed=42"):
        e.load_state_dict(states)
    # a per-rank state of an older fm9g: the rank's own mixture, batches of 2 rows
    old = MixtureLoader(cfg, smollm2_tokenizer, 256, 2, rank=0, world_size=2)
    old.load_state_dict(_per_rank_state(old))
    assert old.resume_note is None and _take(old, 2)[0]["input_ids"].shape == (2, 256)
    saved = old.state_dict()
    assert saved["format"] == "fm9g.mixture/1" and saved["batches"] == 2
    again = MixtureLoader(cfg, smollm2_tokenizer, 256, 2, rank=0, world_size=2)
    again.load_state_dict(saved)
    _assert_same(_take(again, 2), _take(old, 2))  # resumes exactly, on its rank and world size
    with pytest.raises(MixtureStateError, match=r"world_size 2.*world_size 3.*(?i:resume with world_size=2)"):
        MixtureLoader(cfg, smollm2_tokenizer, 256, 2, rank=0, world_size=3).load_state_dict(saved)


def _per_rank_state(loader: MixtureLoader) -> dict:
    """A fresh per-rank state (format fm9g.mixture/1, what fm9g wrote before the global stream) for `loader`'s rank."""
    from fm9g.data.loader_state import Position

    return Position.initial(len(loader.task_names)).to_state(loader._plan)


# ---------------------------------------------------------------------------------------------
# config file and bad input
# ---------------------------------------------------------------------------------------------
def test_original_json_with_relative_paths_and_aliases(data_root, smollm2_tokenizer, tok_dir):
    cfg = [
        {"dataset_name": "s", "task_name": "short_up", "path": "short", "abs_weight": 1, "transforms": "tf/upper.py",
         "allow_repeat": True, "nlines": 1500, "avg_tokens": 15, "total_tokens": 0.001, "oversize_rule": "segment",
         "weight": 1.0, "incontext_weight": [1.0], "do_compact": False, "is_long": False},
        {"dataset_name": "m", "task_name": "mid", "path": "./mid", "abs_weight": 2, "ave_tokens": 110},
    ]
    path = data_root / "mix.json"
    path.write_text(json.dumps(cfg))
    entries = load_dataset_config(path)
    assert entries[0].path == str(data_root / "short") and entries[0].transforms == str(data_root / "tf/upper.py")
    assert entries[0].ave_tokens_per_line == 15 and entries[1].ave_tokens_per_line == 110
    loader = MixtureLoader.from_config(path, smollm2_tokenizer, 256, 2)
    batch = next(iter(loader))
    d = int(batch["sample_lines"][0, 0])
    text = smollm2_tokenizer.decode([t for t in batch["labels"][0].tolist() if t >= 0])
    if d == 0:
        assert "SHORT" in text
    typed = MixtureLoader([DatasetEntry(**{**e.to_dict(), "path": e.path}) for e in entries], smollm2_tokenizer, 256, 2)
    _assert_same(_take(typed, 2), _take(MixtureLoader.from_config(path, smollm2_tokenizer, 256, 2), 2))
    by_path = MixtureLoader.from_config(path, tok_dir, 256, 2)  # a tokenizer directory works too
    _assert_same(_take(by_path, 2), _take(MixtureLoader.from_config(path, smollm2_tokenizer, 256, 2), 2))


def _bad(root: Path, **change: Any) -> list[dict[str, Any]]:
    cfg = _cfg(root, [("short", 0.5, True), ("mid", 0.5, False)])
    for k, v in change.items():
        if v is None:
            cfg[1].pop(k)
        else:
            cfg[1][k] = v
    return cfg


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"path": "nowhere/idx"}, r"task 'mid': dataset path .*nowhere/idx does not exist.*build-index"),
        ({"transforms": "missing_tf.py"}, r"transform file .*missing_tf.py not found \(task 'mid'\)"),
        ({"path": None}, r"entry 1 .*\(task_name 'mid'\): missing required key\(s\) \['path'\]"),
        ({"abs_weight": 0}, r"\(task_name 'mid'\): 'abs_weight' must be a finite number > 0 \(.*got 0\)"),
        ({"abs_weight": -1.5}, r"'abs_weight' must be a finite number > 0 \(.*got -1.5\)"),
        ({"abs_weight": "0.5"}, r"'abs_weight' must be a number \(got '0.5'\)"),
        ({"abs_weight": None}, r"'abs_weight' is set on some entries but missing on \['mid'\]"),
        ({"task_name": "short"}, r"duplicate task_name 'short' in entries 0 and 1"),
        ({"weigth": 2}, r"\(task_name 'mid'\): unknown key 'weigth'"),
        ({"oversize_rule": "cut"}, r"'oversize_rule' must be one of \['segment', 'head', 'drop'\]"),
        ({"allow_repeat": "yes"}, r"'allow_repeat' must be true or false"),
        ({"weight": "heavy"}, r"'weight' must be a number \(got 'heavy'\)"),
        ({"abs_weight": True}, r"'abs_weight' must be a number \(got True\)"),
    ],
)
def test_bad_config_is_a_clear_error(data_root, smollm2_tokenizer, change, pattern):
    with pytest.raises((MixtureConfigError, FileNotFoundError), match=pattern):
        MixtureLoader(_bad(data_root, **change), smollm2_tokenizer, 256, 2)


def test_bad_data_and_sharding_errors(data_root, smollm2_tokenizer, tmp_path):
    cfg = _cfg(data_root, [("tiny", 1.0, False)])
    with pytest.raises(MixtureConfigError, match=r"task 'tiny'.* has 9 line\(s\), fewer than world_size=12.*allow_repeat"):
        MixtureLoader(cfg, smollm2_tokenizer, 64, 1, rank=0, world_size=12)
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"output": f"a{i}", "answer": "a"}) + "\n" for i in range(4)))
    build_index(src, tmp_path / "q", language="en", num_workers=1)
    (tmp_path / "needs_question.py").write_text(
        "def transform(data, num_sample, r):\n    return {'input': data['question'], 'output': data['answer']}\n"
    )
    (tmp_path / "no_output.py").write_text("def transform(data, num_sample, r):\n    return {'input': data['answer']}\n")
    bad = [{"dataset_name": "q", "task_name": "qa", "path": "q", "abs_weight": 1, "transforms": "needs_question.py"}]
    with pytest.raises(MixtureConfigError, match=r"task 'qa': transform failed on line 0: .*line 0: KeyError: 'question'"):
        MixtureLoader(bad, smollm2_tokenizer, 64, 1, base_dir=tmp_path)
    bad[0]["transforms"] = "no_output.py"
    with pytest.raises(MixtureConfigError, match=r"task 'qa': transform failed .*without 'output' \(keys: \['input'\]\)"):
        MixtureLoader(bad, smollm2_tokenizer, 64, 1, base_dir=tmp_path)
    (tmp_path / "bad.json").write_text('[{"dataset_name": "q",]')
    with pytest.raises(MixtureConfigError, match=r"bad.json: invalid JSON at line 1 column"):
        load_dataset_config(tmp_path / "bad.json")
    with pytest.raises(MixtureConfigError, match="rank must be"):
        MixtureLoader(_cfg(data_root, MIX), smollm2_tokenizer, 64, 1, rank=2, world_size=2)


# -- worker processes and tokenizer paths (issue 15, items 8 and 9) -------------------------------
def _tiny_mix(root: Path) -> tuple[Path, Path]:
    """A one-dataset config and an FM9G-8B style vocab.txt (a pure-Python tokenizer: workers start fast)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list("abcdefghijklmnopqrstuvwxyz ")
    (root / "vocab.txt").write_text("".join(json.dumps(t) + "\n" for t in tokens))
    src = root / "tiny.jsonl"
    src.write_text("".join(json.dumps({"output": "hello world " * (i % 5 + 1)}) + "\n" for i in range(64)))
    build_index(src, root / "tiny", language="en", num_workers=1)
    (root / "cfg.json").write_text(json.dumps([{"dataset_name": "t", "task_name": "t", "path": "tiny", "abs_weight": 1}]))
    return root / "cfg.json", root / "vocab.txt"


def _proc_state(pid: int) -> str | None:
    """The state letter of process `pid` (``None`` when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(d.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_exit_when_the_training_process_is_killed(tmp_path):
    cfg, vocab = _tiny_mix(tmp_path)
    script = textwrap.dedent(
        f"""
        import time
        from fm9g.data.mixture import MixtureLoader
        from fm9g.data.tokenizers import VocabTxtTokenizer

        if __name__ == "__main__":
            loader = MixtureLoader.from_config({str(cfg)!r}, VocabTxtTokenizer({str(vocab)!r}), 32, 2, num_workers=2)
            it = iter(loader)
            next(it)
            print("ready", flush=True)
            time.sleep(300)
        """
    )
    (tmp_path / "train.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "train.py")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    kids: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        kids = _children(proc.pid)  # 2 workers and the resource tracker
        assert len(kids) >= 2
        proc.kill()  # SIGKILL: no cleanup of any kind in the parent
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_proc_state(k) not in (None, "Z") for k in kids):
            time.sleep(0.1)
        assert [k for k in kids if _proc_state(k) not in (None, "Z")] == []
    finally:
        proc.kill()
        for k in kids:
            if _proc_state(k) not in (None, "Z"):
                os.kill(k, 9)


def test_workers_from_a_script_without_main_guard_fail_at_once(tmp_path):
    cfg, vocab = _tiny_mix(tmp_path)
    script = textwrap.dedent(
        f"""
        from fm9g.data.mixture import MixtureLoader
        from fm9g.data.tokenizers import VocabTxtTokenizer

        loader = MixtureLoader.from_config({str(cfg)!r}, VocabTxtTokenizer({str(vocab)!r}), 32, 2, num_workers=2)
        print(next(iter(loader))["input_ids"].shape)
        """
    )
    (tmp_path / "noguard.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(tmp_path / "noguard.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError:") and str(tmp_path / "noguard.py") in last
    assert 'if __name__ == "__main__":' in last and "num_workers=0" in last
    assert "spawn_main" not in proc.stderr  # the parent said it before starting any worker


def test_a_dead_worker_is_a_clear_error(tmp_path):
    cfg, vocab = _tiny_mix(tmp_path)
    loader = MixtureLoader.from_config(cfg, VocabTxtTokenizer(vocab), 32, 2, num_workers=1)
    try:
        it = iter(loader)
        next(it)
        assert loader._executor is not None
        for p in loader._executor._processes.values():
            p.kill()
        with pytest.raises(RuntimeError, match=r"worker process ended unexpectedly.*num_workers=0"):
            for _ in range(100):
                next(it)
    finally:
        loader.close()


def test_a_pool_already_marked_broken_is_the_same_clear_error(tmp_path):
    """The race CI hit: when the pool knows its worker died before the next read is submitted,
    ``submit`` itself raises BrokenProcessPool; that too must be the clear error."""
    import time

    cfg, vocab = _tiny_mix(tmp_path)
    loader = MixtureLoader.from_config(cfg, VocabTxtTokenizer(vocab), 32, 2, num_workers=1)
    try:
        it = iter(loader)
        next(it)
        for p in loader._executor._processes.values():
            p.kill()
        deadline = time.monotonic() + 20
        while not loader._executor._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loader._executor._broken, "the pool did not notice the dead worker"
        with pytest.raises(RuntimeError, match=r"worker process ended unexpectedly.*num_workers=0"):
            for _ in range(100):
                next(it)
    finally:
        loader.close()


def _remote_code_tokenizer(tok_dir: Path, root: Path) -> tuple[Path, Path]:
    """A copy of a real tokenizer directory whose auto_map names Python code that writes a marker."""
    folder = root / "remote_tok"
    shutil.copytree(tok_dir, folder)
    marker = root / "code_ran"
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


def test_tokenizer_path_runs_no_shipped_code_unless_trusted(data_root, tok_dir, tmp_path, monkeypatch):
    folder, marker = _remote_code_tokenizer(tok_dir, tmp_path)
    with pytest.raises(ConfigError, match="trust_remote_code") as exc:
        MixtureLoader(_cfg(data_root, MIX), str(folder), 256, 2)
    assert "tokenization_evil.py" in str(exc.value)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        MixtureLoader.from_config(_cfg(data_root, MIX), folder, 256, 2)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        build_index(data_root / "short.jsonl", tmp_path / "idx", tokenizer=folder)
    assert not marker.exists()
    seen = {}

    def fake_load(path, *, trust_remote_code=False):
        from transformers import AutoTokenizer

        seen[str(path)] = trust_remote_code
        return AutoTokenizer.from_pretrained(tok_dir)

    monkeypatch.setattr(mixture_module, "load_tokenizer", fake_load)
    MixtureLoader.from_config(_cfg(data_root, MIX), str(folder), 256, 2, trust_remote_code=True)
    assert seen == {str(folder): True}


def test_build_index_takes_every_tokenizer_path_form(tmp_path):
    cfg, vocab = _tiny_mix(tmp_path)
    meta = build_index(tmp_path / "tiny.jsonl", tmp_path / "idx2", tokenizer=vocab, num_workers=1)
    assert meta["token_count"] == f"tokenizer:{vocab}"
    tok = VocabTxtTokenizer(vocab)
    expected = sum(len(tok.encode("hello world " * (i % 5 + 1))) for i in range(64)) / 64
    assert meta["avg_token_per_line"] == pytest.approx(expected)


def test_main_guard_check_follows_what_spawn_reimports(tmp_path, monkeypatch):
    import importlib.machinery
    import types

    from fm9g.data.mixture import _check_main_guard

    unguarded = tmp_path / "__main__.py"
    unguarded.write_text("import sys\nrun(sys.argv)\n")  # a package's __main__ runs unconditionally
    guarded = tmp_path / "guarded.py"
    guarded.write_text("def main():\n    pass\n\nif '__main__' == __name__:\n    main()\n")

    def fake_main(path: Path, spec_name: str | None) -> None:
        mod = types.ModuleType("__main__")
        mod.__file__ = str(path)
        mod.__spec__ = importlib.machinery.ModuleSpec(spec_name, None) if spec_name else None
        monkeypatch.setitem(sys.modules, "__main__", mod)

    fake_main(unguarded, "fm9g.__main__")  # python -m fm9g: spawn does not re-import it
    _check_main_guard(2, "spawn")
    fake_main(guarded, None)
    _check_main_guard(2, "spawn")
    fake_main(unguarded, "mytool")  # python -m mytool: re-imported by name
    with pytest.raises(RuntimeError, match="num_workers=0"):
        _check_main_guard(2, "forkserver")
