"""LoRA fine-tuning with fm9g: freeze the base, train low-rank updates, save only LoRA tensors.

    python examples/lora.py --config examples/configs/lora_7b.json           # a real run (GPU)
    python examples/lora.py --cpu-smoke                                      # toy run on CPU

The original ``train_configs/7b_lora.json`` works as is: its ``"finetune"`` section (``lora_r``,
``lora_alpha``, ``lora_dropout``, ``lora_layer``) turns LoRA on. Checkpoints hold only the LoRA
tensors (``<module>.lora.lora_A`` / ``lora_B``, the original names), and LoRA runs resume exactly.
``fm9g convert bmt2hf`` merges them into a Hugging Face model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fm9g import FM9GConfig, FM9GModel, LoraConfig, TrainConfig, Trainer, build_index


def cpu_smoke(work: Path) -> None:
    from _toy import make_toy_tokenizer, write_sft_jsonl

    tok_dir = make_toy_tokenizer(work / "tokenizer")
    build_index(write_sft_jsonl(work / "raw" / "chat.jsonl"), work / "index" / "chat", language="en")
    mix = work / "mix.json"
    mix.write_text(json.dumps([{"dataset_name": "chat", "task_name": "chat", "path": str(work / "index" / "chat"),
                                "abs_weight": 1.0, "transforms": "chatml"}]))
    model_cfg = FM9GConfig.from_name("tiny", vocab_size=512)
    torch.manual_seed(0)
    torch.save(FM9GModel(model_cfg).state_dict(), work / "base.pt")  # stands in for 9g_models/7b.pt
    cfg = TrainConfig(
        model=model_cfg, pretrained_model=str(work / "base.pt"), tokenizer_path=str(tok_dir), data=str(mix),
        lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"]),
        lr=2e-2, warmup_iters=2, train_iters=20, batch_size=2, max_length=64,
        save=str(work / "checkpoints"), model_unique="lora_smoke", save_iters=10, progress_bar=False, log_iters=5,
        inspect_iters=0,
    )
    result = Trainer(cfg).fit()
    saved = torch.load(result.last_checkpoint / "fm9g_live_checkpoint-20.pt", weights_only=True)
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; {len(saved)} LoRA tensors saved, e.g. {next(iter(saved))}")
    assert all(".lora.lora_" in k for k in saved)


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*_lora.json)")
