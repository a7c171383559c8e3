"""Attention backends: registry, availability errors, agreement with a dense reference."""
from __future__ import annotations

import math

import pytest
import torch

from fm9g.models.attention import (
    ATTENTION_BACKENDS,
    AttentionUnavailableError,
    available_backends,
    backend_status,
    get_attention,
    resolve_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Explicit block-diagonal causal softmax attention, fp64, with the GQA repeat written out."""
    n, h, dh = q.shape
    rep = h // k.shape[1]
    doc = torch.zeros(n, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        doc[a:b] = i
    idx = torch.arange(n)
    allowed = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) / math.sqrt(dh)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)


def _inputs(seed: int = 0, h: int = 4, kv: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cu = [0, 5, 6, 19, 32]
    q = torch.randn(32, h, 16, generator=g)
    k = torch.randn(32, kv, 16, generator=g)
    v = torch.randn(32, kv, 16, generator=g)
    return q, k, v, cu


@pytest.mark.parametrize("name", ["sdpa", "flex"])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_cpu_backends_match_dense_reference(name: str, kv: int) -> None:
    q, k, v, cu = _inputs(kv=kv)
    fn = get_attention(name, "cpu", torch.float32)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    out = fn(q, k, v, cu_t, 13, scale=16 ** -0.5, cache={})
    ref = _dense_reference(q, k, v, cu)
    assert out.shape == q.shape
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_flex_backward_on_cpu_is_a_clear_error() -> None:
    q, k, v, cu = _inputs(seed=1)
    q.requires_grad_()
    with pytest.raises(AttentionUnavailableError, match="no backward on CPU.*sdpa"):
        get_attention("flex")(q, k, v, torch.tensor(cu, dtype=torch.int32), 13, scale=0.25, cache={})


@pytest.mark.gpu
def test_sdpa_and_flex_gradients_agree() -> None:
    q, k, v, cu = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs(seed=1))
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    grads = {}
    for name in ("sdpa", "flex"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = get_attention(name)(qq, kk, vv, cu_t, 13, scale=0.25, cache={})
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        grads[name] = (qq.grad, kk.grad, vv.grad)
    for a, b in zip(grads["sdpa"], grads["flex"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cache_is_shared_across_calls() -> None:
    q, k, v, cu = _inputs()
    cache: dict = {}
    cu_t = torch.tensor(cu, dtype=torch.int32)
    get_attention("flex")(q, k, v, cu_t, 13, scale=0.25, cache=cache)
    mask = cache["flex_block_mask"]
    get_attention("flex")(q, k, v, cu_t, 13, scale=0.25, cache=cache)
    assert cache["flex_block_mask"] is mask


def test_auto_on_cpu_is_sdpa() -> None:
    assert resolve_attention("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
    assert set(available_backends("cpu", torch.float32)) >= {"sdpa", "flex"}


def test_registry_names() -> None:
    assert set(ATTENTION_BACKENDS) == {"sdpa", "flex", "torch_varlen", "flash_attn", "flash_attn_4"}


def test_unavailable_backends_say_why() -> None:
    status = backend_status("cpu", torch.float32)
    assert status["sdpa"] is None
    assert "CUDA" in status["torch_varlen"]
    with pytest.raises(AttentionUnavailableError, match="torch_varlen.*CUDA"):
        resolve_attention("torch_varlen", "cpu", torch.bfloat16)
    import importlib.util

    expected = "pip install" if importlib.util.find_spec("flash_attn_2_cuda") is None else "CUDA only"
    with pytest.raises(AttentionUnavailableError, match=expected):
        resolve_attention("flash_attn", "cpu", torch.bfloat16)
    with pytest.raises(AttentionUnavailableError, match="flash_attn_4.*(pip install flash-attn-4|CUDA only)"):
        resolve_attention("flash_attn_4", "cpu", torch.bfloat16)
    with pytest.raises(AttentionUnavailableError, match="unknown attention backend 'xformers'"):
        get_attention("xformers")
    with pytest.raises(AttentionUnavailableError, match="needs device and dtype"):
        get_attention("auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_agree_with_sdpa(dtype: torch.dtype) -> None:
    q, k, v, cu = (t.cuda().to(dtype) if isinstance(t, torch.Tensor) else t for t in _inputs())
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    ref = get_attention("sdpa")(q, k, v, cu_t, 13, scale=0.25, cache={}).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name in available_backends("cuda", dtype):
        out = get_attention(name, "cuda", dtype)(q, k, v, cu_t, 13, scale=0.25, cache={})
        assert (out.float() - ref).abs().max().item() < tol, name


@pytest.mark.gpu
def test_gpu_varlen_backends_skip_the_empty_documents_of_a_static_layout() -> None:
    """CUDA graphs replay a padded layout (fm9g.models.fm9g.static_layout): trailing empty documents
    and a rounded-up max_seqlen change neither the output nor the gradients of the varlen kernels."""
    from fm9g.models.fm9g import static_layout

    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 70, 75, 300, 512], dtype=torch.int32, device="cuda")
    names = [n for n in ("torch_varlen", "flash_attn", "flash_attn_4") if n in available_backends("cuda", torch.bfloat16)]
    assert "torch_varlen" in names
    for name in names:
        fn = get_attention(name, "cuda", torch.bfloat16)
        results = []
        for padded in (False, True):
            q, k, v = (torch.randn(512, h, 64, generator=g.manual_seed(i)).cuda().bfloat16().requires_grad_()
                       for i, h in ((0, 8), (1, 4), (2, 4)))
            c, m = static_layout(cu, 225, 512) if padded else (cu, 225)
            assert (c.shape[0], m) == ((8, 256) if padded else (5, 225))
            out = fn(q, k, v, c, m, scale=0.125, cache={})
            out.float().square().sum().backward()
            results.append((out.detach(), q.grad, k.grad, v.grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0, msg=name)  # the forward is exact
        for a, b in zip(results[0][1:], results[1][1:]):  # dq adds up blocks in any order (atomics)
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2, msg=name)


@pytest.mark.gpu
@pytest.mark.fa4
def test_gpu_flash_attn_4_matches_torch_varlen_eager_compiled_and_graphed() -> None:
    """flash-attn-4's kernels (installed on the device run) compute what torch's varlen kernels do,
    forward and backward, at a real head size with GQA and mixed document lengths; inside a compiled
    function recorded as a CUDA graph they give the same numbers again, with no graph skipped."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    if "flash_attn_4" not in available_backends("cuda", torch.bfloat16):
        pytest.fail(backend_status("cuda", torch.bfloat16)["flash_attn_4"])  # the device run installs it
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 1024, 2048, 2100, 2101, 3000, 4096], dtype=torch.int32, device="cuda")
    inputs = [torch.randn(4096, h, 128, generator=g).cuda().bfloat16() for h in (16, 4, 4)]

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = fn(q, k, v, cu, 1096, scale=128 ** -0.5, cache={})  # the longest document: 3000..4096
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]

    ref = run(get_attention("torch_varlen"))
    fa4 = run(get_attention("flash_attn_4", "cuda", torch.bfloat16))
    for name, a, b in zip(("out", "dq", "dk", "dv"), fa4, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)
    torch._dynamo.reset()
    counters.clear()
    graphed = torch.compile(get_attention("flash_attn_4"), mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        torch.compiler.cudagraph_mark_step_begin()
        again = run(graphed)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for name, a, b in zip(("out", "dq", "dk", "dv"), again, fa4):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=name)
