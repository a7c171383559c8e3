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
its frozen base matmul runs in FP8 (:meth:`fm9g.models.lora.LoraLinear.rebase`). In one process the
frozen base is a :class:`FrozenFloat8Linear`: its weight is cast to FP8 once, when the layer is
placed on its device (torchao's layer would cast the unchanging weight again every step), the
backward computes the input's gradient only, and on a GPU the bf16 weight itself then waits in
host memory, so the GPU holds the base in FP8 (the same bytes as in bf16: two FP8 layouts). Under
FSDP2 the base is sharded and gathered per step, and torchao's layer computes it.

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
           "fp8_supported", "check_fp8_device", "fp8_linear_names", "FrozenFloat8Linear", "convert_to_fp8",
           "apply_fp8"]

#: the values of ``TrainConfig.fp8`` besides ``false``: torchao's recipe names
FP8_RECIPES = ("tensorwise", "rowwise")
#: the first CUDA compute capability with FP8 tensor cores (Ada / Hopper)
FP8_MIN_CAPABILITY = (8, 9)
FP8_INSTALL = "pip install 'fm9g[fp8]'"
_DECODER_PREFIX = "encoder.layers."
# weights and activations in e4m3; gradients in e5m2 with one scale per tensor (torchao's tensorwise
# recipe), in e4m3 with one scale per row (its rowwise recipe)
_E4M3, _E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_FP8_COPIES = ("weight_fp8", "weight_fp8_scale", "weight_t_fp8", "weight_t_fp8_scale")


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


def _to_fp8(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``t`` in FP8 scaled to its range, and the fp32 scale that undoes it (``t ≈ q · scale``):
    one for the tensor (0-d), or one per row (``[rows, 1]``) with ``rowwise``."""
    amax = (t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()).float()
    top = torch.finfo(dtype).max
    scale = top / amax.clamp(min=1e-12)
    q = (t.float() * scale).clamp(-top, top).to(dtype, memory_format=torch.contiguous_format)  # row-major, as FP8 matmuls take it
    return q, scale.reciprocal()


class _FrozenFP8Matmul(torch.autograd.Function):
    """``x Wᵀ`` from the FP8 copies of a frozen ``W``: the forward multiplies ``x`` (cast to e4m3 per
    call) by ``W``'s copy, the backward the output's gradient (cast per call) by ``Wᵀ``'s copy. No
    gradient for ``W``: it is frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, wt: torch.Tensor,
                wt_scale: torch.Tensor, rowwise: bool) -> torch.Tensor:
        xq, x_scale = _to_fp8(x, _E4M3, rowwise)
        ctx.save_for_backward(wt, wt_scale)
        ctx.rowwise = rowwise
        # fast accumulation in the forward's product, exact in the gradient's (torchao's recipes' choice)
        return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=x.dtype,
                                use_fast_accum=x.is_cuda)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        wt, wt_scale = ctx.saved_tensors
        gq, g_scale = _to_fp8(grad, _E4M3 if ctx.rowwise else _E5M2, ctx.rowwise)
        grad_x = torch._scaled_mm(gq, wt.t(), scale_a=g_scale, scale_b=wt_scale.t(), out_dtype=grad.dtype)
        return grad_x, None, None, None, None, None


def _remake_fp8_copies(module: "FrozenFloat8Linear", _incompatible_keys: Any) -> None:
    module.refresh_fp8()


class FrozenFloat8Linear(nn.Linear):
    """A frozen linear (a LoRA run's base) whose matmuls run on FP8 tensor cores from FP8 copies of
    its weight made once, not every step.

    Two copies in e4m3: ``weight_fp8`` (``[out, in]``, for the forward) and ``weight_t_fp8``
    (``[in, out]``, for the input's gradient; FP8 matmuls take both operands with the reduced
    dimension contiguous), with one scale per tensor (``tensorwise``) or per row of each copy
    (``rowwise``). They are made whenever the layer is placed (``.to()``, ``.cuda()``, ...), after a
    ``load_state_dict``, a LoRA merge or unmerge, or by :meth:`refresh_fp8`; they are not in the
    state dict, which keeps ``weight`` / ``bias`` as they are. On a GPU the bf16 ``weight`` then moves
    to host memory (it is not used until it changes again), so the layer takes the GPU memory its
    bf16 weight took. The activations and gradients are cast per call, with dynamic scales.

    Build one with :meth:`from_linear` (shares the linear's parameters).
    """

    weight_fp8: torch.Tensor | None
    weight_fp8_scale: torch.Tensor | None
    weight_t_fp8: torch.Tensor | None
    weight_t_fp8_scale: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str) -> "FrozenFloat8Linear":
        """``linear`` (frozen) computing in FP8 with ``recipe`` (``"tensorwise"`` / ``"rowwise"``).

        Raises:
            ValueError: ``linear.weight`` requires a gradient (train it through torchao's layer).
        """
        if linear.weight.requires_grad:
            raise ValueError("FrozenFloat8Linear keeps a fixed FP8 copy of its weight: freeze the weight "
                             "(requires_grad=False) or convert the layer with torchao's float8 training")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.train(linear.training)
        self.rowwise = fp8_recipe(recipe) == "rowwise"
        for name in _FP8_COPIES:
            self.register_buffer(name, None, persistent=False)
        # where the copies live (and the layer computes): moved by .to() like any buffer
        self.register_buffer("fp8_device", torch.empty(0, device=linear.weight.device), persistent=False)
        self.register_load_state_dict_post_hook(_remake_fp8_copies)  # a module-level function: the layer still pickles
        return self

    @torch.no_grad()
    def refresh_fp8(self) -> None:
        """(Re)make the FP8 copies from ``weight`` on the layer's device; on a GPU, then move the bf16
        ``weight`` to host memory."""
        device = self.fp8_device.device
        if device.type == "meta" or self.weight.device.type == "meta":
            return
        w = self.weight.detach().to(device).contiguous()
        self.weight_fp8, self.weight_fp8_scale = _to_fp8(w, _E4M3, self.rowwise)
        if self.rowwise:  # the gradient's matmul reduces over the output rows: scales per input column
            self.weight_t_fp8, self.weight_t_fp8_scale = _to_fp8(w.t(), _E4M3, True)
        else:
            self.weight_t_fp8, self.weight_t_fp8_scale = self.weight_fp8.t().contiguous(), self.weight_fp8_scale
        del w
        if device.type == "cuda" and self.weight.device.type == "cuda":
            self.weight.data = self.weight.data.to("cpu")

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "FrozenFloat8Linear":
        for name in _FP8_COPIES:  # made again from the placed weight below, never cast as a float buffer
            setattr(self, name, None)
        super()._apply(fn, recurse)
        self.refresh_fp8()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` -> ``[..., out_features]`` in ``x``'s dtype."""
        if self.weight_fp8 is None:
            self.refresh_fp8()
        y = _FrozenFP8Matmul.apply(x.reshape(-1, self.in_features), self.weight_fp8, self.weight_fp8_scale,
                                   self.weight_t_fp8, self.weight_t_fp8_scale, self.rowwise)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={'rowwise' if self.rowwise else 'tensorwise'}"


def convert_to_fp8(model: nn.Module, recipe: str, *, frozen_copies: bool = True) -> list[str]:
    """Convert the linears of :func:`fp8_linear_names` to FP8 compute, in place (no device check).

    Args:
        model: the built model (any device, ``"meta"`` included), LoRA applied or not.
        recipe: ``"tensorwise"`` or ``"rowwise"`` (torchao's dynamic scaling recipes).
        frozen_copies: every frozen linear (a LoRA run's base, adapted or not) becomes a
            :class:`FrozenFloat8Linear` (its weight cast to FP8 once); False: torchao's layer,
            which casts it every step (FSDP2, where the base is sharded and gathered per step).
    Returns:
        The names of the converted modules.
    """
    recipe = fp8_recipe(recipe)
    from fm9g.models.lora import LoraLinear

    names = fp8_linear_names(model)
    lora = {n for n in names if isinstance(model.get_submodule(n), LoraLinear)}
    frozen = {n for n in names if frozen_copies and not model.get_submodule(n).weight.requires_grad}
    dynamic = set(names) - frozen  # torchao's layers: trained weights (and frozen ones under FSDP2)
    if dynamic:
        float8 = _torchao_float8()
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
        float8.convert_to_float8_training(model, config=config, module_filter_fn=_named(dynamic - lora))
    for name in sorted(frozen - lora):  # a LoRA run's base linears without a branch
        _replace_module(model, name, FrozenFloat8Linear.from_linear(model.get_submodule(name), recipe))
    for name in sorted(lora):  # the frozen base in FP8 under the same branch (torchao alone would drop the branch)
        layer = model.get_submodule(name)
        if name in frozen:
            base: nn.Linear = FrozenFloat8Linear.from_linear(layer.to_linear(), recipe)
        else:
            base = float8.convert_to_float8_training(layer.to_linear(), config=config)
        _replace_module(model, name, layer.rebase(base))
    return names


def _named(names: set[str]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: fqn in names


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def apply_fp8(model: nn.Module, config: "TrainConfig", *, sharded: bool = False) -> list[str]:
    """``TrainConfig.fp8`` applied to the built model, before it is compiled (and sharded).

    Checks the device (:func:`check_fp8_device`: the run's CUDA device, ``device="auto"`` included)
    and that torchao is installed, then :func:`convert_to_fp8`. Nothing happens for
    ``fp8 = false``. Under FSDP2 the weights are gathered in their own dtype and cast to FP8 after
    the gather (torchao's FP8 all-gather wraps each weight in a tensor subclass, which then reaches
    the state dict and the checkpoints), and ``sharded`` (FSDP2) keeps a LoRA base on torchao's
    layer: a :class:`FrozenFloat8Linear` holds its whole weight on every rank.

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
    names = convert_to_fp8(model, recipe, frozen_copies=not sharded)
    if not names:
        raise ConfigError(f"fp8 = {recipe!r}: no linear layer of the decoder has widths that are multiples of 16, "
                          "which FP8 matmuls need; set fp8: false")
    return names
