"""Resume anywhere (issue 30): a run saved on 2 ranks continues on 1 or 4 ranks (real torchrun, gloo
on CPU) with the data of the uninterrupted run; a changed global batch continues the data stream.

Two cases: a full fine-tune on one dataset (resumed on 1 and on 4 ranks), and LoRA on a mixture of
3 repeating datasets (resumed on 4 ranks with the same global batch, and on 1 rank with another
one). Each launch costs seconds (a 4-rank one ~15 s on 2 cores), so the cases share references.

Every run is the Trainer under a small script that records, per rank and micro-batch, the
documents it trains on (hashes of each labelled document's tokens). The reference trains 4 steps
on 2 ranks x batch_size 1 x grad_accum 2 (4 rows a step) and saves a sharded checkpoint at step 2
(checkpoint_format "sharded": the model and optimizer re-shard to any number of ranks). The
resumed runs train steps 3-4 on 1 rank x grad_accum 4 (FSDP2 over one process) and on 4 ranks x
grad_accum 1: each step must train on the same documents (as a multiset) as the reference's step,
and its loss must equal the reference's within REL_TOL.

REL_TOL: fp32 everywhere; the runs differ only in the order of additions (per micro-batch, per rank,
then the all-reduce / reduce-scatter across another number of ranks). Step 3 starts from the same
weights and moments (measured: equal to the last bit on 1 and 4 ranks); step 4 follows one update
whose gradient differs by that rounding (measured: 2e-8 relative on a loss of ~6). 1e-6 relative
leaves 50x room for other CPUs' summation orders.
"""
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from test_distributed import ROOT, TORCHRUN, WORDS, _free_port, _losses, _run

REL_TOL = 1e-6
MAX_LENGTH = 48
STEPS, SAVE_AT = 4, 2

RECORDER = '''
import hashlib, json, os, sys
from fm9g.training.builders import build_loader, build_tokenizer
from fm9g.training.config import TrainConfig
from fm9g.training.trainer import Trainer


class Recorder:
    """The Trainer's loader, writing the documents of each micro-batch (hashes of their tokens) to `out`."""

    def __init__(self, loader, out):
        self.loader, self.out = loader, out

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for b in self.loader:
            flat, lab, cu = b["input_ids"].reshape(-1), b["labels"].reshape(-1) != -100, b["cu_seqlens"].tolist()
            docs = [hashlib.sha1(flat[x:y].numpy().tobytes()).hexdigest()[:16] for x, y in zip(cu[:-1], cu[1:])
                    if y > x and bool(lab[x:y].any())]
            with open(self.out, "a") as f:
                f.write(json.dumps(docs) + "\\n")
            yield b


if __name__ == "__main__":
    cfg = TrainConfig.from_json(sys.argv[1])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    loader = build_loader(cfg, build_tokenizer(cfg), rank=rank, world_size=world)
    trainer = Trainer(cfg, loader=Recorder(loader, os.path.join(sys.argv[2], f"docs.rank-{rank}.jsonl")))
    trainer.fit()
    if rank == 0:
        print("START", trainer.resume_summary, flush=True)
'''


def _docs(n: int, lo: int, hi: int, tok, r: random.Random, tag: str) -> list[str]:
    """`n` records whose outputs are `lo`..`hi` tokens long."""
    lines = []
    for i in range(n):
        ids = tok(" ".join(r.choice(WORDS) for _ in range(hi + 5)))["input_ids"]
        text = tok.decode(ids[: r.randint(lo, hi)])
        lines.append(json.dumps({"input": "", "output": f"{tag}{i} {text}"}))
    return lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A one-dataset config (one 28..40-token document a row) and a mixture of 3 repeating datasets
    (short documents, several a row; `gamma` has 7 lines: each of the 4 lanes repeats it within a
    few rows), the recorder script and a base train config."""
    sys.path.insert(0, str(ROOT / "examples"))
    from _toy import make_toy_tokenizer
    from transformers import AutoTokenizer

    from fm9g import build_index

    d = tmp_path_factory.mktemp("anywhere")
    tok_dir = make_toy_tokenizer(d / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    r = random.Random(30)
    configs = {}
    for name, n, lo, hi in [("text", 40, 28, 40), ("alpha", 30, 6, 14), ("beta", 20, 12, 24), ("gamma", 7, 4, 9)]:
        (d / f"{name}.jsonl").write_text("\n".join(_docs(n, lo, hi, tok, r, name)) + "\n")
        build_index(d / f"{name}.jsonl", d / name, language="en")
    entry = {"transforms": "identity", "allow_repeat": True}
    configs["one"] = [{"dataset_name": "text", "task_name": "text", "path": str(d / "text"), "abs_weight": 1, **entry}]
    configs["mix3"] = [{"dataset_name": n, "task_name": n, "path": str(d / n), "abs_weight": w, **entry}
                       for n, w in [("alpha", 0.5), ("beta", 0.3), ("gamma", 0.2)]]
    for name, cfg in configs.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    (d / "record.py").write_text(RECORDER)
    model = {"vocab_size": 512, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
             "dim_head": 16, "dim_ff": 64, "tie_lm_head": False}
    base = {"model": model, "tokenizer_path": str(tok_dir), "train_iters": STEPS, "lr": 3e-3, "warmup_iters": 1,
            "lr_scheduler": "cosine", "max_length": MAX_LENGTH, "batch_size": 1, "save": str(d / "runs"),
            "save_iters": 0, "save_final": False, "progress_bar": False, "inspect_iters": 0, "tensorboard": None,
            "stats_dir": "auto", "seed": 11, "device": "cpu", "compile": False, "num_workers": 0}
    return d, base


CASES = {  # name: the run's settings; where the same global batch resumes: [(ranks, grad_accum)]
    "full": {"data": "one"},
    "lora_mix3": {"data": "mix3", "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                           "target_modules": ["project_q", "project_v"]}, "lora_random_base": True},
}


def _train(d: Path, base: dict, name: str, nproc: int, **kw) -> subprocess.CompletedProcess:
    """Train run `name` under the recorder: torchrun with `nproc` processes, or one process (FSDP2 over a
    mesh of one, which loads sharded checkpoints) when `nproc` is 1."""
    cfg = dict(base, model_unique=name, **kw)
    cfg["data"] = str(d / f"{cfg['data']}.json")
    path = d / f"{name}.json"
    path.write_text(json.dumps(cfg))
    run_dir = d / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    script = [str(d / "record.py"), str(path), str(run_dir)]
    if nproc == 1:
        path.write_text(json.dumps(dict(cfg, data_parallel="fsdp")))
        return _run([sys.executable, *script])
    return _run([*TORCHRUN, f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                 *script])


def _steps(run_dir: Path, nproc: int, grad_accum: int, first_step: int) -> dict[int, Counter]:
    """The documents each step of a run trained on, over all ranks: {step: multiset of hashes}."""
    out: dict[int, Counter] = {}
    for rank in range(nproc):
        rows = (run_dir / f"docs.rank-{rank}.jsonl").read_text().splitlines()
        for i, line in enumerate(rows):
            out.setdefault(first_step + i // grad_accum, Counter()).update(json.loads(line))
    return out


def _reference(d: Path, base: dict, case: str) -> Path:
    """2 ranks x batch_size 1 x grad_accum 2, 4 steps, a sharded checkpoint at step 2 (once per case)."""
    run = d / "runs" / f"ref_{case}"
    if not (run / str(SAVE_AT)).is_dir():
        _train(d, base, f"ref_{case}", 2, grad_accum=2, save_iters=SAVE_AT, checkpoint_format="sharded", **CASES[case])
    return run


RESUMES = {"full": [(1, 4), (4, 1)], "lora_mix3": [(1, 4), (4, 1)]}


@pytest.mark.parametrize("case", list(CASES))
def test_a_two_rank_run_resumes_on_one_and_on_four_ranks_with_the_same_data(setup, case):
    """Steps 3-4 after the step-2 checkpoint of the 2 x 1 x 2 reference, on 1 x 1 x 4 and 4 x 1 x 1: the
    same documents in each step, losses within REL_TOL, the run header naming both re-shardings."""
    d, base = setup
    ref = _reference(d, base, case)
    assert (ref / str(SAVE_AT) / "dcp" / ".metadata").is_file()
    ref_docs, ref_loss = _steps(ref, 2, 2, 1), _losses(ref)
    assert len(ref_loss) == STEPS and all(sum(ref_docs[s].values()) >= 4 for s in range(1, STEPS + 1))
    for nproc, grad_accum in RESUMES[case]:
        name = f"{case}_on_{nproc}"
        out = _train(d, base, name, nproc, grad_accum=grad_accum, resume_ckpt=str(ref / str(SAVE_AT)), **CASES[case])
        start = next(line for line in out.stdout.splitlines() if line.startswith("START"))
        assert f"re-sharded from 2 to {nproc} process(es)" in start and "exact resume" in start, start
        assert "same global batch of 4 rows per step" in start, start
        got_docs, got_loss = _steps(d / "runs" / name, nproc, grad_accum, SAVE_AT + 1), _losses(d / "runs" / name)
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert got_docs[step] == ref_docs[step], (nproc, step)
        assert len(got_loss) == STEPS - SAVE_AT
        for a, b in zip(got_loss, ref_loss[SAVE_AT:]):
            assert abs(a - b) <= REL_TOL * abs(b), (nproc, got_loss, ref_loss)


def _stream(d: Path, base: dict, rows: int) -> list[list[str]]:
    """The first `rows` rows of the reference's data stream, in order: the documents of each row, read
    one row a micro-batch by the loader the Trainer builds (1 rank x grad_accum 4: the same 4 lanes)."""
    import hashlib

    from fm9g.training.builders import build_loader, build_tokenizer
    from fm9g.training.config import TrainConfig

    settings = {k: v for k, v in CASES["lora_mix3"].items() if k != "data"}
    cfg = TrainConfig.from_dict(dict(base, data=str(d / "mix3.json"), grad_accum=4, save=None, **settings))
    it = iter(build_loader(cfg, build_tokenizer(cfg)))
    out = []
    for _ in range(rows):
        b = next(it)
        flat, lab, cu = b["input_ids"].reshape(-1), b["labels"].reshape(-1) != -100, b["cu_seqlens"].tolist()
        out.append([hashlib.sha1(flat[x:y].numpy().tobytes()).hexdigest()[:16] for x, y in zip(cu[:-1], cu[1:])
                    if y > x and bool(lab[x:y].any())])
    return out


def test_a_changed_global_batch_continues_the_stream_without_repeating_or_skipping(setup):
    """The LoRA / 3-dataset checkpoint of the 2 x 1 x 2 reference (4 rows a step) resumed on 1 rank x
    grad_accum 3 (3 rows a step): the run says so, and its rows are the stream's rows 8, 9, 10, ... in
    order, while the reference trained rows 0-7 before the checkpoint: every row of the stream is
    trained once, none repeated or skipped (a document appears again only where the stream itself
    starts a new epoch of its dataset)."""
    d, base = setup
    ref = _reference(d, base, "lora_mix3")
    out = _train(d, base, "mix3_ga3", 1, grad_accum=3, train_iters=5, resume_ckpt=str(ref / str(SAVE_AT)),
                 **CASES["lora_mix3"])
    start = next(line for line in out.stdout.splitlines() if line.startswith("START"))
    assert "re-sharded from 2 to 1 process(es)" in start, start
    assert "the global batch changed to 3 rows per step (the stream was started with 4" in start, start
    assert "continues at row 8" in start and "no row repeated or skipped" in start, start
    got = [json.loads(x) for x in (d / "runs" / "mix3_ga3" / "docs.rank-0.jsonl").read_text().splitlines()]
    assert len(got) == 3 * 3
    stream = _stream(d, base, 8 + len(got))
    assert got == stream[8:]
    before = _steps(ref, 2, 2, 1)
    assert before[1] + before[2] == Counter(h for row in stream[:8] for h in row)
    assert len(_losses(d / "runs" / "mix3_ga3")) == 3


def test_a_checkpoint_with_per_rank_loader_states_of_an_older_fm9g_still_resumes(setup, tmp_path):
    """A checkpoint written before the global stream holds per-rank loader states (fm9g.mixture/1):
    the Trainer resumes it on the same number of processes, continuing that rank's own mixture."""
    import torch

    from fm9g.data.loader_state import Position
    from fm9g.training.builders import build_loader, build_tokenizer
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    d, base = setup
    cfg = TrainConfig.from_dict(dict(base, data=str(d / "one.json"), save=str(tmp_path / "runs"), model_unique="old",
                                     train_iters=1, save_iters=1, batch_size=2, grad_accum=2))
    Trainer(cfg).fit()
    # what an older fm9g saved after that step: its per-rank mixture after grad_accum batches
    old = build_loader(cfg, build_tokenizer(cfg))
    old.load_state_dict(Position.initial(1).to_state(old._plan))
    it = iter(old)
    for _ in range(2):
        next(it)
    state = old.state_dict()
    assert state["format"] == "fm9g.mixture/1"
    torch.save(state, cfg.run_dir / "1" / "dataset_ckpt" / "loader_state.pt")
    expected = [next(it)["input_ids"] for _ in range(2)]
    resumed = Trainer(cfg.override({"resume_ckpt": "1", "train_iters": 2}))
    resumed.resume("1")
    got = iter(resumed.loader)
    assert all(torch.equal(next(got)["input_ids"], e) for e in expected)
    assert "exact resume" in resumed.resume_summary
