"""build_index / IndexedDataset: round trips, meta.json, validation errors, atomicity, the original format."""
from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import h5py
import numpy as np
import pytest

from fm9g.data import indexed
from fm9g.data.indexed import IndexedDataset, IndexedDatasetError, InvalidLineError, build_index

ZH = "九格大模型训练数据的一是在不了有和人这中为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
EN = "the of and to in a is that for it as was with be by on not he this are or his from at which but".split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    recs = []
    for i in range(n):
        if i % 2:
            rec = {"input": "".join(r.choices(ZH, k=r.randint(0, 30))), "output": "".join(r.choices(ZH, k=r.randint(1, 80)))}
        else:
            rec = {"input": " ".join(r.choices(EN, k=r.randint(0, 20))), "output": " ".join(r.choices(EN, k=r.randint(1, 60)))}
        if i % 7 == 3:
            rec["output"] += ' "quoted" \\ back\tslash \u2028 emoji 😀'
        if i % 11 == 5:
            del rec["input"]
        recs.append(rec)
    return recs


def write_jsonl(path: Path, records: list, *, trailing_newline: bool = True) -> list[bytes]:
    lines = [json.dumps(r, ensure_ascii=bool(i % 3 == 0)).encode() for i, r in enumerate(records)]
    path.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
    return lines



@pytest.mark.parametrize("workers,block", [(1, 1 << 20), (1, 97), (2, 211)])
def test_round_trip_every_line(tmp_path, json_backend, workers, block):
    recs = make_records(300)
    src = tmp_path / "train.jsonl"
    lines = write_jsonl(src, recs)
    meta = build_index(src, tmp_path / "idx", language="zh", num_workers=workers, block_size=block,
                       json_parser=json_backend)
    ds = IndexedDataset(tmp_path / "idx", json_parser=json_backend)
    assert len(ds) == len(recs) == meta["nlines"]
    assert ds[0] == recs[0]  # the first line is not dropped
    assert [ds[i] for i in range(len(ds))] == recs
    assert ds[-1] == recs[-1]
    assert ds[10:57] == recs[10:57]
    assert ds[::50] == recs[::50]
    assert list(ds) == recs
    assert ds.read_raw(4) == lines[4] + b"\n"
    assert (tmp_path / "idx" / "data.jsonl").read_bytes() == src.read_bytes()
    with pytest.raises(IndexError):
        ds[len(recs)]


def test_index_files_format(tmp_path):
    recs = make_records(40)
    src = tmp_path / "a.jsonl"
    lines = write_jsonl(src, recs)
    build_index(src, tmp_path / "idx")
    expected = np.concatenate([[0], np.cumsum([len(l) + 1 for l in lines])])
    text = (tmp_path / "idx" / "index").read_text().split()
    assert [int(x) for x in text] == expected.tolist()
    with h5py.File(tmp_path / "idx" / "index.h5") as f:
        assert f["index"][()].tolist() == expected.tolist()
    assert IndexedDataset(tmp_path / "idx", index_source="h5").offsets.tolist() == expected.tolist()
    assert IndexedDataset(tmp_path / "idx", index_source="text").offsets.tolist() == expected.tolist()
    assert (tmp_path / "idx" / "meta.json").read_text().count("\n") == 1  # one JSON line


def test_original_format_index_without_leading_zero(tmp_path):
    """An index dir as convert_json2index wrote it: end offsets only, first line must still be read."""
    recs = make_records(25, seed=3)
    d = tmp_path / "orig"
    d.mkdir()
    lines = write_jsonl(d / "data.jsonl", recs)
    ends = np.cumsum([len(l) + 1 for l in lines])
    (d / "index").write_text("\n".join(str(int(e)) for e in ends) + "\n")
    with h5py.File(d / "index.h5", "w") as f:
        f.create_dataset("index", data=ends.astype(np.int64))
    (d / "meta.json").write_text(json.dumps({"language": "zh", "nlines": len(recs), "nbytes": int(ends[-1])}))
    for source in ("text", "h5", "auto"):
        ds = IndexedDataset(d, index_source=source)
        assert len(ds) == len(recs)
        assert ds[0] == recs[0]
        assert ds[:] == recs
    # a hand-written index with CRLF line ends and a trailing blank line still reads
    (d / "index").write_bytes(b"\r\n".join(str(int(e)).encode() for e in ends) + b"\r\n\r\n")
    assert IndexedDataset(d, index_source="text")[:] == recs
    (d / "index").write_text("12\nabc\n")
    with pytest.raises(IndexedDatasetError, match="index:2: not a byte offset"):
        IndexedDataset(d, index_source="text")


def _zh_estimate(line: bytes) -> float:
    return 0.7 * len(line.decode("utf-8"))


def test_meta_values_zh_estimate(tmp_path):
    r = random.Random(1)
    recs = make_records(30, seed=1)
    # lines long enough to land in the upper buckets (0.7 * chars >= 4000, 8000, 16000)
    recs += [{"input": "", "output": "".join(r.choices(ZH, k=k))} for k in (6000, 6100, 12000, 30000)]
    src = tmp_path / "long.jsonl"
    lines = write_jsonl(src, recs)
    meta = build_index(src, tmp_path / "idx", language="zh", num_workers=2, block_size=4096)
    est = [_zh_estimate(l) for l in lines]
    assert meta["nlines"] == len(recs)
    assert meta["nbytes"] == src.stat().st_size
    assert meta["avg_token_per_line"] == pytest.approx(sum(est) / len(est))
    names = ["less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k"]
    bounds = [0, 4000, 8000, 16000, 32000, 64000, 128000, 256000, float("inf")]
    want = {n: sum(bounds[i] <= e < bounds[i + 1] for e in est) for i, n in enumerate(names)}
    assert meta["length_distribute"] == want
    # the four long lines land in four different upper buckets (lines 31 and 34 are \uXXXX-escaped: 6 chars each)
    assert [want[n] for n in names] == [30, 1, 1, 1, 0, 1, 0, 0]
    assert meta["n_invalid"] == 0
    on_disk = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))


def test_meta_en_estimate_and_data_sample(tmp_path):
    first = {"input": "a b  c", "output": "x" * 80, "extra": ["one", "two"], "js": json.dumps({"k": "y" * 70})}
    recs = [first, {"output": "hello world"}]
    src = tmp_path / "en.jsonl"
    lines = write_jsonl(src, recs)
    meta = build_index(src, tmp_path / "idx", language="en")
    est = [1.5 * (l.decode().count(" ") + 1) for l in lines]
    assert meta["avg_token_per_line"] == pytest.approx(sum(est) / 2)
    sample = meta["data_sample"]
    assert sample["output"] == "x" * 50 + "..."
    assert sample["input"] == "a b  c"
    assert sample["extra"] == ["one"]
    assert json.loads(sample["js"]) == {"k": "y" * 50 + "..."}


def test_meta_with_real_tokenizer(tmp_path, smollm2_tokenizer):
    recs = make_records(20, seed=5)
    src = tmp_path / "t.jsonl"
    write_jsonl(src, recs)
    meta = build_index(src, tmp_path / "idx", tokenizer=smollm2_tokenizer, num_workers=2, block_size=1024)
    tok = smollm2_tokenizer
    counts = [
        len(tok(r.get("input") or "", add_special_tokens=False)["input_ids"]) + len(tok(r["output"], add_special_tokens=False)["input_ids"])
        for r in recs
    ]
    assert meta["avg_token_per_line"] == pytest.approx(sum(counts) / len(counts))
    assert meta["length_distribute"]["less_4k"] == len(recs)
    assert meta["token_count"].startswith("tokenizer:")


BAD_LINES = [
    (b'{"input": "a", "output": "b"', "invalid JSON"),
    (b'["input", "output"]', "expected a JSON object, got list"),
    (b'{"input": "a"}', "missing field 'output'"),
    (b'{"input": "a", "output": 3}', "field 'output' must be a string, got int"),
    (b'{"input": ["a"], "output": "b"}', "field 'input' must be a string, got list"),
    (b'{"input": "a", "output": "\xff\xfe"}', "invalid UTF-8"),
    (b'{"output": "ok"} {"output": "two"}', "invalid JSON"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_each_bad_line_names_file_line_and_problem(tmp_path, json_backend, bad, message):
    good = [json.dumps(r).encode() for r in make_records(6)]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(good[:4] + [bad] + good[4:]) + b"\n")
    with pytest.raises(InvalidLineError) as exc:
        build_index(src, tmp_path / "idx", num_workers=1, json_parser=json_backend)
    assert exc.value.line == 5
    assert message in str(exc.value)
    assert f"{src}:5:" in str(exc.value)
    assert not (tmp_path / "idx").exists()


def test_skip_invalid_counts_and_keeps_every_valid_line(tmp_path, json_backend):
    recs = make_records(60, seed=9)
    lines = [json.dumps(r).encode() for r in recs]
    bad = [b for b, _ in BAD_LINES]
    mixed, valid = [], []
    for i, l in enumerate(lines):
        if i % 9 == 0:
            mixed.append(bad[(i // 9) % len(bad)])
        mixed.append(l)
        valid.append(recs[i])
    mixed.append(b"")  # a blank line: skipped, not invalid
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(mixed) + b"\n")
    n_bad = sum(1 for i in range(len(lines)) if i % 9 == 0)
    meta = build_index(src, tmp_path / "idx", skip_invalid=True, num_workers=2, block_size=300,
                       json_parser=json_backend)
    assert meta["n_invalid"] == n_bad
    assert meta["n_blank"] == 1
    assert meta["nlines"] == len(valid)
    ds = IndexedDataset(tmp_path / "idx", json_parser=json_backend)
    assert ds[:] == valid
    assert meta["invalid_examples"][0].startswith(f"{src}:1: ")


def test_empty_source_and_all_invalid(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        build_index(tmp_path / "empty.jsonl", tmp_path / "idx")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        build_index(tmp_path / "blank.jsonl", tmp_path / "idx")
    (tmp_path / "bad.jsonl").write_bytes(b"nope\n")
    with pytest.raises(ValueError, match="no valid line"):
        build_index(tmp_path / "bad.jsonl", tmp_path / "idx", skip_invalid=True)
    assert not (tmp_path / "idx").exists()
    with pytest.raises(FileNotFoundError):
        build_index(tmp_path / "missing.jsonl", tmp_path / "idx")
    with pytest.raises(ValueError, match="language"):
        build_index(tmp_path / "bad.jsonl", tmp_path / "idx", language="fr")


def test_directory_source_txt_and_missing_final_newline(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    a = make_records(5)
    write_jsonl(src / "a.jsonl", a, trailing_newline=False)
    (src / "b.txt").write_text("  first text line \n\n second\n", encoding="utf-8")
    c = make_records(3, seed=4)
    write_jsonl(src / "sub" / "c.jsonl", c)
    (src / "notes.md").write_text("ignored")
    meta = build_index(src, tmp_path / "idx")
    want = a + [{"input": "", "output": "first text line"}, {"input": "", "output": "second"}] + c
    ds = IndexedDataset(tmp_path / "idx")
    assert ds[:] == want
    assert meta["n_blank"] == 1
    assert (tmp_path / "idx" / "data.jsonl").read_bytes().count(b"\n") == len(want)
    assert [Path(s).name for s in meta["sources"]] == ["a.jsonl", "b.txt", "c.jsonl"]


@pytest.mark.parametrize("where", ["mid_copy", "h5", "ctrl_c"])
def test_interrupted_build_leaves_no_output(tmp_path, monkeypatch, where):
    src = tmp_path / "in" / "a.jsonl"
    src.parent.mkdir()
    write_jsonl(src, make_records(50))
    calls = []
    real_copy = indexed._copy_range

    def boom(*args, **kwargs):
        raise RuntimeError("disk full (injected)")

    def copy_then_fail(*args, **kwargs):  # fails on the 3rd block, with workers still scanning
        calls.append(1)
        if len(calls) == 3:
            if where == "ctrl_c":
                raise KeyboardInterrupt
            boom()
        return real_copy(*args, **kwargs)

    if where == "h5":
        monkeypatch.setattr(indexed, "_write_h5", boom)
    else:
        monkeypatch.setattr(indexed, "_copy_range", copy_then_fail)
    with pytest.raises(KeyboardInterrupt if where == "ctrl_c" else RuntimeError):
        build_index(src, tmp_path / "out" / "idx", num_workers=2, block_size=512)
    assert where == "h5" or len(calls) == 3
    assert not (tmp_path / "out" / "idx").exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary directory left behind
    monkeypatch.setattr(indexed, "_write_h5", boom)
    # an existing index survives a failed rebuild
    monkeypatch.undo()
    build_index(src, tmp_path / "out" / "idx")
    before = (tmp_path / "out" / "idx" / "meta.json").read_text()
    monkeypatch.setattr(indexed, "_write_h5", boom)
    write_jsonl(src, make_records(10, seed=2))
    with pytest.raises(RuntimeError):
        build_index(src, tmp_path / "out" / "idx", overwrite=True)
    assert (tmp_path / "out" / "idx" / "meta.json").read_text() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["idx"]


def test_output_directory_rules(tmp_path):
    src_dir = tmp_path / "data"
    src_dir.mkdir()
    write_jsonl(src_dir / "a.jsonl", make_records(5))
    with pytest.raises(ValueError, match="inside the input directory"):
        build_index(src_dir, src_dir / "idx")
    with pytest.raises(ValueError, match="inside the input directory"):
        build_index(src_dir, src_dir, overwrite=True)
    with pytest.raises(ValueError, match="contains the source"):
        build_index(src_dir / "a.jsonl", tmp_path, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not an index directory"):
        build_index(src_dir / "a.jsonl", other)
    assert (other / "keep.txt").read_text() == "precious"
    build_index(src_dir / "a.jsonl", tmp_path / "idx")
    with pytest.raises(FileExistsError, match="already holds an index"):
        build_index(src_dir / "a.jsonl", tmp_path / "idx")
    write_jsonl(src_dir / "a.jsonl", make_records(8, seed=1))
    assert build_index(src_dir / "a.jsonl", tmp_path / "idx", overwrite=True)["nlines"] == 8
    assert len(IndexedDataset(tmp_path / "idx")) == 8
    (tmp_path / "empty").mkdir()
    assert build_index(src_dir / "a.jsonl", tmp_path / "empty")["nlines"] == 8  # an empty dir is fine


def test_truncated_or_modified_data_is_detected(tmp_path):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, make_records(40))
    build_index(src, tmp_path / "idx")
    data = tmp_path / "idx" / "data.jsonl"
    raw = data.read_bytes()
    data.write_bytes(raw[:-10])
    with pytest.raises(IndexedDatasetError, match="truncated or modified"):
        IndexedDataset(tmp_path / "idx")
    # same size, line boundaries moved: a newline deleted, a character inserted elsewhere
    k = raw.index(b"\n")
    data.write_bytes(raw[:k] + b" " + raw[k + 1 :])
    with pytest.raises(IndexedDatasetError, match="newline"):
        IndexedDataset(tmp_path / "idx")
    data.write_bytes(raw)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    meta["nlines"] += 1
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexedDatasetError, match="meta.json says"):
        IndexedDataset(tmp_path / "idx")
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(tmp_path / "nowhere")


def test_pickle_reopens_the_map(tmp_path):
    recs = make_records(10)
    write_jsonl(tmp_path / "a.jsonl", recs)
    build_index(tmp_path / "a.jsonl", tmp_path / "idx")
    ds = IndexedDataset(tmp_path / "idx")
    assert ds[3] == recs[3]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[:] == recs


def test_cli_build_index(tmp_path, capsys):
    from fm9g.cli import main

    write_jsonl(tmp_path / "a.jsonl", make_records(12))
    assert main(["build-index", str(tmp_path / "a.jsonl"), str(tmp_path / "idx"), "--language", "en"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith("indexed 12 lines") and '"nlines": 12' in line  # one line
    assert main(["build-index", str(tmp_path / "a.jsonl"), str(tmp_path / "idx1"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nlines"] == 12
    (tmp_path / "b.jsonl").write_bytes(b'{"output": "x"}\n{"input": 1, "output": "y"}\n')
    assert main(["build-index", str(tmp_path / "b.jsonl"), str(tmp_path / "idx2")]) == 2
    err = capsys.readouterr().err
    assert "b.jsonl:2:" in err and "'input' must be a string" in err
    assert main(["build-index", str(tmp_path / "b.jsonl"), str(tmp_path / "idx2"), "--skip-invalid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_invalid"] == 1


def test_bom_and_crlf(tmp_path, json_backend):
    recs = make_records(30, seed=8)
    body = b"\r\n".join(json.dumps(r, ensure_ascii=False).encode() for r in recs) + b"\r\n"
    src = tmp_path / "win.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + body)  # written by a Windows editor
    meta = build_index(src, tmp_path / "idx", num_workers=2, block_size=128, json_parser=json_backend)
    assert IndexedDataset(tmp_path / "idx", json_parser=json_backend)[:] == recs
    assert (tmp_path / "idx" / "data.jsonl").read_bytes() == body
    assert meta["nbytes"] == len(body)


def test_killed_build_temporaries_are_cleaned(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_records(5))
    stale = tmp_path / ".idx.tmp-999999999-deadbeef"  # a build killed with SIGKILL: pid gone
    stale.mkdir()
    (stale / "data.jsonl").write_bytes(b"half")
    live = tmp_path / f".idx.tmp-{os.getppid()}-cafe0000"  # a build still running elsewhere
    live.mkdir()
    build_index(tmp_path / "a.jsonl", tmp_path / "idx")
    assert not stale.exists() and live.exists()


def test_big_integers_in_extra_keys_stay_exact(tmp_path, json_backend):
    """orjson reads integers beyond 64 bits as floats: such lines are read exactly (issue 15, item 7)."""
    recs = [
        {"output": "a", "id": 123456789012345678901234567890},
        {"output": "b", "meta": {"ids": [18446744073709551615, -9223372036854775809, 2**70]}, "x": 1.5e300},
        {"output": "c", "n": -(10**40), "f": 12345678901234567890.5},
    ]
    src = tmp_path / "ids.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    meta = build_index(src, tmp_path / "idx", num_workers=1, json_parser=json_backend)
    ds = IndexedDataset(tmp_path / "idx", json_parser=json_backend)
    assert [ds[i] for i in range(3)] == recs and ds[0:3] == recs and list(ds) == recs
    assert type(ds[0]["id"]) is int and ds[0]["id"] == 123456789012345678901234567890
    assert type(ds[2]["n"]) is int and type(ds[2]["f"]) is float
    assert meta["data_sample"]["id"] == 123456789012345678901234567890
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["data_sample"]["id"] == 123456789012345678901234567890
