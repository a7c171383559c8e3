"""Profile fm9g training steps on a GPU: where the time of one W1 step goes (kernel table).

    python benchmarks/profile_step.py [--variant compile] [--rows 30]

Uses the same model, batch and Trainer step as benchmarks/train_gpu.py; prints torch.profiler's
table of CUDA kernels sorted by total GPU time over 3 profiled steps (after warm-up).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="compile")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    flags = set(args.variant.split("+"))
    torch.manual_seed(0)
    mcfg = FM9GConfig(**train_gpu.SHAPE, attn_impl="auto")
    with torch.device("cuda"):
        model = FM9GModel(mcfg)
    cfg = TrainConfig(model=mcfg, lr=1e-5, lr_scheduler="constant", warmup_iters=0, train_iters=10**6,
                      max_length=train_gpu.SEQ, batch_size=1, save=None, tensorboard=None, stats_dir=None,
                      progress_bar=False, device="cuda", precision="bf16", compile="compile" in flags,
                      use_checkpoint="ckpt" in flags, attn_impl="auto", inspect_iters=0)
    trainer = Trainer(cfg, model=model, loader=[])
    batch = train_gpu.packed_batch(mcfg.vocab_size, "cuda")
    for _ in range(4):
        trainer.train_step([batch])
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            trainer.train_step([batch])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
