"""FP8 matmuls (``TrainConfig.fp8``, fm9g/training/fp8.py): the config values, the one capability
check (faked on CPU at its seam, :func:`fm9g.training.fp8.fp8_supported`), the conversion keeping
the state dict key for key and value for value (full model and LoRA), training through the
Trainer, and on an FP8 GPU a few steps against bf16."""
from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import pytest
import torch

from fm9g import FM9GConfig, FM9GModel, LoraConfig
from fm9g._io import ConfigError
from fm9g.models.lora import LoraLinear, apply_lora, lora_modules, lora_state_dict, merge_lora
from fm9g.training import fp8
from fm9g.training.config import TrainConfig
from fm9g.training.fp8 import FP8UnavailableError, FrozenFloat8Linear, convert_to_fp8, fp8_linear_names, fp8_supported
from fm9g.training.trainer import Trainer
from test_trainer import ToyLoader, _cfg

LORA = {"r": 4, "alpha": 8}
DECODER_LINEARS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
A100 = "NVIDIA A100-SXM4-80GB (compute capability 8.0)"


def _needs_torchao():
    return pytest.importorskip("torchao.float8", reason="torchao is not installed: pip install 'fm9g[fp8]'")


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("value, expected", [(False, False), ("false", False), ("tensorwise", "tensorwise"),
                                             ("rowwise", "rowwise"), ("RowWise", "rowwise")])
def test_fp8_takes_false_or_a_recipe(value, expected):
    assert TrainConfig(model="tiny", fp8=value).fp8 == expected


@pytest.mark.parametrize("value, words", [(True, ["fp8 = true", "tensorwise", "rowwise"]),
                                          ("e4m3", ["fp8 = 'e4m3'", "false", "tensorwise", "rowwise"]),
                                          ("yes", ["fp8", "tensorwise"])])
def test_a_bad_fp8_value_names_the_key_and_the_choices(value, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(model="tiny", fp8=value)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_fp8_under_bmtrain_is_refused_naming_the_way_out():
    with pytest.raises(ConfigError, match=r"fp8 = 'tensorwise' runs under the torch engine.*fp8: false"):
        TrainConfig(model="tiny", fp8="tensorwise", engine="bmtrain")


def test_fp8_reads_from_json_and_the_command_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"model": "tiny", "fp8": "rowwise"}')
    assert TrainConfig.from_json(path).fp8 == "rowwise"
    assert TrainConfig.from_json(path).override(["fp8=false"]).fp8 is False


# ---------------------------------------------------------------------------------- the capability seam
@pytest.mark.parametrize("capability, name, ok", [((8, 0), "NVIDIA A100-SXM4-80GB", False),
                                                  ((8, 0), "NVIDIA A800 80GB PCIe", False),
                                                  ((8, 6), "NVIDIA RTX A6000", False),
                                                  ((8, 9), "NVIDIA L40S", True),
                                                  ((9, 0), "NVIDIA H100 80GB HBM3", True),
                                                  ((10, 0), "NVIDIA B200", True)])
def test_fp8_supported_reads_the_compute_capability(monkeypatch, capability, name, ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, named = fp8_supported("cuda")
    assert got is ok and name in named and f"{capability[0]}.{capability[1]}" in named


def test_fp8_supported_is_false_on_cpu():
    assert fp8_supported("cpu") == (False, "CPU")


def test_fp8_on_a_gpu_without_fp8_names_it_and_the_alternative(monkeypatch, tmp_path):
    """The capability faked at its one seam: an A100 (SM 8.0) is refused when the engine is built,
    the message naming the GPU and what to set instead."""
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (False, A100))
    with pytest.raises(FP8UnavailableError) as err:
        Trainer(_cfg(tmp_path, fp8="tensorwise", device="cpu"), loader=ToyLoader())
    text = str(err.value)
    assert A100 in text and "fp8: false" in text and "bf16" in text and "8.9" in text, text


def test_fp8_on_cpu_is_refused_naming_the_cpu(tmp_path):
    with pytest.raises(FP8UnavailableError, match=r"device is CPU.*fp8: false"):
        Trainer(_cfg(tmp_path, fp8="rowwise", device="cpu"), loader=ToyLoader())


def test_fp8_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(FP8UnavailableError, match=r"pip install 'fm9g\[fp8\]'"):
        convert_to_fp8(FM9GModel(FM9GConfig.from_name("tiny")), "tensorwise")


def test_a_run_without_fp8_never_imports_torchao():
    code = ("import sys, fm9g, fm9g.training.trainer, fm9g.training.fp8; "
            "from fm9g.training.config import TrainConfig; TrainConfig(model='tiny'); "
            "assert 'torchao' not in sys.modules, 'torchao imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_the_fp8_error_is_a_one_line_cli_error():
    from fm9g.cli import is_user_error

    assert is_user_error(FP8UnavailableError("x")) and issubclass(FP8UnavailableError, ConfigError)


# ---------------------------------------------------------------------------------- the conversion
def _model(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny", tie_lm_head=False, qkv_bias=True))
    if lora:
        apply_lora(model, LoraConfig(**LORA, target_modules=["project_q", "project_v", "w_0", "w_out"]))
        for _, layer in lora_modules(model):  # a trained-looking adapter (B = 0 would hide a dropped branch)
            torch.nn.init.normal_(layer.lora.lora_B, std=0.02)
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_conversion_keeps_the_state_dict_and_converts_only_the_decoder_linears(lora):
    _needs_torchao()
    model = _model(lora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = {n for n, _ in lora_modules(model)}
    names = convert_to_fp8(model, "tensorwise")
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and type(after[k]) is torch.Tensor and torch.equal(after[k], v), k
    assert sorted(names) == sorted(f"encoder.layers.{i}.{p}" for i in range(2) for p in (
        "self_att.self_attention.project_q", "self_att.self_attention.project_k", "self_att.self_attention.project_v",
        "self_att.self_attention.attention_out", "ffn.ffn.w_in.w_0", "ffn.ffn.w_in.w_1", "ffn.ffn.w_out"))
    assert type(model.lm_head) is torch.nn.Linear  # the lm_head (and the embedding) stay as they are
    for name in names:
        layer = model.get_submodule(name)
        assert "Float8" in type(layer).__name__, name
        assert isinstance(layer, LoraLinear) == (name in adapters), name
    assert {n for n, _ in lora_modules(model)} == adapters


def test_a_lora_layer_keeps_its_branch_and_only_its_base_is_fp8():
    """The FP8 LoRA layer computes base(x) in FP8 plus the branch in the activation dtype: against
    the unconverted layer its output differs by the base's FP8 rounding only, the gradient reaches
    the adapters (not the frozen base), and merging still folds the update into the weight."""
    _needs_torchao()
    model = _model(lora=True)
    ref = _model(lora=True)
    convert_to_fp8(model, "tensorwise")
    name = "encoder.layers.0.self_att.self_attention.project_q"
    layer, ref_layer = model.get_submodule(name), ref.get_submodule(name)
    x = torch.randn(2, 8, 64)
    out, expected = layer(x), ref_layer(x)
    assert torch.allclose(layer.base(x) + layer.lora(x), out)
    assert torch.allclose(out, expected, rtol=0.1, atol=0.05)  # FP8 (e4m3: 3 mantissa bits) against fp32
    assert torch.equal(layer.lora(x), ref_layer.lora(x))
    out.square().sum().backward()
    assert layer.lora.lora_A.grad is not None and layer.weight.grad is None
    merge_lora(model)
    merge_lora(ref)
    assert torch.equal(layer.weight, ref_layer.weight)
    assert lora_state_dict(model).keys() == lora_state_dict(ref).keys()


def test_only_linears_with_widths_of_multiples_of_16_are_chosen():
    model = FM9GModel(FM9GConfig.from_name("tiny", dim_ff=72))  # w_0 / w_1 / w_out: 72 = 4.5 × 16
    names = fp8_linear_names(model)
    assert names and not any(n.endswith(("w_0", "w_1", "w_out")) for n in names)
    assert all(n.startswith("encoder.layers.") for n in names)


# ---------------------------------------------------------------------------------- the frozen FP8 base
def _dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def _frozen_linear(recipe: str, bias: bool = True) -> tuple[torch.nn.Linear, FrozenFloat8Linear]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48, bias=bias).requires_grad_(False)
    with torch.no_grad():
        plain.weight[3] *= 40  # rows of very different ranges: tensorwise and rowwise scales differ
    ref = torch.nn.Linear(64, 48, bias=bias).requires_grad_(False)
    ref.load_state_dict(plain.state_dict())
    return ref, FrozenFloat8Linear.from_linear(plain, recipe)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_frozen_fp8_base_multiplies_its_fp8_copies_and_gives_only_the_inputs_gradient(recipe):
    """Forward and backward are exactly the FP8 products the recipe defines (the copies of W made
    once, x and the gradient cast per call, one scale per tensor or per row), W gets no gradient,
    and the state dict is the linear's, key for key and value for value."""
    rowwise = recipe == "rowwise"
    ref, layer = _frozen_linear(recipe)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    xq, xs = fp8._to_fp8(x.detach().reshape(-1, 64), torch.float8_e4m3fn, rowwise)
    w = _dequantized(layer.weight_fp8, layer.weight_fp8_scale)
    expected = (_dequantized(xq, xs) @ w.t()).reshape(3, 5, 48) + ref.bias
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    gq, gs = fp8._to_fp8(grad.reshape(-1, 48), torch.float8_e4m3fn if rowwise else torch.float8_e5m2, rowwise)
    wt = _dequantized(layer.weight_t_fp8, layer.weight_t_fp8_scale)
    assert torch.allclose(x.grad, (_dequantized(gq, gs) @ wt.t()).reshape(3, 5, 64), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.weight_fp8.dtype == layer.weight_t_fp8.dtype == torch.float8_e4m3fn
    assert layer.weight_fp8_scale.shape == ((48, 1) if rowwise else ())
    assert layer.weight_t_fp8_scale.shape == ((64, 1) if rowwise else ())
    assert torch.allclose(w, ref.weight, rtol=0.07, atol=0.02 * ref.weight.abs().max().item())  # e4m3 rounding
    full = ref(x)
    assert torch.allclose(out, full, rtol=0.1, atol=0.03 * full.abs().max().item())  # against the unconverted layer
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_a_frozen_fp8_base_casts_its_weight_once_and_again_when_it_changes():
    ref, layer = _frozen_linear("tensorwise")
    x = torch.randn(4, 64)
    layer(x)
    first = layer.weight_fp8
    for _ in range(3):
        layer(x)
    assert layer.weight_fp8 is first  # not cast again per call
    layer.to(torch.float64)  # placed: made again from the moved weight, and still FP8 (never cast as a buffer)
    assert layer.weight.dtype == torch.float64 and layer.weight_fp8.dtype == torch.float8_e4m3fn
    new = {"weight": 2 * ref.weight, "bias": ref.bias}
    layer.load_state_dict(new)
    assert torch.equal(layer.weight_fp8, fp8._to_fp8(new["weight"].double(), torch.float8_e4m3fn, False)[0])
    assert layer(x.double()).dtype == torch.float64
    torch.save(layer, io.BytesIO())  # the whole layer pickles (torch.save(model); no lambda hook)
    again = copy.deepcopy(layer)
    assert torch.equal(again.weight_fp8, layer.weight_fp8) and torch.equal(again(x.double()), layer(x.double()))


def test_a_trained_weight_is_refused_by_the_frozen_fp8_base():
    with pytest.raises(ValueError, match="freeze the weight"):
        FrozenFloat8Linear.from_linear(torch.nn.Linear(16, 16), "tensorwise")


def test_a_lora_run_puts_every_frozen_linear_on_fp8_copies_and_merging_remakes_them():
    """In one process every frozen linear of a LoRA model (with a branch or without) becomes a
    FrozenFloat8Linear; a merge changes the weight, and the copies follow it; under FSDP2
    (frozen_copies=False) torchao's layer computes them."""
    _needs_torchao()
    model = _model(lora=True)
    convert_to_fp8(model, "rowwise")
    q = model.get_submodule("encoder.layers.0.self_att.self_attention.project_q")  # a LoRA layer
    k = model.get_submodule("encoder.layers.0.self_att.self_attention.project_k")  # frozen, no branch
    assert isinstance(q, LoraLinear) and isinstance(q, FrozenFloat8Linear) and type(k) is FrozenFloat8Linear
    x = torch.randn(2, 3, 64)
    unmerged = q(x)
    before = q.weight_fp8.clone()
    merge_lora(model)
    assert not torch.equal(q.weight_fp8, before)
    assert torch.equal(q.weight_fp8, fp8._to_fp8(q.weight, torch.float8_e4m3fn, True)[0])
    assert torch.allclose(q(x), unmerged, rtol=0.1, atol=0.1)
    sharded = _model(lora=True)
    convert_to_fp8(sharded, "rowwise", frozen_copies=False)
    assert not any(isinstance(m, FrozenFloat8Linear) for m in sharded.modules())


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fp8_trains_through_the_trainer_with_the_capability_faked(monkeypatch, tmp_path, recipe, lora):
    """On CPU with the capability faked at its seam (torch runs FP8 matmuls on CPU too): the
    Trainer converts the layers, trains, and saves the checkpoint the bf16/fp32 run saves - same
    keys, plain tensors - with losses within FP8 rounding of the unconverted run."""
    _needs_torchao()
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, "a faked H100"))
    extra = dict(lora=LORA, lora_random_base=True) if lora else {}
    runs = {}
    for name, value in (("ref", False), ("fp8", recipe)):
        t = Trainer(_cfg(tmp_path / name, fp8=value, device="cpu", train_iters=4, **extra), loader=ToyLoader())
        runs[name] = (t.fit().losses, type(t.model.encoder.layers[0].ffn.ffn.w_out).__name__)
    (ref, ref_type), (got, got_type) = runs["ref"], runs["fp8"]
    assert "Float8" in got_type and "Float8" not in ref_type
    assert all(math.isfinite(x) for x in got)
    assert got == pytest.approx(ref, rel=1e-2), (got, ref)
    ckpts = [torch.load(next((tmp_path / n).rglob("fm9g_live_checkpoint-4.pt")), weights_only=True) for n in runs]
    assert list(ckpts[0]) == list(ckpts[1])
    assert all(type(v) is torch.Tensor and v.dtype == ckpts[0][k].dtype for k, v in ckpts[1].items())


def test_a_lora_run_on_the_frozen_fp8_base_resumes_exactly(monkeypatch, tmp_path):
    """LoRA over FrozenFloat8Linear bases (rowwise), saved at step 3 of 6 and resumed in a new
    Trainer: steps 4-6 give the straight run's losses bit for bit."""
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, "a faked H100"))
    common = dict(fp8="rowwise", device="cpu", train_iters=6, lora=LORA, lora_random_base=True)
    straight = Trainer(_cfg(tmp_path / "a", save_iters=3, **common), loader=ToyLoader())
    losses = straight.fit().losses
    assert any(isinstance(m, FrozenFloat8Linear) for m in straight.model.modules())
    ckpt = next((tmp_path / "a").rglob("fm9g_live_checkpoint-3.pt"))
    resumed = Trainer(_cfg(tmp_path / "b", resume_ckpt=str(ckpt), **common), loader=ToyLoader()).fit().losses
    assert resumed == losses[3:], (resumed, losses)


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.fp8
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpu_fp8_tensorwise_trains_close_to_bf16(tmp_path, lora):
    """A few steps of the tiny model on an FP8 GPU (H100 / H200), compiled as a user runs it:
    finite losses within 2 % of the bf16 run step by step, the linears converted."""
    _needs_torchao()
    ok, name = fp8_supported("cuda")
    if not ok:
        pytest.skip(f"{name} has no FP8 tensor cores")
    extra = dict(lora=LORA, lora_random_base=True) if lora else {}
    losses = {}
    for run, value in (("bf16", False), ("fp8", "tensorwise")):
        t = Trainer(_cfg(tmp_path / run, fp8=value, device="cuda", train_iters=8, **extra), loader=ToyLoader())
        losses[run] = t.fit().losses
        converted = [m for m in t.model.modules() if "Float8" in type(m).__name__]
        assert len(converted) == (14 if value else 0)
    assert all(math.isfinite(x) for x in losses["fp8"])
    assert losses["fp8"] == pytest.approx(losses["bf16"], rel=2e-2), losses


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_gpu_frozen_fp8_base_keeps_fp8_on_the_gpu_and_its_weight_in_host_memory(recipe):
    """On an FP8 GPU: placing the layer makes its FP8 copies there and moves the bf16 weight to host
    memory (the GPU holds what bf16 took); cuBLAS's FP8 products are the recipe's (against the
    dequantized copies in fp32), for row counts that are not multiples of 16 too, compiled and eager."""
    ok, name = fp8_supported("cuda")
    if not ok:
        pytest.skip(f"{name} has no FP8 tensor cores")
    rowwise = recipe == "rowwise"
    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 512, dtype=torch.bfloat16).requires_grad_(False)
    layer = FrozenFloat8Linear.from_linear(plain, recipe)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer.cuda()
    assert layer.weight.device.type == "cpu" and layer.weight_fp8.device.type == "cuda"
    assert torch.cuda.memory_allocated() - before < 2 * 256 * 512 + 16384  # two FP8 copies, the bias and scales
    x = torch.randn(37, 256, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(37, 512, dtype=torch.bfloat16, device="cuda")
    xq, xs = fp8._to_fp8(x, torch.float8_e4m3fn, rowwise)
    expected = _dequantized(xq, xs) @ _dequantized(layer.weight_fp8, layer.weight_fp8_scale).t() + layer.bias.float()
    gq, gs = fp8._to_fp8(grad, torch.float8_e4m3fn if rowwise else torch.float8_e5m2, rowwise)
    expected_grad = _dequantized(gq, gs) @ _dequantized(layer.weight_t_fp8, layer.weight_t_fp8_scale).t()
    for run in (layer, torch.compile(layer)):
        xg = x.clone().requires_grad_(True)
        out = run(xg)
        out.backward(grad)
        assert out.dtype == torch.bfloat16
        assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
        assert torch.allclose(xg.grad.float(), expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item())
    full = torch.nn.functional.linear(x, plain.weight.cuda(), plain.bias.cuda())  # and near the bf16 layer
    assert torch.allclose(out.float(), full.float(), rtol=0.1, atol=0.05 * full.abs().max().item())
