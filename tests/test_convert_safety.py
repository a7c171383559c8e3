"""Conversions never destroy their inputs, never silently replace an output, and fail on a bad or
unwritable checkpoint file with one error naming the file and saying what to do (issue 15, items 2
and 10, conversion side), and their tokenizer files load in transformers 4.44 as well as 5."""
from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fm9g._io import DiskFullError, atomic_dir, atomic_file, explain_disk_full
from fm9g.convert.files import ConversionError, load_checkpoint_file
from fm9g.convert.hf import bmt_to_hf, hf_to_bmt, load_pretrained
from fm9g.convert.keys import bmt_to_hf_key
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
CFG = FM9GConfig(vocab_size=96, dim_model=64, num_layers=2, num_heads=4, num_kv_heads=2, dim_head=16, dim_ff=96,
                 dtype="fp32", attn_impl="sdpa")


def _checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny fm9g checkpoint `folder/model.pt` with its config.json (~330 kB)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(FM9GModel(CFG).state_dict(), folder / "model.pt")
    CFG.to_json(folder / "config.json")
    return folder / "model.pt"


def _lora(path: Path) -> Path:
    sd = {f"encoder.layers.{i}.self_att.self_attention.project_q.lora.lora_{ab}": torch.randn(shape)
          for i in range(CFG.num_layers) for ab, shape in (("A", (4, 64)), ("B", (64, 4)))}
    torch.save(sd, path)
    return path


def _hf_dir(tmp: Path, name: str = "hf") -> Path:
    """A tiny Hugging Face (Llama) directory: the native export of `_checkpoint`."""
    return bmt_to_hf(_checkpoint(tmp / f"{name}-src"), tmp / name)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fm9g", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------------------
# item 2: inputs are never replaced, outputs only with overwrite=True
# ------------------------------------------------------------------------------------------------


def test_export_never_deletes_its_lora_config_or_reference(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    out = bmt_to_hf(ckpt, tmp_path / "out")  # an earlier export, to be overwritten
    lora = _lora(out / "l.pt")
    (out / "lora.json").write_text(json.dumps({"r": 4, "alpha": 8}))
    CFG.to_json(out / "model.json")
    before = _snapshot(out)
    with pytest.raises(ConversionError, match=r"out_dir .*out would replace lora .*l\.pt; choose another"):
        bmt_to_hf(ckpt, out, lora=lora, lora_alpha=8, overwrite=True)
    with pytest.raises(ConversionError, match="would replace config"):
        bmt_to_hf(ckpt, out, config=out / "model.json", overwrite=True)
    with pytest.raises(ConversionError, match="would replace lora_config"):
        bmt_to_hf(ckpt, tmp_path / "x", lora=_lora(tmp_path / "l.pt"), lora_config=tmp_path / "x" / "lora.json")
    (tmp_path / "link").symlink_to(out)  # resolved paths are compared
    with pytest.raises(ConversionError, match="would replace lora"):
        bmt_to_hf(ckpt, tmp_path / "link", lora=lora, lora_alpha=8, overwrite=True)
    assert _snapshot(out) == before
    # an output inside an input folder changes that input: refused too
    with pytest.raises(ConversionError, match=r"is inside reference_dir .*out.*outside"):
        bmt_to_hf(ckpt, out / "again", reference_dir=out)
    with pytest.raises(ConversionError, match="is inside the checkpoint"):
        bmt_to_hf(ckpt.parent, ckpt.parent / "hf")
    assert _snapshot(out) == before and sorted(p.name for p in ckpt.parent.iterdir()) == ["config.json", "model.pt"]
    # the LoRA beside the output, not inside it, merges fine
    assert bmt_to_hf(ckpt, out, lora=_lora(tmp_path / "l.pt"), lora_alpha=8, overwrite=True) == out


def test_hf_to_bmt_replaces_an_existing_checkpoint_only_with_overwrite(tmp_path):
    hf = _hf_dir(tmp_path)
    trained = _checkpoint(tmp_path / "trained", seed=1)
    other = FM9GConfig.from_dict({**CFG.to_dict(), "dim_ff": 128})
    other.to_json(tmp_path / "trained" / "config.json")  # the config of another model
    before = _snapshot(tmp_path / "trained")
    with pytest.raises(FileExistsError, match=r"model\.pt exists; pass overwrite=True \(CLI: --overwrite\)"):
        hf_to_bmt(hf, trained)
    with pytest.raises(FileExistsError, match=r"config\.json holds another model config.*overwrite=True"):
        hf_to_bmt(hf, tmp_path / "trained" / "second.pt")
    assert _snapshot(tmp_path / "trained") == before
    # a second checkpoint of the same config beside the first is fine (the config stays the same)
    hf_to_bmt(hf, tmp_path / "same" / "a.pt")
    hf_to_bmt(hf, tmp_path / "same" / "b.pt")
    hf_to_bmt(hf, trained, overwrite=True)
    got, want = torch.load(trained, weights_only=True), torch.load(tmp_path / "same" / "a.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "trained" / "config.json").read_text() == (tmp_path / "same" / "config.json").read_text()


def test_hf_to_bmt_never_writes_into_its_input(tmp_path):
    hf = _hf_dir(tmp_path)
    sd = {k: v.clone() for k, v in load_pretrained(hf).state_dict().items()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf / "config.json").read_text())
    torch.save({bmt_to_hf_key(k): v for k, v in sd.items()}, bin_dir / "pytorch_model.bin")
    before = _snapshot(bin_dir)
    for target in ("pytorch_model.bin", "model.pt"):
        with pytest.raises(ConversionError, match=r"out_path .* is inside hf_dir .*bin"):
            hf_to_bmt(bin_dir, bin_dir / target, write_config=False, overwrite=True)
    assert _snapshot(bin_dir) == before


def test_cli_hf2bmt_needs_overwrite(tmp_path):
    hf = _hf_dir(tmp_path)
    assert _cli("convert", "hf2bmt", str(hf), "m/model.pt", cwd=tmp_path).returncode == 0
    first = (tmp_path / "m" / "model.pt").read_bytes()
    out = _cli("convert", "hf2bmt", str(hf), "m/model.pt", "--dtype", "bf16", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("fm9g convert: error: ") and "--overwrite" in out.stderr
    assert (tmp_path / "m" / "model.pt").read_bytes() == first
    assert _cli("convert", "hf2bmt", str(hf), "m/model.pt", "--dtype", "bf16", "--overwrite", cwd=tmp_path).returncode == 0
    assert torch.load(tmp_path / "m" / "model.pt", weights_only=True)["input_embedding.weight"].dtype == torch.bfloat16
    out = _cli("convert", "bmt2hf", "m/model.pt", "m", "--overwrite", cwd=tmp_path)
    assert out.returncode == 2 and "would replace the checkpoint" in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------------
# item 10: bad checkpoint files are named, with what to do
# ------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_files_are_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    sharded = bmt_to_hf(ckpt, tmp_path / "sharded", max_shard_size=100_000)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    _truncate(shard)
    for convert in (lambda: hf_to_bmt(sharded, tmp_path / "x.pt"), lambda: load_pretrained(sharded)):
        with pytest.raises(ConversionError, match=rf"{shard}: not a readable safetensors file \(truncated"):
            convert()
    _truncate(ckpt)
    with pytest.raises(ConversionError, match=rf"{ckpt}: not a readable torch checkpoint \(truncated.*again"):
        bmt_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "out").exists()


def test_refused_pickles_are_named_with_how_to_convert(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    evil = {"w": torch.zeros(2), "args": argparse.Namespace(lr=1.0)}  # what a training script may leave in
    torch.save(evil, tmp_path / "l.pt")
    hf = _hf_dir(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((hf / "config.json").read_text())
    torch.save(evil, tmp_path / "bin" / "pytorch_model.bin")
    advice = r"holds Python objects other than tensors \(argparse.Namespace\).*tensors-only.*torch.save\(state_dict"
    with pytest.raises(ConversionError, match=rf"{tmp_path / 'l.pt'}: {advice}"):
        bmt_to_hf(ckpt, tmp_path / "out", lora=tmp_path / "l.pt", lora_alpha=8)
    with pytest.raises(ConversionError, match=rf"pytorch_model.bin: {advice}"):
        hf_to_bmt(tmp_path / "bin", tmp_path / "x.pt")

    class CheckpointError(ValueError):
        pass

    with pytest.raises(CheckpointError, match=advice):  # training passes its own error class
        load_checkpoint_file(tmp_path / "l.pt", error=CheckpointError)
    assert set(load_checkpoint_file(ckpt)) == set(FM9GModel(CFG).state_dict())


def test_disk_full_errors_name_the_destination_file(tmp_path):
    err = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match=r"cannot write .*a\.bin: the disk is full .*another disk") as got:
        with explain_disk_full(tmp_path / "a.bin"):
            raise err
    assert got.value.__cause__ is err and got.value.errno == errno.ENOSPC and isinstance(got.value, OSError)
    with pytest.raises(DiskFullError, match=rf"cannot write {tmp_path / 'run' / '4' / 'm.pt'}: torch.save .*unexpected"):
        with atomic_dir(tmp_path / "run" / "4") as tmp, explain_disk_full(tmp / "m.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(DiskFullError, match=rf"cannot write {tmp_path / 'f.st'}: the disk quota"):
        with atomic_file(tmp_path / "f.st"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass unchanged
        with atomic_file(tmp_path / "f.st"):
            raise RuntimeError("something else")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not any((tmp_path / "run").iterdir())


_SIZE_LIMITED = """
import resource, signal, sys
from pathlib import Path
from fm9g.cli import main
from fm9g.convert.hf import bmt_to_hf, hf_to_bmt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
root = Path(sys.argv[1])
for convert in (lambda: hf_to_bmt(root / "hf", root / "bmt" / "model.pt", overwrite=True),
                lambda: bmt_to_hf(root / "bmt" / "model.pt", root / "hf", overwrite=True)):
    try:
        convert()
    except OSError as err:
        print(type(err).__name__, err)
    else:
        print("no error")
print("exit", main(["convert", "bmt2hf", str(root / "bmt" / "model.pt"), str(root / "hf"), "--overwrite"]))
"""


def test_a_size_limit_during_a_conversion_is_named_and_leaves_the_output(tmp_path):
    import re

    hf = _hf_dir(tmp_path)  # fp32: 330 kB
    hf_to_bmt(hf, tmp_path / "bmt" / "model.pt", dtype="bf16")  # 165 kB
    before = {"hf": _snapshot(hf), "bmt": _snapshot(tmp_path / "bmt")}
    out = subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(tmp_path)], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"DiskFullError cannot write {tmp_path / 'bmt' / 'model.pt'}: torch.save"), lines
    assert lines[1].startswith(f"DiskFullError cannot write {hf / 'model.safetensors'}: the file"), lines
    assert lines[2:] == ["exit 2"], lines
    error, = out.stderr.strip().splitlines()[-1:]
    assert error.startswith(f"fm9g convert: error: cannot write {hf / 'model.safetensors'}"), out.stderr
    assert all(re.search("a size limit|file-size limit", line) and "Free some space" in line
               for line in [*lines[:2], error]), lines
    assert {"hf": _snapshot(hf), "bmt": _snapshot(tmp_path / "bmt")} == before  # outputs as they were
    assert not list(tmp_path.rglob(".*")), list(tmp_path.rglob(".*"))  # no temporaries left


# ------------------------------------------------------------------------------------------------
# tokenizer files of an export load in transformers 4.44 too
# ------------------------------------------------------------------------------------------------




def test_export_tokenizer_from_a_transformers_5_reference_loads_in_4_44(tmp_path, compat_python):
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _toy import TEXT, make_toy_tokenizer
    finally:
        sys.path.remove(str(ROOT / "examples"))
    toy = make_toy_tokenizer(tmp_path / "toy")
    tok = AutoTokenizer.from_pretrained(toy)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    ref = _hf_dir(tmp_path, "ref")
    tok.save_pretrained(ref)  # the reference as transformers 5 writes it
    out = bmt_to_hf(ref.parent / "ref-src" / "model.pt", tmp_path / "export", reference_dir=ref)
    want = {"ids": [tok.encode(t) for t in TEXT[:4]],
            "chat": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)}
    assert AutoTokenizer.from_pretrained(out).encode(TEXT[0]) == want["ids"][0]  # transformers 5 still reads it
    code = (
        "import json, sys, transformers\n"
        "from transformers import AutoTokenizer\n"
        "texts = json.loads(sys.argv[3])\n"
        "got = {}\n"
        "for name in sys.argv[1:3]:\n"
        "    tok = AutoTokenizer.from_pretrained(name)\n"
        "    got[name] = {'ids': [tok.encode(t) for t in texts],\n"
        "                 'chat': tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
        "                 if tok.chat_template else None}\n"
        "print(transformers.__version__)\n"
        "print(json.dumps(got))\n"
    )
    run = subprocess.run([compat_python, "-c", code, str(out), str(toy), json.dumps(TEXT[:4])],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    version, got = run.stdout.strip().splitlines()[-2:]
    assert version.startswith("4."), version
    got = json.loads(got)
    assert got[str(out)] == want
    assert got[str(toy)] == {"ids": want["ids"], "chat": None}  # examples/_toy.py's tokenizer, too
