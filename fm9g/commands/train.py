"""`fm9g train --config train.json [--set key=value ...]`: run the Trainer from a config file.

Several processes: ``torchrun ... -m fm9g train --config X`` (see docs/distributed.md). Without
torchrun, the original launch variables (GPUS_PER_NODE, NNODES, NODE_RANK / RANK,
MASTER_ENDPOINT / MASTER_ADDR, MASTER_PORT) make ``fm9g train`` start torchrun itself.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


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
    p.add_argument("--check", action="store_true",
                   help="check the config without training: every path, the tokenizer, every index, the model "
                        "config, vocab sizes, the schedule and the LoRA targets; all problems at once (exit 2) "
                        "or a one-screen summary (exit 0)")
    return p


def _relaunch_under_torchrun(args: argparse.Namespace) -> int | None:
    """Re-run this command under torchrun when the original launch variables ask for several processes."""
    from fm9g.training.distributed import torchrun_args_from_env

    launch = torchrun_args_from_env()
    if launch is None or args.print_config or args.check:
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
    if args.check:
        from fm9g.training.preflight import check_config_file

        report = check_config_file(args.config, overrides=list(args.overrides), section=args.section)
        print(report.text())
        return 0 if report.ok else 2
    from fm9g.training.config import TrainConfig

    cfg = TrainConfig.from_json(args.config, section=args.section)
    if args.overrides:
        cfg = cfg.override(list(args.overrides))
    if args.print_config:
        print(cfg.to_json())
        return 0
    return _train(cfg, args)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run: the same config and ``--set``s, ``resume_ckpt=latest``."""
    sets = [f"--set {item}" for item in args.overrides if item.split("=", 1)[0].strip() not in ("resume_ckpt",)]
    section = [f"--section {args.section}"] if args.section else []
    return " ".join(["fm9g train --config", args.config, *section, *sets, "--set resume_ckpt=latest"])


def _train(cfg: Any, args: argparse.Namespace) -> int:
    """Build the Trainer and fit; SIGINT / SIGTERM end with 128 + the signal (130 / 143)."""
    from fm9g.training.distributed import explain_collective_errors
    from fm9g.training.interrupts import RunInterrupted, exit_code
    from fm9g.training.trainer import Trainer

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        with explain_collective_errors():  # a rank that times out: one line naming what to do
            trainer = Trainer(cfg)
            trainer.resume_hint = resume_command(args)
            result = trainer.fit()  # a refused checkpoint or run: one line, exit 2 (fm9g.cli.main)
    except RunInterrupted as err:  # a second signal: stopped at once
        if main_rank:
            print(f"fm9g train: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started (building the model, reading data)
        if main_rank:
            print("fm9g train: interrupted before the first step; nothing was written", file=sys.stderr, flush=True)
        return exit_code(2)
    if result.signal is not None:
        return exit_code(result.signal)
    if not main_rank:  # under torchrun only rank 0 reports
        return 0
    print(f"done: step {result.step}, {result.tokens} tokens, stop: {result.stop_reason}, "
          f"skipped: {result.skipped}, dropped records: {result.dropped or 'none'}, "
          f"last checkpoint: {result.last_checkpoint}")
    return 0
