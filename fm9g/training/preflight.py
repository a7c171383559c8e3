"""``fm9g train --check``: everything a launch would find wrong, at once, without building weights.

:func:`check_config_file` reads a train config the way ``fm9g train`` does and collects every
problem instead of stopping at the first: a key set twice in one JSON object, each bad key or
value, every path (by the one rule of :func:`fm9g.training.config.config_base_dir`), the
tokenizer, every dataset index and transform, the model config (from ``model``, or the
``config.json`` beside a ``.pt``), the tokenizer's size against ``vocab_size``, the schedule, the
LoRA targets (matched on the model built on the meta device: no memory, no weights), the run
folder and ``resume_ckpt``. The :class:`CheckReport` prints as a list of problems (exit 2) or a
one-screen summary (exit 0).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fm9g._io import ConfigError, json_duplicate_keys, nearby_hint
from fm9g.training.config import TrainConfig, config_base_dir
from fm9g.training.legacy import merge_sections
from fm9g.training.schedules import schedule_text, schedule_warnings

__all__ = ["CheckReport", "check_config_file", "check_config"]


@dataclass
class CheckReport:
    """What :func:`check_config_file` found.

    Attributes:
        source: the config file.
        problems: each would stop a launch (or make it train something else than meant).
        warnings: worth knowing, not stopping.
        summary: the run in a few lines (shown when there is no problem).
    """

    source: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        """The problems (numbered) or the summary, then the warnings."""
        if self.problems:
            lines = [f"fm9g train --check: {len(self.problems)} problem(s) in {self.source}:"]
            lines += [f"  {i}. {p}" for i, p in enumerate(self.problems, 1)]
        else:
            lines = [f"fm9g train --check: {self.source} is ready to train"] + [f"  {s}" for s in self.summary]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def check_config_file(path: str | os.PathLike, *, overrides: list[str] | None = None,
                      section: str | None = None) -> CheckReport:
    """Check the train config at `path` (with ``--set`` `overrides`) and return every problem."""
    path = Path(path)
    report = CheckReport(source=str(path))
    if not path.is_file():
        report.problems.append(f"train config {path.resolve()} does not exist{nearby_hint(path)}")
        return report
    text = path.read_text(encoding="utf-8")
    try:
        report.problems += [f"{path}: {d}" for d in json_duplicate_keys(text)]
        raw = merge_sections(json.loads(text), str(path), section)
    except (ValueError, ConfigError) as err:  # invalid JSON, or sections that do not merge
        report.problems.append(f"{path}: {err}")
        return report
    cfg = _lenient_config(raw, str(path), str(config_base_dir(path)), report)
    if cfg is not None and overrides:
        try:
            cfg = cfg.override(list(overrides))
        except ConfigError as err:
            report.problems.append(f"--set: {err}")
    if cfg is not None:
        check_config(cfg, report)
    return report


def _lenient_config(raw: dict[str, Any], source: str, base_dir: str, report: CheckReport) -> TrainConfig | None:
    """The TrainConfig of `raw`, leaving out (and reporting) each key whose value is refused."""
    values = dict(raw)
    while True:
        try:
            return TrainConfig.from_dict(values, source=source, base_dir=base_dir)
        except ConfigError as err:
            report.problems.append(str(err))
            bad = [k for k, v in values.items() if _refused(k, v, source, base_dir)]
            if not bad:
                return None  # keys that are refused only together: nothing more to check
            for k in bad:
                values.pop(k)
            if len(bad) > 1:  # the first error named one of them; name the others too
                for k in bad[1:]:
                    report.problems.append(_error_of(k, raw[k], source, base_dir))


def _refused(key: str, value: Any, source: str, base_dir: str) -> bool:
    try:
        TrainConfig.from_dict({key: value}, source=source, base_dir=base_dir)
    except ConfigError:
        return True
    return False


def _error_of(key: str, value: Any, source: str, base_dir: str) -> str:
    try:
        TrainConfig.from_dict({key: value}, source=source, base_dir=base_dir)
    except ConfigError as err:
        return str(err)
    return f"{source}: {key}"


def check_config(cfg: TrainConfig, report: CheckReport) -> None:
    """Check a built TrainConfig: paths, tokenizer, data, model, vocab, schedule, LoRA, run folder."""
    mc = _check_model(cfg, report)
    n_tok = _check_tokenizer(cfg, report)
    if mc is not None and n_tok is not None and n_tok > mc.vocab_size:
        report.problems.append(f"the tokenizer has {n_tok} tokens but the model's vocab_size is {mc.vocab_size}: "
                               "use the model's own tokenizer, or a model config with a larger vocab_size")
    _check_data(cfg, report)
    report.warnings += schedule_warnings(cfg)
    report.summary.append("schedule: " + schedule_text(cfg))
    if mc is not None and cfg.lora is not None:
        _check_lora(cfg, mc, report)
    _check_run_folder(cfg, report)


def _problem(report: CheckReport, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None with the error's message kept as a problem."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - every user error becomes one line of the report
        report.problems.append(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))
        return None


def _check_model(cfg: TrainConfig, report: CheckReport) -> Any:
    """The model config (no weights); a problem when none is named or it cannot be read."""
    from fm9g.training.model_source import model_config_of

    if cfg.pretrained_model and _problem(report, cfg.require_path, cfg.pretrained_model, "pretrained_model") is None:
        return _problem(report, model_config_of, cfg) if cfg.model is not None else None
    mc = _problem(report, model_config_of, cfg)
    if mc is None and cfg.model is None and cfg.pretrained_model:
        pre = Path(cfg.resolve_path(cfg.pretrained_model))
        if pre.is_dir() and (pre / "config.json").is_file():
            from fm9g.convert.hf_config import load_hf_config

            mc = _problem(report, load_hf_config, pre)
    if mc is None and cfg.model is None and not any("pretrained_model" in p for p in report.problems):
        report.problems.append("no model config: set model (a preset such as \"fm9g-7b\" or \"7b\", or a model JSON), "
                               "or put the config.json that `fm9g convert hf2bmt` writes beside the pretrained .pt")
    if mc is not None:
        report.summary.append(f"model: {mc.num_parameters() / 1e9:.3f} B parameters, vocab {mc.vocab_size}, "
                              f"{mc.num_layers} layers, dim_model {mc.dim_model}"
                              + (f"; weights from {cfg.pretrained_model}" if cfg.pretrained_model else "; random init"))
    return mc


def _check_tokenizer(cfg: TrainConfig, report: CheckReport) -> int | None:
    """Open the tokenizer; its size (None when it could not be opened)."""
    path = cfg.tokenizer_path or (cfg.pretrained_model if cfg.pretrained_model and
                                  os.path.isdir(cfg.resolve_path(cfg.pretrained_model)) else None)
    if path is None:
        report.problems.append("tokenizer_path is not set (needed to tokenize the data)")
        return None
    found = _problem(report, cfg.require_path, path, "tokenizer_path")
    if found is None:
        return None
    from fm9g.data.tokenizers import load_tokenizer

    tok = _problem(report, lambda: load_tokenizer(found, trust_remote_code=cfg.trust_remote_code))
    if tok is None:
        return None
    report.summary.append(f"tokenizer: {found} ({len(tok)} tokens)")
    return len(tok)


def _check_data(cfg: TrainConfig, report: CheckReport) -> None:
    """The dataset config, every index directory and every transform file."""
    from fm9g.data.entries import load_dataset_config
    from fm9g.data.index_format import IndexedDataset
    from fm9g.data.transforms import load_transform
    from fm9g.training.model_source import lookup_paths

    if cfg.data is None:
        report.problems.append("data (dataset_config) is not set: give a dataset config JSON or a list of entries")
        return
    source: Any = cfg.data
    if isinstance(source, str):
        source = cfg.find_file(cfg.data, "dataset_configs")
        if source is None:
            tried = lookup_paths(cfg, cfg.data, "dataset_configs")
            report.problems.append(f"dataset config {cfg.data!r} not found: tried {', '.join(tried)}{nearby_hint(tried[0])}")
            return
    entries = _problem(report, lambda: load_dataset_config(source, base_dir=cfg.base_dir))
    for e in entries or []:
        p = Path(e.path).expanduser()
        if not p.is_dir():
            report.problems.append(f"task {e.task_name!r}: dataset path {p.resolve()} is not an index directory "
                                   f"(relative paths in a dataset config are resolved against its own folder){nearby_hint(p)}")
        else:
            ds = _problem(report, IndexedDataset, p)
            if ds is not None:
                report.summary.append(f"data: {e.task_name}: {len(ds)} lines in {p}")
        if not callable(e.transforms):
            _problem(report, load_transform, e.transforms, None, e.task_name)


def _check_lora(cfg: TrainConfig, mc: Any, report: CheckReport) -> None:
    """Apply the LoRA config to the model built on the meta device (no memory)."""
    import torch

    from fm9g.models.fm9g import FM9GModel
    from fm9g.models.lora import apply_lora

    with torch.device("meta"):
        model = FM9GModel(mc)
    if _problem(report, apply_lora, model, cfg.lora) is not None:
        report.summary.append(f"LoRA: r {cfg.lora.r}, alpha {cfg.lora.alpha}, targets {list(cfg.lora.target_modules)}")


def _check_run_folder(cfg: TrainConfig, report: CheckReport) -> None:
    """The run folder: a run a fresh start would be refused on, a live lock, a missing resume_ckpt."""
    from fm9g.training.checkpoint import list_checkpoints, resolve_checkpoint
    from fm9g.training.run_lock import describe_holder, read_lock, stale_reason

    run_dir = cfg.run_dir
    report.summary.append(f"run folder: {run_dir.resolve() if run_dir is not None else 'none (save is off)'}")
    if run_dir is None:
        return
    holder = read_lock(run_dir)
    if holder is not None and stale_reason(holder) is None:
        report.problems.append(f"run folder {run_dir} is in use by another training run ({describe_holder(holder)})")
    if cfg.resume_ckpt is not None:
        _problem(report, resolve_checkpoint, run_dir, cfg.resume_ckpt)
    elif list_checkpoints(run_dir) and not cfg.overwrite_run:
        report.problems.append(f"{run_dir} already holds a run (checkpoints) and this run starts at step 0: set "
                               "resume_ckpt: \"latest\" to continue it, choose another model_unique, or set overwrite_run: true")
