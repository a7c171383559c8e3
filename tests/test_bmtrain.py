"""The bmtrain engine: the install-command error without bmtrain and the CMakeLists patch (CPU);
on a GPU with bmtrain installed (`bash scripts/install_bmtrain.sh`): loss parity with the torch
engine, resume, torch-engine checkpoints in both directions, LoRA.

GPU part: `pytest -m "gpu and bmtrain" tests/test_bmtrain.py` (one GPU, one process: the engine
starts bmtrain's process group itself)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fm9g.training.config import TrainConfig
from fm9g.training.builders import build_engine
from fm9g.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SDIST = ROOT / ".whl" / "bmtrain-1.0.1.tar.gz"


def _patcher():
    spec = importlib.util.spec_from_file_location("patch_bmtrain", ROOT / "scripts" / "patch_bmtrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ToyLoader:
    """Deterministic packed batches (2 rows x 32 tokens, 2 documents per row, 2 tasks) of counting
    sequences (a learnable next token)."""

    task_names = ["alpha", "beta"]

    def __init__(self, vocab: int = 99) -> None:
        self.i, self.vocab = 0, vocab

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 + self.i)
            self.i += 1
            # counting sequences from a random start: the next token is learnable, so the loss falls
            start = torch.randint(0, self.vocab - 3, (2, 1), generator=g)
            ids = (start + torch.arange(32)) % (self.vocab - 3) + 3
            labels = torch.roll(ids, -1, 1)
            labels[:, [0, 1, 15, 16, 17, 31]] = -100
            pos = torch.arange(16).repeat(2).expand(2, 32).clone()
            yield {"input_ids": ids, "labels": labels, "position_ids": pos,
                   "cu_seqlens": torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32),
                   "task_ids": torch.tensor([[0] * 32, [1] * 32]), "task_names": list(self.task_names),
                   "num_tokens": 64, "num_label_tokens": int((labels != -100).sum())}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(model="tiny", train_iters=20, lr=3e-3, warmup_iters=2, lr_scheduler="cosine", save=str(tmp_path / "ckpt"),
                save_iters=0, max_length=32, batch_size=2, grad_accum=2, progress_bar=False, inspect_iters=0, seed=7,
                tensorboard=None, stats_dir=None, save_final=False)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------- CPU
def test_without_bmtrain_engine_bmtrain_fails_at_once_naming_the_install_script(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bmtrain", None)  # `import bmtrain` raises ImportError
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    model = FM9GModel(FM9GConfig.from_name("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"bash scripts/install_bmtrain\.sh"):
        build_engine(_cfg(tmp_path, engine="bmtrain"), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was touched"
    with pytest.raises(RuntimeError, match=r"bash scripts/install_bmtrain\.sh"):
        Trainer(_cfg(tmp_path, engine="bmtrain"), loader=ToyLoader())


CMAKELISTS = """\
set(CMAKE_CUDA_ARCHITECTURES  "61;62;70;72;75;80" )
enable_language(CUDA)
set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -gencode=arch=compute_61,code=sm_61 -gencode=arch=compute_80,code=sm_80")
if(NOT DEFINED ENV{BUILD_DOCKER_ENV} OR "$ENV{BUILD_DOCKER_ENV}" STREQUAL "0")
    set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -gencode=arch=compute_86,code=sm_86")
endif()
set_target_properties(C PROPERTIES
    CUDA_ARCHITECTURES "61;62;70;72;75;80")
"""


def test_cmakelists_patch_sets_every_architecture():
    out = _patcher().patch_cmakelists(CMAKELISTS, "90")
    assert 'set(CMAKE_CUDA_ARCHITECTURES  "90" )' in out
    assert 'CUDA_ARCHITECTURES "90")' in out
    assert out.count("-gencode") == 1 and "-gencode=arch=compute_90,code=sm_90" in out
    assert "sm_86" not in out and "sm_61" not in out
    assert _patcher().patch_cmakelists(out, "90") == out  # idempotent


def test_patch_refuses_a_file_that_is_not_bmtrains():
    mod = _patcher()
    with pytest.raises(mod.PatchError, match="CMAKE_CUDA_ARCHITECTURES"):
        mod.patch_cmakelists("project(x)\n", "90")


def test_nccl_cu11_requirement_is_dropped():
    setup = 'install_requires=[\n        "numpy",\n\t\t"nvidia-nccl-cu11>=2.14.3"\n    ],'
    out = _patcher().drop_nccl_requirement(setup)
    assert "nccl" not in out and '"numpy"' in out


@pytest.mark.skipif(not SDIST.exists(), reason="no .whl/bmtrain-1.0.1.tar.gz (see docs/install.md)")
def test_patch_on_the_real_sdist(tmp_path):
    import tarfile

    with tarfile.open(SDIST) as tar:
        tar.extractall(tmp_path, filter="data")
    src = tmp_path / "bmtrain-1.0.1"
    lines = _patcher().patch_tree(src, "90")
    assert lines == ['set(CMAKE_CUDA_ARCHITECTURES "90")',
                     'set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -gencode=arch=compute_90,code=sm_90")',
                     'set_target_properties(C PROPERTIES CUDA_ARCHITECTURES "90")']
    assert "nvidia-nccl" not in (src / "setup.py").read_text()
    assert "nvidia-nccl" not in (src / "pyproject.toml").read_text()


# ----------------------------------------------------------------------------------------- GPU
def _needs_bmtrain():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        import bmtrain  # noqa: F401
    except ImportError:
        pytest.fail("bmtrain is not installed: run `bash scripts/install_bmtrain.sh` first")


@pytest.fixture
def base_weights(tmp_path):
    """One set of tiny-model weights both engines start from."""
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    torch.manual_seed(123)
    path = tmp_path / "base.pt"
    torch.save(FM9GModel(FM9GConfig.from_name("tiny")).state_dict(), path)
    return str(path)


# bf16 tolerance: the torch engine keeps the residual stream in fp32 (fp32 master weights under
# autocast) while bmtrain's parameters are bf16, so the per-step losses differ by bf16 rounding.
BF16_REL = 2e-2
FP32_REL = 1e-3


@pytest.mark.gpu
@pytest.mark.bmtrain
@pytest.mark.parametrize("offload", [False, True], ids=["adam", "offload"])
def test_first_20_losses_match_the_torch_engine(tmp_path, base_weights, offload):
    _needs_bmtrain()
    kw = dict(pretrained_model=base_weights, device="cuda", compile=False)
    ref = Trainer(_cfg(tmp_path, model_unique="torch", **kw), loader=ToyLoader()).fit()
    t = Trainer(_cfg(tmp_path, model_unique="bmt", engine="bmtrain", offload=offload, **kw), loader=ToyLoader())
    assert t.engine.name == "bmtrain" and t.engine.precision == "bf16"
    got = t.fit()
    assert len(got.losses) == len(ref.losses) == 20
    assert got.losses == pytest.approx(ref.losses, rel=BF16_REL)
    assert got.losses[-1] < got.losses[0]


@pytest.mark.gpu
@pytest.mark.bmtrain
def test_fp32_losses_match_the_torch_engine_closely(tmp_path, base_weights):
    _needs_bmtrain()
    kw = dict(pretrained_model=base_weights, device="cuda", compile=False, precision="fp32", train_iters=10)
    ref = Trainer(_cfg(tmp_path, model_unique="torch", **kw), loader=ToyLoader()).fit()
    got = Trainer(_cfg(tmp_path, model_unique="bmt", engine="bmtrain", **kw), loader=ToyLoader()).fit()
    assert got.losses == pytest.approx(ref.losses, rel=FP32_REL)


@pytest.mark.gpu
@pytest.mark.bmtrain
@pytest.mark.parametrize("offload", [False, True], ids=["adam", "offload"])
def test_resume_under_bmtrain_continues_the_curve(tmp_path, base_weights, offload):
    _needs_bmtrain()
    kw = dict(pretrained_model=base_weights, engine="bmtrain", offload=offload, train_iters=12)
    straight = Trainer(_cfg(tmp_path, model_unique="straight", save_iters=6, **kw), loader=ToyLoader()).fit()
    cfg = _cfg(tmp_path, model_unique="resumed", **kw)
    again = Trainer(cfg.override({"resume_ckpt": str(tmp_path / "ckpt" / "straight" / "6")}), loader=ToyLoader()).fit()
    assert again.step == 12 and len(again.losses) == 6
    # the first step after the resume sees bit-identical weights and data: the same loss exactly;
    # later steps may differ in the last bits (non-deterministic GPU backward kernels)
    assert again.losses[0] == straight.losses[6]
    assert again.losses == pytest.approx(straight.losses[6:], rel=1e-3)


@pytest.mark.gpu
@pytest.mark.bmtrain
def test_torch_engine_checkpoint_loads_under_bmtrain_and_back(tmp_path, base_weights):
    _needs_bmtrain()
    kw = dict(pretrained_model=base_weights, device="cuda", compile=False)
    run = tmp_path / "ckpt"
    torch_straight = Trainer(_cfg(tmp_path, model_unique="t", train_iters=15, save_iters=5, **kw), loader=ToyLoader()).fit()
    # torch -> bmtrain (weights, AdamW moments, loader, counters)
    b = Trainer(_cfg(tmp_path, model_unique="b", engine="bmtrain", train_iters=10, save_iters=10,
                     resume_ckpt=str(run / "t" / "5"), **kw), loader=ToyLoader()).fit()
    assert b.step == 10
    assert b.losses == pytest.approx(torch_straight.losses[5:10], rel=BF16_REL)
    sd = torch.load(run / "b" / "10" / "fm9g_live_checkpoint-10.pt", weights_only=True)
    ref = torch.load(run / "t" / "10" / "fm9g_live_checkpoint-10.pt", weights_only=True)
    assert sd.keys() == ref.keys()
    assert all(sd[k].dtype == torch.float32 and sd[k].shape == ref[k].shape for k in ref)
    # bmtrain -> torch
    back = Trainer(_cfg(tmp_path, model_unique="t2", train_iters=15, resume_ckpt=str(run / "b" / "10"), **kw),
                   loader=ToyLoader()).fit()
    assert back.step == 15
    assert back.losses == pytest.approx(torch_straight.losses[10:15], rel=BF16_REL)


@pytest.mark.gpu
@pytest.mark.bmtrain
def test_lora_under_bmtrain_trains_only_the_adapters(tmp_path, base_weights):
    _needs_bmtrain()
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["project_q", "project_v", "w_out"]}
    cfg = _cfg(tmp_path, model_unique="lora", pretrained_model=base_weights, engine="bmtrain", lora=lora,
               lr=1e-2, warmup_iters=0, lr_scheduler="constant", train_iters=20, save_final=True)
    t = Trainer(cfg, loader=ToyLoader())
    base = torch.load(base_weights, weights_only=True)
    res = t.fit()
    assert res.losses[-1] < res.losses[0]
    sd = t.engine.model_state_dict(lora_only=True)
    assert sd and all(".lora.lora_" in k for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_B")), "lora_B never moved"
    full = t.engine.model_state_dict()
    for k, v in base.items():  # the frozen base is unchanged (up to its bf16 copy)
        assert torch.allclose(full[k].float(), v.to(torch.bfloat16).float()), k
    saved = torch.load(res.last_checkpoint / f"fm9g_live_checkpoint-{res.step}.pt", weights_only=True)
    assert saved.keys() == sd.keys()


# ------------------------------------------------- state conversion on CPU (no bmtrain needed)
def _bare_engine(model, *, dtype=torch.bfloat16, offload=False):
    """A BMTrainEngine without bmtrain: the model's parameters replaced by flat 1-D tensors, as
    bmtrain's one-process shards are, holding the optimizer state in bmtrain's layout. Exercises
    the engine's own state code (model / optimizer state in both directions)."""
    from fm9g.training.bmtrain_engine import BMTrainEngine
    from fm9g.training.step_math import param_groups

    e = object.__new__(BMTrainEngine)
    e.world_size, e.rank, e.offload, e.weight_decay = 1, 0, offload, 0.1
    e.device, e.dtype = torch.device("cpu"), dtype
    e._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    e._lora_keys = [k for k in e._shapes if ".lora.lora_" in k]
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = {}
    for name, p in model.named_parameters():
        q = torch.nn.Parameter(p.detach().reshape(-1).to(dtype).clone(), requires_grad=p.requires_grad)
        q._start_partition = 0
        flat[name] = q
    e._params = flat
    groups = param_groups(model, 4.0)
    opt_groups = [{"params": [flat[n] for n in g["names"]], "names": g["names"], "lr": 1e-3 * g["lr_scale"],
                   "lr_scale": g["lr_scale"], "betas": (0.9, 0.95), "eps": 1e-8} for g in groups]
    e.optimizer = torch.optim.SGD(opt_groups, lr=1e-3)  # a container for groups and state
    e._order = [(n, p) for g in e.optimizer.param_groups for n, p in zip(g["names"], g["params"])]
    for name, p in e._order:
        e._init_state(p, masters[name])
    return e


@pytest.mark.parametrize("offload", [False, True], ids=["adam", "offload"])
def test_bmtrain_state_round_trips_with_the_torch_engine_on_cpu(offload):
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.torch_engine import TorchEngine

    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    ref = TorchEngine(model, lr=1e-3, device="cpu", lr_scale_width=4.0)
    batch = next(iter(ToyLoader()))
    ref.train_step([batch], 1e-3)
    ref.train_step([batch], 1e-3)
    full, opt = ref.model_state_dict(), ref.optimizer_state_dict()

    e = _bare_engine(FM9GModel(FM9GConfig.from_name("tiny")), offload=offload)
    e.load_model_state_dict(full)
    e.load_optimizer_state_dict(opt)
    # the fp32 master weights come back exactly, the bf16 parameters are their rounding
    got = e.model_state_dict()
    assert got.keys() == full.keys()
    assert all(torch.equal(got[k], full[k]) for k in full)
    for name, p in e._params.items():
        want = full[name].reshape(-1)
        if offload:  # bmtrain's CPU Adam truncates
            assert torch.equal(p.detach(), (want.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16))
        else:
            assert torch.equal(p.detach(), want.to(torch.bfloat16))
    # the optimizer state goes back into the torch engine unchanged, and it trains on
    back = e.optimizer_state_dict()
    assert back["param_groups"][0].keys() == opt["param_groups"][0].keys()
    for i, st in opt["state"].items():
        assert float(back["state"][i]["step"]) == float(st["step"])
        assert torch.equal(back["state"][i]["exp_avg"], st["exp_avg"])
        assert torch.equal(back["state"][i]["exp_avg_sq"], st["exp_avg_sq"])
    torch.manual_seed(0)
    again = TorchEngine(FM9GModel(FM9GConfig.from_name("tiny")), lr=1e-3, device="cpu", lr_scale_width=4.0)
    again.load_model_state_dict(got)
    again.load_optimizer_state_dict(back)
    a, b = ref.train_step([batch], 1e-3), again.train_step([batch], 1e-3)
    assert a.loss == b.loss and a.grad_norm == b.grad_norm


def test_bmtrain_lora_state_and_strict_loading_on_cpu():
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.models.lora import LoraConfig, apply_lora

    model = FM9GModel(FM9GConfig.from_name("tiny"))
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["project_q"]))
    e = _bare_engine(model)
    sd = e.model_state_dict(lora_only=True)
    assert sd and all(".lora.lora_" in k for k in sd) and all(v.dtype == torch.float32 for v in sd.values())
    e.load_model_state_dict({k: v + 1 for k, v in sd.items()}, lora_only=True)
    assert all(torch.equal(e.model_state_dict(lora_only=True)[k], sd[k] + 1) for k in sd)
    with pytest.raises(ValueError, match="missing keys"):
        e.load_model_state_dict({k: v for k, v in list(sd.items())[1:]}, lora_only=True)
    full = e.model_state_dict()
    with pytest.raises(ValueError, match="another shape"):
        e.load_model_state_dict({**full, "input_embedding.weight": torch.zeros(3, 3)})


@pytest.mark.parametrize("share, expected", [(True, [True] * 4), (False, [False] * 4), (0.5, [False, True, False, True])])
def test_bmtrain_blocks_checkpoint_the_same_share_of_layers_on_cpu(monkeypatch, share, expected):
    """``use_checkpoint`` under bmtrain: each layer becomes a block that checkpoints itself exactly
    when the one-process engine would recompute that layer (bmtrain's classes faked: no GPU here)."""
    from types import SimpleNamespace

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel, checkpointed_layers
    from fm9g.training import bmtrain_engine

    class Block(torch.nn.Module):
        def __init__(self, layer, use_checkpoint, zero_level):
            super().__init__()
            self._module, self.use_checkpoint = layer, use_checkpoint

    class TransformerBlockList(torch.nn.ModuleList):
        pass

    class DistributedModule(torch.nn.Module):
        pass

    fake = SimpleNamespace(Block=Block, TransformerBlockList=TransformerBlockList, DistributedModule=DistributedModule)
    monkeypatch.setattr(bmtrain_engine, "_convert_params", lambda *a, **k: None)  # (its shards live on a GPU)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = FM9GModel(FM9GConfig.from_name("tiny", num_layers=4))
    bmtrain_engine.wrap_model(fake, model, dtype=torch.float32, use_checkpoint=share)
    assert [b.use_checkpoint for b in model.encoder.layers] == expected == checkpointed_layers(4, share)
    assert model.gradient_checkpointing is False  # the blocks checkpoint themselves
