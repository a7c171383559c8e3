"""`fm9g train --config train.json [--set key=value ...]`: run the Trainer from a config file.

Several processes: ``torchrun ... -m fm9g train --config X`` (see docs/distributed.md). Without
torchrun, the original launch variables (GPUS_PER_NODE, NNODES, NODE_RANK / RANK,
MASTER_ENDPOINT / MASTER_ADDR, MASTER_PORT) make ``fm9g train`` start torchrun itself.
"""
from __future__ import annotations

import argparse
import os
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


def _relaunch_under_torchrun(args: argparse.Namespace) -> int | None:
    """Re-run this command under torchrun when the original launch variables ask for several processes."""
    from fm9g.training.distributed import torchrun_args_from_env

    launch = torchrun_args_from_env()
    if launch is None or args.print_config:
        return None
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "fm9g", "train", "--config", args.config]
    for item in args.overrides:
        cmd += ["--set", item]
    if args.section:
        cmd += ["--section", args.section]
    print("fm9g train: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def run(args: argparse.Namespace) -> int:
    code = _relaunch_under_torchrun(args)
    if code is not None:
        return code
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    cfg = TrainConfig.from_json(args.config, section=args.section)
    if args.overrides:
        cfg = cfg.override(list(args.overrides))
    if args.print_config:
        print(cfg.to_json())
        return 0
    from fm9g.training.distributed import explain_collective_errors

    with explain_collective_errors():  # a rank that times out: one line naming what to do
        result = Trainer(cfg).fit()  # a refused checkpoint or run: one line, exit 2 (fm9g.cli.main)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"done: step {result.step}, {result.tokens} tokens, stop: {result.stop_reason}, "
          f"skipped: {result.skipped}, last checkpoint: {result.last_checkpoint}")
    return 0
