"""`fm9g train --config train.json [--set key=value ...]`: run the Trainer from a config file.

Training runs in one process (CPU or one GPU) in this version; see docs/training.md.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model from a config JSON",
        description="Train from a TrainConfig JSON (ours, or the original train_configs/*.json).",
    )
    p.add_argument("--config", "-c", required=True, help="train config JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=3e-4 --set resume_ckpt=latest")
    p.add_argument("--section", choices=["pretrain", "finetune"], default=None,
                   help="read only this section of an original {pretrain, finetune} file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def run(args: argparse.Namespace) -> int:
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    cfg = TrainConfig.from_json(args.config, section=args.section)
    if args.overrides:
        cfg = cfg.override(list(args.overrides))
    if args.print_config:
        print(cfg.to_json())
        return 0
    from fm9g.training.checkpoint import CheckpointError
    from fm9g.training.trainer import TrainingError

    try:
        result = Trainer(cfg).fit()
    except (CheckpointError, TrainingError) as err:
        print(f"fm9g train: error: {err}", file=sys.stderr)
        return 1
    print(f"done: step {result.step}, {result.tokens} tokens, stop: {result.stop_reason}, "
          f"skipped: {result.skipped}, last checkpoint: {result.last_checkpoint}")
    return 0
