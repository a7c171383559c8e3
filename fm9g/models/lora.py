"""LoRA for FM9G: config, the LoRA linear layer, injection, merging and checkpoint formats.

The original FM9G stack injected LoRA with OpenDelta, which no longer installs. This module is a
small native replacement that keeps the original checkpoint format:

* A wrapped linear keeps its ``weight`` / ``bias`` state-dict keys and gains a child module
  ``lora`` holding ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``, so LoRA tensors are saved as
  ``<module>.lora.lora_A`` / ``<module>.lora.lora_B`` -- the names the original tools read and write.
* ``y = base(x) + dropout(x) @ Aᵀ @ Bᵀ · (alpha / r)``; ``A`` ~ kaiming-uniform(a=√5), ``B = 0``, so
  a freshly wrapped model computes exactly what the base model computes.
* PEFT adapter directories (Hugging Face module names) are written and read by
  `fm9g.convert.peft`, which also registers the Hugging Face target names (``q_proj`` ...) as
  aliases `LoraConfig` accepts.

Typical use::

    cfg = LoraConfig.from_name("fm9g-7b")              # r 64, alpha 32, all 7 projections
    apply_lora(model, cfg)                             # in place; base weights frozen
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    ...
    torch.save(lora_state_dict(model), "lora.pt")      # original naming

Only torch (and `fm9g._io`) is imported.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fm9g._io import atomic_file, atomic_write_bytes, name_list, read_json

__all__ = [
    "ORIGINAL_TARGETS",
    "TARGET_ALIASES",
    "register_target_aliases",
    "LoraError",
    "LoraConfig",
    "LoraBranch",
    "LoraLinear",
    "apply_lora",
    "merge_lora",
    "unmerge_lora",
    "unload_lora",
    "reset_lora_parameters",
    "lora_modules",
    "get_lora_config",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora_checkpoint",
    "load_lora_checkpoint",
    "trainable_parameters",
    "count_parameters",
]

#: The linear layers of an FM9G block, in block order (original bmtrain names).
ORIGINAL_TARGETS: tuple[str, ...] = (
    "project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out",
)
#: Other names of the targets, mapped to the original ones by `LoraConfig`. Export formats add
#: theirs: importing `fm9g.convert.peft` adds the Hugging Face names (``q_proj`` -> ``project_q``).
TARGET_ALIASES: dict[str, str] = {}


def register_target_aliases(aliases: Mapping[str, str]) -> None:
    """Accept ``aliases`` (other name -> one of `ORIGINAL_TARGETS`) in ``target_modules``."""
    unknown = sorted(set(aliases.values()) - set(ORIGINAL_TARGETS))
    if unknown:
        raise LoraError(f"target aliases must map to {list(ORIGINAL_TARGETS)}, got {unknown}")
    TARGET_ALIASES.update(aliases)


# Infixes that wrappers (activation checkpointing, torch.compile, FSDP, DDP) add to module names but
# that never appear in state-dict keys.
_WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class LoraError(ValueError):
    """A LoRA config, target list or checkpoint that does not fit the model."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# Effective settings of the original LoRA runs (docs/lora.md: train_configs/<size>_lora.json
# "finetune" sections override the run_bmtrain_lora.sh defaults).
_PRESETS: dict[str, dict[str, Any]] = {
    "fm9g-4b": dict(r=16, alpha=32, dropout=0.0, target_modules=list(ORIGINAL_TARGETS)),
    "fm9g-7b": dict(r=64, alpha=32, dropout=0.0, target_modules=list(ORIGINAL_TARGETS)),
    "fm9g-70b": dict(r=16, alpha=32, dropout=0.0, target_modules=["project_q", "project_v"]),
    # run_bmtrain_lora.sh / README defaults, before the *_lora.json override.
    "original-default": dict(
        r=16, alpha=32, dropout=0.0,
        target_modules=["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"],
    ),
}
_PRESET_ALIASES = {"4b": "fm9g-4b", "7b": "fm9g-7b", "70b": "fm9g-70b", "default": "original-default"}
_ORIGINAL_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_layer": "target_modules"}


def _parse_target_list(value: Any, *, source: str = "target_modules") -> list[str]:
    """Turn a target list given as a list, a python-literal string or a comma list into names."""
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = ast.literal_eval(text)  # "['project_q','project_v']" as in the original JSONs
        except (ValueError, SyntaxError):
            if not re.fullmatch(r"[\w.,\s]+", text):
                raise LoraError(
                    f"{source}={value!r} is neither a list of module names nor a python-literal list "
                    "such as \"['project_q', 'project_v']\""
                ) from None
            parsed = [t for t in (p.strip() for p in text.split(",")) if t]
        value = [parsed] if isinstance(parsed, str) else parsed
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in value):
        raise LoraError(f"{source} must be a list of module names, got {value!r}")
    return list(value)


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability applied to the LoRA branch input (0 ≤ p < 1).
        target_modules: linear layers to wrap, matched against the end of module names (a name
            matches ``X`` if it equals ``X`` or ends with ``.X``). Original names
            (``project_q``, ``project_k``, ``project_v``, ``attention_out``, ``w_0``, ``w_1``,
            ``w_out``) or a registered alias (`TARGET_ALIASES`: the Hugging Face names ``q_proj``
            ... ``down_proj`` once `fm9g.convert.peft` is imported), mapped to the original
            ones. Duplicates are dropped, order kept.

    Example::

        LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]).target_modules
        # -> ['project_q', 'project_v']
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"]
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise LoraError(f"LoraConfig.alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise LoraError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        names = _parse_target_list(self.target_modules)
        if not names:
            raise LoraError("LoraConfig.target_modules is empty: name at least one linear layer, e.g. ['project_q', 'project_v']")
        mapped: list[str] = []
        for name in names:
            name = name.strip()
            if not name:
                raise LoraError(f"LoraConfig.target_modules contains an empty name: {names!r}")
            name = TARGET_ALIASES.get(name, name)
            if name not in mapped:
                mapped.append(name)
        self.target_modules = mapped

    @property
    def scaling(self) -> float:
        """The factor ``alpha / r`` applied to the LoRA update."""
        return float(self.alpha) / self.r

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`from_name`."""
        return sorted(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LoraConfig":
        """A preset matching the original runs' effective settings (docs/lora.md).

        ``fm9g-7b``: r 64, α 32, all 7 projections; ``fm9g-4b``: r 16, α 32, all 7;
        ``fm9g-70b``: r 16, α 32, ``project_q``/``project_v`` only; ``original-default``: the
        README defaults (r 16, α 32, no ``attention_out``). Dropout is 0 in all of them.

        Args:
            name: preset name (``7b``/``4b``/``70b`` accepted too).
            **overrides: fields to change, e.g. ``dropout=0.05``.
        """
        key = _PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in _PRESETS:
            raise LoraError(f"unknown LoRA preset {name!r}; choose one of {cls.presets()}")
        values = {**_PRESETS[key], **overrides}
        values["target_modules"] = list(values["target_modules"])
        return cls(**values)

    # -- dict / JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the fields (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "LoRA config",
                  require: tuple[str, ...] = ()) -> "LoraConfig":
        """Build from our keys or from the original ``"finetune"`` keys.

        Accepts ``{"r", "alpha", "dropout", "target_modules"}`` (unknown keys are an error), or the
        original ``{"lora_r", "lora_alpha", "lora_dropout", "lora_layer"}`` (other keys of the
        original ``finetune`` section, such as ``lr``, are ignored). A dict with a ``"finetune"``
        (or ``"lora"``) section is read from that section. ``lora_layer`` may be a list or the
        python-literal string used by the original scripts (``"['project_q','project_v']"``).
        ``require`` names fields that must be given (in either spelling) rather than defaulted.
        """
        if not isinstance(data, Mapping):
            raise LoraError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for section in ("finetune", "lora"):
            if isinstance(data.get(section), Mapping):
                return cls.from_dict(data[section], source=f"{source} [{section!r}]", require=require)
        original = [k for k in data if k in _ORIGINAL_KEYS]
        ours = [k for k in data if k in {f.name for f in dataclasses.fields(cls)}]
        if original:
            clash = [k for k in original if _ORIGINAL_KEYS[k] in data]
            if clash:
                raise LoraError(f"{source}: both {clash} and {[_ORIGINAL_KEYS[k] for k in clash]} are set; keep one spelling")
            values = {_ORIGINAL_KEYS[k]: data[k] for k in original}
            values.update({k: data[k] for k in ours})
        else:
            unknown = sorted(set(data) - set(ours))
            if unknown:
                raise LoraError(
                    f"{source}: unknown keys {unknown}; expected r, alpha, dropout, target_modules "
                    "(or the original lora_r, lora_alpha, lora_dropout, lora_layer)"
                )
            values = dict(data)
        absent = [name for name in require if name not in values]
        if absent:
            raise LoraError(f"{source}: does not give {absent}")
        if "target_modules" in values:
            values["target_modules"] = _parse_target_list(values["target_modules"], source=f"{source}: target_modules")
        try:
            return cls(**values)
        except LoraError as e:
            raise LoraError(f"{source}: {e}") from None
        except TypeError as e:  # a wrong value type reaching the dataclass
            raise LoraError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "LoraConfig":
        """Read a JSON file written by :meth:`to_json` or an original ``train_configs/*_lora.json``."""
        return cls.from_dict(read_json(path, error=LoraError), source=str(path))

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the config as JSON text; when ``path`` is given also write it there (atomically)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_bytes(path, text.encode("utf-8"))
        return text


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

class LoraBranch(nn.Module):
    """The low-rank update ``dropout(x) @ Aᵀ @ Bᵀ · scaling``.

    Args:
        in_features: input width of the wrapped linear.
        out_features: output width of the wrapped linear.
        r: rank.
        alpha: scale numerator (``scaling = alpha / r``).
        dropout: dropout probability on the branch input.
        device, dtype: where and how to store ``lora_A`` / ``lora_B``.

    Parameters: ``lora_A`` ``[r, in_features]`` (kaiming-uniform, a=√5), ``lora_B``
    ``[out_features, r]`` (zeros).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LoraError(f"LoRA rank r must be > 0, got {r}")
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        if self.lora_A.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ kaiming-uniform(a=√5) (the ``nn.Linear`` default), B = 0: the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` in fp32, shape ``[out_features, in_features]``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` -> ``[..., out]`` in x's dtype.

        A and B are cast to the activation dtype (like autocast), so fp32 adapters on a bf16 model
        keep fp32 master weights and gradients without saving an fp32 copy of every activation.
        """
        h = self.dropout(x)
        h = F.linear(h, self.lora_A.to(h.dtype))          # (..., r)
        return F.linear(h, self.lora_B.to(h.dtype)) * self.scaling  # (..., out)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}"


class LoraLinear(nn.Linear):
    """``nn.Linear`` with a LoRA branch: ``y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · alpha/r``.

    A subclass of ``nn.Linear``, so ``weight`` / ``bias`` keep their state-dict keys and anything
    that checks ``isinstance(m, nn.Linear)`` still works; the branch is the child ``lora``
    (keys ``lora.lora_A`` / ``lora.lora_B``). Build one around an existing linear with
    :meth:`from_linear` (shares its parameters, allocates no new base weight).

    Attributes:
        merged: True while the update is folded into ``weight`` (the branch is then skipped).
    """

    lora: LoraBranch
    merged: bool

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_branch(r, alpha, dropout, adapter_dtype)

    def _add_branch(self, r: int, alpha: float, dropout: float, adapter_dtype: torch.dtype | None) -> None:
        self.lora = LoraBranch(
            self.in_features, self.out_features, r, alpha, dropout,
            device=self.weight.device, dtype=adapter_dtype or self.weight.dtype,
        )
        self.merged = False

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
    ) -> "LoraLinear":
        """Wrap ``linear``: the result holds the very same ``weight`` / ``bias`` Parameters.

        Args:
            linear: the layer to wrap (not modified).
            r, alpha, dropout: LoRA hyper-parameters.
            adapter_dtype: dtype of ``lora_A`` / ``lora_B``; None = the base weight's dtype.
        """
        if isinstance(linear, LoraLinear):
            raise LoraError("this linear already has a LoRA branch")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.train(linear.training)
        self._add_branch(r, alpha, dropout, adapter_dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` -> ``[..., out_features]``."""
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``alpha/r · B A`` into ``weight`` (fp32 math, then cast). No-op if already merged."""
        if self.merged:
            return
        w = self.weight
        w.copy_((w.float() + self.lora.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. Exact up to one rounding of ``weight``'s dtype (fp32: ~1e-7
        relative); nothing extra is stored. No-op if not merged."""
        if not self.merged:
            return
        w = self.weight
        w.copy_((w.float() - self.lora.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing ``weight`` / ``bias`` (merge first to keep the update)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = self.weight
        lin.register_parameter("bias", self.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return super().extra_repr() + f", merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Model-level operations
# ----------------------------------------------------------------------------------------------

def _clean_name(name: str) -> str:
    """Module name as it appears in state-dict keys (wrapper infixes and a DDP ``module.`` removed)."""
    for infix in _WRAPPER_INFIXES:
        name = name.replace(infix, "")
        if name.endswith(infix[:-1]):
            name = name[: -len(infix[:-1])].rstrip(".")
    if name.startswith("module."):
        name = name[len("module."):]
    return name


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """Yield ``(clean module name, LoraLinear)`` for every wrapped linear, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield _clean_name(name), module


def apply_lora(
    model: nn.Module,
    config: LoraConfig,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Wrap the target linears of ``model`` in place and freeze everything but LoRA.

    Every ``nn.Linear`` whose name ends with one of ``config.target_modules`` (``name == t`` or
    ``name.endswith("." + t)``) is replaced by a :class:`LoraLinear` sharing its parameters; then
    all parameters get ``requires_grad=False`` except ``lora_A`` / ``lora_B``.

    Args:
        model: any module tree (an ``FM9GModel`` or a hand-built one). On the meta device the
            LoRA parameters are created there too; call :func:`reset_lora_parameters` after
            materialising the model (``to_empty``).
        config: the LoRA settings.
        adapter_dtype: dtype of the LoRA parameters. Default fp32 -- they are small, and fp32
            master weights train well with a bf16 base (the branch runs in the activation dtype).
            None = the base weight's dtype.

    Returns:
        ``model`` itself.

    Raises:
        LoraError: a target matching no module, a target naming a module that is not an
            ``nn.Linear``, r ≤ 0, or a model that already has LoRA layers.
    """
    if not isinstance(config, LoraConfig):
        raise LoraError(f"apply_lora needs a LoraConfig, got {type(config).__name__}")
    if config.r <= 0:
        raise LoraError(f"LoRA rank r must be > 0, got {config.r}")
    existing = [n for n, _ in lora_modules(model)]
    if existing:
        raise LoraError(
            f"the model already has {len(existing)} LoRA layers (e.g. {existing[0]!r}); "
            "call merge_lora / load_lora_state_dict on it instead of applying LoRA twice"
        )
    targets = list(config.target_modules)
    hits: dict[str, list[str]] = {t: [] for t in targets}
    not_linear: list[str] = []
    chosen: list[str] = []
    for raw_name, module in model.named_modules():
        name = _clean_name(raw_name)
        matched = [t for t in targets if _matches(name, t)]
        if not matched:
            continue
        if not isinstance(module, nn.Linear):
            # A wrapper (e.g. checkpoint_wrapper) may share the name of the linear inside it.
            if any(isinstance(m, nn.Linear) and _clean_name(n) == name for n, m in module.named_modules()):
                continue
            not_linear.append(f"{name} ({type(module).__name__})")
            continue
        if name == "lm_head" and hasattr(type(model), "output_weight"):
            raise LoraError(
                f"{type(model).__name__} computes logits from lm_head.weight directly (fused loss), so a "
                "LoRA branch on lm_head would be ignored; remove 'lm_head' from target_modules"
            )
        for t in matched:
            hits[t].append(raw_name)
        chosen.append(raw_name)
    if not_linear:
        raise LoraError(f"LoRA targets {targets} match modules that are not nn.Linear: {not_linear}")
    missing = [t for t, names in hits.items() if not names]
    if missing:
        leaves = sorted({_clean_name(n).rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LoraError(
            f"LoRA target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {leaves}"
        )
    for raw_name in chosen:
        parent_name, _, child = raw_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, LoraLinear.from_linear(
            linear, r=config.r, alpha=config.alpha, dropout=config.dropout, adapter_dtype=adapter_dtype,
        ))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in lora_modules(model):
        m.lora.lora_A.requires_grad_(True)
        m.lora.lora_B.requires_grad_(True)
    return model


def reset_lora_parameters(model: nn.Module) -> nn.Module:
    """Re-initialise every LoRA branch (A kaiming-uniform, B = 0), e.g. after a model built on the
    meta device was materialised with ``to_empty``. Refuses merged layers. Returns ``model``."""
    for name, m in _require_lora(model, "reset_lora_parameters"):
        if m.merged:
            raise LoraError(f"reset_lora_parameters: {name} is merged; call unmerge_lora(model) first")
        with torch.no_grad():
            m.lora.reset_parameters()
    return model


def _require_lora(model: nn.Module, what: str) -> list[tuple[str, LoraLinear]]:
    mods = list(lora_modules(model))
    if not mods:
        raise LoraError(f"{what}: the model has no LoRA layers; call apply_lora(model, LoraConfig(...)) first")
    return mods


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (see :meth:`LoraLinear.merge`). Returns ``model``."""
    for _, m in _require_lora(model, "merge_lora"):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (see :meth:`LoraLinear.unmerge`). Returns ``model``."""
    for _, m in _require_lora(model, "unmerge_lora"):
        m.unmerge()
    return model


def unload_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replace every :class:`LoraLinear` by a plain ``nn.Linear`` sharing its weight (in place).

    Args:
        model: a LoRA model.
        merge: fold the updates into the weights first (PEFT's ``merge_and_unload``); with False
            the updates are dropped (the base model comes back, unmerged first if needed).

    Returns:
        ``model``, now without LoRA parameters; its ``state_dict()`` is a plain full checkpoint.
        Base parameters keep ``requires_grad=False``.
    """
    for _, m in _require_lora(model, "unload_lora"):
        if merge:
            m.merge()
        else:
            m.unmerge()
    for raw_name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent_name, _, child = raw_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.to_linear())
    return model


def get_lora_config(model: nn.Module) -> LoraConfig | None:
    """Reconstruct the :class:`LoraConfig` of a LoRA model from its layers (None without LoRA).

    ``target_modules`` are the last name components of the wrapped linears, original block order
    first. Raises :class:`LoraError` if layers disagree on r / alpha / dropout.
    """
    mods = list(lora_modules(model))
    if not mods:
        return None
    settings = {(m.lora.r, m.lora.alpha, getattr(m.lora.dropout, "p", 0.0)) for _, m in mods}
    if len(settings) != 1:
        raise LoraError(f"LoRA layers use different (r, alpha, dropout) settings: {sorted(settings)}")
    r, alpha, dropout = settings.pop()
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _ in mods))
    order = {t: i for i, t in enumerate(ORIGINAL_TARGETS)}
    leaves.sort(key=lambda t: order.get(t, len(order)))
    alpha_out: float = int(alpha) if float(alpha).is_integer() else alpha
    return LoraConfig(r=r, alpha=alpha_out, dropout=dropout, target_modules=leaves)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (after :func:`apply_lora`: only LoRA ones) -- give these
    to the optimizer. Shared parameters are listed once."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": N}`` parameter counts (shared parameters counted once).

    After :func:`apply_lora`, ``trainable == Σ r·(in + out)`` over the wrapped linears.
    """
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


# ----------------------------------------------------------------------------------------------
# Original-format state dicts
# ----------------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed ``<module>.lora.lora_A`` / ``<module>.lora.lora_B`` (the names of
    the original FM9G LoRA checkpoints), detached, in module order."""
    out: dict[str, torch.Tensor] = {}
    for name, m in _require_lora(model, "lora_state_dict"):
        out[f"{name}.lora.lora_A"] = m.lora.lora_A.detach()
        out[f"{name}.lora.lora_B"] = m.lora.lora_B.detach()
    return out


def load_lora_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "LoRA state dict",
) -> None:
    """Copy LoRA tensors (original naming, as from :func:`lora_state_dict`) into a LoRA model.

    Values are cast to the parameters' dtype / device. Shapes must match exactly.

    Args:
        model: a model prepared with :func:`apply_lora` (same targets and r as the checkpoint).
        state_dict: ``{"<module>.lora.lora_A": [r, in], "<module>.lora.lora_B": [out, r], ...}``.
            Wrapper prefixes (``module.``, ``_orig_mod.`` ...) in its keys are ignored.
        strict: when True (default) missing and unexpected keys are errors; shape mismatches
            are always errors.
        source: what to call the checkpoint in error messages (e.g. its path).

    Raises:
        LoraError: listing every missing / unexpected key and every shape mismatch.
    """
    mods = _require_lora(model, "load_lora_state_dict")
    if any(m.merged for _, m in mods):
        raise LoraError("load_lora_state_dict: the LoRA layers are merged; call unmerge_lora(model) first")
    params: dict[str, nn.Parameter] = {}
    for name, m in mods:
        params[f"{name}.lora.lora_A"] = m.lora.lora_A
        params[f"{name}.lora.lora_B"] = m.lora.lora_B
    given = {_clean_name(k): v for k, v in state_dict.items()}
    missing = [k for k in params if k not in given]
    unexpected = [k for k in given if k not in params]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in given.items()
        if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} tensors: {name_list(mismatched, 8)}")
    if strict and missing:
        problems.append(f"missing {len(missing)} keys: {name_list(missing, 8)}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {name_list(unexpected, 8)}")
    if problems:
        cfg = get_lora_config(model)
        raise LoraError(
            f"{source} does not fit the model's LoRA layers (r={cfg.r if cfg else '?'}, "
            f"targets={cfg.target_modules if cfg else '?'}): " + "; ".join(problems)
            + ". Was it trained on another model size or with other LoRA settings? Build the model with "
            "the same FM9GConfig and LoraConfig (r, target_modules) as the run that wrote it."
        )
    with torch.no_grad():
        for k, p in params.items():
            if k in given:
                p.copy_(given[k].to(device=p.device, dtype=p.dtype))


def save_lora_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """``torch.save`` :func:`lora_state_dict` to ``path`` (atomically); loadable by the original tools."""
    path = Path(path)
    sd = {k: v.clone().cpu() for k, v in lora_state_dict(model).items()}
    with atomic_file(path) as tmp:
        torch.save(sd, tmp)


def load_lora_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> None:
    """Load an original-format LoRA ``.pt`` (e.g. ``fm9g_live_checkpoint-<step>.pt`` of a LoRA run)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise LoraError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    load_lora_state_dict(model, sd, strict=strict, source=str(path))
