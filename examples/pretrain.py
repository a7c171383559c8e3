"""Pretraining with fm9g: raw text -> index -> mixture of datasets -> Trainer, with resume.

    python examples/pretrain.py --config examples/configs/pretrain_7b.json
    python examples/pretrain.py --config ... --set resume_ckpt=latest    # continue after a crash
    python examples/pretrain.py --cpu-smoke                              # toy run on CPU, seconds

Pretraining samples have ``input = ""``: the loss covers the whole text. Long documents are cut
into ``max_length`` windows; several documents are packed into each row (they never attend to
each other).
"""
from __future__ import annotations

import json
from pathlib import Path

from fm9g import FM9GConfig, TrainConfig, Trainer, build_index


def cpu_smoke(work: Path) -> None:
    from _toy import make_toy_tokenizer, write_sft_jsonl, write_text_jsonl

    tok_dir = make_toy_tokenizer(work / "tokenizer")
    build_index(write_text_jsonl(work / "raw" / "text.jsonl"), work / "index" / "text", language="en")
    build_index(write_sft_jsonl(work / "raw" / "qa.jsonl"), work / "index" / "qa", language="en")
    mix = work / "mix.json"  # the original dataset-config format; abs_weight = share of tokens
    mix.write_text(json.dumps([
        {"dataset_name": "text", "task_name": "text", "path": str(work / "index" / "text"), "abs_weight": 0.7},
        {"dataset_name": "qa", "task_name": "qa", "path": str(work / "index" / "qa"), "abs_weight": 0.3},
    ]))
    common = dict(model=FM9GConfig.from_name("tiny", vocab_size=512), tokenizer_path=str(tok_dir), data=str(mix),
                  lr=1e-2, warmup_iters=0.1, drop_iters=0.2, lr_scheduler="warmupstabledrop", train_iters=12,
                  batch_size=2, max_length=64, save=str(work / "checkpoints"), model_unique="pretrain_smoke",
                  save_iters=6, progress_bar=False, log_iters=3, inspect_iters=0)
    result = Trainer(TrainConfig(**common)).fit()  # checkpoints at steps 6 and 12
    # resuming from step 6 (as after a crash) reproduces steps 7..12 exactly
    again = Trainer(TrainConfig(**common, resume_ckpt="6")).fit()
    print(f"straight: {result.losses[6:]}\nresumed:  {again.losses}")
    assert again.losses == result.losses[6:]


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*.json)")
