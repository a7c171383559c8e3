"""LoRA for FM9G: the LoRA linear layer, injection, merging and the original checkpoint format
(`LoraConfig` is defined in `fm9g.models.lora_config` and re-exported here).

The original FM9G stack injected LoRA with OpenDelta, which no longer installs. This module is a
small native replacement that keeps the original checkpoint format:

* A wrapped linear keeps its ``weight`` / ``bias`` state-dict keys and gains a child module
  ``lora`` holding ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``, so LoRA tensors are saved as
  ``<module>.lora.lora_A`` / ``<module>.lora.lora_B`` -- the names the original tools read and write.
* ``y = base(x) + dropout(x) @ Aᵀ @ Bᵀ · (alpha / r)``; ``A`` ~ kaiming-uniform(a=√5), ``B = 0``, so
  a freshly wrapped model computes exactly what the base model computes.
* PEFT adapter directories (Hugging Face module names) are written and read by
  `fm9g.convert.peft`; `LoraConfig` accepts the Hugging Face target names (``q_proj`` ...) itself.

Typical use::

    cfg = LoraConfig.from_name("fm9g-7b")              # r 64, alpha 32, all 7 projections
    apply_lora(model, cfg)                             # in place; base weights frozen
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    ...
    torch.save(lora_state_dict(model), "lora.pt")      # original naming

Only torch (and `fm9g._io`) is imported.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fm9g._io import atomic_file, name_list, state_dict_mismatch
from fm9g.models.lora_config import ORIGINAL_TARGETS, TARGET_ALIASES, LoraConfig, LoraError, register_target_aliases

__all__ = [
    "ORIGINAL_TARGETS",
    "TARGET_ALIASES",
    "register_target_aliases",
    "LoraError",
    "LoraConfig",
    "LoraBranch",
    "LoraLinear",
    "lora_linear_class",
    "apply_lora",
    "merge_lora",
    "unmerge_lora",
    "unload_lora",
    "reset_lora_parameters",
    "lora_modules",
    "is_lora_name",
    "split_lora_name",
    "get_lora_config",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora_checkpoint",
    "load_lora_checkpoint",
    "trainable_parameters",
    "count_parameters",
]

# Infixes that wrappers (activation checkpointing, torch.compile, FSDP, DDP) add to module names but
# that never appear in state-dict keys.
_WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


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
        return self.up(F.linear(h, self.lora_A.to(h.dtype)))  # (..., r) -> (..., out)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        """The up-projection of an already down-projected ``h = dropout(x) Aᵀ``: ``h Bᵀ · scaling``."""
        return F.linear(h, self.lora_B.to(h.dtype)) * self.scaling

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

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's own output ``x Wᵀ + b``: ``nn.Linear``'s, or that of the linear class
        this layer was moved onto with :meth:`rebase` (an FP8 linear: ``fm9g.training.fp8``)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` -> ``[..., out_features]``."""
        out = self.base(x)
        if self.merged:
            return out
        return out + self.lora(x)

    def rebase(self, linear: nn.Linear) -> "LoraLinear":
        """This LoRA branch on another implementation of the same layer.

        ``linear`` computes this layer with its ``weight`` and ``bias`` (say an ``nn.Linear``
        subclass computing in FP8, converted from :meth:`to_linear`). It becomes a LoRA linear
        itself, of class ``Lora<its class>`` (:func:`lora_linear_class`): its base output is
        ``linear``'s own forward; its branch, merge state and state-dict keys are this layer's.

        Returns:
            ``linear`` (changed in place), to put where this layer was.
        Raises:
            LoraError: ``linear`` has another shape or no bias where this layer has one (or the reverse).
        """
        if (linear.weight.shape != self.weight.shape) or ((linear.bias is None) != (self.bias is None)):
            raise LoraError(f"rebase: the new linear ({linear.weight.shape}, bias={linear.bias is not None}) must "
                            f"compute this layer ({self.weight.shape}, bias={self.bias is not None}); build it from "
                            "layer.to_linear()")
        linear.__class__ = lora_linear_class(type(linear))
        linear.lora = self.lora
        linear.merged = self.merged
        return linear

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``alpha/r · B A`` into ``weight`` (fp32 math, then cast). No-op if already merged."""
        if self.merged:
            return
        w = self.weight
        w.copy_((w.float() + self.lora.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True
        self._base_changed()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. Exact up to one rounding of ``weight``'s dtype (fp32: ~1e-7
        relative); nothing extra is stored. No-op if not merged."""
        if not self.merged:
            return
        w = self.weight
        w.copy_((w.float() - self.lora.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False
        self._base_changed()

    def _base_changed(self) -> None:
        """``weight`` changed in place: a base that computes from copies of it (the FP8 one of
        :meth:`rebase`, ``refresh_fp8``) makes them again."""
        refresh = getattr(self, "refresh_fp8", None)
        if refresh is not None:
            refresh()

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


@functools.cache
def lora_linear_class(base: type[nn.Linear]) -> type[LoraLinear]:
    """The LoRA linear class over ``base`` (a subclass of ``nn.Linear``): ``LoraLinear`` itself for
    ``nn.Linear``, else ``Lora<base name>`` deriving from both, whose :meth:`LoraLinear.base` runs
    ``base.forward`` (one class per ``base``, made once)."""
    if issubclass(base, LoraLinear):
        return base
    if base is nn.Linear:
        return LoraLinear
    return type(f"Lora{base.__name__}", (LoraLinear, base), {"__module__": __name__, "__doc__": LoraLinear.__doc__})


# ----------------------------------------------------------------------------------------------
# Model-level operations
# ----------------------------------------------------------------------------------------------

LORA_TENSOR_SUFFIXES = ("lora.lora_A", "lora.lora_B")  # the original FM9G names of a LoRA branch's tensors


def is_lora_name(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA tensor (``<module>.lora.lora_A`` / ``lora_B``,
    the original FM9G names)."""
    return name.endswith(LORA_TENSOR_SUFFIXES)


def split_lora_name(name: str) -> tuple[str, str] | None:
    """``"encoder.layers.0.self_att.self_attention.project_q.lora.lora_A"`` ->
    ``("encoder.layers.0.self_att.self_attention.project_q", "lora_A")``; a DDP ``module.`` prefix is
    dropped; None for a name that is not a LoRA tensor."""
    if not is_lora_name(name):
        return None
    module, _, kind = name.removeprefix("module.").rpartition(".")
    return module[: -len("lora")].rstrip("."), kind


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
    expected = params if strict else {k: p for k, p in params.items() if k in given}
    problem = state_dict_mismatch(expected, given if strict else {k: given[k] for k in expected}, source=source)
    if problem:
        cfg = get_lora_config(model)
        raise LoraError(
            f"{source} does not fit the model's LoRA layers (r={cfg.r if cfg else '?'}, "
            f"targets={cfg.target_modules if cfg else '?'}): {problem}"
            ". Was it trained on another model size or with other LoRA settings? Build the model with "
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
