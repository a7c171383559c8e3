"""`fm9g build-index SRC OUT --language zh|en [--format auto|io|messages|sharegpt|alpaca] [--tokenizer PATH] [--skip-invalid] [--overwrite]`.

The original script's form works too: ``fm9g build-index --path SRC --language zh --output OUT``
(the flags of ``convert_json2index.py``).
"""
from __future__ import annotations

import argparse
import json
import time

from fm9g.commands._args import positional_or_flag


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``build-index`` sub-command."""
    p = subparsers.add_parser(
        "build-index",
        help="validate a jsonl/txt source and write an index directory (data.jsonl, index, index.h5, meta.json)",
        description=(
            "Validate a .jsonl or .txt file (or a directory of them) and write an index directory: "
            "data.jsonl, index (N+1 byte offsets), index.h5 and meta.json. Each jsonl line must be a JSON "
            "object with a string 'output' and an optional string 'input', or a chat record ('messages', "
            "ShareGPT 'conversations', Alpaca 'instruction'); .txt lines become "
            '{"input": "", "output": line}.'
        ),
    )
    positional_or_flag(p, "src", "--path", metavar="SRC",
                       help="a .jsonl or .txt file, or a directory of them (searched one level down)")
    positional_or_flag(p, "out", "--output", metavar="OUT", help="the index directory to write")
    p.add_argument("--language", choices=["zh", "en", "code"], default="zh",
                   help="token estimate without a tokenizer: zh = 0.7 x characters, en/code = 1.5 x space-separated pieces")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="Hugging Face tokenizer directory or name: count real tokens (input + output) instead of estimating")
    p.add_argument("--format", default="auto", choices=["auto", "io", "messages", "sharegpt", "alpaca"],
                   help="record format of the jsonl lines: auto (detected per line, default), io ({input, output}), "
                        "messages (OpenAI), sharegpt (conversations) or alpaca (instruction/input/output)")
    p.add_argument("--chat-template", default=None, metavar="SPEC",
                   help="with --tokenizer: render every record through this chat template (tokenizer, chatml, "
                        "chatml-original, userai or a .jinja path) as training will; a record it cannot render "
                        "is a bad line")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count bad lines instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the whole meta.json (default: a one-line summary)")
    p.add_argument("--workers", type=int, default=None, help="validating processes (default: min(2, CPU count))")
    return p


def run(args: argparse.Namespace) -> int:
    """Build the index and print a one-line summary (or, with ``--json``, meta.json)."""
    from fm9g.data.indexed import build_index

    t0 = time.perf_counter()
    meta = build_index(
        args.src,
        args.out,
        language=args.language,
        tokenizer=args.tokenizer,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
        num_workers=args.workers,
        format=args.format,
        chat_template=args.chat_template,
    )
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps(meta, ensure_ascii=False, indent=1))
        return 0
    print(f"indexed {meta['nlines']} lines ({meta['nbytes'] / 1e6:.1f} MB) into {args.out} in {dt:.1f} s; "
          f"invalid skipped: {meta['n_invalid']}, blank: {meta['n_blank']}; for the dataset config: "
          f"\"nlines\": {meta['nlines']}, \"ave_tokens_per_line\": {meta.get('avg_token_per_line', 0):.0f} "
          f"(all of meta.json: fm9g inspect {args.out})")
    return 0
