"""Bad data files and dataset configs: each error names the file / line / key and says what format
is expected (issue 15, item 10)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fm9g.data import index_format
from fm9g.data.indexed import IndexedDataset, IndexedDatasetError, InvalidLineError, build_index
from fm9g.data.mixture import MixtureConfigError, MixtureLoader, load_dataset_config
from fm9g.data.tokenizers import VocabTxtTokenizer



def _build_error(src: Path, out: Path, json_parser: str = "auto") -> str:
    with pytest.raises(InvalidLineError) as exc:
        build_index(src, out, num_workers=1, json_parser=json_parser)
    assert not out.exists()
    return str(exc.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("indent", ["", " "])  # a leading space takes the standard library's full parser
def test_nan_literal_is_named_not_a_lone_surrogate(tmp_path, json_backend, literal, indent):
    src = tmp_path / "nan.jsonl"
    src.write_text('{"output": "a"}\n' + indent + '{"output": "b", "score": ' + literal + "}\n")
    msg = _build_error(src, tmp_path / "idx", json_backend)
    assert f"{src}:2:" in msg
    assert f"{literal} is not a JSON value" in msg
    assert "write null" in msg
    assert "surrogate" not in msg


def test_number_beyond_float_range_is_named(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text('{"output": "a", "x": 1e400}\n')
    msg = _build_error(src, tmp_path / "idx")
    assert f"{src}:1:" in msg and "1e400" in msg and "write it as a string" in msg


def test_bare_cr_line_endings(tmp_path, json_backend):
    src = tmp_path / "mac.jsonl"
    src.write_bytes(b'{"output": "a"}\r{"output": "b"}\r{"output": "c"}\r')
    msg = _build_error(src, tmp_path / "idx", json_backend)
    assert f"{src}:1:" in msg
    assert "bare CR" in msg and "\\n" in msg and "tr '\\r' '\\n'" in msg


def test_crlf_still_reads(tmp_path, json_backend):
    src = tmp_path / "dos.jsonl"
    src.write_bytes(b'{"output": "a"}\r\n{"output": "b"}\r\n')
    assert build_index(src, tmp_path / "idx", num_workers=1, json_parser=json_backend)["nlines"] == 2
    assert IndexedDataset(tmp_path / "idx", json_parser=json_backend)[:] == [{"output": "a"}, {"output": "b"}]


@pytest.mark.parametrize("indent", [2, None])
def test_json_array_file_says_one_object_per_line(tmp_path, json_backend, indent):
    src = tmp_path / "records.json"
    src.write_text(json.dumps([{"input": "", "output": "a"}, {"output": "b"}], indent=indent))
    msg = _build_error(src, tmp_path / "idx", json_backend)
    assert f"{src}:1:" in msg
    assert "expected one JSON object per line, this looks like a JSON array" in msg
    assert "jq -c '.[]'" in msg


def test_pretty_printed_object(tmp_path, json_backend):
    src = tmp_path / "one.json"
    src.write_text(json.dumps({"input": "", "output": "a"}, indent=2))
    msg = _build_error(src, tmp_path / "idx", json_backend)
    assert f"{src}:1:" in msg and "pretty-printed JSON" in msg and "one JSON object per line" in msg


def test_json_parser_is_one_of_three(tmp_path, index_dir):
    src = tmp_path / "ok.jsonl"
    with pytest.raises(ValueError, match="json_parser must be one of .'auto', 'orjson', 'stdlib'., got 'ujson'"):
        build_index(src, tmp_path / "idx2", json_parser="ujson")
    assert not (tmp_path / "idx2").exists()
    with pytest.raises(ValueError, match="json_parser must be one of"):
        IndexedDataset(index_dir, json_parser="ujson")


def test_json_parser_orjson_without_orjson_says_what_to_install(tmp_path, index_dir):
    """In a process where orjson cannot be imported, asking for it names the package to install."""
    code = (
        "import sys; sys.modules['orjson'] = None\n"  # an import of orjson now fails, as when it is absent
        "from fm9g.data.indexed import IndexedDataset, build_index\n"
        "for call in (lambda: build_index(sys.argv[1], sys.argv[2], json_parser='orjson'),\n"
        "             lambda: IndexedDataset(sys.argv[3], json_parser='orjson')):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as err:\n"
        "        print(err)\n"
        "print(IndexedDataset(sys.argv[3])[0]['output'])\n"  # "auto" reads on without it
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ok.jsonl"), str(tmp_path / "idx2"), str(index_dir)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3 and all("json_parser='orjson' needs orjson" in line and "pip install orjson" in line
                                 for line in out[:2]), out
    assert out[2] == "line 0" and not (tmp_path / "idx2").exists()


@pytest.fixture
def index_dir(tmp_path) -> Path:
    src = tmp_path / "ok.jsonl"
    src.write_text("".join(json.dumps({"output": f"line {i}"}) + "\n" for i in range(5)))
    build_index(src, tmp_path / "idx", num_workers=1)
    return tmp_path / "idx"


@pytest.mark.parametrize("content", ["[1, 2]\n", '"text"\n', "7\n"])
def test_meta_json_that_is_not_an_object(index_dir, content):
    (index_dir / "meta.json").write_text(content)
    with pytest.raises(IndexedDatasetError) as exc:
        IndexedDataset(index_dir)
    msg = str(exc.value)
    assert str(index_dir / "meta.json") in msg
    assert "expected a JSON object" in msg and "fm9g build-index" in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_h5_without_text_index(index_dir, damage):
    h5 = index_dir / "index.h5"
    h5.write_bytes(b"not hdf5 " * 50 if damage == "garbage" else h5.read_bytes()[:700])
    (index_dir / "index").unlink()
    with pytest.raises(IndexedDatasetError) as exc:
        IndexedDataset(index_dir)
    msg = str(exc.value)
    assert str(h5) in msg and "not a readable HDF5 index" in msg
    assert "no text index" in msg and "fm9g build-index" in msg


def test_corrupt_h5_beside_a_text_index_reads_the_text_one(index_dir):
    """From _TEXT_INDEX_MAX_BYTES on, "auto" opens index.h5 rather than parse the text index; a
    damaged index.h5 then sends "auto" to the text index."""
    text = index_dir / "index"
    # the same offsets, padded with spaces (the parser skips whitespace) to the size "auto" maps index.h5 at
    text.write_bytes(text.read_bytes().rstrip(b"\n") + b" " * index_format._TEXT_INDEX_MAX_BYTES + b"\n")
    assert isinstance(index_format.read_offsets(index_dir), np.memmap)  # "auto" took the (intact) index.h5
    (index_dir / "index.h5").write_bytes(b"not hdf5 " * 50)
    assert [r["output"] for r in IndexedDataset(index_dir)] == [f"line {i}" for i in range(5)]
    with pytest.raises(IndexedDatasetError, match="source='text'"):
        IndexedDataset(index_dir, index_source="h5")


def _entries(index_dir: Path, **weights: dict) -> list[dict]:
    return [
        {"dataset_name": name, "task_name": name, "path": str(index_dir), **w} for name, w in weights.items()
    ]


@pytest.mark.parametrize("values", [(1e308, 1e308), (1e-300, 1e300)])
def test_abs_weight_whose_normalisation_overflows(index_dir, tmp_path, values):
    cfg = _entries(index_dir, a={"abs_weight": values[0]}, b={"abs_weight": values[1]})
    (tmp_path / "mix.json").write_text(json.dumps(cfg))
    with pytest.raises(MixtureConfigError) as exc:
        load_dataset_config(tmp_path / "mix.json")
    msg = str(exc.value)
    assert str(tmp_path / "mix.json") in msg and "abs_weight" in msg and "only their ratios matter" in msg


def test_weight_times_nlines_that_overflows(index_dir):
    tok = _vocab_tokenizer(index_dir.parent)
    cfg = _entries(index_dir, a={"weight": 1e308}, b={"weight": 1e308})
    with pytest.raises(MixtureConfigError, match="weight x nlines"):
        MixtureLoader(cfg, tok, 16, 2)


def _vocab_tokenizer(root: Path) -> VocabTxtTokenizer:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list("abcdefghijklmnopqrstuvwxyz0123456789 ")
    (root / "vocab.txt").write_text("".join(json.dumps(t) + "\n" for t in tokens))
    return VocabTxtTokenizer(root / "vocab.txt")


def test_entry_weights_are_still_checked_one_by_one(index_dir):
    for bad in (float("inf"), float("nan"), 0, -1):
        with pytest.raises(MixtureConfigError, match="abs_weight"):
            load_dataset_config(_entries(index_dir, a={"abs_weight": bad}))
