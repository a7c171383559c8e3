"""Pretraining with fm9g: raw text -> index -> mixture of datasets -> Trainer, with resume.

    python examples/pretrain.py --config examples/configs/pretrain_7b.json
    python examples/pretrain.py --config ... --set resume_ckpt=latest    # continue after a crash
    python examples/pretrain.py --cpu-smoke                              # toy run on CPU, seconds
    python examples/pretrain.py --gpu                                    # real text, one GPU, ~1-2 minutes
    torchrun --nproc_per_node=8 examples/pretrain.py --gpu --work runs/pretrain   # the same on 8 GPUs (FSDP2)
    python examples/pretrain.py --gpu --device cpu --steps 20            # the GPU mode on a CPU (slow)

``--gpu`` trains a ~30M-parameter FM9G from scratch on real text that every Python installation
has: its standard library (source files, and the docstrings as a second dataset), mixed 85 / 15
by ``MixtureLoader``, with a byte-level BPE tokenizer trained on it first. It checkpoints every
40% of the steps, resumes from the step-80% checkpoint in a new run folder and compares the
resumed losses with the straight run's, exports the final checkpoint with ``bmt_to_hf`` (a
``LlamaForCausalLM`` directory) and continues a few prompts greedily with stock transformers.
Under torchrun ``batch_size`` is per GPU (the global batch grows with the number of GPUs).

Pretraining samples have ``input = ""``: the loss covers the whole text. Long documents are cut
into ``max_length`` windows; several documents are packed into each row (they never attend to
each other).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fm9g import FM9GConfig, FM9GModel, TrainConfig, Trainer, bmt_to_hf, build_index


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


def gpu_run(args) -> None:
    from _gpu import Timer, finish, greedy, load_export, log, on_main_first, rank, resume_check, train_tokenizer, \
        write_stdlib_corpus
    from transformers import AutoTokenizer

    work, timer, summary = Path(args.work), Timer(), {"example": "pretrain", "device": args.device}

    def prepare() -> None:  # rank 0 only (the others wait): text, tokenizer, indexes, mixture
        with timer("corpus"):
            summary["corpus"] = write_stdlib_corpus(work / "raw")
        with timer("tokenizer"):
            train_tokenizer([work / "raw" / "docs.jsonl", work / "raw" / "code.jsonl"], work / "tokenizer")
        with timer("index"):
            build_index(work / "raw" / "code.jsonl", work / "index" / "code", language="code", overwrite=True)
            build_index(work / "raw" / "docs.jsonl", work / "index" / "docs", language="en", overwrite=True)
        (work / "mix.json").write_text(json.dumps([  # the original dataset-config format
            {"dataset_name": "stdlib_code", "task_name": "code", "path": str(work / "index" / "code"), "abs_weight": 0.85},
            {"dataset_name": "stdlib_docs", "task_name": "docs", "path": str(work / "index" / "docs"), "abs_weight": 0.15},
        ]))

    on_main_first(prepare)
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    steps = args.steps
    rows, length = (32, 512) if args.device.startswith("cuda") else (2, 128)  # on a CPU: a smoke test of this mode
    model = FM9GConfig(vocab_size=(len(tok) + 127) // 128 * 128, dim_model=512, num_layers=8, num_heads=8, num_kv_heads=8,
                       dim_ff=1536, tie_lm_head=True, max_length=512, use_checkpoint=False)
    common = dict(model=model, tokenizer_path=str(work / "tokenizer"), data=str(work / "mix.json"), device=args.device,
                  lr=2e-3, lr_scheduler="warmupstabledrop", warmup_iters=0.05, drop_iters=0.2, train_iters=steps,
                  batch_size=rows, max_length=length, save=str(work / "checkpoints"), save_iters=max(1, steps * 2 // 5),
                  log_iters=max(1, steps // 20), inspect_iters=0, progress_bar=False,
                  compile=False)  # torch.compile pays off in long runs (compile=True), not in a 1-minute one
    with timer("train"):
        straight = Trainer(TrainConfig(**common, model_unique="straight")).fit()
    summary.update(steps=straight.step, tokens=straight.tokens, first_loss=straight.losses[0],
                   last_loss=straight.losses[-1], params_m=_millions(model))
    mid = (steps * 4 // 5) // common["save_iters"] * common["save_iters"]  # the step-80% checkpoint
    with timer("resume"):  # as after a crash at step `mid`: a new run folder continues from its checkpoint
        resumed = Trainer(TrainConfig(**common, model_unique="resumed",
                                      resume_ckpt=str(work / "checkpoints" / "straight" / str(mid)))).fit()
    summary["resume"] = resume_check(straight.losses[mid:], resumed.losses)
    summary["resume"]["from_step"] = mid
    log(f"loss {straight.losses[0]:.3f} -> {straight.losses[-1]:.3f} over {straight.step} steps "
        f"({straight.tokens / 1e6:.1f}M tokens); resumed from step {mid}: exact {summary['resume']['exact']}, "
        f"max relative difference {summary['resume']['max_rel_diff']:.2e}")
    if rank() == 0:
        with timer("export"):
            out = bmt_to_hf(resumed.last_checkpoint, work / "hf", format="native", overwrite=True)
            tok.save_pretrained(out)  # the export is a complete Hugging Face directory
        with timer("generate"):
            hf, hf_tok = load_export(out, args.device)
            summary["samples"] = {p: greedy(hf, hf_tok, p, max_new_tokens=24) for p in PROMPTS}
        for p, text in summary["samples"].items():
            log(f"  {p!r} -> {text!r}")
    summary["seconds"] = timer.seconds
    finish(summary, args.summary)
    if rank() == 0:
        tail = straight.losses[-max(1, len(straight.losses) // 10):]  # one step's loss is noisy: the last 10%
        assert steps < 100 or sum(tail) / len(tail) < 0.6 * straight.losses[0], "the loss did not fall"
        # bit-exact on CPU; on a GPU the attention backward's atomics reorder sums, so the resumed
        # curve follows the straight one within bf16 noise (1.4e-2 relative on an H200, 2026-12-02)
        assert summary["resume"]["max_rel_diff"] < 2e-2, "the resumed losses differ from the straight run's"


def _millions(cfg: FM9GConfig) -> float:
    with torch.device("meta"):
        return round(sum(p.numel() for p in FM9GModel(cfg).parameters()) / 1e6, 1)


PROMPTS = ["def __init__(self, ", "import os\nimport sys\n", "Return the number of"]


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*.json)", gpu_run, 600)
