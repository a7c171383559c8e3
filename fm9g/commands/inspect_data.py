"""`fm9g inspect-data INDEX --tokenizer T [--chat-template X] [--train-on X] [--bos X] [-n N]`.

Renders the first N records of an index the way training does and the way serving does
(``tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)`` + the answer), reports
every token that differs and every record with nothing to train (exit status 1), and shows the
first record with its trained tokens marked. Exit status 0 when training matches serving.
"""
from __future__ import annotations

import argparse

_MARK_OPEN, _MARK_CLOSE = "\u00ab", "\u00bb"  # « trained tokens »


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``inspect-data`` sub-command."""
    p = subparsers.add_parser(
        "inspect-data",
        help="check that chat records train on the tokens serving produces (apply_chat_template parity)",
        description=(
            "Render the first N records of an index as training does (chat template, trained spans) and "
            "as serving does (the tokenizer's apply_chat_template with add_generation_prompt, then the "
            "answer); report every token that differs and every record with nothing to train. Exit status "
            "0: training matches serving; 1: differences found; 2: bad arguments."
        ),
    )
    p.add_argument("index", metavar="INDEX", help="an index directory written by fm9g build-index")
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="the model's tokenizer (a Hugging Face directory)")
    p.add_argument("--chat-template", default="tokenizer", metavar="SPEC",
                   help="the training template: tokenizer (default), chatml, chatml-original, userai or a .jinja path")
    p.add_argument("--serve-template", default=None, metavar="PATH",
                   help="a .jinja file serving uses instead of the tokenizer's own template")
    p.add_argument("--train-on", default="assistant", choices=["assistant", "last_assistant", "all"])
    p.add_argument("--bos", default="auto", choices=["auto", "always", "never"])
    p.add_argument("-n", "--records", type=int, default=20, help="records to check (default 20; 0 = all)")
    p.add_argument("--no-show", action="store_true", help="do not print the first record with its trained tokens")
    p.add_argument("--trust-remote-code", action="store_true", help="let the tokenizer folder run its own Python code")
    return p


def marked(ids: list[int], labels: list[int], tokenizer) -> str:
    """The text of `ids` (and the final label) with the tokens that carry a label wrapped in « »."""
    # labels[j] is token j + 1: token 0 is never trained; the last label follows the last input id
    tokens = list(zip(ids, [False] + [lab != -100 for lab in labels[:-1]]))
    if labels and labels[-1] != -100:
        tokens.append((labels[-1], True))
    out: list[str] = []
    run: list[int] = []
    for k, (tid, trained) in enumerate(tokens):
        run.append(tid)
        if k + 1 == len(tokens) or tokens[k + 1][1] != trained:
            text = tokenizer.decode(run)
            out.append(f"{_MARK_OPEN}{text}{_MARK_CLOSE}" if trained else text)
            run = []
    return "".join(out)


def run(args: argparse.Namespace) -> int:
    """Check parity and print the report; 0 when it holds, 1 when something differs."""
    from pathlib import Path

    from fm9g.data.chat import tokenize_record
    from fm9g.data.index_format import IndexedDataset
    from fm9g.data.parity import check_chat_parity
    from fm9g.data.tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    serve = Path(args.serve_template).read_text(encoding="utf-8") if args.serve_template else None
    limit = None if args.records == 0 else args.records
    report = check_chat_parity(args.index, tok, chat_template=args.chat_template, train_on=args.train_on,
                               bos=args.bos, limit=limit, serve_template=serve)
    if not args.no_show:
        ids, labels = tokenize_record(IndexedDataset(args.index)[0], tok, chat_template=args.chat_template,
                                      train_on=args.train_on, bos=args.bos)
        print(f"record 0 as trained ({len(ids)} tokens, {sum(lab != -100 for lab in labels)} labels, "
              f"trained tokens in {_MARK_OPEN} {_MARK_CLOSE}):\n{marked(ids, labels, tok)}\n")
    print(report.summary())
    return 0 if report.ok else 1
