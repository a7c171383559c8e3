"""LoRA at the conversion boundary: PEFT adapter directories and the LoRA checkpoints that
`bmt_to_hf` merges or exports (docs/lora.md, docs/convert.md).

* A PEFT adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` in Hugging Face module
  names (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``), so an fm9g LoRA
  runs on the exported Hugging Face model with ``peft.PeftModel`` and an adapter trained with peft
  continues in fm9g. Names come from the one table, `fm9g.convert.keys.NAME_TABLE`.
* A ``format="native"`` export folds muP factors into some weights (`export_factors`); the LoRA
  updates of those layers carry the same factor in the adapter.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm9g._io import atomic_write_bytes, name_list, read_json
from fm9g.convert.files import (
    ConversionError,
    load_checkpoint_file,
    open_safetensors,
    read_conversion_json,
    resolve_ckpt,
    unwrap_state_dict,
)
from fm9g.convert.hf_config import export_factors
from fm9g.convert.keys import KeyMappingError, bmt_to_hf_module, hf_to_bmt_module
from fm9g.models.lora import (
    ORIGINAL_TARGETS,
    LoraConfig,
    LoraError,
    apply_lora,
    get_lora_config,
    load_lora_state_dict,
    lora_modules,
    split_lora_name,
)
from fm9g.models.lora_config import HF_TARGET_NAMES

__all__ = [
    "HF_TO_ORIGINAL_TARGET",
    "ORIGINAL_TO_HF_TARGET",
    "LoraPairs",
    "save_peft_adapter",
    "load_peft_adapter",
    "write_peft_adapter",
    "config_from_peft",
    "read_lora_for_export",
]

#: module name -> (lora_A [r, in], lora_B [out, r])
LoraPairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


#: Hugging Face (Llama / Qwen2) names of the FM9G linears, accepted in ``target_modules`` (their home:
#: `fm9g.models.lora_config.HF_TARGET_NAMES`, which LoraConfig reads without this module).
HF_TO_ORIGINAL_TARGET: dict[str, str] = dict(HF_TARGET_NAMES)
ORIGINAL_TO_HF_TARGET: dict[str, str] = {v: k for k, v in HF_TO_ORIGINAL_TARGET.items()}

_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
# PEFT adapter_config.json fields fm9g cannot honour, with their neutral values
_PEFT_NEUTRAL: tuple[tuple[str, Any], ...] = (
    ("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None),
    ("layers_to_transform", None), ("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False),
    ("exclude_modules", None), ("layer_replication", None), ("target_parameters", None),
    ("trainable_token_indices", None),
)


def _factors(config: Any, format: str) -> dict[str, float]:
    if format not in ("native", "fm9g"):
        raise LoraError(f"format must be 'native' or 'fm9g', got {format!r}")
    return export_factors(config, format) if config is not None else {}


# ================================================================================================
# writing adapters
# ================================================================================================


def write_peft_adapter(
    out_dir: str | os.PathLike[str],
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    lora: LoraConfig,
    *,
    factors: Mapping[str, float],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write LoRA tensors (original module names) as a PEFT adapter directory.

    Args:
        out_dir: directory to create / write into (files of the same name are replaced atomically).
        pairs: ``{module: (lora_A [r, in], lora_B [out, r])}``, in the order to write.
        lora: r, alpha and dropout for ``adapter_config.json``.
        factors: `export_factors` of the base export; lora_B of a listed module is multiplied by it.
        base_model_name_or_path: recorded in ``adapter_config.json``.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    hf_leaves: list[str] = []
    for name, (a, b) in pairs.items():
        try:
            hf = bmt_to_hf_module(name)
        except KeyMappingError as e:
            raise LoraError(
                f"save_peft_adapter: LoRA layer {name!r} has no Hugging Face name ({e}); only the "
                f"FM9G projections {list(ORIGINAL_TARGETS)} (and lm_head) can be exported"
            ) from None
        if _leaf(hf) not in hf_leaves:
            hf_leaves.append(_leaf(hf))
        scaled = b.detach().float() * factors.get(_leaf(name), 1.0)
        tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = scaled.to(b.dtype).cpu().contiguous()
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": hf_leaves, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / "adapter_config.json", (json.dumps(adapter_config, indent=2) + "\n").encode())
    return out


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    *,
    format: str = "native",
) -> Path:
    """Write the LoRA layers of `model` as a PEFT adapter directory.

    Writes ``adapter_config.json`` (``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``,
    ``lora_alpha``, ``lora_dropout``, ``target_modules`` in Hugging Face names, ``bias`` none) and
    ``adapter_model.safetensors`` with keys
    ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` etc. Load it with
    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` on the model exported by ``bmt_to_hf``.

    Args:
        model: a LoRA model (`apply_lora`), not merged.
        out_dir: directory to create / write into (existing files of the same name are replaced
            atomically, other files are left alone).
        base_model_name_or_path: recorded in ``adapter_config.json`` (the HF export it belongs to).
        format: the export flavour of the base model: ``"native"`` (Llama/Qwen2 with muP folded
            into the weights -- LoRA updates of folded layers are scaled to match) or ``"fm9g"``.

    Returns:
        The output directory.
    """
    mods = list(lora_modules(model))
    if not mods:
        raise LoraError("save_peft_adapter: the model has no LoRA layers; call apply_lora(model, LoraConfig(...)) first")
    if any(m.merged for _, m in mods):
        raise LoraError("save_peft_adapter: the LoRA layers are merged; call unmerge_lora(model) first")
    factors = _factors(getattr(model, "config", None), format)
    pairs = {name: (m.lora.lora_A, m.lora.lora_B) for name, m in mods}
    lora = get_lora_config(model)
    assert lora is not None
    return write_peft_adapter(out_dir, pairs, lora, factors=factors, base_model_name_or_path=base_model_name_or_path)


# ================================================================================================
# reading adapters
# ================================================================================================


def config_from_peft(adapter_config: Mapping[str, Any], source: str) -> LoraConfig:
    """Translate a PEFT ``adapter_config.json`` into a LoraConfig, refusing features fm9g lacks."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{source}: peft_type is {adapter_config.get('peft_type')!r}; only LORA adapters can be imported")
    unsupported = []
    for key, neutral in _PEFT_NEUTRAL:
        value = adapter_config.get(key, neutral)
        if value not in (neutral, None, {}, [], False) or (key == "bias" and value != "none"):
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise LoraError(f"{source}: uses PEFT features fm9g does not support: {', '.join(unsupported)}")
    targets = adapter_config.get("target_modules")
    if targets == "all-linear":
        targets = list(ORIGINAL_TARGETS)
    elif isinstance(targets, str):
        raise LoraError(
            f"{source}: target_modules is the regular expression {targets!r}; fm9g imports adapters whose "
            "target_modules is a list of names (q_proj, k_proj, ...) or 'all-linear'"
        )
    r = adapter_config.get("r")
    alpha = adapter_config.get("lora_alpha", r)
    if adapter_config.get("use_rslora", False):
        # PEFT's rsLoRA scales by alpha/√r; the same update with our alpha/r scaling:
        alpha = float(alpha) * math.sqrt(r)
    try:
        return LoraConfig(r=r, alpha=alpha, dropout=adapter_config.get("lora_dropout", 0.0) or 0.0,
                          target_modules=list(targets or []))
    except LoraError as e:
        raise LoraError(f"{source}: {e}") from None


def _read_adapter_weights(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st_path, bin_path = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st_path.is_file():
        return _read_safetensors(st_path), st_path
    if bin_path.is_file():
        return load_checkpoint_file(bin_path, mmap=False), bin_path
    raise LoraError(f"{adapter_dir}: neither adapter_model.safetensors nor adapter_model.bin found")


def _prepare_model(model: nn.Module, cfg: LoraConfig, adapter_dir: Path, adapter_dtype: torch.dtype | None) -> None:
    """Apply LoRA with the adapter's settings, or check the model's LoRA layers agree with them."""
    existing = get_lora_config(model)
    if existing is None:
        apply_lora(model, cfg, adapter_dtype=adapter_dtype)
    elif existing.r != cfg.r or set(existing.target_modules) != set(cfg.target_modules):
        raise LoraError(
            f"{adapter_dir}: adapter has r={cfg.r}, targets={cfg.target_modules} but the model's LoRA layers have "
            f"r={existing.r}, targets={existing.target_modules}; apply the adapter to a model without LoRA"
        )
    elif any(m.merged for _, m in lora_modules(model)):
        raise LoraError(f"load_peft_adapter({adapter_dir}): the LoRA layers are merged; call unmerge_lora(model) first")
    else:
        for _, m in lora_modules(model):
            m.lora.alpha, m.lora.scaling = float(cfg.alpha), float(cfg.alpha) / cfg.r


def load_peft_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    *,
    format: str = "native",
    strict: bool = True,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Import a PEFT LoRA adapter (made by peft or by `save_peft_adapter`) into ``model``.

    Applies LoRA with the adapter's settings when the model has none yet (same as
    ``apply_lora(model, cfg)``); if it already has LoRA layers their targets and rank must agree.

    Args:
        model: an ``FM9GModel`` (plain or already with LoRA).
        adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``
            (or ``adapter_model.bin``).
        format: export flavour of the HF base model the adapter was trained on (``"native"``
            or ``"fm9g"``, see `save_peft_adapter`).
        strict: missing / unexpected adapter tensors are errors.
        adapter_dtype: dtype for newly created LoRA parameters.

    Returns:
        ``model``.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise LoraError(f"{adapter_dir}: no adapter_config.json; is this a PEFT adapter directory?")
    cfg = config_from_peft(read_json(config_path, error=LoraError), str(config_path))
    raw, weights_path = _read_adapter_weights(adapter_dir)
    _prepare_model(model, cfg, adapter_dir, adapter_dtype)
    factors = _factors(getattr(model, "config", None), format)
    sd: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, value in raw.items():
        match = _PEFT_KEY.match(key.removeprefix(_PEFT_PREFIX))
        try:
            module = hf_to_bmt_module(match["module"]) if match else None
        except KeyMappingError:
            module = None
        if module is None:
            bad.append(key)
            continue
        if match["kind"] == "lora_B" and _leaf(module) in factors:
            value = (value.float() / factors[_leaf(module)]).to(value.dtype)
        sd[f"{module}.lora.{match['kind']}"] = value
    if bad:
        raise LoraError(
            f"{weights_path}: {len(bad)} tensors are not LoRA A/B weights of FM9G projections: {name_list(bad, 8)}"
        )
    load_lora_state_dict(model, sd, strict=strict, source=str(weights_path))
    return model


# ================================================================================================
# LoRA checkpoints merged or exported by bmt_to_hf
# ================================================================================================


def _read_lora(
    lora: str | os.PathLike[str] | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], str, Path | None]:
    if isinstance(lora, Mapping):
        return unwrap_state_dict(lora, "lora state dict"), "lora state dict", None
    path = Path(lora)
    if not path.exists():
        raise FileNotFoundError(f"LoRA checkpoint {str(path)!r} does not exist")
    path = resolve_ckpt(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path), str(path), path
    return unwrap_state_dict(load_checkpoint_file(path, mmap=False), str(path)), str(path), path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (a ConversionError names a truncated or damaged one)."""
    with ExitStack() as stack:
        handle = open_safetensors(path, stack)
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _lora_config_beside(lora_path: Path | None) -> tuple[LoraConfig | None, str]:
    """The LoRA settings (with alpha) in a JSON beside the LoRA checkpoint, if one names them."""
    if lora_path is None:
        return None, ""
    for name in ("lora_config.json", "config.json", "train_config.json", "adapter_config.json"):
        f = lora_path.parent / name
        if not f.is_file():
            continue
        try:
            data = read_conversion_json(f)
            if name == "adapter_config.json":
                return config_from_peft(data, str(f)), str(f)
            return LoraConfig.from_dict(data, source=str(f), require=("alpha",)), str(f)
        except (ConversionError, LoraError):
            continue
    return None, ""


def _lora_pairs(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, value in sd.items():
        split = split_lora_name(key)
        if split is None or not split[0]:
            bad.append(key)
            continue
        pairs.setdefault(split[0], {})[split[1]] = value
    if bad:
        raise ConversionError(
            f"{source}: {len(bad)} tensors are not LoRA weights named '<module>.lora.lora_A/lora_B': {name_list(bad)}. "
            "Pass the LoRA checkpoint as lora= and the full base checkpoint as ckpt"
        )
    if not pairs:
        raise ConversionError(f"{source}: holds no LoRA tensors")
    return pairs


def _lora_rank(pairs: Mapping[str, Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor], source: str) -> int:
    """The one rank of LoRA pairs that fit the base weights; ConversionError naming every misfit."""
    problems: list[str] = []
    ranks: set[int] = set()
    for mod, ab in sorted(pairs.items()):
        weight = base.get(f"{mod}.weight")
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"{mod}: has only {sorted(ab)}")
        elif weight is None:
            problems.append(f"{mod}: no such layer in the base checkpoint")
        elif (ab["lora_A"].ndim != 2 or ab["lora_B"].ndim != 2 or ab["lora_A"].shape[0] != ab["lora_B"].shape[1]
              or (ab["lora_B"].shape[0], ab["lora_A"].shape[1]) != tuple(weight.shape)):
            problems.append(f"{mod}: lora_A {tuple(ab['lora_A'].shape)} / lora_B {tuple(ab['lora_B'].shape)} "
                            f"do not fit the base weight {tuple(weight.shape)}")
        else:
            ranks.add(int(ab["lora_A"].shape[0]))
    if problems:
        raise ConversionError(
            f"{source}: this LoRA checkpoint does not fit the base checkpoint ({len(problems)} problems: "
            f"{name_list(problems, 6)}). Was it trained on another model size?"
        )
    if len(ranks) != 1:
        raise ConversionError(f"{source}: LoRA layers have different ranks {sorted(ranks)}")
    return ranks.pop()


def read_lora_for_export(
    lora: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    lora_config: Any = None,
    lora_alpha: float | None = None,
    lora_r: int | None = None,
) -> tuple[LoraPairs, LoraConfig]:
    """Read a LoRA checkpoint (original names) and check it against the base weights.

    Args:
        lora: a ``.pt`` / ``.safetensors`` path (or step folder), or a state dict.
        base: the base checkpoint's tensors.
        lora_config: a LoraConfig, a dict or a JSON path giving alpha and r; default: a
            ``lora_config.json`` / ``config.json`` / ``train_config.json`` / ``adapter_config.json``
            beside the checkpoint.
        lora_alpha, lora_r: explicit values, overriding the others.

    Returns:
        ``({module: (A, B)}, LoraConfig)`` with the checkpoint's rank, the alpha found and the
        targets present.

    Raises:
        ConversionError: tensors that are not LoRA weights, do not fit the base, disagree on the
            rank, or an alpha that no source gives.
    """
    sd, source, path = _read_lora(lora)
    pairs = _lora_pairs(sd, source)
    r = _lora_rank(pairs, base, source)
    if isinstance(lora_config, (str, os.PathLike)):
        given, where = LoraConfig.from_json(lora_config), "lora_config"
    elif lora_config is not None:
        given = lora_config if isinstance(lora_config, LoraConfig) else LoraConfig.from_dict(lora_config)
        where = "lora_config"
    else:
        given, where = _lora_config_beside(path)
    alpha = float(given.alpha) if given is not None else None
    given_r = given.r if given is not None else None
    if lora_alpha is not None:
        alpha, where = float(lora_alpha), "lora_alpha"
    if lora_r is not None:
        given_r = int(lora_r)
    if given_r is not None and given_r != r:
        raise ConversionError(f"{source}: the LoRA tensors have rank {r} but {where or 'lora_r'} says r={given_r}")
    if alpha is None:
        raise ConversionError(
            f"{source}: the LoRA alpha is unknown, so the merge scale alpha/r cannot be computed; pass lora_alpha= "
            "(CLI: --lora-alpha), lora_config= (a LoraConfig or the training JSON with a 'finetune' section), "
            "or put lora_config.json beside the LoRA checkpoint"
        )
    cfg = LoraConfig(r=r, alpha=int(alpha) if alpha.is_integer() else alpha,
                     target_modules=sorted({_leaf(mod) for mod in pairs}))
    return {mod: (ab["lora_A"], ab["lora_B"]) for mod, ab in pairs.items()}, cfg
