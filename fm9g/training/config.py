"""`TrainConfig`: every knob of a training run, as one typed, keyword-only dataclass.

The field names are the ones users of the original FM9G scripts know (`lr`, `warmup_iters`,
`drop_iters`, `lr_scheduler`, `batch_size`, `max_length`, `train_iters`, `save_iters`, ...).
:meth:`TrainConfig.from_json` reads our own JSON (a flat object) and the original
`train_configs/*.json` files; the translation of the original launcher's key names, file layout
and string values lives in :mod:`fm9g.training.legacy`. This module keeps the dataclass, its
validation and JSON in / out. Unknown keys are errors that name the key and suggest the nearest one.

``model``, ``data`` and ``lora`` are typed: a dict given for them becomes an ``FM9GConfig``, a list
of ``DatasetEntry`` or a ``LoraConfig`` once, when the config is built; a string stays a preset name
or a path, resolved by the builders (:func:`fm9g.training.trainer.build_model`, ``build_loader``).

Example::

    cfg = TrainConfig.from_json("train_configs/7b.json")
    cfg = cfg.override({"lr": "3e-4", "train_iters": 200})      # what `--set k=v` does
    cfg = TrainConfig(model="tiny", data="mix.json", lr=1e-3, train_iters=100)
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fm9g._io import ConfigError, atomic_write_text, nearby_hint, read_json
from fm9g.data.mixture import DatasetEntry
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import checkpoint_share
from fm9g.models.lora import LoraConfig
from fm9g.training.fp8 import FP8_RECIPES, fp8_recipe
from fm9g.training.legacy import ALIASES, IGNORED_KEYS, coerce, lora_values, merge_sections, translate_keys
from fm9g.training.parallelize import DATA_PARALLEL
from fm9g.training.schedules import SCHEDULERS, normalise_name

__all__ = ["TrainConfig", "ConfigError", "ALIASES", "IGNORED_KEYS", "SCHEDULERS"]

TRAIN_CONFIGS_FOLDER = "train_configs"  # the original layout: apps/<x>/train_configs/*.json, run from apps/<x>
ENGINES = ("torch", "bmtrain")
SHARDINGS = ("full", "hybrid")  # FSDP2 over all ranks / within a node, replicated across nodes
CHECKPOINT_FORMATS = ("full", "sharded")  # one gathered .pt / torch.distributed.checkpoint shards
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZERS = ("adamw", "adamw_master", "adamw_bf16")


@dataclass(kw_only=True)
class TrainConfig:
    """Configuration of one training run (pretraining, SFT or LoRA).

    Model and data:
        model: preset name (``"fm9g-7b"``, ``"tiny"``), path to a model JSON (the original
            ``model_configs/*.json`` load unchanged; a bare name like ``"7b"`` is also looked up as
            ``model_configs/7b.json`` next to the train config), a dict of FM9GConfig fields, or an
            ``FM9GConfig``. Optional when ``pretrained_model`` is an HF directory.
        pretrained_model: initial weights: a ``.pt`` in the original key names, or an HF directory.
        tokenizer_path: HF tokenizer directory (defaults to ``pretrained_model`` when that is a dir).
        trust_remote_code: run the Python code a tokenizer folder ships (the FM9G 4B/7B/70B
            ``tokenization_fm9g.py``); off by default, and a folder that needs it is refused with a
            message naming this option.
        data: mixture config path (the original ``dataset_configs/*.json``; a bare name is looked up
            as ``dataset_configs/<name>.json``) or a list of entries (``DatasetEntry`` or dicts;
            relative paths in dicts resolve against ``base_dir``).
        lora: ``LoraConfig`` / dict (``r``, ``alpha``, ``dropout``, ``target_modules``) or None
            (full training). The original keys ``lora_r``, ``lora_alpha``, ``lora_dropout``,
            ``lora_layer`` fill it in. LoRA trains on top of ``pretrained_model``; without one the
            Trainer refuses unless ``lora_random_base`` is true (LoRA on a randomly initialised base).

    Optimisation (defaults = the original scripts):
        lr, lr_scheduler (cosine | warmupstabledrop | warmupstableexp | linear | constant;
        case-insensitive), warmup_iters and drop_iters (a count, or a fraction of train_iters when
        in (0, 1)), drop_begin / drop_rate (warmupstableexp), weight_decay 0.1, clip_grad 1.0
        (<= 0 disables), adam_betas (0.9, 0.95), adam_eps 1e-8, grad_accum (micro-batches per
        optimizer step; the loss is the mean over all labelled tokens of the step).

    Loop: train_iters (optimizer steps; always the length of the run), stop_when_end (what happens
    when the data runs out before train_iters: True stops there with a message; False is an error
    naming the step, since the run would fall short of its schedule), batch_size rows of
    max_length tokens per micro-batch, seed, max_bad_steps (consecutive non-finite losses before
    stopping), ignore_cuda_oom (skip a batch that runs out of GPU memory).

    Relative paths (every path of this config, read or written): against the config file's
    folder, or the folder above it for a file in ``train_configs/`` (the original
    ``apps/<x>/train_configs/`` layout); the working directory for a config built in Python
    (:func:`config_base_dir`, docs/training.md "Relative paths").

    Checkpoints: save (root directory; None disables), model_unique
    (run name: checkpoints go to ``<save>/<model_unique>/<step>/``), save_iters (0: only at the
    end), save_final, keep_last (prune older checkpoints of the run's lineage), resume_ckpt (a
    step number, ``"latest"`` or a checkpoint path), only_load_model (resume weights only: step 0,
    fresh optimizer and loader), load_dataloader_ckpt (false: resume without the data position),
    resume_no_optimizer (resume without the optimizer state; alias ``resume_no_optimze``). A
    resume from a checkpoint lacking optimizer or loader state is refused unless the matching
    option says to go on (docs/checkpoints.md). save_on_interrupt (default true): SIGINT / SIGTERM
    stop after the step in hand and save it (docs/training.md, "Interrupts and preemption"). A run that starts at step 0 (no resume, or only_load_model) refuses a run folder
    that already holds checkpoints or train stats, unless ``overwrite_run`` is true (then those are
    deleted first; docs/training.md, "Run folders").

    Logging: log_iters, inspect_iters (a table of parameter statistics every N steps; 0, the
    default: never), tensorboard (directory;
    ``"auto"`` = ``<save>/<model_unique>/tensorboard``; ``"original"`` = the original launcher's
    ``<save>/../tensorboard/<exp_group><model_unique>``; None disables), exp_group (prefix of the
    ``"original"`` TensorBoard folder), stats_dir (train_stats jsonl; ``"auto"`` =
    ``<save>/<model_unique>/train_stats``), log_task_loss (the original's ``tensorboard_all_tasks``:
    the per-task TensorBoard scalars ``Loss/train/<task>``; per-task losses are always on the console
    line and in train_stats), progress_bar (only ever drawn when stderr is a terminal), peak_flops (for MFU; None = detect from the GPU name).

    Evaluation (docs/training.md, "Evaluation"): eval_data (held-out datasets: a dataset config or
    a list of entries, like ``data``), eval_split (share of each training dataset's documents held
    out of training, in [0, 1); the same documents on every run, rank and resume), eval_iters
    (evaluate every N optimizer steps and at the end; 0 = off), eval_tokens (row tokens evaluated
    each time, over all ranks; None = all held-out data), eval_prompts (questions answered greedily
    at each evaluation), keep_best (keep the checkpoint of the lowest eval loss through
    ``keep_last`` pruning; ``resume_ckpt: best``), early_stopping_patience (stop after K
    evaluations without improvement; 0 = off), early_stopping_min_delta (the improvement that counts).

    Engine: engine (``"torch"``: one process, or FSDP2 under torchrun; ``"bmtrain"``: ZeRO-3 blocks and
    optional optimizer offload, needs bmtrain, see docs/install.md), device (auto |
    cpu | cuda | cuda:N), precision (auto = bf16 autocast with fp32 master weights on GPU, fp32 on
    CPU), compile (torch.compile each layer; ``"auto"`` = on for CUDA, off on CPU), cuda_graphs
    (the compiled layers replay as CUDA graphs, one launch per layer and direction; ``"auto"`` = on
    for compiled layers on one CUDA device without activation checkpointing or FSDP2), offload (the
    optimizer in host memory: fp32 masters and moments there and the Adam step on the CPU, the GPU
    keeping bf16 weights and gradients; both engines; the torch engine with ``adamw`` or
    ``adamw_master``, in one process or under FSDP2), fp8 (``false``, ``"tensorwise"`` or
    ``"rowwise"``: the decoder's linear layers compute in FP8 through torchao, on GPUs of compute
    capability 8.9+; weights, optimizer state and checkpoints unchanged; ``pip install
    'fm9g[fp8]'``; see docs/training.md, "FP8"), deterministic (true: bit-reproducible runs on a GPU
    through deterministic kernels - ``torch.use_deterministic_algorithms``, cuBLAS's fixed workspace,
    the attention backward without atomics; two runs give identical losses and weights and a resume
    continues bit-exactly; refused with the bmtrain engine and the flex attention backend; see
    docs/checkpoints.md), num_workers.

    Optimizer: optimizer (``"adamw"``: fp32 master weights and moments, 16 bytes per trained
    parameter; ``"adamw_master"``: the same AdamW on fp32 master weights and moments held by the
    optimizer, the model training bf16 compute weights and gradients in flat buffers (no casts per
    step; the forward's activations and gradient accumulation are bf16); ``"adamw_bf16"``: weights, gradients and moments in bf16
    with stochastically rounded updates, 8 bytes per parameter, for a full fine-tune that would not
    fit otherwise; the last two: one-process torch engine; see docs/training.md), lr,
    weight_decay, clip_grad, adam_betas, adam_eps.

    Training-time switches applied to the model when it is built: use_checkpoint (activation
    checkpointing: true, false, or the share of decoder layers to recompute, e.g. 0.5) and attn_impl
    (attention backend). None (the default) takes the value of the
    model config (an original model JSON may carry ``use_checkpoint`` / ``attn_impl``); a value
    here wins (docs/training.md, "Training-time switches").

    Data parallelism (see docs/distributed.md): data_parallel (``"auto"``: FSDP2 under torchrun with
    several processes, one process otherwise; ``"fsdp"``: FSDP2 over all ranks, also for one process
    on one GPU; ``"hybrid"``: FSDP2 within a node, replicated across nodes;
    ``"none"``: one process), data_parallel_shard (read by ``"auto"``: ``"full"``:
    shard weights, gradients and optimizer state over all ranks; ``"hybrid"``: shard within a
    node, replicate across nodes), reshard_after_forward (free each layer's gathered weights after
    its forward, re-gather for backward: less memory, more communication), checkpoint_format
    (``"full"``: the model gathered into one ``.pt`` in the original names; ``"sharded"``: also a
    ``torch.distributed.checkpoint`` folder every rank writes its shard into, fast to save and load).
    """

    # --- model / data -------------------------------------------------------------------------
    model: FM9GConfig | str | None = None
    pretrained_model: str | None = None
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    data: list[DatasetEntry] | str | None = None
    lora: LoraConfig | None = None
    lora_random_base: bool = False
    # --- optimisation -------------------------------------------------------------------------
    lr: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_iters: float = 0.01
    drop_iters: float = 0.01
    drop_begin: int = -1
    drop_rate: float = 0.5
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    optimizer: str = "adamw"
    grad_accum: int = 1
    # --- loop ---------------------------------------------------------------------------------
    train_iters: int = 1000
    stop_when_end: bool = True
    batch_size: int = 1
    max_length: int = 4096
    seed: int = 1234
    max_bad_steps: int = 10
    ignore_cuda_oom: bool = False
    # --- checkpoints --------------------------------------------------------------------------
    save: str | None = "checkpoints"
    model_unique: str = "fm9g"
    save_iters: int = 500
    save_final: bool = True
    keep_last: int | None = None
    resume_ckpt: str | None = None
    only_load_model: bool = False
    load_dataloader_ckpt: bool = True
    resume_no_optimizer: bool = False
    overwrite_run: bool = False
    save_on_interrupt: bool = True
    # --- logging ------------------------------------------------------------------------------
    log_iters: int = 1
    inspect_iters: int = 0
    tensorboard: str | None = "auto"
    exp_group: str = ""
    stats_dir: str | None = "auto"
    log_task_loss: bool = True
    progress_bar: bool = True
    peak_flops: float | None = None
    # --- evaluation (fm9g.training.evaluate; docs/training.md, "Evaluation") ---------------------
    eval_data: list[DatasetEntry] | str | None = None
    eval_split: float = 0.0
    eval_iters: int = 0
    eval_tokens: int | None = None
    eval_prompts: list[str] = dataclasses.field(default_factory=list)
    keep_best: bool = False
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    # --- engine -------------------------------------------------------------------------------
    engine: str = "torch"
    device: str = "auto"
    precision: str = "auto"
    use_checkpoint: bool | float | None = None
    compile: bool | str = "auto"
    cuda_graphs: bool | str = "auto"
    attn_impl: str | None = None
    offload: bool = False
    fp8: bool | str = False
    deterministic: bool = False
    num_workers: int = 0
    # --- several processes (torchrun; see docs/distributed.md) ---------------------------------
    data_parallel: str = "auto"
    data_parallel_shard: str = "full"
    reshard_after_forward: bool = True
    checkpoint_format: str = "full"
    # directory that relative paths in the config are resolved against (set by from_json)
    base_dir: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | None = None, base_dir: str | None = None) -> "TrainConfig":
        """Build from a flat dict (our keys, original keys, hyphen or underscore spellings).

        Args:
            d: key -> value; values may be strings (converted to the field's type).
            source: file name used in error messages.
            base_dir: directory relative paths are resolved against.
        Raises:
            ConfigError: unknown key (with the nearest valid key) or a value of the wrong type.
        """
        values = translate_keys(d, set(_field_names()), source)
        if base_dir is not None and "base_dir" not in values:
            values["base_dir"] = str(base_dir)
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}" if source else str(err)) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, section: str | None = None) -> "TrainConfig":
        """Read a train config JSON.

        Accepted shapes: a flat object of keys; or the original ``{"pretrain": {...},
        "finetune": {...}}`` (sections merged in that order; pass ``section="pretrain"`` to read
        only one). Relative paths inside resolve against :func:`config_base_dir` of the file (the
        one rule, docs/training.md "Relative paths"). A key set twice in one object is an error
        naming the key and its lines.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"train config {path.resolve()} does not exist{nearby_hint(path)}")
        raw = merge_sections(read_json(path, error=ConfigError), str(path), section)
        return cls.from_dict(raw, source=str(path), base_dir=str(config_base_dir(path)))

    def override(self, updates: dict[str, Any] | list[str]) -> "TrainConfig":
        """Return a copy with some keys changed (``--set key=value``).

        Args:
            updates: a dict, or a list of ``"key=value"`` strings (value parsed as JSON when it
                is valid JSON, else kept as a string).
        """
        if isinstance(updates, list):
            parsed: dict[str, Any] = {}
            for item in updates:
                if "=" not in item:
                    raise ConfigError(f"--set {item!r}: expected key=value")
                k, v = item.split("=", 1)
                try:
                    parsed[k.strip()] = json.loads(v)
                except json.JSONDecodeError:
                    parsed[k.strip()] = v
            updates = parsed
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        new = translate_keys(updates, set(_field_names()), "--set")
        if new.get("lora") is not None:  # merge LoRA keys into the current LoRA settings
            base = lora_values(current.get("lora")) or {}
            base.update(lora_values(new["lora"]) or {})
            new["lora"] = base
        current.update(new)
        return TrainConfig(**current)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (model / lora objects turned into dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("model", "lora") and v is not None and not isinstance(v, str):
                v = v.to_dict()
            elif f.name in ("data", "eval_data") and isinstance(v, list):
                v = [x.to_dict() for x in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to JSON text; also write it to ``path`` when given (atomically)."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    # ------------------------------------------------------------------ checks / derived
    def validate(self) -> None:
        """Coerce value types and check ranges; raises :class:`ConfigError` naming the key."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in ("model", "data", "lora", "eval_data", "eval_prompts"):
                continue
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.model = _model_value(self.model)
        self.data = _data_value(self.data, self.base_dir)
        self.eval_data = _data_value(self.eval_data, self.base_dir)
        _check_eval(self)
        self.lora = _lora_value(self.lora)
        try:
            self.lr_scheduler = normalise_name(self.lr_scheduler)
        except ValueError:
            _choice("lr_scheduler", self.lr_scheduler.lower(), SCHEDULERS)
        _choice("engine", self.engine, ENGINES)
        _choice("data_parallel_shard", self.data_parallel_shard, SHARDINGS)
        _choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("data_parallel", self.data_parallel, DATA_PARALLEL)
        if self.offload and self.engine == "torch" and self.optimizer == "adamw_bf16":
            raise ConfigError("offload=true keeps fp32 masters and moments in host memory (optimizer adamw or "
                              "adamw_master); adamw_bf16 keeps its 8 bytes per parameter on the GPU: choose one of the two")
        if self.optimizer != "adamw" and self.engine == "bmtrain":
            raise ConfigError(f"optimizer={self.optimizer!r} runs under the torch engine; with engine=\"bmtrain\" "
                              "use optimizer=\"adamw\" (offload=true moves its state to the CPU)")
        for check in (_check_fp8, _check_deterministic, _check_checkpoint_share):
            check(self)
        for name in ("compile", "cuda_graphs"):
            value = getattr(self, name)
            if value not in (True, False, "auto"):
                raise ConfigError(f"{name} must be true, false or \"auto\", got {value!r}")
        _check_finite(self)
        for name in ("train_iters", "grad_accum", "batch_size", "max_length", "log_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "drop_iters", "save_iters", "inspect_iters", "weight_decay", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas must be two numbers, got {self.adam_betas}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must both be in [0, 1), got {list(self.adam_betas)} (the original: 0.9, 0.95)")
        if not 0 < self.adam_eps < float("inf"):
            raise ConfigError(f"adam_eps must be a finite number > 0, got {self.adam_eps} (the original: 1e-8)")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {self.device!r}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or null, got {self.keep_last}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.resume_ckpt is not None and str(self.resume_ckpt).strip() == "":
            self.resume_ckpt = None
        if self.save is not None and str(self.save).lower() in ("true", "false"):
            # the original launcher's `save` was an on/off flag, the directory was fixed
            self.save = "checkpoints" if str(self.save).lower() == "true" else None

    @property
    def warmup_steps(self) -> float:
        """Warmup length in steps (a fraction in (0, 1) is a share of train_iters)."""
        return resolve_iters(self.warmup_iters, self.train_iters)

    @property
    def drop_steps(self) -> float:
        """Drop length in steps (a fraction in (0, 1) is a share of train_iters)."""
        return resolve_iters(self.drop_iters, self.train_iters)

    @property
    def run_dir(self) -> Path | None:
        """``<save>/<model_unique>`` (None when saving is off)."""
        if self.save is None:
            return None
        return Path(self.output_path(self.save)) / self.model_unique

    def output_path(self, p: str | os.PathLike) -> str:
        """Resolve a path the run writes to (``save``, ``tensorboard``, ``stats_dir``) by the one
        rule: absolute as is, else relative to ``base_dir`` (:func:`config_base_dir` of the config
        file), else (a config built in Python) relative to the working directory."""
        p = os.path.expanduser(str(p))
        if os.path.isabs(p) or self.base_dir is None:
            return p
        return os.path.normpath(os.path.join(self.base_dir, p))

    def resolve_path(self, p: str | os.PathLike) -> str:
        """Resolve a path the run reads (``pretrained_model``, ``tokenizer_path``, ...) by the same
        rule as :meth:`output_path`; whether it exists is not looked at (see :meth:`require_path`)."""
        return self.output_path(p)

    def require_path(self, p: str | os.PathLike, what: str) -> str:
        """:meth:`resolve_path`, and a FileNotFoundError naming the absolute path tried (and a
        folder of that name nearby, if any) when nothing is there."""
        found = self.resolve_path(p)
        if not os.path.exists(found):
            raise FileNotFoundError(f"{what} {str(p)!r} not found: tried {os.path.abspath(found)} "
                                    f"(relative paths are resolved against {self.base_dir or os.getcwd()}, "
                                    f"docs/training.md \"Relative paths\"){nearby_hint(found)}")
        return found

    def find_file(self, value: str, folder: str) -> str | None:
        """Look a model / dataset config up the way the original launcher did.

        A path (with a ``/`` or ending in ``.json``) resolves by the one rule (:meth:`resolve_path`).
        A bare name ``X`` is ``<folder>/X.json`` (or ``<folder>/X``) in ``base_dir``: for the
        original ``apps/<x>/train_configs/7b.json`` that is ``apps/<x>/<folder>/X.json``. Returns
        None if absent.
        """
        value = os.path.expanduser(value)
        roots = [self.base_dir or os.getcwd()]
        if os.path.isabs(value):
            return value if os.path.isfile(value) else None
        if "/" in value or value.endswith(".json"):
            for root in roots:
                p = os.path.join(root, value)
                if os.path.isfile(p):
                    return p
            return None
        for root in roots:
            for c in (f"{value}.json", value):
                p = os.path.join(root, folder, c)
                if os.path.isfile(p):
                    return p
        return None


def config_base_dir(path: str | os.PathLike) -> Path:
    """The folder every relative path of the train config file `path` resolves against (the one
    rule): the file's own folder, except for a file in a folder named ``train_configs`` (the
    original ``apps/<x>/train_configs/`` layout, whose scripts ran from ``apps/<x>``), whose
    base is the folder above it."""
    folder = Path(path).resolve().parent
    return folder.parent if folder.name == TRAIN_CONFIGS_FOLDER else folder


def resolve_iters(value: float, train_iters: int) -> float:
    """A count, or (value in (0, 1)) a fraction of ``train_iters``."""
    if 0 < value < 1:
        return value * train_iters
    return float(value)


# ---------------------------------------------------------------------------------- helpers
def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_finite(config: TrainConfig) -> None:
    """Every number of the config is finite: an inf / NaN hyperparameter (lr, weight_decay,
    clip_grad, adam_eps, adam_betas, warmup_iters, ...) would train a non-finite model."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


def _check_deterministic(cfg: TrainConfig) -> None:
    """``deterministic`` only with what has deterministic kernels (not bmtrain's
    engine, whose fused CUDA kernels have no deterministic mode; not flex attention, whose compiled
    backward does not promise one)."""
    if not cfg.deterministic:
        return
    if cfg.engine == "bmtrain":
        raise ConfigError("deterministic=true needs the torch engine: bmtrain's kernels have no deterministic mode; "
                          "set engine=\"torch\" (offload=true works there too) or deterministic=false")
    if cfg.attn_impl == "flex":
        raise ConfigError("deterministic=true: the flex attention backend has no deterministic backward; set "
                          "attn_impl to \"auto\", \"torch_varlen\", \"sdpa\" or \"flash_attn_4\" (or deterministic=false)")


def _check_checkpoint_share(cfg: TrainConfig) -> None:
    """``use_checkpoint``: None, true, false, or a share of the layers in (0, 1) (0 / 1 read as false / true)."""
    if cfg.use_checkpoint is not None:
        try:
            cfg.use_checkpoint = checkpoint_share(cfg.use_checkpoint)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_fp8(cfg: TrainConfig) -> None:
    """``fp8``: false, or a recipe of :data:`fm9g.training.fp8.FP8_RECIPES`, under the torch engine."""
    if cfg.fp8 is False:
        return
    if cfg.fp8 is True:
        raise ConfigError(f"fp8 = true: name the scaling, fp8: {' or '.join(map(repr, FP8_RECIPES))} "
                          "(one scale per tensor or one per row; docs/training.md, \"FP8\")")
    cfg.fp8 = fp8_recipe(cfg.fp8)
    if cfg.engine != "torch":
        raise ConfigError(f"fp8 = {cfg.fp8!r} runs under the torch engine; with engine=\"{cfg.engine}\" set fp8: false")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{name} = {value!r} is not one of {list(allowed)}{hint}")


def _model_value(model: Any) -> FM9GConfig | str | None:
    """A dict becomes an FM9GConfig; a name / path stays a string (resolved by build_model)."""
    if model is None or isinstance(model, FM9GConfig):
        return model
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, dict):
        try:
            return FM9GConfig.from_dict(model, source="TrainConfig.model")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    raise ConfigError(f"model must be a preset name, a JSON path, a dict or an FM9GConfig, got {model!r}")


def _data_value(data: Any, base_dir: str | None) -> list[DatasetEntry] | str | None:
    """A list of dicts becomes DatasetEntry objects (relative paths against `base_dir`); a
    dataset-config name / path stays a string (resolved by build_loader)."""
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, os.PathLike):
        return str(data)
    if not isinstance(data, (list, tuple)):
        raise ConfigError(f"data must be a dataset config path / name or a list of entries, got {data!r}")
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, DatasetEntry):
            entries.append(item)
        elif isinstance(item, dict):
            try:
                entries.append(DatasetEntry.from_dict(item, base_dir=base_dir, where=f"TrainConfig.data entry {i}"))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        else:
            raise ConfigError(f"data entry {i} must be a dict or a DatasetEntry, got {item!r}")
    return entries


def _lora_value(lora: Any) -> LoraConfig | None:
    """A dict becomes a LoraConfig (:meth:`LoraConfig.from_dict`); ``r <= 0`` means full training (None)."""
    if lora is None or isinstance(lora, LoraConfig):
        return lora
    d = lora_values(lora) or {}
    r = d.get("r", 0)
    if not isinstance(r, (int, float)) or isinstance(r, bool):
        raise ConfigError(f"lora_r (lora.r) must be an integer, got {r!r}")
    if r <= 0:
        return None
    try:
        return LoraConfig.from_dict(d, source="lora")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_eval(config: TrainConfig) -> None:
    """The evaluation settings: ranges, and held-out data whenever evaluation is on."""
    if isinstance(config.eval_prompts, str):
        config.eval_prompts = [config.eval_prompts]
    if not isinstance(config.eval_prompts, (list, tuple)) or not all(isinstance(p, str) for p in config.eval_prompts):
        raise ConfigError(f"eval_prompts must be a list of strings, got {config.eval_prompts!r}")
    config.eval_prompts = list(config.eval_prompts)
    if not 0.0 <= config.eval_split < 1.0:
        raise ConfigError(f"eval_split must be in [0, 1) (a share of each dataset's documents), got {config.eval_split}")
    for name in ("eval_iters", "early_stopping_patience"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0 (0 = off), got {getattr(config, name)}")
    if config.eval_tokens is not None and config.eval_tokens < 1:
        raise ConfigError(f"eval_tokens must be >= 1 or null (all held-out data), got {config.eval_tokens}")
    if config.early_stopping_min_delta < 0:
        raise ConfigError(f"early_stopping_min_delta must be >= 0, got {config.early_stopping_min_delta}")
    needs_eval = [n for n in ("keep_best", "early_stopping_patience", "eval_prompts") if getattr(config, n)]
    if needs_eval and not config.eval_iters:
        raise ConfigError(f"{', '.join(needs_eval)} need evaluation: set eval_iters (evaluate every N steps)")
