"""Builders: the model, its pretrained weights, the tokenizer and the data loader a TrainConfig describes.

:func:`build_model` makes the model (on any device, ``"meta"`` included, with or without the
``pretrained_model`` weights); :func:`pretrained_state` gives those weights alone, in the original
FM9G names and memory-mapped where the format allows, so an engine that shards the model can load
them piece by piece. The Trainer builds what it is not given through these functions.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fm9g._io import ConfigError, find_model_file, nearby_hint
from fm9g.convert.files import load_checkpoint_file
from fm9g.models.config import FM9GConfig
from fm9g.training.checkpoint import CheckpointError, load_state_dict_checked
from fm9g.training.config import TrainConfig
from fm9g.training.model_source import lookup_paths, model_config_of
from fm9g.training.engine import Engine

__all__ = ["build_model", "pretrained_state", "build_tokenizer", "build_loader", "check_same_shape", "SHAPE_FIELDS",
           "build_engine", "run_data_parallel", "seed_everything", "set_deterministic"]

# model-config fields that must agree between a checkpoint and the model it is loaded into
SHAPE_FIELDS = ("vocab_size", "dim_model", "num_layers", "num_heads", "num_kv_heads", "dim_head", "dim_ff",
                "tie_lm_head", "qkv_bias")



def _resolve_model_config(config: TrainConfig) -> FM9GConfig | None:
    """``config.model`` as an FM9GConfig (a preset name or a model JSON is read here), with the
    ``attn_impl`` switch of the TrainConfig applied; None when ``model`` is not set."""
    mc = model_config_of(config)  # also the config.json beside a pretrained .pt; preset aliases ("7b")
    return _with_switches(mc, config) if mc is not None else None


def _with_switches(mc: FM9GConfig, config: TrainConfig) -> FM9GConfig:
    """The model config with the TrainConfig's ``attn_impl`` when that is set (else the model's own)."""
    return dataclasses.replace(mc, attn_impl=config.attn_impl) if config.attn_impl else mc


def _pretrained_path(config: TrainConfig) -> Path | None:
    """``pretrained_model`` resolved against the config's folder (None when not set)."""
    if not config.pretrained_model:
        return None
    return Path(config.require_path(config.pretrained_model, "pretrained_model"))


def _model_file(folder: Path) -> Path | None:
    """The one fm9g_live_checkpoint*.pt of a checkpoint folder (None: an HF directory)."""
    try:
        return find_model_file(folder)
    except FileExistsError as err:
        raise FileNotFoundError(f"pretrained_model folder {folder}: {err}") from None


def pretrained_state(config: TrainConfig) -> Mapping[str, torch.Tensor] | None:
    """The ``pretrained_model`` weights in the original FM9G names, without building a model.

    A ``.pt`` (or a checkpoint folder holding one) is memory-mapped
    (``torch.load(mmap=True, weights_only=True)``): tensors are read from disk when touched, so an
    engine can load them shard by shard. An HF directory is converted by
    :func:`fm9g.convert.hf.load_pretrained` (on CPU).

    Returns:
        name -> tensor, or None when ``pretrained_model`` is not set.
    """
    pre = _pretrained_path(config)
    if pre is None:
        return None
    file = _model_file(pre) if pre.is_dir() else pre
    if file is None:
        from fm9g.convert.hf import load_pretrained

        return load_pretrained(pre).state_dict()
    state = load_checkpoint_file(file, error=CheckpointError)  # memory-mapped; a refused pickle names the file
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def build_model(config: TrainConfig, *, device: str | torch.device | None = None,
                load_weights: bool = True) -> nn.Module:
    """The FM9GModel the config describes, with ``pretrained_model`` weights when `load_weights`.

    ``pretrained_model`` may be a ``.pt`` in the original key names (needs ``model``), a checkpoint
    folder of ours, or a Hugging Face directory (the model config is read from it when ``model``
    is not set; when set, the shapes must agree).

    Args:
        config: the run's TrainConfig.
        device: where the parameters are created (None: CPU). ``"meta"`` with
            ``load_weights=False`` builds the structure without memory; an engine then loads
            :func:`pretrained_state` shard by shard.
        load_weights: load ``pretrained_model`` (when set).
    Returns:
        The model in train mode.
    """
    from fm9g.models.fm9g import FM9GModel

    mc = _resolve_model_config(config)
    pre = _pretrained_path(config)
    hf_dir = pre if pre is not None and pre.is_dir() and _model_file(pre) is None else None
    if load_weights and str(device) == "meta" and pre is not None:
        raise ValueError("build_model(device='meta') cannot hold weights: pass load_weights=False and load "
                         "pretrained_state(config) into the engine")
    if hf_dir is not None:
        from fm9g.convert.hf import load_hf_config, load_pretrained

        if load_weights:
            model = load_pretrained(hf_dir)
            found = model.config
        else:
            found = load_hf_config(hf_dir)
        if mc is not None:
            check_same_shape(mc, found, f"pretrained_model {hf_dir}")
        mc = _with_switches(found, config)
        if load_weights:
            model.config = mc
            return (model.to(device) if device is not None else model).train()
    if mc is None:
        raise ValueError("TrainConfig.model is not set: give a preset name, a model JSON or an FM9GConfig "
                         "(or pretrained_model = an HF directory)")
    with torch.device(device or "cpu"):
        model = FM9GModel(mc)
    if load_weights and pre is not None and hf_dir is None:
        load_state_dict_checked(model, pretrained_state(config), source=f"pretrained_model {pre}")
    return model.train()


def build_tokenizer(config: TrainConfig) -> Any:
    """The tokenizer at ``tokenizer_path`` (or the ``pretrained_model`` directory): an HF tokenizer
    folder or ``tokenizer.json``, a sentencepiece ``.model`` (or a folder holding one), or the 8B's
    ``vocab.txt`` (see :func:`fm9g.data.tokenizers.load_tokenizer`)."""
    path = config.tokenizer_path or (config.pretrained_model if config.pretrained_model and
                                     os.path.isdir(config.resolve_path(config.pretrained_model)) else None)
    if path is None:
        raise ValueError("tokenizer_path is not set (needed to tokenize the data)")
    path = config.require_path(path, "tokenizer_path")
    from fm9g.data.tokenizers import load_tokenizer

    return load_tokenizer(path, trust_remote_code=config.trust_remote_code)


def build_loader(config: TrainConfig, tokenizer: Any, *, rank: int = 0, world_size: int = 1) -> Any:
    """``MixtureLoader`` for ``config.data`` (a dataset-config JSON path / name or a list); with
    ``eval_split`` it reads the training side only (:mod:`fm9g.data.split`). Rank ``rank`` reads its
    slice of the ``world_size x batch_size x grad_accum`` rows of each step of the global stream."""
    from fm9g.data.mixture import MixtureLoader

    data: Any = config.data
    if data is None:
        raise ValueError("TrainConfig.data is not set: give a dataset config JSON (dataset_config) or a list of entries")
    base_dir = None
    if isinstance(data, str):
        found = config.find_file(data, "dataset_configs")
        if found is None:
            raise FileNotFoundError(f"dataset config {data!r} not found: tried {', '.join(lookup_paths(config, data, 'dataset_configs'))}"
                                    f"{nearby_hint(lookup_paths(config, data, 'dataset_configs')[0])}")
        data = found
    else:
        base_dir = config.base_dir
    kwargs: dict[str, Any] = {"base_dir": base_dir} if base_dir else {}
    if config.eval_split:
        kwargs.update(holdout=config.eval_split, split="train")
    return MixtureLoader.from_config(data, tokenizer, config.max_length, config.batch_size, seed=config.seed,
                                     rank=rank, world_size=world_size, grad_accum=config.grad_accum,
                                     num_workers=config.num_workers, **kwargs)


def check_same_shape(a: Any, b: Any, what: str) -> None:
    da = a if isinstance(a, dict) else a.to_dict()
    db = b if isinstance(b, dict) else b.to_dict()
    diff = [f"{k}: {db.get(k)!r} in {what} vs {da.get(k)!r} in this model" for k in SHAPE_FIELDS
            if k in da and k in db and da[k] != db[k]]
    if diff:
        raise CheckpointError(f"{what} has another model shape ({'; '.join(diff)}); use the model config it was trained with")


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Make this process's kernels deterministic (``TrainConfig.deterministic``), or leave them be.

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises,
    naming itself; torch's flash attention backward and the embedding gradient take their
    deterministic paths; flash-attn-4 reads the same flag), cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set; it must be set before the first
    matmul on the GPU, which the Trainer does here), and cuDNN without autotuning. Off: nothing is
    changed (a setting the user made stays).
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def run_data_parallel(config: TrainConfig) -> str:
    """The data parallelism of this run (``"none"``, ``"fsdp"`` or ``"hybrid"``), decided once from
    ``config.data_parallel`` and the launch (``WORLD_SIZE``); see
    :func:`fm9g.training.parallelize.data_parallel_mode`. Always ``"none"`` for the bmtrain engine."""
    from fm9g.training.distributed import world_size_from_env
    from fm9g.training.parallelize import data_parallel_mode

    if config.engine == "bmtrain":
        return "none"
    return data_parallel_mode(config.data_parallel, world_size_from_env(), shard=config.data_parallel_shard)


def build_engine(config: TrainConfig, model: nn.Module | None, *, lora_only: bool = False) -> Engine:
    """The engine the config asks for, around ``model`` (built and weight-loaded).

    ``engine="bmtrain"``: :class:`~fm9g.training.bmtrain_engine.BMTrainEngine`. Otherwise the torch
    engine, with FSDP2 when :func:`run_data_parallel` says so (the process group is joined here,
    also for one process). With FSDP2 ``model`` may be None: it is then built on the meta device,
    sharded, and each rank loads only its rows of ``pretrained_model`` (or of the one-process
    random initialisation; docs/distributed.md). ``fp8`` converts the decoder's linears here,
    before the engine compiles them (:func:`fm9g.training.fp8.apply_fp8`).

    Raises:
        RuntimeError: ``engine="bmtrain"`` without bmtrain installed (naming the install command).
        ConfigError: ``data_parallel="none"`` under torchrun with several processes; ``fp8`` on a
            device without FP8 tensor cores.
    """
    from fm9g.training.fp8 import apply_fp8
    from fm9g.training.step_math import lr_scale_width
    from fm9g.training.torch_engine import TorchEngine

    if config.engine == "bmtrain":  # (TrainConfig refuses optimizers other than adamw for it)
        from fm9g.training.bmtrain_engine import BMTrainEngine  # fails at once without bmtrain, naming the install command

        return BMTrainEngine(config, model, lora_only=lora_only)
    mode = run_data_parallel(config)
    kw: dict[str, Any] = dict(
        lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas), eps=config.adam_eps,
        clip_grad=config.clip_grad, device=config.device, precision=config.precision,
        use_checkpoint=config.use_checkpoint, compile=config.compile, lora_only=lora_only,
        peak_flops=config.peak_flops, optimizer=config.optimizer, seed=config.seed, cuda_graphs=config.cuda_graphs,
        offload=config.offload)
    if model is None and mode == "none":
        raise ValueError("build_engine: pass the built model (only FSDP2 builds it on the meta device)")
    on_meta = model is None
    if on_meta:
        model = _build_on_meta(config)
    apply_fp8(model, config, sharded=mode != "none")  # before the engine compiles (and shards) the layers
    if mode == "none":
        return TorchEngine(model, lr_scale_width=lr_scale_width(model), **kw)
    from fm9g.training.distributed import build_mesh, check_same_config, init_distributed

    _, world, device = init_distributed("gloo" if str(config.device) == "cpu" else None)
    check_same_config(config.to_dict())
    mesh = build_mesh("hybrid" if mode == "hybrid" else "full", world, device_type=device.type)
    kw["device"] = str(device)
    engine = TorchEngine(model, lr_scale_width=lr_scale_width(model), mesh=mesh, on_meta=on_meta,
                         reshard_after_forward=bool(config.reshard_after_forward), **kw)
    if on_meta:
        _load_initial_weights(engine, config)
    return engine


def _build_on_meta(config: TrainConfig) -> nn.Module:
    """The model's structure on the meta device (no memory), LoRA applied when the config has it."""
    model = build_model(config, device="meta", load_weights=False)
    if config.lora is not None:
        from fm9g.models.lora import apply_lora

        with torch.device("meta"):
            apply_lora(model, config.lora)
    return model.train()


def _load_initial_weights(engine: Engine, config: TrainConfig) -> None:
    """Fill a meta-built engine's shards: ``pretrained_model`` (each rank reads its rows of a
    memory-mapped file), and for what it does not hold (a fresh run, LoRA tensors) the one-process
    random initialisation (every rank builds it on CPU from the seed, keeps its rows, frees the rest)."""
    from fm9g.models.lora import is_lora_name

    names = [n for n, _ in engine.model.named_parameters()]
    lora = [n for n in names if is_lora_name(n)]
    if config.pretrained_model is None or lora:
        from fm9g.models.fm9g import FM9GModel

        seed_everything(config.seed)
        ref = FM9GModel(engine.model.config)
        if lora:
            from fm9g.models.lora import apply_lora

            apply_lora(ref, config.lora)
        engine.load_model_state_dict(ref.state_dict(), source="initial weights")
        del ref
    state = pretrained_state(config)
    if state is not None:
        base = [n for n in names if n not in lora]
        engine.load_model_state_dict(state, names=base, source=f"pretrained_model {config.pretrained_model}")
