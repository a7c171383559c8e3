# coding=utf-8
"""Hugging Face configuration for FM9G (九格) checkpoints exported by `fm9g` with format="fm9g".

Standalone remote code: imports only `transformers`. Loaded with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` through the ``auto_map`` entry that
`fm9g.convert.hf.bmt_to_hf` writes into ``config.json``. Works with transformers 4.44 and later
(including 5.x).

The field names are the usual Llama ones, plus the muP fields of the FM9G 4B family:

- ``scale`` (bool): the muP switch. When true the input embedding is multiplied by ``scale_emb``
  and the final hidden state is divided by ``hidden_size / dim_model_base`` before the LM head.
- ``scale_depth`` (float): when > 0, every residual branch (attention and MLP) is multiplied by
  ``scale_depth / sqrt(num_hidden_layers)`` (independently of ``scale``, as in the original).
- ``attention_bias`` (bool): q/k/v projections carry biases (the 7B / 70B models); the output
  projection never does.
"""
from __future__ import annotations

try:  # transformers >= 5 spells it PreTrainedConfig and keeps the old name as an alias
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class FM9GConfig(_BaseConfig):
    """Configuration of an FM9G causal language model (Llama layout with optional muP scaling)."""

    model_type = "fm9g"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 2560,
        intermediate_size: int = 6400,
        num_hidden_layers: int = 62,
        num_attention_heads: int = 40,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.1,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        rope_theta: float = 1000000.0,
        attention_bias: bool = False,
        scale: bool = False,
        scale_emb: float = 1.0,
        scale_depth: float = -1.0,
        dim_model_base: int = 256,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.scale = scale
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def scale_width(self) -> float:
        """hidden_size / dim_model_base when muP is on, else 1.0 (the logit divisor)."""
        return self.hidden_size / self.dim_model_base if self.scale else 1.0
