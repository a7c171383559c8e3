"""The FM9G ("Dragonfly") decoder in plain torch, read top to bottom:

    RMSNorm → rotary embedding → attention (packed, GQA) → gated FFN → block → model → chunked loss

Module and parameter names are the original bmtrain names (docs/model.md), so original `.pt`
checkpoints load with `load_state_dict(strict=True)`:

    input_embedding.weight                                             [V, d]
    encoder.layers.{i}.self_att.layernorm_before_attention.weight      [d]
    encoder.layers.{i}.self_att.self_attention.project_{q,k,v}.weight  [h·dh | kv·dh, d]  (+ .bias if qkv_bias)
    encoder.layers.{i}.self_att.self_attention.attention_out.weight    [d, h·dh]
    encoder.layers.{i}.ffn.layernorm_before_ffn.weight                 [d]
    encoder.layers.{i}.ffn.ffn.w_in.w_0.weight / w_in.w_1.weight       [ff, d]   (gate / up)
    encoder.layers.{i}.ffn.ffn.w_out.weight                            [d, ff]   (down)
    encoder.output_layernorm.weight                                    [d]
    lm_head.weight                                                     [V, d]    (only when untied)

Shapes in comments: B rows of T tokens, N = B·T, d = dim_model, h / kv heads of width dh, V vocab.
No distributed code lives here: engines wrap a built model.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fm9g.models.attention import ATTENTION_BACKENDS, AttentionFn, AttentionUnavailableError, resolve_attention
from fm9g.models.config import FM9GConfig

__all__ = ["FM9GModel", "FM9GOutput", "RMSNorm", "chunked_cross_entropy", "rotary_cos_sin", "apply_rotary",
           "static_layout", "checkpoint_share", "checkpointed_layers"]

IGNORE_INDEX = -100
# Logits computed at once by the chunked loss: chunk = LOSS_CHUNK_ELEMENTS // V tokens. On CPU
# 2**25 (456 tokens for V = 73448; the eager path makes fp32 copies); on CUDA, where the
# elementwise work is fused, 2**27 (1827 tokens, 256 MiB of bf16 logits): fewer, larger matmuls.
LOSS_CHUNK_ELEMENTS = 2**25
LOSS_CHUNK_ELEMENTS_CUDA = 2**27
# The logits the backward may find kept from the forward instead of recomputing them (CUDA only):
# 4096 tokens x V 73448 in bf16 are 0.56 GiB; a 32k row (4.5 GiB) recomputes. Measured: W1 +3.6 %
# tokens/s and 0.8 GB less peak memory than recomputing (benchmarks/RESULTS.md). A constant: the
# `keep_logits_bytes` argument of `chunked_cross_entropy` is how a caller (or a test) chooses otherwise.
LOSS_KEEP_LOGITS_BYTES = 2**30


# ------------------------------------------------------------------------------------ RMSNorm
class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x²) + eps) · weight; the variance is computed in fp32, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------- rotary embedding
def rotary_cos_sin(position_ids: torch.Tensor, dim_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables for rotate-half RoPE, in fp32.

    Computed from the position ids on every forward (cheap, and nothing to cache, so the model
    builds on the meta device and no buffer ever enters a checkpoint).

    Args:
        position_ids: (B, T) integer positions (restarting at 0 for each packed document).
        dim_head: dh (even).
        base: RoPE theta.
    Returns:
        cos, sin: (B, T, dh) float32, with frequencies 1/base^(2i/dh) repeated for both halves.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim_head, 2, dtype=torch.int64, device=position_ids.device).float() / dim_head))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, dh)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, heads, dh) by (B, T, dh) tables; the rotation runs in fp32, result in x's dtype."""
    xf = x.float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------- attention
@dataclass(kw_only=True)
class AttentionContext:
    """Everything the layers share for one forward: the backend and the packing layout."""

    fn: AttentionFn
    cu_seqlens: torch.Tensor  # int32 (n+1,), boundaries over the N flattened tokens
    max_seqlen: int
    cache: dict[str, Any] = field(default_factory=dict)  # backend scratch (masks, host copies)
    kv: Any = None  # generation: a fm9g.models.generate.KVCache that keeps keys / values and attends


class Attention(nn.Module):
    """Grouped-query attention over packed documents; q/k/v optionally biased, output never."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.dim_head = config.num_heads, config.num_kv_heads, config.dim_head
        d, q_dim, kv_dim = config.dim_model, config.num_heads * config.dim_head, config.num_kv_heads * config.dim_head
        self.project_q = nn.Linear(d, q_dim, bias=config.qkv_bias)
        self.project_k = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.project_v = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.attention_out = nn.Linear(q_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_q(x), self.project_k(x), self.project_v(x)
        q = q.view(B, T, self.num_heads, self.dim_head)  # (B, T, h, dh)
        k = k.view(B, T, self.num_kv_heads, self.dim_head)  # (B, T, kv, dh)
        v = v.view(B, T, self.num_kv_heads, self.dim_head)  # (B, T, kv, dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ctx.kv is not None:  # generation: attend over the cached keys / values of earlier calls
            out = ctx.kv.attend(q, k, v, scale=1.0 / math.sqrt(self.dim_head))  # (B, T, h, dh)
            return self.attention_out(out.reshape(B, T, self.num_heads * self.dim_head))
        # Backends see the flattened token stream: (N, heads, dh), documents given by cu_seqlens.
        out = ctx.fn(
            q.reshape(B * T, self.num_heads, self.dim_head),
            k.reshape(B * T, self.num_kv_heads, self.dim_head),
            v.reshape(B * T, self.num_kv_heads, self.dim_head),
            ctx.cu_seqlens,
            ctx.max_seqlen,
            scale=1.0 / math.sqrt(self.dim_head),
            cache=ctx.cache,
        )  # (N, h, dh)
        return self.attention_out(out.reshape(B, T, self.num_heads * self.dim_head))  # (B, T, d)


class SelfAttentionBlock(nn.Module):
    """Pre-norm attention branch: attention(RMSNorm(x)); the residual is added by the layer."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.layernorm_before_attention = RMSNorm(config.dim_model, config.eps)
        self.self_attention = Attention(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.self_attention(self.layernorm_before_attention(x), cos, sin, ctx)


# ------------------------------------------------------------------------------------------ FFN
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class GatedInput(nn.Module):
    """The two input projections of the gated FFN: w_0 (gate) and w_1 (up), no bias."""

    def __init__(self, dim_model: int, dim_ff: int) -> None:
        super().__init__()
        self.w_0 = nn.Linear(dim_model, dim_ff, bias=False)
        self.w_1 = nn.Linear(dim_model, dim_ff, bias=False)


class FeedForward(nn.Module):
    """w_out(act(w_0 x) ⊙ w_1 x)."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[config.activate_fn]
        self.w_in = GatedInput(config.dim_model, config.dim_ff)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        gate, up = self.w_in.w_0(x), self.w_in.w_1(x)
        return self.w_out(self.act(gate) * up)  # inner (B, T, ff)


class FFNBlock(nn.Module):
    """Pre-norm FFN branch: ffn(RMSNorm(x))."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.layernorm_before_ffn = RMSNorm(config.dim_model, config.eps)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.layernorm_before_ffn(x))


# ---------------------------------------------------------------------------------------- block
class TransformerBlock(nn.Module):
    """h = h + α·attn(norm(h)); h = h + α·ffn(norm(h)), α = scale_depth/√L if scale_depth > 0 else 1."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.self_att = SelfAttentionBlock(config)
        self.ffn = FFNBlock(config)
        self.residual_scale = config.residual_scale if config.scale_depth > 0 else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        a = self.self_att(h, cos, sin, ctx)  # (B, T, d)
        h = h + (a if self.residual_scale is None else a * self.residual_scale)
        f = self.ffn(h)  # (B, T, d)
        return h + (f if self.residual_scale is None else f * self.residual_scale)


class Encoder(nn.Module):
    """The layer stack and the final norm (bmtrain's `encoder`)."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.output_layernorm = RMSNorm(config.dim_model, config.eps)


# ---------------------------------------------------------------------------------- chunked loss
def _ce_chunk_forward(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, V) logits in the compute dtype, (c,) labels -> per-token loss and log-sum-exp, fp32+."""
    acc = logits.float() if logits.dtype != torch.float64 else logits
    lse = torch.logsumexp(acc, dim=-1)  # (c,)
    target = acc.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)  # (c,)
    return torch.where(labels != IGNORE_INDEX, lse - target, torch.zeros_like(lse)), lse


def _ce_chunk_grad(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d logits = (softmax - onehot(label)) · grad, zero for ignored tokens; in logits' dtype."""
    acc = logits.float() if logits.dtype != torch.float64 else logits
    probs = torch.exp(acc - lse[:, None])  # (c, V)
    onehot = torch.arange(acc.shape[1], device=acc.device)[None, :] == labels[:, None]
    g = torch.where(labels != IGNORE_INDEX, grad.to(lse.dtype), torch.zeros_like(lse))  # (c,)
    return ((probs - onehot.to(probs.dtype)) * g[:, None]).to(logits.dtype)


def _ce_chunk_grad_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor) -> None:
    """:func:`_ce_chunk_grad` written over the logits themselves (kept logits become d loss / d logits)."""
    logits.copy_(_ce_chunk_grad(logits, lse, labels, grad))


_FUSED_CE: dict[str, Any] = {}


def _ce_kernels(device: torch.device) -> tuple[Any, Any, Any]:
    """The per-chunk elementwise work (forward, gradient, gradient in place), fused by
    torch.compile on CUDA (one pass over the logits instead of five); plain eager code elsewhere
    (CPU tests, fp64 gradcheck)."""
    if device.type != "cuda":
        return _ce_chunk_forward, _ce_chunk_grad, _ce_chunk_grad_
    if not _FUSED_CE:
        _FUSED_CE["fwd"] = torch.compile(_ce_chunk_forward, dynamic=False)
        _FUSED_CE["grad"] = torch.compile(_ce_chunk_grad, dynamic=False)
        _FUSED_CE["grad_"] = torch.compile(_ce_chunk_grad_, dynamic=False)
    return _FUSED_CE["fwd"], _FUSED_CE["grad"], _FUSED_CE["grad_"]


def _keeps_logits(n_logits: int, dtype: torch.dtype, limit_bytes: int) -> bool:
    """Whether the loss keeps all logits of the step for its backward: when they fit ``limit_bytes``."""
    return n_logits * torch.finfo(dtype).bits // 8 <= limit_bytes


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of (h @ Wᵀ) computed chunk by chunk, forward and backward.

    Two ways to the backward. Where the step's logits fit LOSS_KEEP_LOGITS_BYTES (CUDA; 0.56 GiB
    for 4096 tokens at V 73448 in bf16) they are kept in one (N, V) buffer, which the backward
    turns into d loss / d logits in place; d h and d W are then one GEMM each over all tokens.
    Otherwise only one chunk of logits (c × V, compute dtype) is alive at a time and the backward
    recomputes each chunk's logits from the saved hidden states and per-token log-sum-exp.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int, compute_dtype: torch.dtype, keep_logits_bytes: int) -> torch.Tensor:
        # h (N, d), weight (V, d), labels (N elements, any shape) -> token_loss (labels' shape) fp32
        shape, labels = labels.shape, labels.reshape(-1)
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32 (fp64 stays fp64 for gradcheck)
        fwd = _ce_kernels(h.device)[0]
        n = h.shape[0]
        # allocated in the labels' shape and filled through a flat view: the output is no view itself
        # (FSDP2 warns about a root module returning views)
        token_loss_out = torch.empty(shape, dtype=acc, device=h.device)
        token_loss = token_loss_out.view(-1)
        lse = torch.empty(n, dtype=acc, device=h.device)
        kept = None
        if any(ctx.needs_input_grad[:2]) and _keeps_logits(n * weight.shape[0], compute_dtype, keep_logits_bytes):
            kept = torch.empty(n, weight.shape[0], dtype=compute_dtype, device=h.device)  # (N, V)
        for s in range(0, n, chunk_tokens):
            e = min(n, s + chunk_tokens)
            hc = h[s:e].to(compute_dtype)
            logits = torch.matmul(hc, w.t(), out=kept[s:e]) if kept is not None else hc @ w.t()  # (c, V)
            token_loss[s:e], lse[s:e] = fwd(logits, labels[s:e])
            del logits
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk_tokens, ctx.compute_dtype, ctx.kept_logits = chunk_tokens, compute_dtype, kept
        return token_loss_out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, labels, lse = ctx.saved_tensors
        grad_out = grad_out.reshape(-1)
        cd, chunk_tokens = ctx.compute_dtype, ctx.chunk_tokens
        w = weight.to(cd)
        _, grad_fn, grad_fn_ = _ce_kernels(h.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        kept, ctx.kept_logits = ctx.kept_logits, None
        if kept is not None:  # the logits of every token: d logits in place, then one GEMM each
            for s in range(0, n, chunk_tokens):
                e = min(n, s + chunk_tokens)
                grad_fn_(kept[s:e], lse[s:e], labels[s:e], grad_out[s:e])
            grad_h = (kept @ w).to(h.dtype) if need_h else None  # (N, d)
            grad_w = (kept.t() @ h.to(cd)).to(weight.dtype) if need_w else None  # (V, d)
            return grad_h, grad_w, None, None, None, None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for s in range(0, n, chunk_tokens):
            e = min(n, s + chunk_tokens)
            hc = h[s:e].to(cd)
            dlogits = grad_fn(hc @ w.t(), lse[s:e], labels[s:e], grad_out[s:e])  # (c, V) in cd
            if need_h:
                grad_h[s:e] = (dlogits @ w).to(h.dtype)  # (c, d)
            if need_w:
                grad_w += (dlogits.t() @ hc).to(grad_w.dtype)  # (V, d)
            del dlogits
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int | None = None, *, keep_logits_bytes: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy of the logits `h @ weight.T` without materialising all of them.

    Args:
        h: (N, d) hidden states (already normalised / muP-scaled).
        weight: (V, d) output embedding.
        labels: N target ids in any shape ((N,), (B, T), ...), -100 = ignored.
        chunk_tokens: tokens per chunk (default LOSS_CHUNK_ELEMENTS // V, LOSS_CHUNK_ELEMENTS_CUDA // V on CUDA).
        keep_logits_bytes: keep all logits for the backward (one GEMM each for d h and d W) when
            they fit this many bytes, else recompute them chunk by chunk; default
            LOSS_KEEP_LOGITS_BYTES on CUDA, 0 (recompute) elsewhere.
    Returns:
        float32 losses in the shape of ``labels``, 0 where the label is -100; differentiable
        w.r.t. h and weight.
    """
    if chunk_tokens is None:
        per_chunk = LOSS_CHUNK_ELEMENTS_CUDA if h.device.type == "cuda" else LOSS_CHUNK_ELEMENTS
        chunk_tokens = max(1, per_chunk // weight.shape[0])
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    if keep_logits_bytes is None:
        keep_logits_bytes = LOSS_KEEP_LOGITS_BYTES if h.is_cuda else 0
    return _ChunkedLinearCrossEntropy.apply(h, weight, labels, int(chunk_tokens), dtype, int(keep_logits_bytes))


# ------------------------------------------------------------------------------ packing layout
STATIC_LAYOUT_MIN_BOUNDS = 8


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def static_layout(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> tuple[torch.Tensor, int]:
    """The packing layout padded to one of a few shapes, for layers replayed as CUDA graphs.

    A recorded graph replays one shape; packed rows differ in their number of documents and their
    longest one. The boundaries are padded to the next power of two (at least 8) by repeating the
    last one (empty documents, which attention skips), and ``max_seqlen`` is rounded up to the next
    power of two, at most ``total`` (an upper bound only sizes the attention kernel's grid). A 4096
    row then has at most 10 boundary counts and 13 lengths, whatever the data.

    Args:
        cu_seqlens: int32 (n+1,) boundaries, on the device.
        max_seqlen: the longest document.
        total: the flattened token count (the last boundary).
    Returns:
        (boundaries (m,) with m a power of two >= n+1, the rounded max_seqlen).
    """
    n_bounds = cu_seqlens.shape[0]
    want = max(_next_pow2(n_bounds), STATIC_LAYOUT_MIN_BOUNDS)
    if want > n_bounds:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((want - n_bounds,), total)])
    return cu_seqlens, min(_next_pow2(max(int(max_seqlen), 1)), total)


# ---------------------------------------------------------------------------------------- model
@dataclass(kw_only=True)
class FM9GOutput:
    """What `FM9GModel.forward` returns.

    Attributes:
        loss: scalar fp32 mean over labelled tokens (None without labels; 0.0 if none labelled).
        logits: (B, T, V) in the compute dtype, when labels is None or return_logits=True.
        token_loss: (B, T) fp32 per-token loss, 0 where the label is -100 (None without labels).
        num_label_tokens: int64 scalar tensor, tokens with a label (None without labels).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None


def checkpoint_share(value: bool | float) -> bool | float:
    """An activation-checkpointing setting as ``True``, ``False`` or a fraction strictly between 0 and 1
    (0 and 1 become ``False`` / ``True``).

    Raises:
        ValueError: a number outside [0, 1], or not a number.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"use_checkpoint must be true, false or the share of decoder layers to recompute "
                         f"(a number in [0, 1], e.g. 0.5), got {value!r}")
    return True if value == 1 else (False if value == 0 else float(value))


def checkpointed_layers(num_layers: int, share: bool | float) -> list[bool]:
    """Which of ``num_layers`` layers recompute their activations for a setting ``share``
    (:func:`checkpoint_share`): all, none, or ``round(share * num_layers)`` of them spread evenly
    (layer ``i`` when ``floor((i + 1) * k / L) > floor(i * k / L)``: 0.5 of 4 layers -> the 2nd and 4th)."""
    share = checkpoint_share(share)
    k = num_layers if share is True else 0 if share is False else round(share * num_layers)
    return [(i + 1) * k // num_layers > i * k // num_layers for i in range(num_layers)]


class FM9GModel(nn.Module):
    """The FM9G decoder (docs/model.md) with bmtrain parameter names.

    Args:
        config: the hyper-parameters. Parameters are created in torch's default dtype on the
            current default device (so `with torch.device("meta"): FM9GModel(cfg)` builds a 70B
            skeleton without memory) and initialised with `init_weights()`.
    """

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        self.config = config
        if config.attn_impl == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
            raise AttentionUnavailableError(
                "config.attn_impl='flash_attn' but flash-attn is not installed: "
                "install it with `pip install 'fm9g[ampere]'` (A100 / A800; docs/install.md), or use attn_impl='auto'"
            )
        self.input_embedding = nn.Embedding(config.vocab_size, config.dim_model)  # (V, d)
        self.encoder = Encoder(config)
        self.lm_head = None if config.tie_lm_head else nn.Linear(config.dim_model, config.vocab_size, bias=False)
        self.gradient_checkpointing: bool | float = bool(config.use_checkpoint)
        self.loss_chunk_tokens: int | None = None  # None → LOSS_CHUNK_ELEMENTS // V
        # Set by an engine that compiled the layers to replay as CUDA graphs (TrainConfig.cuda_graphs):
        # a graph is recorded once per shape, so under grad the packing layout is padded to a few
        # shapes (static_layout()); without grad (generation, evaluation: a new length every call)
        # the layers run eagerly instead of recording a graph per length.
        self.graphed_layers = False
        self._attn_cache: dict[tuple[str, str, torch.dtype], str] = {}
        self.init_weights()

    # -------------------------------------------------------------- setup
    @torch.no_grad()
    def init_weights(self) -> None:
        """The original init: every Linear weight and bias ~ N(0, σ) with σ = init_std/√scale_width if
        `scale` else init_std; embeddings (input and untied lm_head) ~ N(0, init_std); norms = 1."""
        cfg = self.config
        linear_std = cfg.init_std / math.sqrt(cfg.scale_width) if cfg.scale else cfg.init_std
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, linear_std)
                if module.bias is not None:
                    module.bias.normal_(0.0, linear_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.input_embedding.weight.normal_(0.0, cfg.init_std)
        if self.lm_head is not None:
            self.lm_head.weight.normal_(0.0, cfg.init_std)

    def set_activation_checkpointing(self, enabled: bool | float) -> None:
        """Recompute the layers' activations in backward (torch.utils.checkpoint, non-reentrant):
        ``True`` every layer, ``False`` none, a fraction in (0, 1) that share of the layers, spread
        evenly (:func:`checkpointed_layers`)."""
        self.gradient_checkpointing = checkpoint_share(enabled)

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, d) output projection: lm_head.weight, or the input embedding when tied."""
        return self.input_embedding.weight if self.lm_head is None else self.lm_head.weight

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend name `config.attn_impl` resolves to on (device, dtype) (cached)."""
        key = (self.config.attn_impl, device.type, dtype)
        name = self._attn_cache.get(key)
        if name is None:
            name = resolve_attention(self.config.attn_impl, device, dtype)
            self._attn_cache[key] = name
        return name

    # -------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool | None = None,
        max_seqlen: int | None = None,
        kv_cache: Any = None,
    ) -> FM9GOutput:
        """Run packed rows through the decoder.

        Args:
            input_ids: (B, T) token ids.
            position_ids: (B, T) positions; None → 0..T-1 per row, or restarting per document
                when cu_seqlens is given.
            cu_seqlens: int (n+1,) document boundaries over the flattened B·T tokens (0 first,
                B·T last); None → each row is one causal sequence. Documents never attend to
                each other.
            labels: (B, T) targets already aligned with positions (position j predicts
                labels[j]; no shift), -100 ignored.
            return_logits: also return logits when labels are given (default: only without labels).
            max_seqlen: longest document, if the caller knows it (saves nothing but a reduction).
            kv_cache: a :class:`fm9g.models.generate.KVCache` (generation; see :meth:`generate`):
                the rows attend over the cached tokens plus these, which are appended; needs
                ``position_ids``, no ``cu_seqlens`` or labels; logits of the last position only (B, 1, V).
        Returns:
            FM9GOutput(loss, logits, token_loss, num_label_tokens).
        """
        cfg = self.config
        B, T = input_ids.shape
        N = B * T
        device = input_ids.device
        cache: dict[str, Any] = {}
        if cu_seqlens is None:
            cu = torch.arange(0, N + 1, T, dtype=torch.int32, device=device)
            max_len = T
            if position_ids is None:
                position_ids = torch.arange(T, device=device).expand(B, T)
        else:
            # The layout is validated on the host: free when cu_seqlens is a host tensor, one sync
            # when it is already on the device and max_seqlen is not given. A caller that staged
            # it on the device and passes max_seqlen (the engines, from the packer) skips the check
            # and the wait for the device it would cost on every forward.
            on_host = cu_seqlens.device.type == "cpu"
            cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
            max_len = None
            if on_host or max_seqlen is None:
                bounds = cu_seqlens.tolist()
                if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != N or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
                    raise ValueError(
                        f"cu_seqlens must rise from 0 to B*T={N} over the flattened tokens, got {bounds[:8]}"
                        f"{'...' if len(bounds) > 8 else ''} (length {len(bounds)})"
                    )
                max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
            if position_ids is None:
                flat = torch.arange(N, device=device)
                doc = torch.searchsorted(cu[1:].long(), flat, right=True)  # (N,) document of each token
                position_ids = (flat - cu.long()[doc]).view(B, T)
        if max_seqlen is not None:
            max_len = int(max_seqlen)
        graphs = self.graphed_layers and torch.is_grad_enabled()
        if graphs:
            cu, max_len = static_layout(cu, max_len, N)

        # 1. embedding (× scale_emb under muP)
        h = self.input_embedding(input_ids)  # (B, T, d)
        if cfg.scale:
            h = h * cfg.scale_emb
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        ctx = AttentionContext(
            fn=ATTENTION_BACKENDS[self.attention_backend(device, compute_dtype)].fn,
            cu_seqlens=cu,
            max_seqlen=max_len,
            cache=cache,
            kv=kv_cache,
        )
        cos, sin = rotary_cos_sin(position_ids.to(device), cfg.dim_head, cfg.base)  # (B, T, dh) fp32

        # 2. layers (optionally recomputed in backward)
        share = self.gradient_checkpointing if torch.is_grad_enabled() else False
        use_ckpt = checkpointed_layers(len(self.encoder.layers), share)
        for layer, recompute in zip(self.encoder.layers, use_ckpt):
            if recompute:
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            elif self.graphed_layers and not graphs:
                h = layer._call_impl(h, cos, sin, ctx)  # the layer's own forward, not its compiled graphs
            else:
                h = layer(h, cos, sin, ctx)

        # 3. final norm; 4. head input ÷ scale_width under muP
        h = self.encoder.output_layernorm(h)  # (B, T, d)
        if cfg.scale:
            h = h / cfg.scale_width
        weight = self.output_weight  # (V, d)
        if kv_cache is not None:
            h = h[:, -1:]  # (B, 1, d): generation reads the next-token logits only

        out = FM9GOutput()
        if labels is not None:
            token_loss = chunked_cross_entropy(h.reshape(N, -1), weight, labels.reshape(B, T).to(device),
                                               self.loss_chunk_tokens)  # (B, T) fp32
            count = (labels != IGNORE_INDEX).sum()
            out.token_loss = token_loss
            out.num_label_tokens = count
            out.loss = token_loss.sum() / count.clamp(min=1).to(device)
        if labels is None or return_logits:
            out.logits = F.linear(h, weight)  # (B, T, V)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue prompts with a KV cache, greedy by default (:func:`fm9g.models.generate.generate`:
        arguments, padding, sampling). input_ids (B, T), attention_mask (B, T) 1 = real token.

        Returns:
            (B, T + n) int64: the prompts, then n <= max_new_tokens generated tokens per row.
        """
        from fm9g.models.generate import generate

        return generate(self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        eos_token_id=eos_token_id, attention_mask=attention_mask, pad_token_id=pad_token_id,
                        generator=generator)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.num_layers}, d={c.dim_model}, heads={c.num_heads}/{c.num_kv_heads}, "
                f"V={c.vocab_size}, tied={c.tie_lm_head}, muP={c.scale}")
