"""FP8 matmuls in training (``TrainConfig.fp8``): the decoder's linear layers computed on FP8 tensor cores.

With ``fp8 = "tensorwise"`` or ``"rowwise"`` the linear layers of every decoder layer (attention
q / k / v / out, FFN gate / up / down) are converted by torchao's float8 training
(``torchao.float8.convert_to_float8_training`` with ``Float8LinearConfig.from_recipe_name``):
each forward casts the input and the weight to FP8 with dynamic scales (one per tensor, or one per
row), multiplies on FP8 tensor cores and returns the activation dtype; the backward does the same
for its two matmuls. The input embedding, the final norm and the lm_head stay as they are.

What does not change: the parameters (the same ``weight`` / ``bias`` tensors in the same dtypes),
their names, the optimizer and its master state, checkpoints. A model converted here has the
state dict of the unconverted one, key for key and value for value.

LoRA: a LoRA linear keeps its branch (``lora_A`` / ``lora_B``, in the activation dtype) and only
its frozen base matmul runs in FP8 (:meth:`fm9g.models.lora.LoraLinear.rebase`).

FP8 tensor cores exist from compute capability 8.9 on (H100, H200, H20, L40, Blackwell);
:func:`fp8_supported` is the one place that decides it. torchao is an optional dependency
(``pip install 'fm9g[fp8]'``), imported only when ``fp8`` is set.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from fm9g._io import ConfigError

if TYPE_CHECKING:
    from fm9g.training.config import TrainConfig

__all__ = ["FP8_RECIPES", "FP8_MIN_CAPABILITY", "FP8_INSTALL", "FP8UnavailableError", "fp8_recipe",
           "fp8_supported", "check_fp8_device", "fp8_linear_names", "convert_to_fp8", "apply_fp8"]

#: the values of ``TrainConfig.fp8`` besides ``false``: torchao's recipe names
FP8_RECIPES = ("tensorwise", "rowwise")
#: the first CUDA compute capability with FP8 tensor cores (Ada / Hopper)
FP8_MIN_CAPABILITY = (8, 9)
FP8_INSTALL = "pip install 'fm9g[fp8]'"
_DECODER_PREFIX = "encoder.layers."


class FP8UnavailableError(ConfigError):
    """``fp8`` is set where it cannot run: a device without FP8 tensor cores, or torchao missing."""


def fp8_supported(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``device`` has FP8 tensor cores, and its name (the GPU's, or ``"CPU"``).

    The one place that decides it: CUDA compute capability >= 8.9 (H100, H200, H20, L40,
    Blackwell); an A100 / A800 (8.0) or a CPU has none.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False, device.type.upper()
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
    return tuple(capability) >= FP8_MIN_CAPABILITY, name


def fp8_recipe(value: Any) -> str:
    """``value`` as a recipe of :data:`FP8_RECIPES` (any case), or :class:`ConfigError` naming the choices."""
    recipe = value.lower() if isinstance(value, str) else value
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8 = {value!r} is not one of false, {', '.join(map(repr, FP8_RECIPES))} "
                          "(FP8 matmuls with one scale per tensor or per row; docs/training.md, \"FP8\")")
    return recipe


def check_fp8_device(recipe: str, device: str | torch.device) -> None:
    """Raise :class:`FP8UnavailableError` naming the device when ``fp8 = recipe`` cannot run on it."""
    ok, name = fp8_supported(device)
    if not ok:
        raise FP8UnavailableError(
            f"fp8 = {recipe!r} needs FP8 tensor cores (compute capability >= 8.9: H100, H200, H20, L40, Blackwell), "
            f"and this run's device is {name}: set fp8: false to train in bf16 there (the default)")


def _torchao_float8() -> Any:
    """``torchao.float8``, or :class:`FP8UnavailableError` saying how to install it."""
    try:
        import torchao.float8 as float8
    except ImportError as err:
        raise FP8UnavailableError(f"fp8 needs torchao's float8 training, which does not import ({err}): "
                                  f"{FP8_INSTALL}, or set fp8: false") from err
    return float8


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The module names of the linear layers FP8 applies to: every ``nn.Linear`` inside a decoder
    layer (``encoder.layers.*``; LoRA linears included, their branches not) whose in and out
    widths are multiples of 16 (what FP8 matmuls require); the lm_head and embeddings never."""
    return [name for name, m in model.named_modules()
            if name.startswith(_DECODER_PREFIX) and isinstance(m, nn.Linear)
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def convert_to_fp8(model: nn.Module, recipe: str) -> list[str]:
    """Convert the linears of :func:`fp8_linear_names` to FP8 compute, in place (no device check).

    Args:
        model: the built model (any device, ``"meta"`` included), LoRA applied or not.
        recipe: ``"tensorwise"`` or ``"rowwise"`` (torchao's dynamic scaling recipes).
    Returns:
        The names of the converted modules.
    """
    recipe = fp8_recipe(recipe)
    from fm9g.models.lora import LoraLinear

    float8 = _torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    names = fp8_linear_names(model)
    lora = [n for n in names if isinstance(model.get_submodule(n), LoraLinear)]
    plain = set(names) - set(lora)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=_named(plain))
    for name in lora:  # the frozen base in FP8 under the same branch (torchao alone would drop the branch)
        layer = model.get_submodule(name)
        base = float8.convert_to_float8_training(layer.to_linear(), config=config)
        _replace_module(model, name, layer.rebase(base))
    return names


def _named(names: set[str]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: fqn in names


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def apply_fp8(model: nn.Module, config: "TrainConfig") -> list[str]:
    """``TrainConfig.fp8`` applied to the built model, before it is compiled (and sharded).

    Checks the device (:func:`check_fp8_device`: the run's CUDA device, ``device="auto"`` included)
    and that torchao is installed, then :func:`convert_to_fp8`. Nothing happens for
    ``fp8 = false``. Under FSDP2 the weights are gathered in their own dtype and cast to FP8 after
    the gather (torchao's FP8 all-gather wraps each weight in a tensor subclass, which then reaches
    the state dict and the checkpoints).

    Returns:
        The names of the converted modules ([] when ``fp8`` is off).
    Raises:
        FP8UnavailableError: a device without FP8 tensor cores (naming it), or torchao missing
            (naming ``pip install 'fm9g[fp8]'``).
        ConfigError: no linear layer FP8 can compute.
    """
    recipe = config.fp8
    if not recipe:
        return []
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    check_fp8_device(recipe, device)
    names = convert_to_fp8(model, recipe)
    if not names:
        raise ConfigError(f"fp8 = {recipe!r}: no linear layer of the decoder has widths that are multiples of 16, "
                          "which FP8 matmuls need; set fp8: false")
    return names
