"""fm9g against the Hugging Face baseline on the user's path, in one command.

    python benchmarks/run.py W1 W2                      # the ratio table (markdown) of issue 13
    python benchmarks/run.py W1 W2 --scaling            # also W1@accum8, W1@16k, W1@32k, W2@16k
    python benchmarks/run.py W1 --variants base,eager,compile_full --no-hf
    python benchmarks/run.py W1 W2 --tiny               # CPU smoke: tiny shapes, 3 steps, no HF

Every fm9g figure comes from ``Trainer(config).fit()`` over a real index read through
``MixtureLoader`` (``num_workers`` >= 1) with logging on as a user has it (a console line every
step, the train_stats jsonl, TensorBoard when tensorboardX is importable); the step times are the
Trainer's own ``iter_time`` of the stats rows, the median over the rows after ``--warmup``.
Each run is a fresh subprocess (its own peak memory). The HF baseline is
``benchmarks/hf_baseline.py`` (the shared protocol file, copied verbatim), also in a subprocess.

Workloads (``NAME[@SCALE]``):
    W1   full fine-tune of the 1.5B shape (vocab 73448, d 2048, 24 layers, 16 heads MHA, ff 5504,
         untied, qkv bias), bf16 autocast + fp32 master weights, fused AdamW, one packed row of
         4096 tokens = 4 documents of 1024 per step. HF: ``hf_baseline.py full``.
    W2   LoRA r 64 / alpha 32 on all 7 projections of the 7B shape (fm9g-7b preset: MHA 28 heads,
         d 3584, ff 18944, 28 layers, qkv bias), base bf16, no activation checkpointing, same rows.
         HF: the best of ``lora`` (checkpointing) and ``lora:nockpt``.
    W3   not run here: ``benchmarks/bmtrain_w3.py`` (the bmtrain engine).
    @accum8  8 micro-batches of one 4096 row per optimizer step.
    @16k / @32k  one row of 16384 / 32768 tokens per step holding ONE document (long-context cost).
    The HF baseline has only the 4096 shapes, so the scaled runs have no ratio.

Variants (``--variants``, comma-separated; each ``+``-joined flags applied to every workload):
    base          the defaults a user gets (layers compiled on CUDA, attention "auto")
    eager         compile=False
    compile_full  torch.compile the whole model (not only the layers)
    ckpt          activation checkpointing on
    attn=NAME     attention backend (sdpa | flex | torch_varlen | flash_attn | flash_attn_4 | auto)
    chunk=N       tokens per chunk of the fused linear + cross-entropy
    ahead=0       every step waits for the one before (the Trainer queues one step ahead by default on CUDA)
    keep_logits=0 the loss's backward recomputes the logits (kept from the forward by default when they fit 1 GiB)
    land=0        flat-buffer optimizers zero their gradient buffer and backward adds onto it (by default,
                  with one micro-batch, the gradients are dropped and copied into the buffer at the step)
    flatnorm=0    the gradient norm over the parameters' gradients (by default over the flat buffers)
    lorafuse=1|0  q/k/v and gate/up, which read the same input, run their LoRA down-projections as one
                  GEMM (1) or each branch its own (0); default: fm9g.models.lora.FUSE_SHARED_INPUT
    workers=N     MixtureLoader worker processes (default 2)
    profile       torch.profiler over 3 steps after the warm-up: the kernel table in the child's
                  log, the top 20 kernels (ms per step) in run.json, the Chrome trace as
                  trace-<run>.json in the --out folder
    graphs[=0]    TrainConfig(cuda_graphs=True) (False with =0): the compiled layers replay as CUDA graphs
    opt=NAME      optimizer (adamw | adamw_master | adamw_bf16); adamw_master keeps the HF baseline's
                  fp32 optimizer state but a bf16 residual stream; adamw_bf16 keeps bf16 state

Prints the markdown table; with ``$OUT`` set (or ``--out``) also writes ``run.json`` and the logs
of every child process there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK = 989e12
W1_SHAPE = dict(vocab_size=73448, dim_model=2048, num_layers=24, num_heads=16, num_kv_heads=16, dim_head=128,
                dim_ff=5504, tie_lm_head=False, qkv_bias=True, scale=False, scale_depth=-1.0, base=1e6,
                max_length=32768, init_std=0.02, use_checkpoint=False)
TINY_SHAPE = dict(vocab_size=512, dim_model=64, num_layers=2, num_heads=4, num_kv_heads=4, dim_head=16, dim_ff=128,
                  tie_lm_head=False, qkv_bias=True, scale=False, scale_depth=-1.0, base=1e6, max_length=1024,
                  init_std=0.02, use_checkpoint=False)
SCALES = {"": (4096, 1024, 1), "accum8": (4096, 1024, 8), "16k": (16384, 16384, 1), "32k": (32768, 32768, 1)}
TINY_SCALES = {"": (256, 64, 1), "accum8": (256, 64, 2), "16k": (512, 512, 1), "32k": (1024, 1024, 1)}
SCALING = ["W1@accum8", "W1@16k", "W1@32k", "W2@16k"]


# ---------------------------------------------------------------------------------- data
def _token_chars(n: int) -> list[str]:
    """``n`` distinct single characters, one vocabulary token each (no whitespace, no specials)."""
    out: list[str] = []
    for lo, hi in ((0x4E00, 0xD7FF), (0xE000, 0xFDFF), (0x10000, 0x2FFFF)):
        out.extend(chr(c) for c in range(lo, hi + 1))
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"cannot make {n} single-character tokens")


def build_data(folder: Path, vocab: int, doc_len: int, n_docs: int, seed: int = 0) -> tuple[Any, list[dict]]:
    """A ``vocab.txt`` tokenizer of ``vocab`` tokens and an index of ``n_docs`` documents that
    tokenize to exactly ``doc_len`` ids each (BOS + ``doc_len - 1`` tokens; the EOS is the last
    label), random ids below ``vocab``. Returns (tokenizer, TrainConfig.data entries)."""
    from fm9g.data.indexed import build_index
    from fm9g.data.tokenizers import VocabTxtTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _token_chars(vocab - 3)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("".join(json.dumps(t) + "\n" for t in ["<unk>", "<s>", "</s>", *chars]), encoding="utf-8")
    rng = random.Random(seed)
    src = folder / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            text = "".join(rng.choices(chars, k=doc_len - 1))
            f.write(json.dumps({"input": "", "output": text}, ensure_ascii=False) + "\n")
    build_index(src, folder / "index", language="en", num_workers=1, overwrite=True)
    tok = VocabTxtTokenizer(vocab_file)
    assert len(tok.encode(text)) == doc_len - 1, "the synthetic documents must tokenize to doc_len - 1 ids"
    return tok, [{"dataset_name": "synthetic", "task_name": "synthetic", "path": str(folder / "index"),
                  "abs_weight": 1.0}]


# ---------------------------------------------------------------------------------- one fm9g run (child)
def _flags(variant: str) -> dict[str, str]:
    out = {}
    for f in variant.split("+"):
        k, _, v = f.partition("=")
        out[k.strip()] = v.strip()
    return out


def run_fm9g(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one workload variant through ``Trainer(config).fit()``; figures from its stats rows."""
    import torch

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.models.lora import LoraConfig
    from fm9g.training.config import TrainConfig
    from fm9g.training.metrics import flops_per_token, read_train_stats
    from fm9g.training.trainer import Trainer

    tiny, workload, scale = spec["tiny"], spec["workload"], spec["scale"]
    flags = _flags(spec["variant"])
    row, doc_len, accum = (TINY_SCALES if tiny else SCALES)[scale]
    steps, warmup = spec["steps"], spec["warmup"]
    device = "cpu" if tiny else "cuda"
    lora = workload == "W2"
    if tiny:
        mc = FM9GConfig(**TINY_SHAPE)
    elif lora:
        mc = FM9GConfig.from_name("fm9g-7b")
    else:
        mc = FM9GConfig(**W1_SHAPE)
    work = Path(spec["work"])
    docs_per_row = row // doc_len
    tok, data = build_data(work / "data", mc.vocab_size, doc_len, docs_per_row * accum * (steps + warmup) + 8)
    try:
        import tensorboardX  # noqa: F401

        tensorboard = "auto"
    except ImportError:
        tensorboard = None
    compile_: bool | str = "auto"
    if "eager" in flags or "compile_full" in flags:
        compile_ = False
    cfg = TrainConfig(
        model=mc, data=data, lora=LoraConfig.from_name("fm9g-7b").to_dict() if lora else None,
        lr=1e-5 if not lora else 1e-4, lr_scheduler="constant", warmup_iters=0, train_iters=steps + warmup,
        batch_size=1, max_length=row, grad_accum=accum, save=str(work / "runs"), model_unique="bench",
        save_iters=0, save_final=False, log_iters=1, stats_dir="auto", tensorboard=tensorboard,
        progress_bar=False, inspect_iters=0, device=device, precision="bf16" if not tiny else "fp32",
        compile=compile_, use_checkpoint="ckpt" in flags, attn_impl=flags.get("attn") or None,
        num_workers=int(flags.get("workers", 2 if not tiny else 1)), seed=0, optimizer=flags.get("opt") or "adamw",
        **({"cuda_graphs": flags["graphs"] != "0"} if "graphs" in flags else {}),
    )
    model = None
    if lora:
        # the 7B base is created directly in bf16 on the GPU (an fp32 7B would be 30.7 GB)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if not tiny else torch.float32)
        try:
            with torch.device(device):
                model = FM9GModel(dataclasses.replace(mc, attn_impl=flags["attn"]) if flags.get("attn") else mc)
        finally:
            torch.set_default_dtype(previous)
    if "lorafuse" in flags:
        import fm9g.models.lora as lora_mod

        lora_mod.FUSE_SHARED_INPUT = flags["lorafuse"] != "0"
    t_build = time.perf_counter()
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    if "chunk" in flags and hasattr(trainer.model, "loss_chunk_tokens"):
        trainer.model.loss_chunk_tokens = int(flags["chunk"])
    if flags.get("ahead") == "0":
        trainer.engine.launch_ahead = False
    if flags.get("keep_logits") == "0":
        import fm9g.models.fm9g as fm9g_model

        fm9g_model.LOSS_KEEP_LOGITS_BYTES = 0
    if flags.get("land") == "0":
        engine = trainer.engine
        engine.zero_grad = lambda: engine.optimizer.zero_grad(set_to_none=False)
    if flags.get("flatnorm") == "0":
        trainer.engine.flat_norm = False
    if "compile_full" in flags:
        trainer.model.compile()
    kernels: list[dict[str, Any]] = []
    if "profile" in flags:
        _profile_steps(trainer, warmup, device, kernels, n=min(3, cfg.train_iters - warmup), trace=work / "trace.json")
    build_s = time.perf_counter() - t_build
    t_fit = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t_fit
    stats_dir = work / "runs" / "bench" / "train_stats"
    rows = read_train_stats(stats_dir)
    timed = [r for r in rows if r["iteration"] > warmup] or rows[-1:]
    dt = statistics.median(r["iter_time"] for r in timed)
    tokens = statistics.median(r["num_tokens"] for r in timed)
    tps = tokens / dt
    fpt = flops_per_token(trainer.model, row)
    peak = max((r.get("peak_mem_gb") or 0.0) for r in rows) if rows else 0.0
    attn = trainer.model.attention_backend(torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)
    return dict(kind="fm9g", workload=workload + (f"@{scale}" if scale else ""), variant=spec["variant"],
                tokens_per_s=round(tps), mfu=round(tps * fpt / PEAK, 4), peak_mem_GB=round(peak, 2),
                step_s=round(dt, 4), row=row, doc_len=doc_len, grad_accum=accum, steps=len(timed),
                attn=attn, loss=round(result.losses[-1], 3) if result.losses else None,
                skipped=result.skipped, build_s=round(build_s, 1), fit_s=round(fit_s, 1),
                iter_times=[round(r["iter_time"], 4) for r in rows], **({"kernels": kernels} if kernels else {}))


def _profile_steps(trainer: Any, warmup: int, device: str, out: list[dict[str, Any]], n: int = 3,
                   trace: Path | None = None) -> None:
    """Profile ``n`` optimizer steps after the warm-up with torch.profiler, inside ``fit``: the
    kernel table (per step, sorted by device time) goes to the child's log and the top 20 rows into
    ``out`` (the run's ``kernels``); with ``trace``, the Chrome trace of those steps is written there."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = trainer.engine
    inner = engine.train_step
    calls = {"n": 0}
    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)

    def step(batches, lr, **kw):  # kw: the launch-ahead arguments (after=, lr_if_skipped=)
        calls["n"] += 1
        if calls["n"] == warmup + 1:
            prof.__enter__()
        res = inner(batches, lr, **kw)
        if calls["n"] == warmup + n:
            if cuda:
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            if trace is not None:
                prof.export_chrome_trace(str(trace))
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            avgs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=40), flush=True)
            except (KeyError, AttributeError, ValueError):  # an older torch names the key differently
                print(prof.key_averages().table(row_limit=40), flush=True)
            out.extend({"name": e.key[:120], "ms_per_step": round(getattr(e, key, 0) / 1e3 / n, 3),
                        "calls_per_step": round(e.count / n, 1)} for e in avgs[:20])
        return res

    engine.train_step = step


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = run_fm9g(spec)
    except Exception as err:  # reported in the table, the other runs go on
        import traceback

        traceback.print_exc()
        res = dict(kind="fm9g", workload=spec["workload"] + (f"@{spec['scale']}" if spec["scale"] else ""),
                   variant=spec["variant"], error=f"{type(err).__name__}: {err}"[:500])
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------- parent
def _run_child(cmd: list[str], log: Path, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Run a child process; returns the JSON results it printed and the tail of its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    try:
        p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        text += f"\n[timed out after {timeout:.0f} s]"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text, encoding="utf-8")
    results = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
        elif line.startswith("{") and '"kind"' in line:
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return results, "\n".join(text.splitlines()[-6:])


def _fmt(r: dict[str, Any] | None, key: str, fmt: str) -> str:
    if r is None or key not in r or r[key] is None:
        return "–"
    return format(r[key], fmt)


def table(fm9g: list[dict[str, Any]], hf: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown ratio table (fm9g vs the best HF configuration of the workload)."""
    lines = ["| workload | variant | fm9g tok/s | MFU | peak GB | step s | HF config | HF tok/s | HF MFU | HF peak GB | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in fm9g:
        base = r["workload"].split("@")[0] if "@" not in r["workload"] else None
        cands = [h for h in hf.get(base or "", []) if "tokens_per_s" in h]
        best = max(cands, key=lambda h: h["tokens_per_s"]) if cands else None
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['variant']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}×" if best else "–"
        lines.append(
            f"| {r['workload']} | {r['variant']} | {r['tokens_per_s']:,} | {_fmt(r, 'mfu', '.1%')} | "
            f"{_fmt(r, 'peak_mem_GB', '.1f')} | {_fmt(r, 'step_s', '.3f')} | {best['kind'] if best else '–'} | "
            f"{best['tokens_per_s']:,} | {_fmt(best, 'mfu', '.1%')} | {_fmt(best, 'peak_mem_GB', '.1f')} | {ratio} |"
            if best else
            f"| {r['workload']} | {r['variant']} | {r['tokens_per_s']:,} | {_fmt(r, 'mfu', '.1%')} | "
            f"{_fmt(r, 'peak_mem_GB', '.1f')} | {_fmt(r, 'step_s', '.3f')} | – | – | – | – | – |")
    for w, rs in hf.items():
        for h in rs:
            if "error" in h:
                lines.append(f"| {w} | HF {h.get('kind')} | error: {h['error']} | | | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["W1", "W2"], help="W1, W2, W3, with @accum8 / @16k / @32k")
    ap.add_argument("--variants", default="base", help="comma-separated fm9g variants (see above)")
    ap.add_argument("--scaling", action="store_true", help="also run " + ", ".join(SCALING))
    ap.add_argument("--steps", type=int, default=8, help="timed steps (as the HF baseline)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (as the HF baseline)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny shapes, 3 steps (1 warm-up), no HF")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per child process")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for run.json and the logs (default $OUT)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return _child_main(args.child)
    if args.tiny:
        args.steps, args.warmup, args.no_hf = 2, 1, True
    workloads = list(args.workloads) + (SCALING if args.scaling else [])
    out_dir = Path(args.out) if args.out else None
    work_root = Path(tempfile.mkdtemp(prefix="fm9g-bench-"))
    log_root = (out_dir or work_root) / "logs"
    t_start = time.perf_counter()
    fm9g_results: list[dict[str, Any]] = []
    hf_results: dict[str, list[dict[str, Any]]] = {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for w in workloads:
        name, _, scale = w.partition("@")
        if name == "W3":
            print("W3 runs through the bmtrain engine: python benchmarks/bmtrain_w3.py (not part of this command)",
                  flush=True)
            continue
        if name not in ("W1", "W2") or scale not in SCALES:
            raise SystemExit(f"unknown workload {w!r}: expected W1, W2 or W3, with @accum8, @16k or @32k")
        for v in variants:
            tag = f"{w}-{v}".replace("@", "_").replace("+", "_").replace("=", "-")
            spec = dict(workload=name, scale=scale, variant=v, tiny=args.tiny, steps=args.steps, warmup=args.warmup,
                        work=str(work_root / tag))
            res, tail = _run_child([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                   log_root / f"{tag}.log", args.timeout)
            r = res[-1] if res else dict(kind="fm9g", workload=w, variant=v, error="no result: " + tail[-300:])
            trace = work_root / tag / "trace.json"
            if out_dir is not None and trace.exists():  # the profile flag's Chrome trace
                out_dir.mkdir(parents=True, exist_ok=True)
                trace.replace(out_dir / f"trace-{tag}.json")
            fm9g_results.append(r)
            print(json.dumps({k: v_ for k, v_ in r.items() if k != "iter_times"}), flush=True)
        if not args.no_hf and not scale and name not in hf_results:
            kinds = ["full"] if name == "W1" else ["lora", "lora:nockpt"]
            res, tail = _run_child([sys.executable, str(ROOT / "benchmarks" / "hf_baseline.py"), *kinds],
                                   log_root / f"hf-{name}.log", args.timeout)
            hf_results[name] = res or [dict(kind=",".join(kinds), error="no result: " + tail[-300:])]
            for h in hf_results[name]:
                print(json.dumps(h), flush=True)
    md = table(fm9g_results, hf_results)
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        versions = {"torch": torch.__version__}
        for mod in ("transformers", "peft"):
            try:
                versions[mod] = __import__(mod).__version__
            except ImportError:
                pass
    except ImportError:
        gpu, versions = "?", {}
    header = (f"`python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}` — "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {gpu}, "
              + ", ".join(f"{k} {v}" for k, v in versions.items())
              + f"; {time.perf_counter() - t_start:.0f} s")
    print("\n" + header + "\n\n" + md, flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run.json").write_text(json.dumps({"header": header, "fm9g": fm9g_results, "hf": hf_results},
                                                     indent=1) + "\n", encoding="utf-8")
        (out_dir / "run.md").write_text(header + "\n\n" + md + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in fm9g_results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
