"""`fm9g inspect PATH`: a summary of a checkpoint (.pt or folder), a run folder, an index folder
(meta.json) or a config JSON (train, model or dataset config)."""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any


def summarize_state_dict(sd: dict[str, Any], max_rows: int = 12) -> str:
    """Tensor count, parameter count, dtypes, LoRA or full, inferred shape, the first keys."""
    import torch

    from fm9g.models.lora import split_lora_name

    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    n = sum(v.numel() for v in tensors.values())
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in tensors.values())
    lora_names = {k: split_lora_name(k) for k in tensors}
    lora = bool(tensors) and all(lora_names.values())
    lines = [f"{len(tensors)} tensors, {n:,} parameters ({n / 1e9:.3f} B), dtypes {dict(dtypes)}",
             "kind: " + ("LoRA tensors only" if lora else "full model state")]
    layers = {int(m.group(1)) for k in tensors if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    emb = tensors.get("input_embedding.weight")
    if emb is not None:
        shape = f"vocab {emb.shape[0]}, dim_model {emb.shape[1]}, layers {len(layers)}"
        shape += ", lm_head untied" if "lm_head.weight" in tensors else ", lm_head tied"
        q = tensors.get("encoder.layers.0.self_att.self_attention.project_q.bias")
        shape += ", qkv_bias" if q is not None else ""
        lines.append("shape: " + shape)
    elif lora:
        r = {v.shape[0] for k, v in tensors.items() if lora_names[k][1] == "lora_A"}
        targets = sorted({lora_names[k][0].rsplit(".", 1)[-1] for k in tensors})
        lines.append(f"LoRA r {sorted(r)}, targets {targets}, layers {len(layers)}")
    for k in list(tensors)[:max_rows]:
        lines.append(f"  {k:70s} {str(tuple(tensors[k].shape)):>18s} {str(tensors[k].dtype).replace('torch.', '')}")
    if len(tensors) > max_rows:
        lines.append(f"  ... {len(tensors) - max_rows} more")
    return "\n".join(lines)


def inspect_path(path: str | Path) -> str:
    """The text ``fm9g inspect`` prints for ``path``."""
    import torch

    from fm9g.commands.run_summary import summarize_run
    from fm9g.training.checkpoint import load_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        if (p / "meta.json").is_file():
            meta = json.loads((p / "meta.json").read_text(encoding="utf-8").splitlines()[0])
            return f"index folder {p}\n" + json.dumps(meta, indent=2, ensure_ascii=False)
        if re.fullmatch(r"-?\d+", p.name) and any(p.glob("fm9g_live_checkpoint-*.pt")):
            ck = load_checkpoint(p, weights_only_model=True)
            ts = ck.trainer_state
            lines = [f"checkpoint {p}: step {ck.step}, tokens {ts.get('tokens', '?')}, "
                     f"LoRA run: {bool(ts.get('is_lora'))}, skipped {ts.get('skipped', {})}"]
            files = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
            lines.append("files: " + ", ".join(files))
            if ck.model_config:
                mc = ck.model_config
                lines.append("model: " + ", ".join(f"{k} {mc[k]}" for k in (
                    "vocab_size", "dim_model", "num_layers", "num_heads", "num_kv_heads", "dim_ff", "tie_lm_head", "scale")
                    if k in mc))
            tc = ck.train_config
            if tc:
                lines.append("train: " + ", ".join(f"{k} {tc.get(k)}" for k in (
                    "lr", "lr_scheduler", "train_iters", "batch_size", "max_length", "grad_accum")))
            lines.append(summarize_state_dict(ck.model_state))
            return "\n".join(lines)
        run = summarize_run(p)  # step / train_iters, last loss, finished, latest and best
        if run is not None:
            return run
        raise ValueError(f"{p}: not an index folder (meta.json), a checkpoint folder or a run folder with checkpoints")
    if p.suffix in (".pt", ".bin", ".opt"):
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"state dict {p}\n" + summarize_state_dict(obj)
        keys = list(obj)[:20] if isinstance(obj, dict) else []
        return f"{p}: {type(obj).__name__}" + (f" with keys {keys}" if keys else "")
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, list):
            from fm9g.data.mixture import load_dataset_config

            entries = load_dataset_config(str(p))
            return f"dataset config {p}: {len(entries)} entries\n" + "\n".join(
                f"  {e.task_name}: abs_weight {e.abs_weight}, path {e.path}" for e in entries)
        if any(k in data for k in ("pretrain", "finetune", "lr", "train_iters", "lr_scheduler")):
            from fm9g.training.config import TrainConfig

            return f"train config {p}\n" + TrainConfig.from_json(p).to_json()
        from fm9g.convert.hf_config import load_model_config  # an original model JSON or an HF config.json

        cfg = load_model_config(p)
        return (f"model config {p}: {cfg.num_parameters() / 1e9:.3f} B parameters\n" + cfg.to_json())
    if p.suffix == ".jsonl":
        from fm9g.training.metrics import read_train_stats

        rows = read_train_stats(p)
        return f"train stats {p}: {len(rows)} iterations; last: " + json.dumps(rows[-1]) if rows else f"{p}: empty"
    raise ValueError(f"{p}: don't know how to inspect a {p.suffix or 'file without extension'} "
                     "(expected a .pt, a checkpoint / run / index folder, or a .json config)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="summarise a checkpoint, run, index folder or config",
                              description="Summarise a checkpoint (.pt or folder), a run folder, an index folder "
                                          "(meta.json) or a config JSON.")
    p.add_argument("path")
    return p


def run(args: argparse.Namespace) -> int:
    print(inspect_path(args.path))
    return 0
