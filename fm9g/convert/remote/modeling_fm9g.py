# coding=utf-8
"""Hugging Face modeling for FM9G (九格) checkpoints exported by `fm9g` with format="fm9g".

Standalone remote code: imports only `torch` and `transformers`; loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. It deliberately avoids the
parts of the transformers API that changed between 4.44 and 5.x (attention interfaces, rotary
buffers, mask utilities): attention is plain `scaled_dot_product_attention` with an explicit mask,
rotary tables are computed on the fly, and the KV cache is a `DynamicCache` (or a legacy tuple).

Architecture (pre-norm Llama layout, parameter names as in Llama):

    h = embed(x) * (scale_emb if scale else 1)                        # (B, T, d)
    for each layer:
        h = h + r * o_proj(attn(rope(q), rope(k), v))                 # r = scale_depth/sqrt(L) if scale_depth > 0 else 1
        h = h + r * down_proj(silu(gate_proj(n)) * up_proj(n))        # n = RMSNorm(h)
    logits = lm_head(RMSNorm(h) / (hidden_size/dim_model_base if scale else 1))
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 4.50 no longer mixes generation into PreTrainedModel
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover
    from transformers.generation import GenerationMixin

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover - very old transformers
    DynamicCache = None

import transformers

from .configuration_fm9g import FM9GConfig

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers >= 5.2x calls the KV cache `cache` (in model kwargs and output fields); older
# releases call it `past_key_values`. We accept both and answer in the installed spelling.
_CACHE_NAME = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _residual_scale(config: FM9GConfig) -> float:
    """Multiplier of every residual branch: scale_depth/sqrt(L) when scale_depth > 0, else 1."""
    if config.scale_depth is not None and config.scale_depth > 0:
        return float(config.scale_depth) / math.sqrt(config.num_hidden_layers)
    return 1.0


class FM9GRMSNorm(nn.Module):
    """RMSNorm: the variance in fp32, the result cast back to the input dtype, then times weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def _rope_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """cos/sin tables for rotate-half RoPE. position_ids (B, T) -> cos, sin (B, 1, T, dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, nh, T, hs); rotation in fp32 as the original does, then back to x's dtype
    dtype = x.dtype
    xf = x.to(torch.float32)
    return (xf * cos + _rotate_half(xf) * sin).to(dtype)


class FM9GAttention(nn.Module):
    def __init__(self, config: FM9GConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        bias = bool(config.attention_bias)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x, position_ids, mask, past_key_value=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = _rope_cos_sin(position_ids, self.head_dim, self.rope_theta, torch.float32)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)  # (B, nkv, S, hs), S = past + T
        if self.num_kv_heads != self.num_heads:  # GQA: repeat each kv head for its group of q heads
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class FM9GMLP(nn.Module):
    def __init__(self, config: FM9GConfig) -> None:
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FM9GDecoderLayer(nn.Module):
    def __init__(self, config: FM9GConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = FM9GAttention(config, layer_idx)
        self.mlp = FM9GMLP(config)
        self.input_layernorm = FM9GRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = FM9GRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = _residual_scale(config)

    def forward(self, h, position_ids, mask, past_key_value=None):
        h = h + self.self_attn(self.input_layernorm(h), position_ids, mask, past_key_value) * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h


class FM9GPreTrainedModel(PreTrainedModel):
    config_class = FM9GConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FM9GDecoderLayer"]
    _supports_cache_class = True
    _supports_static_cache = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, FM9GRMSNorm):
            nn.init.ones_(module.weight)


def _cache_from_legacy(past: Any) -> Any:
    """A DynamicCache from the old tuple-of-(k, v)-per-layer format."""
    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(past)
    cache = DynamicCache()
    for i, (k, v) in enumerate(past):
        cache.update(k, v, i)
    return cache


def _cache_to_legacy(cache: Any) -> Any:
    if hasattr(cache, "to_legacy_cache"):
        return cache.to_legacy_cache()
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def _past_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, (tuple, list)):
        return past_key_values[0][0].shape[-2] if len(past_key_values) else 0
    return int(past_key_values.get_seq_length())


class FM9GModel(FM9GPreTrainedModel):
    """The decoder stack: embeddings, layers, final norm. Returns the normed hidden states."""

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([FM9GDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = FM9GRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        """input_ids (B, T) -> last_hidden_state (B, T, d). attention_mask (B, past+T): 1 = real token."""
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.scale:
            inputs_embeds = inputs_embeds * self.config.scale_emb
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device

        legacy = isinstance(past_key_values, (tuple, list))
        if legacy:
            past_key_values = _cache_from_legacy(past_key_values)
        elif use_cache and past_key_values is None and DynamicCache is not None:
            past_key_values = DynamicCache()
        past = _past_length(past_key_values)

        if position_ids is None:
            if attention_mask is not None:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)

        # boolean mask (B, 1, T, S): causal over past+T keys, minus padded keys
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -S:].to(torch.bool)
        # fully masked rows (queries on left padding) would give NaN: let them see everything
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)

        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, position_ids, allowed, past_key_values if use_cache else None)
        h = self.norm(h)

        cache_out = past_key_values if use_cache else None
        if legacy and cache_out is not None:
            cache_out = _cache_to_legacy(cache_out)
        if return_dict is False:
            return (h, cache_out)
        return BaseModelOutputWithPast(**{"last_hidden_state": h, _CACHE_NAME: cache_out})


class FM9GForCausalLM(FM9GPreTrainedModel, GenerationMixin):
    """FM9G with its LM head. logits = lm_head(hidden / scale_width); tied to embed_tokens when
    ``config.tie_word_embeddings``."""

    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:  # pragma: no cover - transformers 4.x
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: FM9GConfig) -> None:
        super().__init__(config)
        self.model = FM9GModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> FM9GModel:
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        """input_ids (B, T) -> logits (B, T, V) fp32-upcast-free (model dtype). labels are
        unshifted (HF convention: position t predicts labels[t+1]); -100 is ignored."""
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        cache_out = out[_CACHE_NAME] if _CACHE_NAME in out else None
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if self.config.scale:
            h = h / self.config.scale_width  # the config's muP width rule (hidden_size / dim_model_base)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        if return_dict is False:
            res = (logits, cache_out)
            return ((loss,) + res) if loss is not None else res
        return CausalLMOutputWithPast(**{"loss": loss, "logits": logits, _CACHE_NAME: cache_out})

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Keep only the tokens the cache has not seen; positions from the attention mask."""
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        past = _past_length(past_key_values)
        if past > 0:
            input_ids = input_ids[:, past:]
        T = input_ids.shape[1]
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        else:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        model_inputs: dict[str, Any] = {
            "position_ids": position_ids,
            _CACHE_NAME: past_key_values,
            "use_cache": use_cache,
            "attention_mask": attention_mask,
        }
        if inputs_embeds is not None and past == 0:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        return model_inputs
