"""Packed (varlen) causal attention backends, chosen from a registry by name.

Every backend computes the same function: causal softmax attention inside each document of a
packed token stream, with no attention across document boundaries ("block-diagonal causal").

    out = backend(q, k, v, cu_seqlens, max_seqlen, scale=1/√dh, cache={})

    q:          [N, h,  dh]   N = all tokens of the batch, flattened (B*T)
    k, v:       [N, kv, dh]   kv divides h (grouped-query attention; no repeat needed by the caller)
    cu_seqlens: int32 [n+1]   document boundaries over the N tokens, 0 first, N last
    max_seqlen: int           longest document
    cache:      dict          per-forward scratch space shared by all layers (masks, host copies)
    returns     [N, h, dh]    in q's dtype

Backends: `sdpa` (reference; any device/dtype), `flex` (FlexAttention with a document mask;
compiled on CUDA, eager elsewhere), `torch_varlen` (`torch.nn.attention.varlen.varlen_attn`, CUDA,
fp16/bf16), `flash_attn` (flash-attn's `flash_attn_varlen_func`, CUDA, fp16/bf16, if installed),
`flash_attn_4` (flash-attn-4's CuTe kernels, Hopper/Blackwell GPUs, fp16/bf16, if installed).
`"auto"` picks the fastest one that works for the tensors' device and dtype.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionBackend",
    "AttentionUnavailableError",
    "ATTENTION_BACKENDS",
    "AUTO_ORDER",
    "backend_status",
    "get_attention",
    "resolve_attention",
    "available_backends",
]


class AttentionUnavailableError(RuntimeError):
    """The requested attention backend cannot run here; the message says why and what to install."""


class AttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        scale: float,
        cache: dict[str, Any],
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------- sdpa
# Not traced by torch.compile: the per-document loop runs over Python ints that change with every
# packing layout, and tracing it would recompile for each new layout. Compiled layers break the
# graph here and run this one function eagerly.
@torch.compiler.disable
def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float,
    cache: dict[str, Any],
) -> torch.Tensor:
    """Reference backend: `F.scaled_dot_product_attention(is_causal=True)` once per document.

    Running each document on its own is exactly the block-diagonal causal mask, needs no [N, N]
    mask in memory, and gives bit-identical results to running the document alone.
    """
    # Python ints for the loop (a host sync on CUDA; this is the reference backend). Deliberately
    # not kept in `cache`: compiled layers would guard on the list and recompile per layout.
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        # (1, h, t, dh) per document
        qd = q[start:end].transpose(0, 1).unsqueeze(0)
        kd = k[start:end].transpose(0, 1).unsqueeze(0)
        vd = v[start:end].transpose(0, 1).unsqueeze(0)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(od.squeeze(0).transpose(0, 1))  # (t, h, dh)
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------- flex
@lru_cache(maxsize=None)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float,
    cache: dict[str, Any],
) -> torch.Tensor:
    """FlexAttention with a document-causal block mask (built once per forward, shared by layers)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise AttentionUnavailableError(
            "FlexAttention has no backward on CPU (torch raises NotImplementedError); "
            "use attn_impl='sdpa' for CPU training, or run under torch.no_grad()"
        )
    n = q.shape[0]
    # Flex's CUDA kernels work in 128-token blocks; lengths that are not a multiple of 128 fail to
    # lower on some torch versions, so pad the stream: the padding is one more document that no
    # real token can see, and its outputs are dropped.
    pad = (-n) % FLEX_BLOCK
    total = n + pad
    block_mask = cache.get("flex_block_mask")
    if block_mask is None:
        positions = torch.arange(total, device=q.device)
        # document id of every token: (N + pad,); padding tokens get id = number of documents
        doc = torch.searchsorted(cu_seqlens[1:].to(q.device, torch.int64), positions, right=True)

        def document_causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document_causal, None, None, total, total, device=q.device)
        cache["flex_block_mask"] = block_mask
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))  # (N + pad, heads, dh)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    # (1, h, N + pad, dh)
    out = fn(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)[:n]


FLEX_BLOCK = 128


# ------------------------------------------------------------------------------- torch_varlen
@lru_cache(maxsize=None)
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float,
    cache: dict[str, Any],
) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn` (flash kernels in torch itself; CUDA, fp16/bf16).

    The keyword for causality changed between torch releases (`is_causal=True` in 2.10,
    `window_size=(-1, 0)` later); GQA is native where `enable_gqa` exists, else k/v are repeated.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise AttentionUnavailableError("this torch's varlen_attn has no `scale` argument; use attn_impl='sdpa'")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


# --------------------------------------------------------------------------------- flash_attn
def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float,
    cache: dict[str, Any],
) -> torch.Tensor:
    """flash-attn's `flash_attn_varlen_func` (causal, GQA native), as the original FM9G code used."""
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                  softmax_scale=scale, causal=True,
                                  deterministic=torch.are_deterministic_algorithms_enabled())


# ------------------------------------------------------------------------------- flash_attn_4
# flash-attn-4 (`pip install flash-attn-4`: CuTe-DSL kernels compiled on first use, Hopper and
# Blackwell) behind two custom ops: compiled layers treat them as opaque calls (dynamo does not
# trace into the DSL) and CUDA graphs record their launches like any other kernel.
@torch.library.custom_op("fm9g::flash_attn_4_forward", mutates_args=())
def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    result = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                             max_seqlen_k=max_seqlen, softmax_scale=scale, causal=True, return_lse=True)
    return result[0], result[1].contiguous()  # out [N,h,dh], lse [h,N] fp32


@_fa4_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fm9g::flash_attn_4_backward", mutates_args=())
def _fa4_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    grads = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, softmax_scale=scale, causal=True,
                            cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                            max_seqlen_k=max_seqlen, deterministic=torch.are_deterministic_algorithms_enabled())
    return grads[0], grads[1], grads[2]


@_fa4_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _fa4_grad(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_fa4_forward.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)


def flash_attn_4_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float,
    cache: dict[str, Any],
) -> torch.Tensor:
    """flash-attn-4's varlen kernels (causal, GQA native); on Hopper they are FA3-class (wgmma, TMA)."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _fa4_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_seqlen), float(scale))[0]


# ----------------------------------------------------------------------------------- registry
_HALF = (torch.float16, torch.bfloat16)


def _check_sdpa(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _check_flex(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention; install torch >= 2.5"
    return None


def _check_torch_varlen(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen; install torch >= 2.10"
    if device.type != "cuda":
        return f"varlen_attn runs on CUDA only (tensors are on {device.type}); use attn_impl='sdpa' or 'flex'"
    if dtype not in _HALF:
        return f"varlen_attn needs fp16/bf16 tensors, got {dtype}; use attn_impl='sdpa' or 'flex' for fp32"
    return None


def _check_flash_attn(device: torch.device, dtype: torch.dtype) -> str | None:
    # flash-attn 2's compiled kernels (flash-attn-4 installs a `flash_attn` package without them)
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn_2_cuda") is None:
        return ("flash-attn is not installed; install it with `pip install 'fm9g[ampere]'` (flash-attn 2, for A100 / A800; "
                "it builds from source: docs/install.md), or use attn_impl='auto'")
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only (tensors are on {device.type}); use attn_impl='sdpa'"
    if dtype not in _HALF:
        return f"flash-attn needs fp16/bf16 tensors, got {dtype}; use attn_impl='sdpa' or 'flex' for fp32"
    return None


@lru_cache(maxsize=None)
def _flash_attn_4_import_error() -> str | None:
    """None when flash-attn-4's kernels import, else why not (imported once: it loads the CuTe DSL)."""
    try:
        importlib.import_module("flash_attn.cute.interface")
    except Exception as e:  # noqa: BLE001 - any failure of the DSL stack means the backend cannot run
        return (f"flash-attn-4 is installed but does not import ({type(e).__name__}: {e}); "
                "reinstall it with `pip install -U flash-attn-4` or use attn_impl='torch_varlen'")
    return None


def _check_flash_attn_4(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        installed = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn at all, or a flash_attn package whose __init__ fails
        installed = False
    if not installed:
        return ("flash-attn-4 is not installed; install it with `pip install 'fm9g[gpu]'` (or `pip install flash-attn-4`; "
                "Hopper/Blackwell GPUs)")
    if device.type != "cuda":
        return f"flash-attn-4 runs on CUDA only (tensors are on {device.type}); use attn_impl='sdpa'"
    if dtype not in _HALF:
        return f"flash-attn-4 needs fp16/bf16 tensors, got {dtype}; use attn_impl='sdpa' or 'flex' for fp32"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return (f"flash-attn-4 runs on Hopper (SM 9.x) and Blackwell (SM 10.x) GPUs, this one is SM {major}.{minor}; "
                "use attn_impl='torch_varlen'")
    return _flash_attn_4_import_error()


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """One registry entry: the function and a check returning why it cannot run (None = it can)."""

    name: str
    fn: AttentionFn
    check: Callable[[torch.device, torch.dtype], str | None]


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(name="sdpa", fn=sdpa_attention, check=_check_sdpa),
    "flex": AttentionBackend(name="flex", fn=flex_attention_varlen, check=_check_flex),
    "torch_varlen": AttentionBackend(name="torch_varlen", fn=torch_varlen_attention, check=_check_torch_varlen),
    "flash_attn": AttentionBackend(name="flash_attn", fn=flash_attn_varlen, check=_check_flash_attn),
    "flash_attn_4": AttentionBackend(name="flash_attn_4", fn=flash_attn_4_varlen, check=_check_flash_attn_4),
}

# "auto" preference, fastest first (flash-attn-4 measured ahead of torch's FA2 kernels on an H200:
# W1 +3.9 %, W2 +2.6 %, benchmarks/RESULTS.md 2026-12-05; it compiles its kernels on first use). flex is not in the list:
# it compiles on first use (tens of seconds) and is worth choosing explicitly; sdpa always works.
AUTO_ORDER: tuple[str, ...] = ("flash_attn_4", "flash_attn", "torch_varlen", "sdpa")


def backend_status(device: torch.device | str, dtype: torch.dtype) -> dict[str, str | None]:
    """For every backend, None if it can run on (device, dtype), else the reason it cannot."""
    device = torch.device(device)
    return {name: b.check(device, dtype) for name, b in ATTENTION_BACKENDS.items()}


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Names of the backends that can run on (device, dtype)."""
    return [name for name, why in backend_status(device, dtype).items() if why is None]


def resolve_attention(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend name for `name` ("auto" or a registry name) on (device, dtype).

    Raises:
        AttentionUnavailableError: `name` is unknown, or cannot run here (with the reason).
    """
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER:
            if ATTENTION_BACKENDS[candidate].check(device, dtype) is None:
                return candidate
        return "sdpa"
    backend = ATTENTION_BACKENDS.get(name)
    if backend is None:
        raise AttentionUnavailableError(
            f"unknown attention backend {name!r}; choose one of {['auto', *ATTENTION_BACKENDS]}"
        )
    why = backend.check(device, dtype)
    if why is not None:
        raise AttentionUnavailableError(f"attention backend {name!r} cannot run: {why}")
    return name


def get_attention(name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AttentionFn:
    """The attention function registered as `name`.

    Args:
        name: a registry name, or "auto" (then `device` and `dtype` are required).
        device, dtype: when given, the backend is checked to run there (else an error says why).
    Returns:
        a function `(q [N,h,dh], k [N,kv,dh], v [N,kv,dh], cu_seqlens, max_seqlen, *, scale, cache) -> [N,h,dh]`.
    Raises:
        AttentionUnavailableError: unknown name, or the backend cannot run on (device, dtype).
    """
    if device is None or dtype is None:
        if name == "auto":
            raise AttentionUnavailableError("get_attention('auto') needs device and dtype to choose a backend")
        if name not in ATTENTION_BACKENDS:
            raise AttentionUnavailableError(
                f"unknown attention backend {name!r}; choose one of {['auto', *ATTENTION_BACKENDS]}"
            )
        return ATTENTION_BACKENDS[name].fn
    return ATTENTION_BACKENDS[resolve_attention(name, device, dtype)].fn
