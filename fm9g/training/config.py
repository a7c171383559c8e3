"""`TrainConfig`: every knob of a training run, as one typed, keyword-only dataclass.

The field names are the ones users of the original FM9G scripts know (`lr`, `warmup_iters`,
`drop_iters`, `lr_scheduler`, `batch_size`, `max_length`, `train_iters`, `save_iters`, ...).
:meth:`TrainConfig.from_json` reads our own JSON (a flat object) and the original
`train_configs/*.json` files (``{"pretrain": {...}, "finetune": {...}}``; the finetune section
overrides the pretrain one, as the original LoRA launcher did), including keys that only made sense
to the original shell launcher (those are accepted and listed in :data:`IGNORED_KEYS` with the reason).

Values may be strings, as in the original launcher (``"4096"``, ``"True"``, ``"1e-4"``); they are
converted to the field's type. Unknown keys are errors that name the key and suggest the nearest one.

Example::

    cfg = TrainConfig.from_json("train_configs/7b.json")
    cfg = cfg.override({"lr": "3e-4", "train_iters": 200})      # what `--set k=v` does
    cfg = TrainConfig(model="tiny", data="mix.json", lr=1e-3, train_iters=100)
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from fm9g._io import read_json

__all__ = ["TrainConfig", "ConfigError", "ALIASES", "IGNORED_KEYS", "SCHEDULERS"]

SCHEDULERS = ("cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant")
ENGINES = ("torch", "bmtrain")
SHARDINGS = ("full", "hybrid")  # FSDP2 over all ranks / within a node, replicated across nodes
CHECKPOINT_FORMATS = ("full", "sharded")  # one gathered .pt / torch.distributed.checkpoint shards
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A bad training configuration: names the key (and file) and says what to do."""


# original key (after '-' -> '_' normalisation) -> our field name
ALIASES: dict[str, str] = {
    "model_config": "model",
    "config": "model",
    "dataset_config": "data",
    "dataset": "data",
    "dataloader_num_workers": "num_workers",
    "tensorboard_all_tasks": "log_task_loss",
    "load": "pretrained_model",
    "log_dir": "stats_dir",
}

# keys of the original launcher that have no meaning here: accepted (so the original JSON files
# load unchanged) and ignored. value = why.
IGNORED_KEYS: dict[str, str] = {
    "n_gpus": "the GPU count comes from torchrun (--nproc_per_node)",
    "flash": "the attention backend is chosen by the model (attn_impl)",
    "local": "launcher switch",
    "dataloader": "only the indexed loader exists",
    "load_grad": "optimizer state is always restored on resume (only_load_model=true skips it)",
    "grad_ckpt_num": "unused in the original",
    "exp_group": "name runs with model_unique / tensorboard",
    "only_run_dataloader": "unused in the original",
    "eps": "layer-norm eps comes from the model config; Adam eps is adam_eps",
    "strict_state_dict": "state dicts are always loaded strictly",
    "resume_no_optimze": "not supported",
    "tp_size": "tensor parallelism is not supported",
    "async_save": "saves are synchronous and atomic",
    "dataloader_num_threads": "use num_workers",
    "dataloader_prefetch": "use num_workers",
    "dataloader_prefetch_factor": "use num_workers",
    "parallel_load_datastate": "loader state is one file",
    "delta_tuning": "LoRA is on when lora_r > 0 (or `lora` is set)",
    "save_name": "checkpoint files are always named fm9g_live_checkpoint-<step>.pt",
    "save_model": "unused in the original",
    "flash_attn_mask_shape": "unused",
}

# LoRA keys of the original finetune section -> LoraConfig field
_LORA_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_layer": "target_modules"}
DEFAULT_LORA_TARGETS = ["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"]


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
        data: mixture config path (the original ``dataset_configs/*.json``; a bare name is looked up
            as ``dataset_configs/<name>.json``) or a list of entries.
        lora: ``LoraConfig`` / dict (``r``, ``alpha``, ``dropout``, ``target_modules``) or None
            (full training). The original keys ``lora_r``, ``lora_alpha``, ``lora_dropout``,
            ``lora_layer`` fill it in.

    Optimisation (defaults = the original scripts):
        lr, lr_scheduler (cosine | warmupstabledrop | warmupstableexp | linear | constant;
        case-insensitive), warmup_iters and drop_iters (a count, or a fraction of train_iters when
        in (0, 1)), drop_begin / drop_rate (warmupstableexp), weight_decay 0.1, clip_grad 1.0
        (<= 0 disables), adam_betas (0.9, 0.95), adam_eps 1e-8, grad_accum (micro-batches per
        optimizer step; the loss is the mean over all labelled tokens of the step).

    Loop: train_iters (optimizer steps), stop_when_end (stop at train_iters; False keeps going at
    the schedule's final lr until the data ends, like the original's default), batch_size rows of
    max_length tokens per micro-batch, seed, max_bad_steps (consecutive non-finite losses before
    stopping), ignore_cuda_oom (skip a batch that runs out of GPU memory).

    Checkpoints: save (root directory; None disables), model_unique (run name: checkpoints go to
    ``<save>/<model_unique>/<step>/``), save_iters (0: only at the end), save_final, keep_last
    (prune older checkpoints), resume_ckpt (a step number, ``"latest"`` or a checkpoint path),
    only_load_model (resume weights only: step 0, fresh optimizer and loader).

    Logging: log_iters, inspect_iters (parameter statistics), tensorboard (directory;
    ``"auto"`` = ``<save>/<model_unique>/tensorboard``; None disables), stats_dir (train_stats
    jsonl; ``"auto"`` = ``<save>/<model_unique>/train_stats``), log_task_loss, progress_bar,
    peak_flops (for MFU; None = detect from the GPU name).

    Engine: engine (``"torch"``; ``"bmtrain"`` later), device (auto | cpu | cuda | cuda:N),
    precision (auto = bf16 autocast with fp32 master weights on GPU, fp32 on CPU), use_checkpoint
    (activation checkpointing; None = the model config's value), compile (torch.compile each
    layer; ``"auto"`` = on for CUDA, off on CPU), attn_impl (attention backend override), offload (bmtrain engine only), num_workers.

    Several processes (``torchrun``, see docs/distributed.md): data_parallel_shard (``"full"``:
    shard weights, gradients and optimizer state over all ranks; ``"hybrid"``: shard within a
    node, replicate across nodes), reshard_after_forward (free each layer's gathered weights after
    its forward, re-gather for backward: less memory, more communication), checkpoint_format
    (``"full"``: the model gathered into one ``.pt`` in the original names; ``"sharded"``: also a
    ``torch.distributed.checkpoint`` folder every rank writes its shard into, fast to save and load).
    """

    # --- model / data -------------------------------------------------------------------------
    model: Any = None
    pretrained_model: str | None = None
    tokenizer_path: str | None = None
    data: Any = None
    lora: Any = None
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
    # --- logging ------------------------------------------------------------------------------
    log_iters: int = 1
    inspect_iters: int = 100
    tensorboard: str | None = "auto"
    stats_dir: str | None = "auto"
    log_task_loss: bool = True
    progress_bar: bool = True
    peak_flops: float | None = None
    # --- engine -------------------------------------------------------------------------------
    engine: str = "torch"
    device: str = "auto"
    precision: str = "auto"
    use_checkpoint: bool | None = None
    compile: bool | str = "auto"
    attn_impl: str | None = None
    offload: bool = False
    num_workers: int = 0
    # --- several processes (torchrun; see docs/distributed.md) ---------------------------------
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
        values = _normalise(d, source)
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
        only one). Relative paths inside are resolved against the JSON's directory (and, for the
        original layout ``apps/x/train_configs/7b.json``, its parent's ``model_configs`` /
        ``dataset_configs``).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"train config {path} does not exist")
        raw = read_json(path, error=ConfigError)
        sections = [k for k in ("pretrain", "finetune") if k in raw]
        if sections:
            other = [k for k in raw if k not in ("pretrain", "finetune")]
            if other:
                raise ConfigError(
                    f"{path}: keys {other} next to the 'pretrain'/'finetune' sections; move them into a section"
                )
            merged: dict[str, Any] = {}
            for s in sections if section is None else [section]:
                if s not in raw:
                    raise ConfigError(f"{path}: no section {s!r} (has {sections})")
                if not isinstance(raw[s], dict):
                    raise ConfigError(f"{path}: section {s!r} must be an object")
                merged.update({f"{k}": v for k, v in raw[s].items()})
            raw = merged
        return cls.from_dict(raw, source=str(path), base_dir=str(path.parent.resolve()))

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
        new = _normalise(updates, "--set")
        if new.get("lora") is not None:  # merge LoRA keys into the current LoRA settings
            base = _lora_to_dict(current.get("lora")) or {}
            base.update(_lora_to_dict(new["lora"]) or {})
            new["lora"] = base
        current.update(new)
        return TrainConfig(**current)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (model / lora objects turned into dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "lora":
                v = _lora_to_dict(v)
            elif f.name == "model" and hasattr(v, "to_dict"):
                v = v.to_dict()
            elif f.name == "data" and isinstance(v, (list, tuple)):
                v = [x.to_dict() if hasattr(x, "to_dict") else (dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x)
                     for x in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to JSON text; also write it to ``path`` when given (atomically)."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)
        if path is not None:
            tmp = Path(f"{path}.tmp")
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, path)
        return text

    # ------------------------------------------------------------------ checks / derived
    def validate(self) -> None:
        """Coerce value types and check ranges; raises :class:`ConfigError` naming the key."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in ("model", "data", "lora"):
                continue
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.lora = _lora_normalise(self.lora)
        from fm9g.training.schedules import normalise_name

        try:
            self.lr_scheduler = normalise_name(self.lr_scheduler)
        except ValueError:
            _choice("lr_scheduler", self.lr_scheduler.lower(), SCHEDULERS)
        _choice("engine", self.engine, ENGINES)
        _choice("data_parallel_shard", self.data_parallel_shard, SHARDINGS)
        _choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        _choice("precision", self.precision, PRECISIONS)
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ConfigError(f"compile must be true, false or \"auto\", got {self.compile!r}")
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
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or null, got {self.keep_last}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.model is not None and not isinstance(self.model, (str, dict, os.PathLike)) and not hasattr(
            self.model, "to_dict"
        ):
            raise ConfigError(f"model must be a preset name, a JSON path, a dict or an FM9GConfig, got {self.model!r}")
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
        return Path(self.resolve_path(self.save)) / self.model_unique

    def resolve_path(self, p: str | os.PathLike) -> str:
        """Resolve a path from the config: absolute as is, else relative to ``base_dir`` if the
        file exists there, else relative to the working directory."""
        p = os.path.expanduser(str(p))
        if os.path.isabs(p) or self.base_dir is None:
            return p
        cand = os.path.join(self.base_dir, p)
        return cand if os.path.exists(cand) else p

    def find_file(self, value: str, folder: str) -> str | None:
        """Look a model / dataset config up the way the original launcher did.

        A path (with a ``/`` or ending in ``.json``) is taken relative to the train config's
        directory, else the working directory. A bare name ``X`` is looked up as
        ``<folder>/X.json`` next to the train config, one level above it (the original
        ``apps/<x>/train_configs`` layout) and in the working directory. Returns None if absent.
        """
        value = os.path.expanduser(value)
        roots = [r for r in ([self.base_dir, os.path.dirname(self.base_dir)] if self.base_dir else []) if r]
        roots.append(os.getcwd())
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


def resolve_iters(value: float, train_iters: int) -> float:
    """A count, or (value in (0, 1)) a fraction of ``train_iters``."""
    if 0 < value < 1:
        return value * train_iters
    return float(value)


# ---------------------------------------------------------------------------------- helpers
def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _normalise(d: dict[str, Any], source: str | None) -> dict[str, Any]:
    """Map original / hyphenated keys to field names; collect LoRA keys; reject unknown keys."""
    names = set(_field_names())
    out: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    where = f"{source}: " if source else ""
    for key, value in d.items():
        k = str(key).strip().replace("-", "_")
        if k in _LORA_KEYS:
            lora[_LORA_KEYS[k]] = value
            continue
        if k in IGNORED_KEYS:
            continue
        k = ALIASES.get(k, k)
        if k not in names:
            known = sorted(names | set(ALIASES) | set(_LORA_KEYS) | set(IGNORED_KEYS))
            near = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(names))}"
            raise ConfigError(f"{where}unknown key {key!r}{hint}")
        out[k] = value
    if lora:
        base = _lora_to_dict(out.get("lora")) or {}
        base.update(lora)
        out["lora"] = base
    return out


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{name} = {value!r} is not one of {list(allowed)}{hint}")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (possibly a string from a shell-style config) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        # for `str | None` fields a number is fine as a string (resume_ckpt=5)
        last_err: Exception | None = None
        for a in args:
            try:
                return _coerce(name, value, a)
            except ConfigError as err:
                last_err = err
        raise last_err or ConfigError(f"{name}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}")
        return tuple(_coerce(name, v, float) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, os.PathLike)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _lora_to_dict(lora: Any) -> dict[str, Any] | None:
    if lora is None:
        return None
    if isinstance(lora, dict):
        return dict(lora)
    if dataclasses.is_dataclass(lora):
        return dataclasses.asdict(lora)
    raise ConfigError(f"lora must be a LoraConfig, a dict or null, got {lora!r}")


def _lora_normalise(lora: Any) -> Any:
    """dict -> LoraConfig (when fm9g.models.lora is available); r <= 0 -> None (full training)."""
    if lora is None or dataclasses.is_dataclass(lora):
        return lora
    d = _lora_to_dict(lora) or {}
    d = {("target_modules" if k == "layers" else k): v for k, v in d.items()}
    tm = d.get("target_modules")
    if isinstance(tm, str):  # the original stores the list as a JSON string: "[\"project_q\", ...]"
        try:
            tm = json.loads(tm)
        except json.JSONDecodeError:
            tm = [t.strip().strip("'\"") for t in tm.strip("[]").split(",") if t.strip()]
        d["target_modules"] = tm
    allowed = {"r", "alpha", "dropout", "target_modules"}
    extra = [k for k in d if k not in allowed]
    if extra:
        raise ConfigError(f"lora: unknown key(s) {extra}; valid: {sorted(allowed)} (or lora_r, lora_alpha, lora_dropout, lora_layer)")
    r = int(float(d.get("r", 0) or 0))
    if r <= 0:
        return None
    d["r"] = r
    if "alpha" in d:
        d["alpha"] = float(d["alpha"])
    if "dropout" in d:
        d["dropout"] = float(d["dropout"])
    d.setdefault("target_modules", list(DEFAULT_LORA_TARGETS))
    try:
        from fm9g.models.lora import LoraConfig
    except ImportError:
        return d
    kwargs = dict(d)
    return LoraConfig(**kwargs)
