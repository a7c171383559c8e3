"""Supervised fine-tuning (SFT) with fm9g: jsonl -> index -> mixture -> Trainer.

    python examples/sft.py --config examples/configs/sft_7b.json      # a real run (GPU)
    python examples/sft.py --cpu-smoke                                # toy model + data, seconds on CPU

The loss covers only the answers (and the closing EOS): prompt tokens carry label -100.
"""
from __future__ import annotations

import json
from pathlib import Path

from fm9g import FM9GConfig, TrainConfig, Trainer, build_index


def cpu_smoke(work: Path) -> None:
    from _toy import make_toy_tokenizer, write_sft_jsonl

    tok_dir = make_toy_tokenizer(work / "tokenizer")
    build_index(write_sft_jsonl(work / "raw" / "chat.jsonl"), work / "index" / "chat", language="en")
    mix = work / "mix.json"
    mix.write_text(json.dumps([{"dataset_name": "chat", "task_name": "chat", "path": str(work / "index" / "chat"),
                                "abs_weight": 1.0, "transforms": "chatml", "allow_repeat": True}]))
    cfg = TrainConfig(
        model=FM9GConfig.from_name("tiny", vocab_size=512), tokenizer_path=str(tok_dir), data=str(mix),
        lr=1e-2, warmup_iters=2, lr_scheduler="cosine", train_iters=30, batch_size=2, max_length=64,
        save=str(work / "checkpoints"), model_unique="sft_smoke", save_iters=15, progress_bar=False,
        log_iters=5, inspect_iters=0,
    )
    result = Trainer(cfg).fit()
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; checkpoint {result.last_checkpoint}")
    assert result.losses[-1] < result.losses[0]


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*.json)")
