"""`fm9g convert`: checkpoint conversion between Hugging Face directories and fm9g / bmtrain `.pt` files.

    fm9g convert hf2bmt HF_DIR OUT.pt [--dtype bf16] [--safetensors] [--overwrite]    (HF_DIR may be a .gguf)
    fm9g convert gguf2hf FILE.gguf OUT_DIR [--overwrite]
    fm9g convert bmt2hf CKPT OUT_DIR [--reference-dir HF_DIR] [--config model.json]
                        [--lora LORA.pt [--lora-alpha A] [--lora-config train.json] [--lora-mode merge|adapter]]
                        [--format native|fm9g] [--dtype bf16] [--max-shard-size 5GB] [--overwrite]

The original ``bmtrain_2_hgface.py`` flags are aliases of the same options:
``--bmtrain-ckpt-path/-i`` (CKPT), ``--huggingface-save-dir/-o`` (OUT_DIR), ``--huggingface-ref-dir/-r``
(``--reference-dir``), ``--lora-ckpt-path`` (``--lora``), ``--lora-config-path`` (``--lora-config``);
for hf2bmt (the original ``hgface_2_bmtrain.py`` had its paths written in the script)
``--huggingface-dir`` (HF_DIR) and ``--bmtrain-ckpt-path`` (OUT).

A thin view of `fm9g.convert.hf.hf_to_bmt` / `bmt_to_hf` and `fm9g.convert.gguf.gguf_to_hf`.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from fm9g.commands._args import positional_or_flag

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000000' -> bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "").upper().removesuffix("B")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints: hf2bmt (Hugging Face -> fm9g .pt), bmt2hf (fm9g .pt -> Hugging Face), gguf2hf",
        description="Convert checkpoints between Hugging Face directories and fm9g / bmtrain .pt files.",
    )
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    h2b = sub.add_parser("hf2bmt", help="Hugging Face directory -> .pt in the original bmtrain names (+ config.json)")
    positional_or_flag(h2b, "hf_dir", "--huggingface-dir", metavar="HF_DIR",
                       help="Hugging Face model directory (config.json + safetensors / pytorch_model.bin)")
    positional_or_flag(h2b, "out", "--bmtrain-ckpt-path", metavar="OUT",
                       help="output checkpoint file, e.g. 9g_models/7b.pt (config.json is written beside it)")
    h2b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="cast the weights (default: keep)")
    h2b.add_argument("--safetensors", action="store_true", help="write safetensors instead of a torch .pt")
    h2b.add_argument("--overwrite", action="store_true",
                     help="replace OUT (and another model's config.json beside it) if it exists; never an input")

    g2h = sub.add_parser("gguf2hf", help="GGUF file (llama.cpp) -> plain Hugging Face directory (fp32 safetensors)")
    g2h.add_argument("gguf", metavar="FILE", help="the .gguf file, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")
    g2h.add_argument("out_dir", metavar="OUT", help="the Hugging Face directory to write")
    g2h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists; never an input")

    b2h = sub.add_parser("bmt2hf", help="fm9g / bmtrain .pt -> Hugging Face directory")
    positional_or_flag(b2h, "ckpt", "-i", "--bmtrain-ckpt-path", metavar="CKPT",
                       help="checkpoint .pt (original names) or a step directory holding one")
    positional_or_flag(b2h, "out_dir", "-o", "--huggingface-save-dir", metavar="OUT_DIR",
                       help="output Hugging Face directory")
    b2h.add_argument("--config", default=None,
                     help="model config JSON (default: config.json beside CKPT, else inferred from --reference-dir)")
    b2h.add_argument("--reference-dir", "-r", "--huggingface-ref-dir", default=None,
                     help="Hugging Face directory of the same model: tokenizer / generation files are copied from it")
    b2h.add_argument("--format", choices=["native", "fm9g"], default="native",
                     help="native: Llama / Qwen2 with muP folded in (no remote code); fm9g: our remote code, muP kept")
    b2h.add_argument("--lora", "--lora-ckpt-path", default=None, help="LoRA checkpoint (<module>.lora.lora_A/B tensors) to merge or export")
    b2h.add_argument("--lora-mode", choices=["merge", "adapter"], default="merge",
                     help="merge the LoRA into the weights (default) or write base + PEFT adapter in OUT_DIR/adapter")
    b2h.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale = alpha / r)")
    b2h.add_argument("--lora-r", type=int, default=None, help="LoRA rank (checked against the tensors)")
    b2h.add_argument("--lora-config", "--lora-config-path", default=None,
                     help="JSON with the LoRA settings (LoraConfig JSON or the training JSON with a 'finetune' section)")
    b2h.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="cast the weights (default: keep)")
    b2h.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), help="safetensors shard size (default 5GB)")
    b2h.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists; never an input")
    return parser


def _gguf_to_hf(gguf: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    from fm9g.convert.gguf import gguf_to_hf
    from fm9g.data.tokenizers import save_tokenizer

    return gguf_to_hf(gguf, out_dir, overwrite=overwrite, save_tokenizer=save_tokenizer)


def run(args: argparse.Namespace) -> int:
    from fm9g.convert.hf import bmt_to_hf, hf_to_bmt

    start = time.perf_counter()
    if args.direction == "gguf2hf":
        out = _gguf_to_hf(args.gguf, args.out_dir, overwrite=args.overwrite)
        print(f"wrote {out} (Hugging Face directory, fp32) in {time.perf_counter() - start:.1f}s")
        return 0
    if args.direction == "hf2bmt":
        hf_dir = args.hf_dir
        if str(hf_dir).endswith(".gguf"):  # a GGUF file: through a temporary Hugging Face directory
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                cfg = hf_to_bmt(_gguf_to_hf(hf_dir, Path(tmp) / "hf"), args.out, dtype=args.dtype,
                                safetensors=args.safetensors, overwrite=args.overwrite)
        else:
            cfg = hf_to_bmt(hf_dir, args.out, dtype=args.dtype, safetensors=args.safetensors,
                            overwrite=args.overwrite)
        print(
            f"wrote {args.out} (+ config.json): {cfg.num_layers} layers, d={cfg.dim_model}, "
            f"heads={cfg.num_heads}/{cfg.num_kv_heads}, vocab={cfg.vocab_size}, tied={cfg.tie_lm_head}, "
            f"qkv_bias={cfg.qkv_bias}, muP={cfg.scale} in {time.perf_counter() - start:.1f}s"
        )
        return 0
    out = bmt_to_hf(
        args.ckpt,
        args.out_dir,
        config=args.config,
        reference_dir=args.reference_dir,
        lora=args.lora,
        format=args.format,
        lora_config=args.lora_config,
        lora_alpha=args.lora_alpha,
        lora_r=args.lora_r,
        lora_mode=args.lora_mode,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} (format={args.format}) in {time.perf_counter() - start:.1f}s", file=sys.stdout)
    return 0
