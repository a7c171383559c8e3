"""Text generation with a KV cache: :class:`KVCache` and :func:`generate` (``FM9GModel.generate``).

One prefill call runs the (left-aligned) prompts through the model and keeps every layer's
rotated keys and values; each later call feeds one token per row and attends over the cache.
Rows of different lengths are left-aligned: padding sits before a row's first real token, its
keys are masked out for every query, and positions count real tokens only, so a padded row sees
exactly what it would see alone. Nothing here is distributed; it runs wherever the model runs.

Shapes: B rows, T prompt tokens, S cached positions (``T + max_new_tokens`` at most), h / kv
heads of width dh, V vocab.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "generate", "left_align", "select_next"]


class KVCache:
    """The keys and values of every layer for B rows, and which cached positions are real tokens.

    Args:
        num_layers: decoder layers (one key / value buffer each).
        batch: B.
        max_positions: S, the most positions the cache will hold (prompt + new tokens).
        num_kv_heads / dim_head: kv, dh.
        dtype / device: of the buffers (the dtype the layers compute in).

    Each model call first calls :meth:`begin` with the (B, T) mask of real tokens it appends, then
    every layer calls :meth:`attend` in order.
    """

    def __init__(self, num_layers: int, batch: int, max_positions: int, num_kv_heads: int, dim_head: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, num_kv_heads, max_positions, dim_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.real = torch.zeros(batch, max_positions, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0  # positions filled (after the current call's tokens once begin() ran)
        self._start = 0
        self._layer = 0
        self._mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_positions: int, dtype: torch.dtype,
                  device: torch.device | str) -> "KVCache":
        """A cache sized for ``model`` (an FM9GModel: its config gives layers, kv heads and dh)."""
        c = model.config
        return cls(c.num_layers, batch, max_positions, c.num_kv_heads, c.dim_head, dtype, device)

    def begin(self, real: torch.Tensor) -> None:
        """Start a model call that appends T positions; ``real`` (B, T) bool marks real tokens.

        Builds the (B, 1, T, S') attention mask of the call (S' = positions after it): query i may
        see key j when j is a real token no later than i, or j is i itself (so a padding query
        attends to something and stays finite; no real query ever sees padding).
        """
        B, T = real.shape
        start, end = self.length, self.length + T
        if end > self.real.shape[1]:
            raise ValueError(f"the KV cache holds {self.real.shape[1]} positions; {end} were asked for: "
                             "build it with max_positions >= prompt length + max_new_tokens")
        self.real[:, start:end] = real.to(self.real.device)
        q_pos = torch.arange(start, end, device=self.real.device)[:, None]  # (T, 1)
        k_pos = torch.arange(end, device=self.real.device)[None, :]  # (1, S')
        visible = (k_pos <= q_pos)[None] & self.real[:, None, :end]  # (B, T, S')
        self._mask = (visible | (k_pos == q_pos)[None])[:, None]  # (B, 1, T, S')
        self._start, self.length, self._layer = start, end, 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
        """Store this layer's new keys / values and attend over everything cached.

        Args:
            q: (B, T, h, dh) rotated queries; k, v: (B, T, kv, dh) rotated keys and values.
            scale: the softmax scale (1/sqrt(dh)).
        Returns:
            (B, T, h, dh) in q's dtype.
        """
        if self._mask is None:
            raise RuntimeError("KVCache.begin(real) must be called before each model call")
        i, s, e = self._layer, self._start, self.length
        self.keys[i][:, :, s:e] = k.transpose(1, 2).to(self.keys[i].dtype)  # (B, kv, T, dh)
        self.values[i][:, :, s:e] = v.transpose(1, 2).to(self.values[i].dtype)
        self._layer += 1
        kc, vc = self.keys[i][:, :, :e].to(q.dtype), self.values[i][:, :, :e].to(q.dtype)  # (B, kv, S', dh)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=self._mask, scale=scale,
                                             enable_gqa=q.shape[2] != k.shape[2])  # (B, h, T, dh)
        return out.transpose(1, 2)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts moved to the right end of their rows (padding first), with their mask.

    Args:
        input_ids: (B, T) ids, padded anywhere (left or right).
        attention_mask: (B, T), 1 on real tokens; None = every token is real.
    Returns:
        (ids (B, T), real (B, T) bool): each row's real tokens in order, at the end of the row.
    """
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    real = attention_mask.to(torch.bool)
    if real.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(real.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if not bool(real.any(dim=1).all()):
        raise ValueError("every prompt needs at least one real token (a row of attention_mask is all 0)")
    # a stable sort of "is real" puts padding first and keeps each row's tokens in order
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices  # (B, T)
    return input_ids.gather(1, order), real.gather(1, order)


def select_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from its (B, V) logits: argmax, or a draw at ``temperature``
    from the smallest set of tokens whose probability reaches ``top_p``. Returns (B,) int64."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        probs = torch.zeros_like(probs).scatter(1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _eos_set(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the layers compute in: the autocast dtype when autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.input_embedding.weight.dtype


@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue B prompts token by token with a KV cache (the model runs in eval mode meanwhile).

    Args:
        model: an FM9GModel (LoRA applied or merged, any preset).
        input_ids: (B, T) prompts; with ``attention_mask`` (B, T) (1 = real token) rows may be
            padded on either side.
        max_new_tokens: tokens to add at most.
        do_sample / temperature / top_p / generator: see :func:`select_next`.
        eos_token_id: id or ids that end a row; after it the row gets ``pad_token_id``.
        pad_token_id: default the first eos id, else 0.
    Returns:
        (B, T + n) int64: ``input_ids`` as given, then n generated tokens (n stops short of
        ``max_new_tokens`` when every row has ended).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}; add a batch dimension")
    device = model.input_embedding.weight.device
    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    ids, real = left_align(input_ids.to(device), None if attention_mask is None else attention_mask.to(device))
    B, T = ids.shape
    cache = KVCache.for_model(model, B, T + max_new_tokens, _cache_dtype(model, device), device)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    new: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        step_ids, step_real = ids, real
        for _ in range(max_new_tokens):
            cache.begin(step_real)
            logits = model(step_ids, position_ids=positions, kv_cache=cache).logits[:, -1]  # (B, V)
            nxt = select_next(logits, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            if eos:
                done = done | torch.isin(nxt, eos_t)
                if bool(done.all()):
                    break
            step_ids, step_real = nxt[:, None], torch.ones(B, 1, dtype=torch.bool, device=device)
            positions = positions[:, -1:] + 1  # (B, 1)
    finally:
        model.train(was_training)
    out = torch.stack(new, dim=1) if new else ids.new_zeros(B, 0)
    return torch.cat([input_ids.to(device), out], dim=1)
