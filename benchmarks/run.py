"""The fm9g benchmark harness: every workload of benchmarks/README.md, fm9g and its baseline in one command.

    python benchmarks/run.py W1 W2                      # GPU: fm9g and the HF baseline, the ratio table
    python benchmarks/run.py W1 W2 --scaling            # also W1@accum8, W1@16k, W1@32k, W2@16k
    python benchmarks/run.py W1 --variants base,eager,opt=adamw_master --no-hf
    python benchmarks/run.py W3 --variants base,engine=bmtrain+offload   # the 7B on one 80 GB GPU
    python benchmarks/run.py W1 W2 --variants base,fp8=tensorwise,fp8=rowwise   # FP8 matmuls (H100 / H200)
    python benchmarks/run.py W4 W5 W6                   # CPU: build_index, MixtureLoader, conversion
    python benchmarks/run.py W7 --gpus 1,2,4,8          # W1 under torchrun on 1..8 GPUs
    python benchmarks/run.py --tiny W1 W2 W3 W4 W5 W6   # CPU smoke of every path (what CI runs)

Every training figure (W1, W2, W3, W7) comes from ``Trainer(config).fit()`` over a real index read
through ``MixtureLoader`` (``num_workers`` >= 1) with logging on as a user has it; the step times are
the Trainer's own ``iter_time`` of the stats rows, the median over the rows after ``--warmup``. Each
run is a fresh subprocess (its own peak memory). The HF baseline is ``benchmarks/hf_baseline.py``
(the shared protocol file, copied verbatim), also in subprocesses of the same command: W1 ``full``
and ``full:liger``, W2 ``lora``, ``lora:nockpt``, ``lora:liger`` and ``lora:nockpt:liger`` (the plain
ones in one process, each Liger one in its own: Liger patches transformers for the rest of its
process; without liger-kernel installed those entries say so). Every ratio is against the fastest
HF configuration of the workload that fits (Liger's included). W4, W5 and W6
(CPU) are ``w4_build_index.py``, ``w5_mixture.py`` and ``w6_convert.py``, each run in a subprocess.

Workloads (``NAME[@SCALE]``; shapes in benchmarks/README.md):
    W1   full fine-tune of the 1.5B shape, one packed row of 4096 tokens = 4 documents of 1024.
    W2   LoRA r 64 / alpha 32 on all 7 projections of the fm9g-7b shape, bf16 base, same rows.
    W3   full fine-tune of fm9g-7b on one GPU capped at 80 GB (``cap=GB``), 16 rows of 4096 per step,
         activation checkpointing; base = torch engine with ``optimizer="adamw_bf16"``.
    W4   ``build_index`` on 1 GB of jsonl (CPU).    W5  MixtureLoader tokens/s (CPU, SmolLM2 tokenizer).
    W6   ``hf_to_bmt`` / ``bmt_to_hf`` of a 7B-shaped checkpoint (CPU).
    W7   W1 (``W7@7b``: W3) under ``torchrun --nproc_per_node N`` for each N of ``--gpus``.
    @accum8  8 micro-batches of one 4096 row per optimizer step (W1, W2).
    @16k / @32k  one row of 16384 / 32768 tokens per step holding ONE document (W1, W2).
    W1@host  the host's work per step, on the CPU: 24 layers of width 32, one row of 64 tokens (4
             documents), fp32, eager; ``--variants base,fsdp`` compares FSDP2 at one rank with one
             process where the step is nothing but Python (what bounds FSDP2 on a GPU, issue 26).

Variants (``--variants``, comma-separated; each ``+``-joined flags applied to every training workload):
    base          the defaults a user gets (layers compiled on CUDA, attention "auto")
    eager         compile=False
    compile_full  torch.compile the whole model (not only the layers)
    ckpt, ckpt=F  activation checkpointing on; ckpt=0 off, ckpt=0.5 half the layers (W3: on unless set)
    attn=NAME     attention backend (sdpa | flex | torch_varlen | flash_attn | flash_attn_4 | auto)
    chunk=N       tokens per chunk of the fused linear + cross-entropy (the model's loss_chunk_tokens)
    workers=N     MixtureLoader worker processes (default 2)
    graphs[=0]    TrainConfig(cuda_graphs=True) (False with =0)
    opt=NAME      optimizer (adamw | adamw_master | adamw_bf16)
    engine=NAME   engine (torch | bmtrain)
    fsdp          TrainConfig(data_parallel="fsdp"): the FSDP2 path, also on one GPU (as a user sets it)
    dp=NAME       TrainConfig(data_parallel=NAME) (auto | none | fsdp | hybrid)
    raf=0|1       TrainConfig(reshard_after_forward=...) under FSDP2 (1: the default)
    det           TrainConfig(deterministic=True): deterministic kernels (compare two det runs' losses)
    resume=K      also save at step K, then resume a second Trainer from it to the end: run.json gets its
                  losses (``resumed_losses``) and whether they equal the first run's (``resume_exact``);
                  every run's ``losses_sha256`` digests its full-precision losses (two ``det`` runs compare bit for bit)
    offload       TrainConfig(offload=True) (bmtrain: its optimizer in host memory; torch: FSDP2's CPU offload)
    cap=GB        cap the process's GPU memory at GB (1e9 bytes); W3 default 80
    fp8=RECIPE    TrainConfig(fp8=RECIPE) (tensorwise | rowwise): the decoder's linears in FP8 (torchao;
                  `pip install 'fm9g[fp8]'`, a GPU of compute capability 8.9+); MFU stays bf16-equivalent
    profile       torch.profiler over 3 steps after the warm-up: the top 20 kernels (ms per step) in
                  run.json, the Chrome trace as trace-<run>.json in the --out folder

Prints the markdown tables; with ``$OUT`` set (or ``--out``) also writes ``run.json``, ``run.md``
and the logs of every child process there.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

PEAK = 989e12  # H100 SXM / H200 dense bf16 (benchmarks/README.md)
W1_SHAPE = dict(vocab_size=73448, dim_model=2048, num_layers=24, num_heads=16, num_kv_heads=16, dim_head=128,
                dim_ff=5504, tie_lm_head=False, qkv_bias=True, scale=False, scale_depth=-1.0, base=1e6,
                max_length=32768, init_std=0.02, use_checkpoint=False)
TINY_SHAPE = dict(vocab_size=512, dim_model=64, num_layers=2, num_heads=4, num_kv_heads=4, dim_head=16, dim_ff=128,
                  tie_lm_head=False, qkv_bias=True, scale=False, scale_depth=-1.0, base=1e6, max_length=1024,
                  init_std=0.02, use_checkpoint=False)
#: (row tokens, document tokens, micro-batches per step) per workload and scale
SCALES = {"": (4096, 1024, 1), "accum8": (4096, 1024, 8), "16k": (16384, 16384, 1), "32k": (32768, 32768, 1),
          "host": (64, 16, 1)}
TINY_SCALES = {"": (256, 64, 1), "accum8": (256, 64, 2), "16k": (512, 512, 1), "32k": (1024, 1024, 1),
               "host": (64, 16, 1)}
#: ``W1@host``: W1's step with almost no arithmetic (24 layers of width 32, on the CPU), so that its
#: time is the host's work per step: the Python of the engine and of FSDP2 (issue 26's bottleneck)
HOST_SHAPE = dict(TINY_SHAPE, vocab_size=128, dim_model=32, num_layers=24, num_heads=2, num_kv_heads=2, dim_ff=64,
                  max_length=64)
W3_SCALE, W3_TINY_SCALE = (4096, 1024, 16), (256, 64, 2)
SCALING = ["W1@accum8", "W1@16k", "W1@32k", "W2@16k"]
TRAIN_WORKLOADS = ("W1", "W2", "W3")
CPU_WORKLOADS = {"W4": "w4_build_index", "W5": "w5_mixture", "W6": "w6_convert"}
FLAGS = {"base", "eager", "compile_full", "ckpt", "attn", "chunk", "workers", "graphs", "opt", "engine",
         "offload", "cap", "profile", "dp", "fsdp", "raf", "fp8", "det", "resume"}
#: the HF baseline's configurations per workload (hf_baseline.py's flags): the plain ones share one
#: process; each Liger one runs in a process of its own (Liger patches transformers for the rest
#: of its process). Every ratio is against the fastest of them that fits.
HF_PLAIN = {"W1": ["full"], "W2": ["lora", "lora:nockpt"]}
HF_LIGER = {"W1": ["full:liger"], "W2": ["lora:liger", "lora:nockpt:liger"]}


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


# ---------------------------------------------------------------------------------- one training run (child)
def parse_variant(variant: str) -> dict[str, str]:
    """``"opt=adamw_master+ckpt"`` -> ``{"opt": "adamw_master", "ckpt": ""}``; unknown flags are an error."""
    out = {}
    for f in variant.split("+"):
        k, _, v = f.partition("=")
        out[k.strip()] = v.strip()
    unknown = sorted(set(out) - FLAGS)
    if unknown:
        raise SystemExit(f"unknown variant flags {unknown} in {variant!r}; known: {sorted(FLAGS)}")
    return out


def _shape(spec: dict[str, Any]) -> tuple[Any, tuple[int, int, int]]:
    """The workload's FM9GConfig and (row tokens, document tokens, micro-batches per step)."""
    from fm9g.models.config import FM9GConfig

    tiny, workload, scale = spec["tiny"], spec["workload"], spec["scale"]
    if workload == "W3":
        layout = W3_TINY_SCALE if tiny else W3_SCALE
    else:
        layout = (TINY_SCALES if tiny else SCALES)[scale]
    if scale == "host":
        return FM9GConfig(**HOST_SHAPE), layout
    if tiny:
        return FM9GConfig(**TINY_SHAPE), layout
    return (FM9GConfig.from_name("fm9g-7b") if workload in ("W2", "W3") else FM9GConfig(**W1_SHAPE)), layout


def train_config(spec: dict[str, Any], mc: Any, data: list[dict], flags: dict[str, str]) -> Any:
    """The TrainConfig of one run: the user's defaults plus the variant's flags."""
    from fm9g.models.lora import LoraConfig
    from fm9g.training.config import TrainConfig

    tiny, workload, work = spec["tiny"], spec["workload"], Path(spec["work"])
    row, _, accum = _shape(spec)[1]
    try:
        import tensorboardX  # noqa: F401

        tensorboard = "auto"
    except ImportError:
        tensorboard = None
    engine = flags.get("engine") or "torch"
    optimizer = flags.get("opt") or ("adamw_bf16" if workload == "W3" and engine == "torch" else "adamw")
    extra: dict[str, Any] = {"cuda_graphs": flags["graphs"] != "0"} if "graphs" in flags else {}
    if "fsdp" in flags or "dp" in flags:
        extra["data_parallel"] = flags.get("dp") or "fsdp"
    if "det" in flags:
        extra["deterministic"] = True
    if "raf" in flags:
        extra["reshard_after_forward"] = flags["raf"] != "0"
    if "fp8" in flags:
        extra["fp8"] = flags["fp8"] or "tensorwise"
    return TrainConfig(
        model=mc, data=data, lora=LoraConfig.from_name("fm9g-7b").to_dict() if workload == "W2" else None,
        lr=1e-4 if workload == "W2" else 1e-5, lr_scheduler="constant", warmup_iters=0,
        train_iters=spec["steps"] + spec["warmup"], batch_size=1, max_length=row, grad_accum=accum,
        save=str(work / "runs"), model_unique="bench", save_iters=int(flags.get("resume") or 0), save_final=False, log_iters=1, stats_dir="auto",
        tensorboard=tensorboard, progress_bar=False, inspect_iters=0, device="cpu" if tiny else "cuda",
        precision="fp32" if tiny else "bf16", compile=False if ("eager" in flags or "compile_full" in flags) else "auto",
        use_checkpoint=float(flags["ckpt"] or 1) if "ckpt" in flags else workload == "W3", attn_impl=flags.get("attn") or None,
        num_workers=int(flags.get("workers", 1 if tiny else 2)), seed=0, optimizer=optimizer, engine=engine,
        offload="offload" in flags, **extra,
    )


def _lora_base(mc: Any, flags: dict[str, str], tiny: bool) -> Any:
    """W2's 7B base, created directly in bf16 on the GPU (an fp32 7B would be 30.7 GB)."""
    import torch

    from fm9g.models.fm9g import FM9GModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if tiny else torch.bfloat16)
    torch.manual_seed(0)  # every variant, FSDP2 or not, starts from the same base weights (as _full_model)
    try:
        with torch.device("cpu" if tiny else "cuda"):
            return FM9GModel(dataclasses.replace(mc, attn_impl=flags["attn"]) if flags.get("attn") else mc)
    finally:
        torch.set_default_dtype(previous)


def _full_model(mc: Any, flags: dict[str, str], tiny: bool) -> Any:
    """W1 / W3 with the torch engine: the model built here, on the device, from the run's seed, and
    passed to the Trainer (a user's `Trainer(cfg, model=model)`), so that every variant, FSDP2 or not,
    starts from the same weights and their losses compare step by step (FSDP2 would otherwise build
    on the meta device and initialise through a full fp32 copy in host memory, from the CPU's random
    numbers). None for bmtrain, which builds its own."""
    import torch

    from fm9g.models.fm9g import FM9GModel

    if (flags.get("engine") or "torch") != "torch":
        return None
    torch.manual_seed(0)  # the TrainConfig's seed
    with torch.device("cpu" if tiny else "cuda"):
        return FM9GModel(dataclasses.replace(mc, attn_impl=flags["attn"]) if flags.get("attn") else mc)


def _cap_gpu_memory(flags: dict[str, str], workload: str, tiny: bool) -> float | None:
    """``cap=GB`` (W3: 80 by default): limit this process's GPU memory, as on an 80 GB card."""
    import torch

    cap = float(flags["cap"]) if flags.get("cap") else (80.0 if workload == "W3" else None)
    if cap is None or tiny or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    if cap * 1e9 < total:
        torch.cuda.set_per_process_memory_fraction(cap * 1e9 / total)
    return cap


def run_fm9g(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one workload variant through ``Trainer(config).fit()``; figures from its stats rows."""
    import torch

    from fm9g.training.metrics import flops_per_token, read_train_stats
    from fm9g.training.trainer import Trainer

    tiny, workload, steps, warmup = spec["tiny"], spec["workload"], spec["steps"], spec["warmup"]
    flags = parse_variant(spec["variant"])
    mc, (row, doc_len, accum) = _shape(spec)
    work = Path(spec["work"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n_docs = (row // doc_len) * accum * world * (steps + warmup) + 8
    tok, data = build_data(work / "data", mc.vocab_size, doc_len, n_docs)
    cap = _cap_gpu_memory(flags, workload, tiny)
    cfg = train_config(spec, mc, data, flags)
    model = _lora_base(mc, flags, tiny) if workload == "W2" else _full_model(mc, flags, tiny)
    t_build = time.perf_counter()
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    if "chunk" in flags:
        trainer.model.loss_chunk_tokens = int(flags["chunk"])
    if "compile_full" in flags:
        trainer.model.compile()
    kernels: list[dict[str, Any]] = []
    timing: dict[str, float] = {}  # the profile's wall and device-busy ms per step
    if "profile" in flags:
        _profile_steps(trainer, warmup, cfg.device, kernels, n=min(3, steps), trace=work / "trace.json", timing=timing)
    build_s = time.perf_counter() - t_build
    t_fit = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t_fit
    rows = read_train_stats(work / "runs" / "bench" / "train_stats")
    timed = [r for r in rows if r["iteration"] > warmup] or rows[-1:]
    # The steady state: the later half of the timed steps. With launch-ahead the host queues the
    # next steps while the GPU still runs earlier ones, so the first steps after the warm-up read
    # short (an H100 showed 0.038 s and 0.074 s before a steady 0.096 s); their median flattered
    # short runs.
    steady = timed[len(timed) // 2:]
    dt = statistics.median(r["iter_time"] for r in steady)
    tps = statistics.median(r["num_tokens"] for r in steady) / dt
    peak = max((r.get("peak_mem_gb") or 0.0) for r in rows) if rows else 0.0
    device = torch.device("cpu" if tiny else "cuda")
    attn = trainer.model.attention_backend(device, torch.float32 if tiny else torch.bfloat16)
    if flags.get("resume"):
        timing.update(_resume_from(trainer, cfg, flags, tok, result.losses, tiny))
    return dict(kind="fm9g", workload=spec["name"], variant=spec["variant"], world_size=world,
                tokens_per_s=round(tps), mfu=round(tps * flops_per_token(trainer.model, row) / PEAK / world, 4),
                peak_mem_GB=round(peak, 2), step_s=round(dt, 4), row=row, doc_len=doc_len, grad_accum=accum,
                steps=len(timed), attn=attn, engine=cfg.engine, optimizer=cfg.optimizer, fp8=cfg.fp8, cap_GB=cap,
                loss=round(result.losses[-1], 3) if result.losses else None, skipped=result.skipped,
                losses=[round(x, 4) for x in result.losses],
                losses_sha256=hashlib.sha256(repr([float(x) for x in result.losses]).encode()).hexdigest()[:16],
                build_s=round(build_s, 1), fit_s=round(fit_s, 1), host_peak_GB=_host_peak_gb(),
                iter_times=[round(r["iter_time"], 4) for r in rows], **({"kernels": kernels} if kernels else {}), **timing)


def _host_peak_gb() -> float:
    """The process's peak resident host memory in GB (1e9 bytes): what offload keeps on the host."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 1)  # Linux: kB


def _resume_from(trainer: Any, cfg: Any, flags: dict[str, str], tok: Any, losses: list[float],
                 tiny: bool) -> dict[str, Any]:
    """``resume=K``: a second Trainer resumes the run from its step-K checkpoint to the end (the
    first one released first); its losses against the uninterrupted run's, bit for bit."""
    import gc

    import torch

    from fm9g.training.trainer import Trainer

    k = int(flags["resume"])
    mc = trainer.model.config if hasattr(trainer.model, "config") else None
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = _full_model(mc, flags, tiny) if mc is not None and cfg.lora is None else None
    again = Trainer(cfg.override({"resume_ckpt": str(k)}), model=model, tokenizer=tok).fit()
    return dict(resumed_from=k, resumed_losses=list(again.losses), resume_exact=bool(again.losses) and list(again.losses) == list(losses[k:]))


def _profile_steps(trainer: Any, warmup: int, device: str, out: list[dict[str, Any]], n: int = 3,
                   trace: Path | None = None, timing: dict[str, float] | None = None) -> None:
    """Profile ``n`` optimizer steps after the warm-up with torch.profiler, inside ``fit``: the
    kernel table (per step, sorted by device time) goes to the child's log and the top 20 rows into
    ``out`` (the run's ``kernels``); with ``trace``, the Chrome trace of those steps is written there."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = trainer.engine
    inner = engine.train_step
    calls = {"n": 0, "t0": 0.0}
    timing = {} if timing is None else timing
    cuda = device == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    def step(batches, lr, **kw):  # kw: whatever else the Trainer passes (after=, lr_if_skipped=)
        calls["n"] += 1
        if calls["n"] == warmup + 1:
            if cuda:
                torch.cuda.synchronize()
            prof.__enter__()
            calls["t0"] = time.perf_counter()
        res = inner(batches, lr, **kw)
        if calls["n"] == warmup + n:
            if cuda:
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - calls["t0"]) * 1e3 / n
            prof.__exit__(None, None, None)
            if trace is not None:
                prof.export_chrome_trace(str(trace))
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            avgs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=40), flush=True)
            except (KeyError, AttributeError, ValueError):  # an older torch names the key differently
                print(prof.key_averages().table(row_limit=40), flush=True)
            busy_ms = _busy_ms(prof, cuda) / n
            # the device's kernel time per step against the step's wall time (profiler on): the rest
            # is time the GPU waited for the host
            print(f"profile: wall {wall_ms:.1f} ms/step, {'GPU' if cuda else 'CPU'} busy {busy_ms:.1f} ms/step", flush=True)
            timing.update(wall_ms_per_step=round(wall_ms, 3), busy_ms_per_step=round(busy_ms, 3))
            out.extend({"name": e.key[:120], "ms_per_step": round(getattr(e, key, 0) / 1e3 / n, 3),
                        "calls_per_step": round(e.count / n, 1)} for e in avgs[:20])
        return res

    engine.train_step = step


def _busy_ms(prof: Any, cuda: bool) -> float:
    """Milliseconds in which the device ran at least one kernel or copy (the union of their intervals);
    0 on CPU."""
    from torch.autograd import DeviceType

    if not cuda:
        return 0.0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def run_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """W4 / W5 / W6: the workload module's ``measure(work, tiny=...)``."""
    import importlib

    module = importlib.import_module(CPU_WORKLOADS[spec["workload"]])
    res = module.measure(Path(spec["work"]), tiny=spec["tiny"])
    return dict(kind="cpu", workload=spec["name"], variant="base", **res)


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = run_cpu(spec) if spec["workload"] in CPU_WORKLOADS else run_fm9g(spec)
    except Exception as err:  # reported in the table, the other runs go on
        import traceback

        traceback.print_exc()
        kind = "cpu" if spec["workload"] in CPU_WORKLOADS else "fm9g"
        res = dict(kind=kind, workload=spec["name"], variant=spec["variant"], error=f"{type(err).__name__}: {err}"[:500])
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one result, from rank 0
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
        elif line.startswith("{") and '"kind"' in line:  # hf_baseline.py prints bare JSON lines
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
    """The markdown ratio table of the training runs: each against the fastest HF configuration of
    its workload that ran (Liger's included; one that ran out of memory has no figures)."""
    lines = ["| workload | variant | fm9g tok/s | MFU | peak GB | step s | best HF config | HF tok/s | HF MFU | HF peak GB "
             "| ratio to best HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in fm9g:
        if r.get("kind") == "cpu" or r["workload"].startswith(("W7", *CPU_WORKLOADS)):
            continue
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['variant']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        cands = [h for h in hf.get(r["workload"], []) if "tokens_per_s" in h]
        best = max(cands, key=lambda h: h["tokens_per_s"]) if cands else None
        hf_cells = (f"{best['kind']} | {best['tokens_per_s']:,} | {_fmt(best, 'mfu', '.1%')} | "
                    f"{_fmt(best, 'peak_mem_GB', '.1f')} | {r['tokens_per_s'] / best['tokens_per_s']:.2f}×"
                    if best else "– | – | – | – | –")
        lines.append(f"| {r['workload']} | {r['variant']} | {r['tokens_per_s']:,} | {_fmt(r, 'mfu', '.1%')} | "
                     f"{_fmt(r, 'peak_mem_GB', '.1f')} | {_fmt(r, 'step_s', '.3f')} | {hf_cells} |")
    for w, rs in hf.items():
        for h in rs:
            if "error" in h:
                lines.append(f"| {w} | HF {h.get('kind')} | error: {h['error']} | | | | | | | | |")
    return "\n".join(lines)


def cpu_table(results: list[dict[str, Any]]) -> str:
    """The markdown table of the CPU workloads: each figure against its goal."""
    lines = ["| workload | figure | value | goal |", "|---|---|---|---|"]
    for r in results:
        if r.get("kind") != "cpu":
            continue
        if "error" in r:
            lines.append(f"| {r['workload']} | error: {r['error'][:120]} | | |")
            continue
        for name, value, goal in r["figures"]:
            lines.append(f"| {r['workload']} | {name} | {value:,} | {goal} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def scaling_table(results: list[dict[str, Any]]) -> str:
    """W7: tokens/s per GPU count and the per-GPU efficiency against one GPU."""
    runs = [r for r in results if r["workload"].startswith("W7") and "tokens_per_s" in r]
    if not runs:
        return ""
    one = {r["variant"]: r["tokens_per_s"] for r in runs if r["world_size"] == 1}
    lines = ["| workload | variant | GPUs | tok/s (all ranks) | per-GPU efficiency |", "|---|---|---|---|---|"]
    for r in runs:
        base = one.get(r["variant"])
        eff = f"{r['tokens_per_s'] / (base * r['world_size']):.1%}" if base else "–"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['world_size']} | {r['tokens_per_s']:,} | {eff} |")
    return "\n".join(lines)


def _spec(args: argparse.Namespace, work_root: Path, name: str, variant: str) -> dict[str, Any]:
    workload, _, scale = name.partition("@")
    tag = f"{name}-{variant}".replace("@", "_").replace("+", "_").replace("=", "-")
    # W1@host runs on the CPU like --tiny (fp32, no compile), with the usual steps
    return dict(name=name, workload=workload, scale=scale, variant=variant, tiny=args.tiny or scale == "host",
                steps=args.steps,
                warmup=args.warmup, work=str(work_root / tag), tag=tag)


def _check_workload(name: str) -> None:
    workload, _, scale = name.partition("@")
    ok = ((workload in ("W1", "W2") and scale in SCALES and (scale != "host" or workload == "W1")) or (workload in ("W3", *CPU_WORKLOADS) and not scale)
          or (workload == "W7" and scale in ("", "7b")))
    if not ok:
        raise SystemExit(f"unknown workload {name!r}: expected W1..W7 (W1/W2 with @accum8, @16k or @32k; W1@host; W7@7b)")


def _torchrun(n: int) -> list[str]:
    """``torchrun`` for ``n`` local processes, its rendezvous on a free port (nothing fixed)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def _train_jobs(args: argparse.Namespace, work_root: Path, name: str, variants: list[str]) -> list[tuple[dict, list[str]]]:
    """(spec, command prefix) of every run of one workload."""
    this = [sys.executable, str(Path(__file__).resolve())]
    if name.startswith("W7"):
        inner = "W3" if name == "W7@7b" else "W1"
        jobs = []
        for n in args.gpus:
            for v in variants:
                spec = dict(_spec(args, work_root, name, v), workload=inner, scale="")
                spec["tag"] += f"-n{n}"
                spec["work"] += f"-n{n}"
                jobs.append((spec, _torchrun(n) + [str(Path(__file__).resolve())]))
        return jobs
    if name.partition("@")[0] in CPU_WORKLOADS:
        return [(_spec(args, work_root, name, "base"), this)]
    return [(_spec(args, work_root, name, v), this) for v in variants]


def _hf_baseline(name: str, log_root: Path, timeout: float, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every HF configuration of the workload (or those of ``only``): the plain ones in one process,
    each Liger one in a process of its own (``HF_PLAIN`` / ``HF_LIGER``); a configuration that did
    not run is an entry with ``error``."""
    import importlib.util

    plain = [k for k in HF_PLAIN[name] if only is None or k in only]
    groups = [plain] * bool(plain) + [[k] for k in HF_LIGER[name] if only is None or k in only]
    results: list[dict[str, Any]] = []
    for kinds in groups:
        if any("liger" in k.split(":") for k in kinds) and importlib.util.find_spec("liger_kernel") is None:
            results += [dict(kind=k, error="liger-kernel is not installed: pip install liger-kernel") for k in kinds]
            continue
        tag = "-".join(k.replace(":", "_") for k in kinds)
        res, tail = _run_child([sys.executable, str(HERE / "hf_baseline.py"), *kinds], log_root / f"hf-{name}-{tag}.log",
                               timeout)
        results += res or [dict(kind=",".join(kinds), error="no result: " + tail[-300:])]
    return results


def _header(argv: list[str], seconds: float) -> str:
    """The command, date, device and versions of this call (RESULTS.md quotes it)."""
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        versions = {"torch": torch.__version__}
        for mod in ("transformers", "peft"):
            try:
                versions[mod] = __import__(mod).__version__
            except ImportError:
                pass
    except ImportError:
        gpu, versions = "?", {}
    return (f"`python benchmarks/run.py {' '.join(argv)}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{gpu}, " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {seconds:.0f} s")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["W1", "W2"], help="W1..W7, W1/W2 with @accum8 / @16k / @32k, W1@host")
    ap.add_argument("--variants", default="base", help="comma-separated fm9g variants (see above)")
    ap.add_argument("--scaling", action="store_true", help="also run " + ", ".join(SCALING))
    ap.add_argument("--steps", type=int, default=8, help="timed steps (as the HF baseline); the figure is the median of their later half (the steady state)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (as the HF baseline)")
    ap.add_argument("--gpus", default="1,2,4,8", help="W7: processes per run (capped at the GPUs present)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    ap.add_argument("--hf", default=None, help="comma-separated HF configurations to run (default: all of the "
                    "workload's, e.g. W2: " + ",".join(HF_PLAIN["W2"] + HF_LIGER["W2"]) + "); ratios are to the fastest run")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny shapes, 3 steps (1 warm-up), no HF")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for run.json and the logs (default $OUT)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.no_hf = 2, 1, True
    args.gpus = [int(n) for n in args.gpus.split(",") if n.strip()]
    if not args.tiny and args.child is None and any(w.startswith("W7") for w in args.workloads):
        import torch

        args.gpus = [n for n in args.gpus if n <= torch.cuda.device_count()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child is not None:
        return _child_main(args.child)
    workloads = list(args.workloads) + (SCALING if args.scaling else [])
    for w in workloads:
        _check_workload(w)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    out_dir = Path(args.out) if args.out else None
    work_root = Path(tempfile.mkdtemp(prefix="fm9g-bench-"))
    log_root = (out_dir or work_root) / "logs"
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    hf_results: dict[str, list[dict[str, Any]]] = {}
    for w in workloads:
        for spec, prefix in _train_jobs(args, work_root, w, variants):
            res, tail = _run_child(prefix + ["--child", json.dumps(spec)], log_root / f"{spec['tag']}.log", args.timeout)
            r = res[-1] if res else dict(kind="fm9g", workload=w, variant=spec["variant"], error="no result: " + tail[-300:])
            trace = Path(spec["work"]) / "trace.json"
            if out_dir is not None and trace.exists():  # the profile flag's Chrome trace
                out_dir.mkdir(parents=True, exist_ok=True)
                trace.replace(out_dir / f"trace-{spec['tag']}.json")
            results.append(r)
            print(json.dumps({k: v_ for k, v_ in r.items() if k != "iter_times"}), flush=True)
        if not args.no_hf and w in ("W1", "W2") and w not in hf_results:
            hf_results[w] = _hf_baseline(w, log_root, args.timeout, args.hf.split(",") if args.hf else None)
            for h in hf_results[w]:
                print(json.dumps(h), flush=True)
    md = "\n\n".join(t for t in (table(results, hf_results), scaling_table(results), cpu_table(results)) if t)
    header = _header(argv if argv is not None else sys.argv[1:], time.perf_counter() - t_start)
    print("\n" + header + "\n\n" + md, flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run.json").write_text(json.dumps({"header": header, "fm9g": results, "hf": hf_results},
                                                     indent=1) + "\n", encoding="utf-8")
        (out_dir / "run.md").write_text(header + "\n\n" + md + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
