"""LR schedules (SPEC §4.3) at chosen steps, with the fixed timing: iteration k trains with lr(k)."""
import math

import pytest

from fm9g.training.config import TrainConfig
from fm9g.training.schedules import lr_at, normalise_name

BASE = 1e-3


def test_warmup_first_step_is_not_zero_and_reaches_base_at_W():
    for name in ("cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant"):
        assert lr_at(1, BASE, scheduler=name, warmup_iters=10, train_iters=100) == pytest.approx(BASE / 10)
        assert lr_at(5, BASE, scheduler=name, warmup_iters=10, train_iters=100) == pytest.approx(BASE * 5 / 10)
        assert lr_at(10, BASE, scheduler=name, warmup_iters=10, train_iters=100, drop_iters=5) == pytest.approx(BASE)


def test_cosine_formula_and_floor():
    W, E = 10, 110
    kw = dict(scheduler="cosine", warmup_iters=W, train_iters=E)
    for k in (10, 35, 60, 85, 110):
        p = (k - W) / (E - W)
        want = max(0.1 * BASE, BASE * (0.1 + 0.45 * (1 + math.cos(math.pi * p))))
        assert lr_at(k, BASE, **kw) == pytest.approx(want)
    assert lr_at(60, BASE, **kw) == pytest.approx(BASE * 0.55)  # half way: 0.1 + 0.45
    assert lr_at(110, BASE, **kw) == pytest.approx(0.1 * BASE)
    assert lr_at(500, BASE, **kw) == pytest.approx(0.1 * BASE)  # stays at the floor after E


def test_cosine_name_is_case_insensitive():
    assert normalise_name("Cosine") == "cosine"
    assert normalise_name("WarmupStableDrop") == "warmupstabledrop"
    assert normalise_name("wsd") == "warmupstabledrop"
    assert lr_at(50, BASE, scheduler="Cosine", warmup_iters=0, train_iters=100) == lr_at(
        50, BASE, scheduler="cosine", warmup_iters=0, train_iters=100)
    assert TrainConfig(lr_scheduler="Cosine").lr_scheduler == "cosine"
    with pytest.raises(ValueError, match="cosine"):
        TrainConfig(lr_scheduler="cosin")


def test_warmup_stable_drop():
    kw = dict(scheduler="warmupstabledrop", warmup_iters=10, drop_iters=20, train_iters=100)
    assert lr_at(50, BASE, **kw) == pytest.approx(BASE)
    assert lr_at(80, BASE, **kw) == pytest.approx(BASE)  # k = E - D: still stable
    assert lr_at(90, BASE, **kw) == pytest.approx(BASE * (0.1 + 0.9 * 10 / 20))
    assert lr_at(100, BASE, **kw) == pytest.approx(0.1 * BASE)
    assert lr_at(130, BASE, **kw) == pytest.approx(0.1 * BASE)


def test_warmup_stable_exp():
    kw = dict(scheduler="warmupstableexp", warmup_iters=10, drop_iters=20, train_iters=100, drop_begin=40, drop_rate=0.5)
    assert lr_at(40, BASE, **kw) == pytest.approx(BASE)
    assert lr_at(60, BASE, **kw) == pytest.approx(BASE * 0.5)  # one half-life after drop_begin
    assert lr_at(80, BASE, **kw) == pytest.approx(BASE * 0.25)
    assert lr_at(80, BASE, **{**kw, "drop_begin": -1}) == pytest.approx(BASE)  # no decay by default


def test_linear_and_constant():
    kw = dict(scheduler="linear", warmup_iters=0, train_iters=100)
    assert lr_at(1, BASE, **kw) == pytest.approx(BASE)
    assert lr_at(51, BASE, **kw) == pytest.approx(BASE * 50 / 100)
    assert lr_at(100, BASE, **kw) == pytest.approx(BASE / 100)  # the last trained step is not 0
    assert lr_at(101, BASE, **kw) == 0.0
    assert lr_at(77, BASE, scheduler="constant", warmup_iters=5, train_iters=100) == BASE


def test_fractions_of_train_iters():
    cfg = TrainConfig(train_iters=1000, warmup_iters=0.01, drop_iters=0.1)
    assert cfg.warmup_steps == pytest.approx(10)
    assert cfg.drop_steps == pytest.approx(100)
    cfg = TrainConfig(train_iters=1000, warmup_iters=20, drop_iters=1)
    assert cfg.warmup_steps == 20 and cfg.drop_steps == 1
