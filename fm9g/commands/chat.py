"""`fm9g chat RUN_OR_CHECKPOINT [--prompt P]`: answers from a training checkpoint, no conversion.

RUN_OR_CHECKPOINT is a checkpoint folder ``<save>/<model_unique>/<step>`` (or its ``.pt``), a run
folder ``<save>/<model_unique>`` (its ``latest``), ``<run>/latest`` or ``<run>/best``, or an fm9g
``.pt`` with its ``config.json`` beside it. A LoRA run's checkpoint is put on its base
(``pretrained_model`` of the run, or ``--base``). The prompt goes through the run's chat format
(:class:`fm9g.training.prompts.PromptFormat`: its data's chat transform, else the tokenizer's chat
template); answers are greedy unless ``--temperature`` is set. Without ``--prompt``, questions are
read from the terminal (or stdin) one line at a time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_trained", "answer", "add_parser", "run"]


def _checkpoint_folder(path: Path) -> Path | None:
    """The checkpoint folder ``path`` names (None: a plain .pt file that is not inside one)."""
    from fm9g.training.checkpoint import list_checkpoints, resolve_checkpoint

    if path.name in ("latest", "best") and not path.exists():
        return resolve_checkpoint(path.parent, path.name)
    if path.is_dir() and not any(path.glob("fm9g_live_checkpoint-*.pt")) and list_checkpoints(path):
        return resolve_checkpoint(path, "latest")  # a run folder
    try:
        return resolve_checkpoint(None, str(path))
    except Exception:
        if path.is_file():
            return None
        raise FileNotFoundError(f"{path} is not a checkpoint folder, a run folder (with numbered checkpoints), "
                                "<run>/latest, <run>/best, or an fm9g .pt file") from None


def load_trained(path: str | Path, *, base: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """The model of a training checkpoint, and the run's TrainConfig (None for a plain ``.pt``).

    Args:
        path: see the module docstring.
        base: the base model of a LoRA checkpoint (default: the run's ``pretrained_model``).
        device: where the model goes.
    Returns:
        (FM9GModel in eval mode, TrainConfig | None).
    Raises:
        FileNotFoundError / CheckpointError: nothing loadable at ``path``; a LoRA checkpoint
            without a base.
    """
    from fm9g.convert.hf import load_pretrained
    from fm9g.training.checkpoint import load_checkpoint, load_state_dict_checked
    from fm9g.training.config import TrainConfig

    folder = _checkpoint_folder(Path(path).expanduser())
    if folder is None:
        return load_pretrained(path).to(device).eval(), None
    ck = load_checkpoint(folder, weights_only_model=True)
    cfg = TrainConfig.from_dict({k: v for k, v in ck.train_config.items()}) if ck.train_config else None
    model = _model_for(ck, cfg, base)
    if ck.trainer_state.get("is_lora"):
        from fm9g.models.lora import LoraConfig, apply_lora, load_lora_state_dict

        apply_lora(model, LoraConfig.from_dict(ck.trainer_state.get("lora") or cfg.lora.to_dict()))
        load_lora_state_dict(model, ck.model_state)
    else:
        load_state_dict_checked(model, ck.model_state, source=f"checkpoint {folder}")
    return model.to(device).eval(), cfg


def _model_for(ck: Any, cfg: Any, base: str | None) -> Any:
    """The model to load a checkpoint into: its own config (a full run), or its base (a LoRA run)."""
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.builders import build_model
    from fm9g.training.checkpoint import CheckpointError

    if ck.trainer_state.get("is_lora"):
        if base is None and (cfg is None or not cfg.pretrained_model):
            raise CheckpointError(f"checkpoint {ck.path} holds LoRA tensors only: give its base with --base")
        lora_cfg = cfg.override({"pretrained_model": base, "lora": None}) if base else cfg.override({"lora": None})
        return build_model(lora_cfg)
    if ck.model_config:
        return FM9GModel(FM9GConfig.from_dict(ck.model_config))
    if cfg is not None:
        return build_model(cfg, load_weights=False)
    raise CheckpointError(f"checkpoint {ck.path} has no config.json: cannot tell the model's shape")


def prompt_format(cfg: Any, tokenizer: Any) -> Any:
    """The run's :class:`~fm9g.training.prompts.PromptFormat` (its data's chat transform when the
    dataset config is still there, else the tokenizer's chat template)."""
    from fm9g.training.evaluate import _entries
    from fm9g.training.prompts import PromptFormat

    entries = None
    if cfg is not None and cfg.data is not None:
        try:
            entries = _entries(cfg, cfg.data)[0]
        except (FileNotFoundError, ValueError):
            entries = None
    return PromptFormat.from_entries(tokenizer, entries)


def answer(model: Any, fmt: Any, question: str, *, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """One answer to ``question`` (greedy when ``temperature`` is 0)."""
    import torch

    ids = torch.tensor([fmt.ids(question)], device=model.input_embedding.weight.device)
    out = model.generate(ids, max_new_tokens, eos_token_id=fmt.stop_ids or None, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else 1.0)
    return fmt.decode(out[0, ids.shape[1]:].tolist())


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="answer questions from a training checkpoint (no conversion)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint folder or .pt, run folder, <run>/latest or <run>/best")
    p.add_argument("--tokenizer", help="tokenizer folder or file (default: the run's tokenizer_path / pretrained_model)")
    p.add_argument("--prompt", help="answer this one question and exit (default: ask interactively)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    p.add_argument("--base", help="the base model of a LoRA checkpoint (default: the run's pretrained_model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from fm9g.training.builders import build_tokenizer
    from fm9g.training.config import TrainConfig

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_trained(args.path, base=args.base, device=device)
    if args.tokenizer:
        from fm9g.data.tokenizers import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    elif cfg is not None:
        tok = build_tokenizer(cfg)
    else:
        raise ValueError(f"{args.path} is not a run's checkpoint: give the tokenizer with --tokenizer")
    fmt = prompt_format(cfg if isinstance(cfg, TrainConfig) else None, tok)
    ask = lambda q: answer(model, fmt, q, max_new_tokens=args.max_new_tokens, temperature=args.temperature)  # noqa: E731
    if args.prompt is not None:
        print(ask(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"fm9g chat: {args.path} ({fmt.kind}); an empty line or Ctrl-D ends")
    while True:
        try:
            q = input("> " if interactive else "")
        except EOFError:
            break
        if not q.strip():
            if interactive:
                break
            continue
        print(ask(q), flush=True)
    return 0
