"""Read and write Hugging Face checkpoint directories: `hf_to_bmt`, `bmt_to_hf`, `load_pretrained`.

Both directions stream: tensors are memory-mapped (safetensors `safe_open`,
`torch.load(mmap=True, weights_only=True)`) and written one at a time, so converting a 7B model
never holds several copies of it in memory. Outputs go to a temporary file / directory next to the
destination and are renamed into place at the end: a failed conversion leaves nothing half-written.

Example::

    from fm9g import hf_to_bmt, bmt_to_hf

    cfg = hf_to_bmt("hf_ckpt_dir", "9g_models/7b.pt")        # writes 7b.pt + config.json beside it
    bmt_to_hf("9g_models/7b.pt", "hf_out", reference_dir="hf_ckpt_dir")          # Llama / Qwen2
    bmt_to_hf("9g_models/7b.pt", "hf_fm9g", reference_dir="hf_ckpt_dir", format="fm9g")

Formats written by `bmt_to_hf`:

* ``format="native"``: muP folded into the weights (embedding × scale_emb, o_proj / down_proj ×
  scale_depth/√L, lm_head ÷ scale_width, head untied when that makes it differ from the
  embedding), written as ``LlamaForCausalLM`` -- or ``Qwen2ForCausalLM`` when q/k/v carry biases.
  Stock transformers and vLLM load it with no remote code.
* ``format="fm9g"``: weights as trained (Llama names), ``config.json`` with ``model_type "fm9g"``,
  the muP fields and an ``auto_map`` to our own ``configuration_fm9g.py`` / ``modeling_fm9g.py``,
  which are copied into the directory (``trust_remote_code=True``).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fm9g._io import atomic_write_text, name_list, read_json, state_dict_mismatch
from fm9g.convert.files import (
    DEFAULT_MAX_SHARD_SIZE,
    ConversionError,
    TensorPlan,
    check_hf_dir,
    copy_reference_files,
    output_dir,
    read_bmt_checkpoint,
    read_conversion_json,
    read_hf_state_dict,
    refuse_replacing_inputs,
    resolve_ckpt,
    save_safetensors_sharded,
    write_state_dict,
)
from fm9g.convert.hf_config import (
    SUPPORTED_MODEL_TYPES,
    export_factors,
    fm9g_config_from_hf,
    hf_config_from_fm9g,
    is_hf_config,
    load_hf_config,
    native_unties,
    resolve_config,
)
from fm9g.convert.keys import KeyMappingError, bmt_to_hf_key, expected_bmt_keys, hf_to_bmt_key
from fm9g.convert.peft import LoraPairs, read_lora_for_export, write_peft_adapter
from fm9g.models.config import DTYPES, FM9GConfig, dtype_name
from fm9g.models.lora import is_lora_name

__all__ = [
    "ConversionError",
    "SUPPORTED_MODEL_TYPES",
    "load_hf_config",
    "fm9g_config_from_hf",
    "hf_config_from_fm9g",
    "expected_bmt_shapes",
    "read_hf_state_dict",
    "read_bmt_checkpoint",
    "hf_to_bmt",
    "bmt_to_hf",
    "load_pretrained",
    "save_safetensors_sharded",
]

PathLike = str | os.PathLike[str]

REMOTE_CODE_DIR = Path(__file__).with_name("remote")
REMOTE_FILES: tuple[str, ...] = ("configuration_fm9g.py", "modeling_fm9g.py")
FOLD_BLOCK_ELEMENTS = 1 << 24  # 64 MB of fp32 per block when folding muP / merging LoRA


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype)
    if name is None:
        raise ConversionError(f"dtype {dtype!r} is not known; use one of bf16, fp16, fp32")
    return DTYPES[name][0]


# ================================================================================================
# the model's tensors and their check
# ================================================================================================


def expected_bmt_shapes(config: FM9GConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of `FM9GModel(config)` (original names, from the key table of
    `fm9g.convert.keys`, in its order) and its shape."""
    d, dh, ff, V = config.dim_model, config.dim_head, config.dim_ff, config.vocab_size
    q, kv = config.num_heads * dh, config.num_kv_heads * dh
    by_module = {  # last module name -> (weight shape, bias shape)
        "input_embedding": ((V, d), None),
        "lm_head": ((V, d), None),
        "project_q": ((q, d), (q,)),
        "project_k": ((kv, d), (kv,)),
        "project_v": ((kv, d), (kv,)),
        "attention_out": ((d, q), None),
        "w_0": ((ff, d), None),
        "w_1": ((ff, d), None),
        "w_out": ((d, ff), None),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for key in expected_bmt_keys(config):
        module, _, param = key.rpartition(".")
        leaf = module.rsplit(".", 1)[-1]
        if leaf.startswith("layernorm") or leaf == "output_layernorm":
            shapes[key] = (d,)
        else:
            weight, bias = by_module[leaf]
            shapes[key] = weight if param == "weight" else bias
    return shapes


def _check_state_dict(
    sd: Mapping[str, torch.Tensor], config: FM9GConfig, source: str, *, what: str = "checkpoint"
) -> None:
    """Raise one ConversionError naming every missing, unexpected and mis-shaped key."""
    problems = state_dict_mismatch(expected_bmt_shapes(config), dict(sd), source=f"the {what}")
    if problems:
        raise ConversionError(
            f"{source}: the {what} does not match the model config "
            f"(dim_model={config.dim_model}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
            f"num_kv_heads={config.num_kv_heads}, dim_ff={config.dim_ff}, vocab_size={config.vocab_size}, "
            f"tie_lm_head={config.tie_lm_head}, qkv_bias={config.qkv_bias}): " + problems
            + ". Pass the config the checkpoint was trained with (config=... or a config.json beside it)."
        )


def _bmt_from_hf(hf_sd: dict[str, torch.Tensor], config: FM9GConfig, source: str,
                 cast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF weights renamed to original names, checked against `config`, in canonical order. A
    stored head of a tied config is dropped (with a warning when it differs from the embedding)."""
    if config.tie_lm_head and "lm_head.weight" in hf_sd:
        head, emb = hf_sd.pop("lm_head.weight"), hf_sd.get("model.embed_tokens.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            warnings.warn(f"{source}: tie_word_embeddings is true but lm_head.weight differs from the embedding; "
                          "it is dropped (transformers ignores it as well)", stacklevel=3)
    sd: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a non-persistent buffer some old exports stored
        try:
            sd[hf_to_bmt_key(name)] = tensor if cast is None else tensor.to(cast)
        except KeyMappingError:
            unmapped.append(name)
    if unmapped:
        raise ConversionError(f"{source}: {len(unmapped)} weights have no FM9G name: {name_list(unmapped)}; "
                              "this is not a Llama / Qwen2 / MiniCPM-layout checkpoint")
    _check_state_dict(sd, config, source, what="Hugging Face checkpoint")
    return {k: sd[k] for k in expected_bmt_shapes(config)}


# ================================================================================================
# HF -> bmtrain
# ================================================================================================


def _refuse_hf_config_beside(out_path: Path) -> None:
    beside = out_path.parent / "config.json"
    try:
        existing = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        existing = {}
    if is_hf_config(existing):
        raise ConversionError(
            f"{beside} is a Hugging Face config that writing the fm9g config.json would replace; "
            f"put {out_path.name} in another directory (e.g. 9g_models/{out_path.name})"
        )


def _refuse_existing_outputs(out_path: Path, config: FM9GConfig, write_config: bool) -> None:
    """An existing checkpoint at `out_path`, or another model's config.json beside it, is replaced
    only with ``overwrite=True`` (the same config is simply written again)."""
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (CLI: --overwrite) to replace it, "
                              "or choose another path")
    beside = out_path.parent / "config.json"
    if not write_config or not beside.is_file():
        return
    try:
        same = read_json(beside) == json.loads(config.to_json())
    except ValueError:
        same = False
    if not same:
        raise FileExistsError(
            f"{beside} holds another model config, which the config of {out_path.name} would replace (the "
            "checkpoints beside it would lose theirs); put the checkpoint in a directory of its own, or pass "
            "overwrite=True (CLI: --overwrite) to replace it"
        )


def hf_to_bmt(
    hf_dir: PathLike,
    out_path: PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    safetensors: bool = False,
    write_config: bool = True,
    overwrite: bool = False,
) -> FM9GConfig:
    """Convert a Hugging Face checkpoint directory into an fm9g / bmtrain checkpoint.

    Reads ``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``
    (sharded or not) of Llama, Qwen2, MiniCPM-style (muP) and fm9g / fm9g7b models. Writes the
    weights in the original bmtrain names (``input_embedding.weight``, ``encoder.layers.{i}...``,
    ``lm_head.weight`` only for untied heads) as a flat ``torch.save`` dict -- or safetensors when
    ``safetensors=True`` -- and ``config.json`` (`FM9GConfig.to_json`, the original model_configs
    shape) in the same directory.

    Tied heads: when the config ties the head, a stored ``lm_head.weight`` is dropped (transformers
    ignores it too; a warning is given if it differs from the embedding).

    Args:
        hf_dir: the Hugging Face directory (``config.json`` + weights).
        out_path: the ``.pt`` (or ``.safetensors``) file to write.
        dtype: cast the weights (``"bf16"``, ``"fp16"``, ``"fp32"``); None keeps them.
        safetensors: write safetensors instead of a torch pickle.
        write_config: write ``config.json`` beside ``out_path``.
        overwrite: replace an existing ``out_path``, and a ``config.json`` beside it that holds
            another config (an input is never replaced).

    Returns:
        The inferred `FM9GConfig`.

    Raises:
        FileNotFoundError: missing directory, config.json or weights.
        FileExistsError: ``out_path`` exists, or ``config.json`` beside it holds another config
            (without ``overwrite``).
        ConversionError: unsupported architecture (named), unmapped or missing keys (all listed),
            shapes that contradict the config, an output that would replace or lie inside ``hf_dir``.
        fm9g._io.DiskFullError: the disk is full or a size limit was hit (the output is left as it was).
    """
    src = check_hf_dir(hf_dir)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ConversionError(f"out_path {out_path} is a directory; give a file name such as {out_path / 'model.pt'}")
    cast = _as_dtype(dtype)
    config = load_hf_config(src)
    beside = out_path.parent / "config.json"
    if write_config:
        _refuse_hf_config_beside(out_path)
    refuse_replacing_inputs({"out_path": out_path, **({"config.json beside out_path": beside} if write_config else {})},
                            {"hf_dir": src})
    if not overwrite:
        _refuse_existing_outputs(out_path, config, write_config)
    with ExitStack() as stack:
        sd = _bmt_from_hf(read_hf_state_dict(src, stack), config, str(src), cast)
        write_state_dict(out_path, sd, safetensors=safetensors)
    if write_config:
        config.to_json(beside)
    return config


# ================================================================================================
# bmtrain -> HF
# ================================================================================================


def _fold(t: torch.Tensor, out_dtype: torch.dtype, factor: float,
          delta: tuple[torch.Tensor, torch.Tensor, float] | None, block_elements: int = FOLD_BLOCK_ELEMENTS) -> torch.Tensor:
    """``(t + scaling · B @ A) · factor`` in fp32, rounded once to `out_dtype`, in row blocks of about
    ``block_elements`` so a large matrix (the 73k x d embedding) never exists in fp32 all at once."""
    if delta is None and factor == 1.0:
        return t.to(out_dtype)  # no copy when the dtype is kept: written from the mmap
    result = torch.empty(t.shape, dtype=out_dtype)
    rows = max(1, block_elements // max(1, t[0].numel()))
    for i in range(0, t.shape[0], rows):
        w = t[i : i + rows].to(torch.float32, copy=True)  # never modify the source in place
        if delta is not None:
            a, b, scaling = delta
            w += (b[i : i + rows].float() @ a.float()) * scaling
        if factor != 1.0:
            w *= factor
        result[i : i + rows] = w
    return result


def _export_plans(sd: Mapping[str, torch.Tensor], cfg: FM9GConfig, format: str, out_dtype: torch.dtype,
                  merge: LoraPairs, scaling: float) -> list[TensorPlan]:
    """One plan per HF tensor: the weight with its export factor and merged LoRA update."""
    factors = export_factors(cfg, format)
    plans = []
    for key, shape in expected_bmt_shapes(cfg).items():
        module, _, param = key.rpartition(".")
        factor = factors.get(module.rsplit(".", 1)[-1], 1.0) if param == "weight" else 1.0
        delta = (*merge[module], scaling) if param == "weight" and module in merge else None
        plans.append(TensorPlan(name=bmt_to_hf_key(key), shape=shape, dtype=out_dtype,
                                make=partial(_fold, sd[key], out_dtype, factor, delta)))
    if format == "native" and native_unties(cfg):  # tied muP head: lm_head = embedding / scale_width
        plans.append(TensorPlan(name="lm_head.weight", shape=(cfg.vocab_size, cfg.dim_model), dtype=out_dtype,
                                make=partial(_fold, sd["input_embedding.weight"], out_dtype, factors["lm_head"], None)))
    return plans


def _read_base(ckpt: Path, cfg: FM9GConfig, stack: ExitStack) -> dict[str, torch.Tensor]:
    sd = read_bmt_checkpoint(ckpt, stack)
    lora_key = next((k for k in sd if is_lora_name(k)), None)
    if lora_key is not None:
        raise ConversionError(f"{ckpt}: holds LoRA tensors ({lora_key}); pass the full base "
                              "checkpoint as ckpt and the LoRA checkpoint as lora=")
    _check_state_dict(sd, cfg, str(ckpt))
    return sd


def _check_choices(format: str, lora_mode: str) -> None:
    if format not in ("native", "fm9g"):
        raise ConversionError(f"format must be 'native' or 'fm9g', got {format!r}")
    if lora_mode not in ("merge", "adapter"):
        raise ConversionError(f"lora_mode must be 'merge' or 'adapter', got {lora_mode!r}")


def _input_paths(ckpt: PathLike, ckpt_file: Path, config: Any, reference_dir: PathLike | None, lora: Any,
                 lora_config: Any) -> dict[str, PathLike | None]:
    """Every file or folder an export reads, by its name in messages (None: not a path); `ckpt_file`
    is the model file `ckpt` names."""
    def path(x: Any) -> PathLike | None:
        return x if isinstance(x, (str, os.PathLike)) else None

    beside = ckpt_file.parent / "config.json"
    return {"the checkpoint": ckpt, "reference_dir": reference_dir, "lora": path(lora), "config": path(config),
            "lora_config": path(lora_config),
            "the config beside the checkpoint": beside if config is None and beside.is_file() else None}


def bmt_to_hf(
    ckpt: PathLike, out_dir: PathLike, config: FM9GConfig | Mapping[str, Any] | PathLike | None = None,
    reference_dir: PathLike | None = None, lora: PathLike | Mapping[str, torch.Tensor] | None = None,
    format: str = "native", *, lora_config: Any = None, lora_alpha: float | None = None, lora_r: int | None = None,
    lora_mode: str = "merge", dtype: str | torch.dtype | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Export an fm9g / bmtrain checkpoint as a Hugging Face directory.

    Args:
        ckpt: the ``.pt`` (or ``.safetensors``) in original names, or a step directory with one ``.pt``.
        out_dir: the directory to create (written to a temporary directory, renamed at the end).
        config: an `FM9GConfig`, a dict of its fields or a model JSON path; default: ``config.json`` beside ``ckpt``,
            else inferred from ``reference_dir``'s ``config.json``.
        reference_dir: a Hugging Face directory of the same model: tokenizer, generation and chat
            template files are copied from it (not its weights, config or code); its token ids are kept.
        lora: a LoRA checkpoint (``<module>.lora.lora_A`` / ``lora_B`` tensors, original or fm9g
            format) to merge: ``W += (alpha / r) · B @ A`` in fp32.
        format: ``"native"`` (Llama / Qwen2, muP folded) or ``"fm9g"`` (remote code, muP kept).
        lora_config: a `LoraConfig`, a dict or a JSON path (the training JSON with a ``finetune``
            section works) giving alpha and r; otherwise a ``lora_config.json`` / ``config.json``
            beside the LoRA checkpoint is read, or ``lora_alpha`` / ``lora_r`` are used.
        lora_alpha, lora_r: explicit LoRA scale values (override the others).
        lora_mode: ``"merge"`` (default) or ``"adapter"``: write the base weights plus a PEFT adapter
            in ``out_dir/adapter`` (load with ``peft.PeftModel.from_pretrained(model, out_dir/"adapter")``).
        dtype: cast the exported weights; None keeps the checkpoint's dtype.
        max_shard_size: bytes per safetensors shard (default 5 GiB).
        overwrite: replace an existing non-empty ``out_dir`` (never one that holds, is, or lies
            inside an input: the checkpoint, ``reference_dir``, ``lora``, ``config``, ``lora_config``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError / FileExistsError: missing inputs / existing output.
        ConversionError: keys or shapes that do not match the config (all listed), a LoRA checkpoint
            for another model, an unknown LoRA alpha, a bad format, an output that would replace or
            lie inside an input.
        fm9g._io.DiskFullError: the disk is full or a size limit was hit (the output is left as it was).
    """
    _check_choices(format, lora_mode)
    ckpt_path, out = resolve_ckpt(ckpt), Path(out_dir)
    ref = check_hf_dir(reference_dir) if reference_dir is not None else None
    refuse_replacing_inputs({"out_dir": out}, _input_paths(ckpt, ckpt_path, config, reference_dir, lora, lora_config))
    cfg = resolve_config(config, ckpt_path, ref)
    with ExitStack() as stack:
        sd = _read_base(ckpt_path, cfg, stack)
        pairs, lora_cfg = read_lora_for_export(lora, sd, lora_config=lora_config, lora_alpha=lora_alpha,
                                               lora_r=lora_r) if lora is not None else ({}, None)
        out_dtype = _as_dtype(dtype) or sd["input_embedding.weight"].dtype
        plans = _export_plans(sd, cfg, format, out_dtype, pairs if lora_mode == "merge" else {},
                              lora_cfg.scaling if lora_cfg else 0.0)
        ref_config = read_conversion_json(ref / "config.json") if ref is not None else None
        hf_config = hf_config_from_fm9g(cfg, format=format, dtype=out_dtype, reference=ref_config)
        adapter = (pairs, lora_cfg) if lora_cfg is not None and lora_mode == "adapter" else None
        with output_dir(out, overwrite=overwrite) as tmp:
            save_safetensors_sharded(tmp, plans, max_shard_size=max_shard_size)
            _write_export_files(tmp, hf_config, cfg, format, ref, adapter, base_name=str(out))
    return out


def _write_export_files(tmp: Path, hf_config: dict[str, Any], cfg: FM9GConfig, format: str, ref: Path | None,
                        adapter: tuple[LoraPairs, Any] | None, *, base_name: str) -> None:
    """What an export holds beside its weights: ``config.json``, the remote code (``format="fm9g"``),
    the reference directory's tokenizer files, and the PEFT adapter (``lora_mode="adapter"``:
    ``adapter`` = the LoRA pairs and their `LoraConfig`; ``base_name`` goes into its config)."""
    atomic_write_text(tmp / "config.json", json.dumps(hf_config, indent=2) + "\n")
    for name in REMOTE_FILES if format == "fm9g" else ():
        shutil.copy2(REMOTE_CODE_DIR / name, tmp / name)
    if ref is not None and copy_reference_files(ref, tmp):
        from fm9g.data.tokenizers import make_tokenizer_dir_compatible

        make_tokenizer_dir_compatible(tmp)  # transformers 5's tokenizer files load in 4.44 too
    if adapter is not None:
        pairs, lora_cfg = adapter
        fp32 = {m: (a.float(), b.float()) for m, (a, b) in pairs.items()}
        write_peft_adapter(tmp / "adapter", fp32, lora_cfg, factors=export_factors(cfg, format),
                           base_model_name_or_path=base_name)


# ================================================================================================
# loading an FM9GModel from either format
# ================================================================================================


def load_pretrained(
    path_or_hf_dir: PathLike,
    *,
    config: FM9GConfig | PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> "torch.nn.Module":
    """Build an `FM9GModel` with weights from an fm9g ``.pt`` / ``.safetensors`` or a Hugging Face
    directory (Llama, Qwen2, MiniCPM-style, fm9g / fm9g7b).

    Args:
        path_or_hf_dir: a checkpoint file (config from ``config`` or ``config.json`` beside it) or
            an HF directory (config inferred).
        config: overrides the config found next to a checkpoint file.
        dtype: cast the parameters (default: the checkpoint's dtype).

    Returns:
        The model in eval mode.
    """
    from fm9g.models.fm9g import FM9GModel

    path = Path(path_or_hf_dir)
    cast = _as_dtype(dtype)
    with ExitStack() as stack:
        if path.is_dir() and (path / "config.json").is_file() and not list(path.glob("*.pt")):
            cfg = load_hf_config(path) if config is None else resolve_config(config, path, None)
            sd = _bmt_from_hf(read_hf_state_dict(path, stack), cfg, str(path), cast)
        else:
            ckpt = resolve_ckpt(path)
            cfg = resolve_config(config, ckpt, None)
            sd = read_bmt_checkpoint(ckpt, stack)
            _check_state_dict(sd, cfg, str(ckpt))
            if cast is not None:
                sd = {k: v.to(cast) for k, v in sd.items()}
        with torch.device("meta"):  # no allocation, no init: the checkpoint's tensors are assigned
            model = FM9GModel(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
