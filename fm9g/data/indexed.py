"""Indexed jsonl datasets: :func:`build_index` writes an index directory, :class:`IndexedDataset` reads it.

An index directory (SPEC §3.2) holds::

    data.jsonl   the valid source lines, byte for byte, each ending in "\\n"
    index        text, N+1 decimal byte offsets, one per line: 0, e_1, ..., e_N (line i is
                 bytes [offsets[i], offsets[i+1]) of data.jsonl)
    index.h5     HDF5, dataset "index": the same N+1 offsets (int64, contiguous)
    meta.json    one JSON line: language, nlines, nbytes, length_distribute, avg_token_per_line,
                 data_sample (SPEC §3.2) and n_invalid, n_blank, token_count, sources

The original ``convert_json2index.py`` wrote ``index`` / ``index.h5`` *without* the leading 0 (end
offsets only), and the original reader then silently skipped the first line. :class:`IndexedDataset`
reads both forms (a first value other than 0 means the leading 0 is missing) and returns every line.

Length statistics (``length_distribute``, ``avg_token_per_line``) use, per line of data.jsonl
(without its line terminator):

* with a tokenizer: ``len(tok(input)) + len(tok(output))``, both encoded with
  ``add_special_tokens=False`` (so BOS/EOS are not counted);
* otherwise SPEC's estimate over the raw JSON text of the line: ``zh``: ``0.7 × characters``;
  ``en`` / ``code``: ``1.5 × (number of " " + 1)`` (pieces when splitting on the space character).
"""
from __future__ import annotations

import json
import json.scanner
import logging
import mmap
import os
import shutil
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

try:  # optional: 4-5x faster validation and reading; the standard library is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = [
    "build_index",
    "IndexedDataset",
    "InvalidLineError",
    "IndexedDatasetError",
    "LENGTH_BUCKETS",
    "estimate_tokens",
    "truncate_sample",
    "read_offsets",
    "is_index_dir",
]

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
INDEX_FILE = "index"
H5_FILE = "index.h5"
META_FILE = "meta.json"

#: meta.json ``length_distribute`` buckets: (name, lower bound inclusive); upper = next lower bound.
LENGTH_BUCKETS: tuple[tuple[str, float], ...] = (
    ("less_4k", 0),
    ("4k-8k", 4000),
    ("8k-16k", 8000),
    ("16k-32k", 16000),
    ("32k-64k", 32000),
    ("64k-128k", 64000),
    ("128k-256k", 128000),
    ("more_256k", 256000),
)
_BUCKET_EDGES = np.array([lo for _, lo in LENGTH_BUCKETS[1:]], dtype=np.float64)
LANGUAGES = ("zh", "en", "code")
SOURCE_SUFFIXES = (".jsonl", ".json", ".txt")
_TEXT_INDEX_MAX_BYTES = 16 << 20  # read the text index below this size; the h5 index above
_DEFAULT_BLOCK = 8 << 20
_JSON_WS = " \t\r\n"


class InvalidLineError(ValueError):
    """A source line is not a JSON object with a string ``output`` (and optional string ``input``)."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(
            f"{path}:{line}: {problem} (each line must be a JSON object with a string 'output' and an "
            f"optional string 'input'; fix the line, or pass skip_invalid=True / --skip-invalid to skip bad lines)"
        )


class IndexedDatasetError(ValueError):
    """An index directory is missing files or does not match its data file."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def estimate_tokens(line: str, language: str) -> float:
    """SPEC's token estimate of one raw data.jsonl line (without its ``"\\n"``).

    Args:
        line: the line's text (JSON syntax and escapes included).
        language: ``"zh"`` (0.7 × characters) or ``"en"`` / ``"code"`` (1.5 × space-separated pieces).
    """
    if language == "zh":
        return 0.7 * len(line)
    return 1.5 * (line.count(" ") + 1)


def truncate_sample(value: Any, max_chars: int = 50) -> Any:
    """Shorten a record for ``meta.json``'s ``data_sample`` (SPEC §3.2).

    Strings longer than ``max_chars`` are cut to ``max_chars`` + ``"..."``, lists to their first
    element, dicts recursively; a string holding a JSON object or list is parsed, truncated and
    dumped back to a string.
    """
    if isinstance(value, dict):
        return {k: truncate_sample(v, max_chars) for k, v in value.items()}
    if isinstance(value, list):
        return [truncate_sample(value[0], max_chars)] if value else []
    if isinstance(value, str):
        head = value.lstrip()[:1]
        if head in ("{", "["):
            try:
                inner = json.loads(value)
            except ValueError:
                inner = None
            if isinstance(inner, (dict, list)):
                return json.dumps(truncate_sample(inner, max_chars), ensure_ascii=False)
        return value if len(value) <= max_chars else value[:max_chars] + "..."
    return value


def _bucket_counts(lengths: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(_BUCKET_EDGES, lengths, side="right"), minlength=len(LENGTH_BUCKETS))


def is_index_dir(path: str | Path) -> bool:
    """True when ``path`` looks like an index directory (data.jsonl plus index, index.h5 or meta.json)."""
    p = Path(path)
    return (p / DATA_FILE).is_file() and any((p / f).is_file() for f in (INDEX_FILE, H5_FILE, META_FILE))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _parse_text_index(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    try:
        values = np.fromstring(raw, dtype=np.int64, sep="\n") if raw.strip() else np.zeros(0, np.int64)
    except ValueError:  # numpy >= 2 raises on unparsable text
        values = None
    if values is None or len(values) != raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1):
        # blank lines, "\r\n" or a stray character: parse token by token and name a bad line
        for no, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            if line.strip() and not line.strip().isdigit():
                raise IndexedDatasetError(f"{path}:{no}: not a byte offset: {line[:40]!r}; rebuild the index")
        values = np.array(raw.split(), dtype=np.int64)
    return values


def _read_h5_index(path: Path) -> np.ndarray:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is a core dependency
        raise IndexedDatasetError(f"reading {path} needs h5py: pip install h5py") from err
    with h5py.File(path, "r") as f:
        if "index" not in f:
            raise IndexedDatasetError(f"{path} has no dataset 'index' (found {list(f)}); rebuild the index")
        ds = f["index"]
        offset = ds.id.get_offset()
        if (
            offset is not None
            and ds.chunks is None
            and ds.compression is None
            and ds.dtype == np.dtype("<i8")
            and ds.shape[0] > 0
        ):
            n = ds.shape[0]
            first = int(ds[0])
            if first == 0:  # contiguous, ours: map it instead of reading it
                return np.memmap(path, dtype="<i8", mode="r", offset=offset, shape=(n,))
        return np.asarray(ds[()], dtype=np.int64)


def read_offsets(path: str | Path, source: str = "auto") -> np.ndarray:
    """Return the N+1 line offsets of an index directory (leading 0 added for the original format).

    Args:
        path: the index directory.
        source: ``"auto"`` (the text ``index`` when under 16 MiB or when there is no index.h5,
            else ``index.h5``), ``"text"`` or ``"h5"``.

    Returns:
        int64 array ``[0, e_1, ..., e_N]`` (memory-mapped for our large ``index.h5`` files).
    """
    p = Path(path)
    txt, h5 = p / INDEX_FILE, p / H5_FILE
    if source == "auto":
        source = "text" if txt.is_file() and (not h5.is_file() or txt.stat().st_size < _TEXT_INDEX_MAX_BYTES) else "h5"
    if source == "text":
        if not txt.is_file():
            raise IndexedDatasetError(f"{txt} not found: build the index with `fm9g build-index SRC {p}`")
        offsets = _parse_text_index(txt)
    elif source == "h5":
        if not h5.is_file():
            raise IndexedDatasetError(
                f"{p} has neither {INDEX_FILE} nor {H5_FILE}: build the index with `fm9g build-index SRC {p}`"
            )
        offsets = _read_h5_index(h5)
    else:
        raise ValueError(f"source must be 'auto', 'text' or 'h5', got {source!r}")
    if len(offsets) == 0 or offsets[0] != 0:  # original convert_json2index: end offsets, no leading 0
        offsets = np.concatenate([np.zeros(1, np.int64), np.asarray(offsets, dtype=np.int64)])
    return offsets


class IndexedDataset(Sequence):
    """Random access to the lines of an index directory, through a memory-mapped ``data.jsonl``.

    Args:
        path: the index directory (ours, or one written by the original tools).
        index_source: ``"auto"``, ``"text"`` or ``"h5"`` (see :func:`read_offsets`).
        check: verify ``meta.json`` and the offsets against the data file (cheap: sizes, counts and
            up to 1024 sampled line ends).

    ``len(ds)`` is N; ``ds[i]`` is line i parsed (dict); ``ds[a:b]`` a list of dicts read with one
    contiguous read; ``ds.read_raw(i)`` the raw bytes of line i (with its ``"\\n"``);
    ``ds.offsets`` the N+1 offsets; ``ds.meta`` the meta.json dict (``{}`` when absent).
    Datasets pickle (the map is reopened lazily), so they work in DataLoader workers.

    Raises:
        IndexedDatasetError: missing files, or data that does not match the index / meta.json
            (truncated or modified after the index was built).
    """

    def __init__(self, path: str | Path, *, index_source: str = "auto", check: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise IndexedDatasetError(f"index directory {self.path} not found: build it with `fm9g build-index SRC {path}`")
        self.data_path = self.path / DATA_FILE
        if not self.data_path.is_file():
            raise IndexedDatasetError(f"{self.data_path} not found: {self.path} is not an index directory")
        meta_path = self.path / META_FILE
        self.meta: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise IndexedDatasetError(f"{meta_path} is not valid JSON ({err}); rebuild the index") from err
        self.offsets: np.ndarray = read_offsets(self.path, index_source)
        self.nbytes = self.data_path.stat().st_size
        self._mm: mmap.mmap | None = None
        if check:
            self._check()

    # -- integrity ----------------------------------------------------------------------------
    def _check(self) -> None:
        rebuild = f"the data file was truncated or modified after the index was built: rebuild with `fm9g build-index SRC {self.path}`"
        n = len(self.offsets) - 1
        m_bytes, m_lines = self.meta.get("nbytes"), self.meta.get("nlines")
        if m_bytes is not None and int(m_bytes) != self.nbytes:
            raise IndexedDatasetError(f"{self.data_path} has {self.nbytes} bytes but {META_FILE} says {m_bytes}: {rebuild}")
        if m_lines is not None and int(m_lines) != n:
            raise IndexedDatasetError(f"{self.path}: the index has {n} lines but {META_FILE} says {m_lines}: {rebuild}")
        if int(self.offsets[-1]) != self.nbytes:
            raise IndexedDatasetError(
                f"{self.path}: the index ends at byte {int(self.offsets[-1])} but {self.data_path} has {self.nbytes} bytes: {rebuild}"
            )
        if n == 0:
            return
        step = max(1, n // 1024)
        sample = np.asarray(self.offsets[step::step], dtype=np.int64)
        if np.any(np.diff(np.asarray(self.offsets[:: max(1, step)], dtype=np.int64)) <= 0):
            raise IndexedDatasetError(f"{self.path}: offsets are not increasing: the index is corrupt; rebuild it")
        sample = sample[sample < self.nbytes]  # the last line may lack "\n" in original-format data
        if len(sample):
            mm = self._map()
            ends = np.frombuffer(mm, dtype=np.uint8)[sample - 1]
            if np.any(ends != 0x0A):
                bad = int(sample[np.argmax(ends != 0x0A)])
                raise IndexedDatasetError(f"{self.path}: line boundary at byte {bad} is not after a newline: {rebuild}")

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.data_path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None
        if isinstance(state["offsets"], np.memmap):
            state["offsets"] = np.asarray(state["offsets"])
        return state

    def close(self) -> None:
        """Close the memory map (reopened on the next read)."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _bounds(self, i: int) -> tuple[int, int]:
        n = len(self)
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"line {i} out of range for {self.path} ({n} lines)")
        return int(self.offsets[j]), int(self.offsets[j + 1])

    def read_raw(self, i: int) -> bytes:
        """Raw bytes of line ``i`` (including its trailing ``"\\n"``)."""
        a, b = self._bounds(i)
        return self._map()[a:b]

    def _parse(self, raw: bytes | memoryview, i: int) -> dict:
        if _orjson is not None:
            try:
                return _orjson.loads(raw)
            except ValueError:
                pass  # the standard library accepts a little more (lone surrogate escapes) and words the error
        try:
            return json.loads(bytes(raw))
        except ValueError as err:
            raise IndexedDatasetError(
                f"{self.data_path}: line {i} (0-based) is not valid JSON ({err}): the data file was modified "
                f"after the index was built; rebuild with `fm9g build-index SRC {self.path}`"
            ) from err

    def __getitem__(self, key: int | slice) -> Any:  # type: ignore[override]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self.read_slice(start, stop)
        a, b = self._bounds(key)
        return self._parse(self._map()[a:b], int(key))

    def read_slice(self, start: int, stop: int) -> list[dict]:
        """Lines ``start..stop-1`` parsed, with one contiguous read of data.jsonl."""
        if stop <= start:
            return []
        base = int(self.offsets[start])
        blob = self._map()[base : int(self.offsets[stop])]
        cuts = np.asarray(self.offsets[start : stop + 1], dtype=np.int64) - base
        view = memoryview(blob)
        return [self._parse(view[cuts[k] : cuts[k + 1]], start + k) for k in range(stop - start)]

    def __iter__(self) -> Iterator[dict]:
        n, block = len(self), 4096
        for s in range(0, n, block):
            yield from self.read_slice(s, min(n, s + block))

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.path)!r}, lines={len(self)}, bytes={self.nbytes})"


# ---------------------------------------------------------------------------------------------
# building: workers scan byte blocks, the main process writes in order
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Job:
    file_no: int
    path: str
    kind: str  # "jsonl" | "txt"
    start: int
    end: int
    size: int


@dataclass(kw_only=True)
class _BlockResult:
    file_no: int
    start: int = 0
    end: int = 0
    n_physical: int = 0  # physical lines owned by the block (blank and invalid included)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # bytes of each kept line, "\n" included
    mode: str = "copy"  # "copy": copy [start,end) (+ "\n" when add_newline); "ranges"; "bytes"
    add_newline: bool = False
    ranges: list[tuple[int, int]] = field(default_factory=list)
    payload: bytes = b""
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(len(LENGTH_BUCKETS), np.int64))
    sum_tokens: float = 0.0
    n_blank: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (1-based line within block, problem), capped
    n_invalid: int = 0
    first: dict | None = None


class _Scanner:
    """Validates and measures the lines of one byte block (runs in a worker process)."""

    def __init__(self, language: str, tokenizer: Any, skip_invalid: bool, use_orjson: bool | None = None) -> None:
        self.language = language
        self.tokenizer = tokenizer
        self.skip_invalid = skip_invalid
        self._scan = json.scanner.make_scanner(json.JSONDecoder())
        self._orjson = _orjson if use_orjson is None else (_orjson if use_orjson else None)

    # reading one block, aligned to whole lines ------------------------------------------------
    @staticmethod
    def _read_block(job: _Job) -> tuple[int, bytes, bytes]:
        """Read the lines that start inside ``[job.start, job.end)``.

        Returns ``(start, buf, tail)``: ``buf`` = bytes ``[start, job.end)`` where ``start`` is the
        first line start at or after ``job.start``; ``tail`` = the rest of the last line (through
        its ``"\n"``) when it runs past ``job.end`` (kept apart to avoid copying ``buf``).
        """
        with open(job.path, "rb", buffering=0) as f:
            start = job.start
            if start == 0:
                if f.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark is not part of line 1
                    start = 3
            else:  # own only the lines that start inside [start, end)
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    while True:
                        chunk = f.read(1 << 16)
                        if not chunk:
                            return job.size, b"", b""
                        k = chunk.find(b"\n")
                        if k >= 0:
                            start += k + 1
                            break
                        start += len(chunk)
                    if start >= job.end:
                        return start, b"", b""
            f.seek(start)
            buf = f.read(job.end - start)
            parts: list[bytes] = []
            if job.end < job.size and not buf.endswith(b"\n"):
                while True:
                    chunk = f.read(1 << 16)
                    if not chunk:
                        break
                    k = chunk.find(b"\n")
                    if k >= 0:
                        parts.append(chunk[: k + 1])
                        break
                    parts.append(chunk)
            return start, buf, b"".join(parts)

    def _parse_std(self, line: bytes) -> Any:
        s = line.decode("utf-8")
        try:
            obj, end = self._scan(s, 0)
        except StopIteration:  # leading whitespace (or not JSON): the full parser decides
            return json.loads(s)
        if end != len(s) and s[end:].strip(_JSON_WS):
            raise ValueError("extra data")
        return obj

    @staticmethod
    def _diagnose(line: bytes) -> str | None:
        """Why ``line`` is not valid JSON; ``None`` for a blank line (skipped, not an error)."""
        if not line.strip(b" \t\r\n"):
            return None
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"invalid UTF-8: {err.reason} at byte {err.start} of the line"
        try:
            json.loads(s)
        except ValueError as err:
            hint = " (the line starts with a UTF-8 byte-order mark: save the file without BOM)" if s.startswith("\ufeff") else ""
            return f"invalid JSON: {err}{hint}"
        return "invalid JSON: the line holds a value that cannot be represented (e.g. a lone surrogate escape)"

    @staticmethod
    def _check_fields(obj: Any) -> str:
        if not isinstance(obj, dict):
            return f"expected a JSON object, got {type(obj).__name__}"
        if "output" not in obj:
            return f"missing field 'output' (keys: {sorted(obj)[:10]})"
        out = obj["output"]
        if not isinstance(out, str):
            return f"field 'output' must be a string, got {type(out).__name__}"
        inp = obj.get("input")
        if inp is not None and not isinstance(inp, str):
            return f"field 'input' must be a string, got {type(inp).__name__}"
        return ""

    def _token_lengths(self, records: list[dict], lines: list[bytes]) -> np.ndarray:
        n = len(lines)
        if self.tokenizer is None:
            if self.language == "zh":
                return 0.7 * np.fromiter((len(s.decode("utf-8")) for s in lines), dtype=np.float64, count=n)
            return 1.5 * (np.fromiter((s.count(b" ") for s in lines), dtype=np.float64, count=n) + 1)
        texts: list[str] = []
        for r in records:
            texts.append(r.get("input") or "")
            texts.append(r["output"])
        counts = _count_tokens(self.tokenizer, texts)
        return counts[0::2] + counts[1::2]

    def __call__(self, job: _Job) -> _BlockResult:
        res = _BlockResult(file_no=job.file_no)
        start, buf, tail = self._read_block(job)
        res.start, res.end = start, start + len(buf) + len(tail)
        if not buf:
            return res
        lines = buf.split(b"\n")
        if tail:
            lines[-1] += tail
            lines[-1:] = lines[-1].split(b"\n")
        del buf
        ends_with_nl = lines[-1] == b""
        if ends_with_nl:
            lines.pop()
        n = res.n_physical = len(lines)
        txt = job.kind == "txt"
        parse = self._orjson.loads if self._orjson is not None else self._parse_std
        keep = np.ones(n, dtype=bool) if not txt else None
        records: list[dict] = []
        kept_lines: list[bytes] = []
        payload: list[bytes] = []
        for k, line in enumerate(lines):
            if txt:
                try:
                    stripped = line.decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    problem = f"invalid UTF-8: {err.reason} at byte {err.start} of the line"
                else:
                    if not stripped:
                        res.n_blank += 1
                        continue
                    obj = {"input": "", "output": stripped}
                    line = json.dumps(obj, ensure_ascii=False).encode("utf-8")
                    payload.append(line + b"\n")
                    records.append(obj)
                    kept_lines.append(line)
                    continue
            else:
                try:
                    obj = parse(line)
                    problem = self._check_fields(obj) if type(obj) is not dict or type(obj.get("output")) is not str or (
                        "input" in obj and type(obj["input"]) is not str and obj["input"] is not None
                    ) else ""
                except (ValueError, StopIteration):  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
                    problem = self._diagnose(line)
                    if problem is None:
                        keep[k] = False
                        res.n_blank += 1
                        continue
                if not problem:
                    records.append(obj)
                    kept_lines.append(line)
                    continue
                keep[k] = False
            res.n_invalid += 1
            if len(res.invalid) < 5:
                res.invalid.append((k + 1, problem))
            if not self.skip_invalid:
                return res
        if records:
            res.first = records[0]
            lengths_tok = self._token_lengths(records, kept_lines)
            res.buckets = _bucket_counts(lengths_tok)
            res.sum_tokens = float(lengths_tok.sum())
        if txt:
            res.mode = "bytes"
            res.payload = b"".join(payload)
            res.lengths = np.fromiter((len(p) for p in payload), dtype=np.int64, count=len(payload))
            return res
        line_lengths = np.fromiter((len(x) for x in lines), dtype=np.int64, count=n) + 1
        if not ends_with_nl:
            line_lengths[-1] -= 1
        ends = np.cumsum(line_lengths)
        lengths = line_lengths[keep]
        if not ends_with_nl and keep[-1]:
            res.add_newline = True
            lengths[-1] += 1
        res.lengths = lengths
        if not keep.all():
            res.mode = "ranges"
            starts = ends - line_lengths
            idx = np.flatnonzero(keep)  # merge runs of kept lines into absolute byte ranges
            if len(idx):
                breaks = np.flatnonzero(np.diff(idx) != 1)
                run_starts = np.concatenate([[idx[0]], idx[breaks + 1]])
                run_ends = np.concatenate([idx[breaks], [idx[-1]]])
                res.ranges = [(start + int(starts[a]), start + int(ends[b])) for a, b in zip(run_starts, run_ends)]
        return res


def _count_tokens(tokenizer: Any, texts: list[str], chunk: int = 256) -> np.ndarray:
    """Token counts of ``texts`` without special tokens, encoded ``chunk`` texts at a time."""
    out = np.zeros(len(texts), dtype=np.float64)
    nonempty = [i for i, t in enumerate(texts) if t]
    backend = getattr(tokenizer, "_tokenizer", None)  # HF fast tokenizer: count in Rust, no id lists
    is_hf = callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids")
    for c in range(0, len(nonempty), chunk):
        idx = nonempty[c : c + chunk]
        batch = [texts[i] for i in idx]
        if backend is not None and hasattr(backend, "encode_batch"):
            counts = [len(e) for e in backend.encode_batch(batch, add_special_tokens=False)]
        elif is_hf:
            counts = [len(x) for x in tokenizer(batch, add_special_tokens=False)["input_ids"]]
        else:
            counts = []
            for t in batch:
                try:
                    counts.append(len(tokenizer.encode(t, add_special_tokens=False)))
                except TypeError:
                    counts.append(len(tokenizer.encode(t)))
        out[idx] = counts
    return out


_WORKER: _Scanner | None = None


def _worker_init(language: str, tokenizer: Any, skip_invalid: bool) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = _Scanner(language, tokenizer, skip_invalid)


def _worker_scan(job: _Job) -> _BlockResult:
    assert _WORKER is not None
    return _WORKER(job)


def _list_sources(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.exists():
        raise FileNotFoundError(f"source {src} not found: pass a .jsonl or .txt file or a directory of them")
    files: list[Path] = []
    for child in sorted(src.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file():
            files.append(child)
        elif child.is_dir():
            files += [g for g in sorted(child.iterdir()) if g.is_file() and not g.name.startswith(".")]
    picked = [f for f in files if f.suffix.lower() in SOURCE_SUFFIXES]
    skipped = [f.name for f in files if f.suffix.lower() not in SOURCE_SUFFIXES]
    if skipped:
        log.warning("build_index: ignoring %d file(s) that are not .jsonl/.json/.txt in %s: %s", len(skipped), src, skipped[:5])
    if not picked:
        raise ValueError(f"source directory {src} holds no .jsonl, .json or .txt files (it and one level down are searched)")
    return picked


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_output(src: Path, sources: list[Path], out: Path, overwrite: bool) -> None:
    if src.is_dir() and (_is_within(out, src)):
        raise ValueError(
            f"output directory {out} is inside the input directory {src}: choose an output outside it "
            f"(a rebuild would read the index's own data.jsonl as input)"
        )
    for s in sources:
        if _is_within(s, out):
            raise ValueError(f"output directory {out} contains the source {s}: writing there would delete it; choose another output")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is a file: remove it or choose another output directory")
        if is_index_dir(out):
            if not overwrite:
                raise FileExistsError(f"{out} already holds an index: pass overwrite=True (--overwrite) to replace it")
        elif any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{out} exists and is not an index directory: pass overwrite=True (--overwrite) to replace it, or choose another output"
            )


def _plan_jobs(sources: list[Path], block_size: int) -> Iterator[_Job]:
    for no, path in enumerate(sources):
        size = path.stat().st_size
        kind = "txt" if path.suffix.lower() == ".txt" else "jsonl"
        for start in range(0, max(size, 1), block_size):
            yield _Job(file_no=no, path=str(path), kind=kind, start=start, end=min(size, start + block_size), size=size)


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    pos, remaining = start, end - start
    use_cfr = hasattr(os, "copy_file_range")
    while remaining > 0:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, remaining, pos)
            except OSError:
                use_cfr = False
                continue
        else:
            chunk = os.pread(src_fd, min(remaining, 8 << 20), pos)
            n = len(chunk)
            _write_all(dst_fd, chunk)
        if n == 0:
            raise IOError(f"unexpected end of file while copying bytes {pos}..{end}")
        pos += n
        remaining -= n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_h5(tmp: Path, raw_offsets: Path, n: int) -> None:
    import h5py

    with h5py.File(tmp / H5_FILE, "w") as f:
        ds = f.create_dataset("index", shape=(n + 1,), dtype="<i8")  # contiguous: readers may memory-map it
        ds[0] = 0
        step = 1 << 20
        for s in range(0, n, step):
            count = min(step, n - s)
            ds[1 + s : 1 + s + count] = np.fromfile(raw_offsets, dtype="<i8", count=count, offset=8 * s)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-*`` left by a build that was killed (SIGKILL)."""
    for d in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = d.name[len(f".{out.name}.tmp-") :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    if out.exists():
        for d in out.parent.glob(f".{out.name}.old-*"):
            shutil.rmtree(d, ignore_errors=True)


def build_index(
    src: str | Path,
    out_dir: str | Path,
    language: str = "zh",
    tokenizer: Any = None,
    *,
    skip_invalid: bool = False,
    overwrite: bool = False,
    num_workers: int | None = None,
    block_size: int = _DEFAULT_BLOCK,
) -> dict[str, Any]:
    """Validate a jsonl/txt source and write an index directory (see the module docstring).

    Streams: blocks of ``block_size`` bytes are validated by ``num_workers`` processes while the
    main process copies the valid bytes and writes offsets, so memory does not grow with input size.
    Everything is written into a temporary directory next to ``out_dir`` and renamed at the end:
    an interrupted build leaves no ``out_dir`` (and an existing one untouched).

    Args:
        src: a ``.jsonl`` (or ``.json``, one record a line) or ``.txt`` file, or a directory of them (searched one level down,
            sorted). ``.txt`` lines become ``{"input": "", "output": line.strip()}``, blank lines skipped.
        out_dir: the index directory to write.
        language: ``"zh"``, ``"en"`` (or ``"code"``) — selects the token estimate.
        tokenizer: a tokenizer object or a path for ``AutoTokenizer.from_pretrained``; when given,
            token statistics are real token counts of input + output.
        skip_invalid: skip (and count, ``n_invalid``) bad lines instead of raising.
        overwrite: replace an existing index directory (or a non-empty non-index directory).
        num_workers: validating processes (default: ``min(2, cpu count)`` without a tokenizer, 1
            with one, whose batch encoding is multi-threaded already; 1 = in this process).
        block_size: bytes per validation job.

    Returns:
        The meta.json dict.

    Raises:
        InvalidLineError: a bad line (file, 1-based line number, problem) without ``skip_invalid``.
        ValueError: an empty source, no valid lines, a bad language, or an output inside the input.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        FileNotFoundError: ``src`` does not exist.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if block_size < 64:
        raise ValueError(f"block_size must be at least 64 bytes, got {block_size}")
    src_p = Path(src).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    sources = _list_sources(src_p)
    _check_output(src_p, sources, out, overwrite)
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tok_name = str(tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(tok_name)
    else:
        tok_name = getattr(tokenizer, "name_or_path", None) or (type(tokenizer).__name__ if tokenizer is not None else None)
    if num_workers is None:  # a tokenizer batch-encodes on all cores by itself: no need to fork it
        num_workers = 1 if tokenizer is not None else min(2, os.cpu_count() or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _build_into(tmp, sources, language, tokenizer, tok_name, skip_invalid, num_workers, block_size)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _build_into(
    tmp: Path,
    sources: list[Path],
    language: str,
    tokenizer: Any,
    tok_name: str | None,
    skip_invalid: bool,
    num_workers: int,
    block_size: int,
) -> dict[str, Any]:
    jobs = _plan_jobs(sources, block_size)
    nlines = 0
    offset = 0
    buckets = np.zeros(len(LENGTH_BUCKETS), np.int64)
    sum_tokens = 0.0
    n_invalid = n_blank = 0
    invalid_examples: list[str] = []
    first: dict | None = None
    line_base = [0] * len(sources)  # physical lines seen so far per file
    raw_offsets = tmp / ".offsets.bin"
    src_fds: dict[int, int] = {}

    def handle(res: _BlockResult) -> None:
        nonlocal nlines, offset, buckets, sum_tokens, n_invalid, n_blank, first
        path = sources[res.file_no]
        for k, problem in res.invalid:
            where = f"{path}:{line_base[res.file_no] + k}"
            if not skip_invalid:
                raise InvalidLineError(path, line_base[res.file_no] + k, problem)
            if len(invalid_examples) < 10:
                invalid_examples.append(f"{where}: {problem}")
        line_base[res.file_no] += res.n_physical
        n_invalid += res.n_invalid
        n_blank += res.n_blank
        if len(res.lengths) == 0:
            return
        if first is None:
            first = res.first
        if res.mode == "bytes":
            _write_all(data_f.fileno(), res.payload)
        else:
            fd = src_fds.get(res.file_no)
            if fd is None:
                for old in src_fds.values():
                    os.close(old)
                src_fds.clear()
                fd = src_fds[res.file_no] = os.open(path, os.O_RDONLY)
            dst = data_f.fileno()
            ranges = [(res.start, res.end)] if res.mode == "copy" else res.ranges
            for a, b in ranges:
                _copy_range(fd, dst, a, b)
            if res.add_newline:
                _write_all(dst, b"\n")
        ends = offset + np.cumsum(res.lengths)
        index_f.write("\n".join(map(str, ends.tolist())) + "\n")
        offs_f.write(ends.astype("<i8").tobytes())
        offset = int(ends[-1])
        nlines += len(ends)
        buckets += res.buckets
        sum_tokens += res.sum_tokens

    with open(tmp / DATA_FILE, "wb", buffering=0) as data_f, open(tmp / INDEX_FILE, "w") as index_f, open(
        raw_offsets, "wb"
    ) as offs_f:
        index_f.write("0\n")
        try:
            if num_workers <= 1:
                scanner = _Scanner(language, tokenizer, skip_invalid)
                for job in jobs:
                    handle(scanner(job))
            else:
                import multiprocessing as mp

                with mp.get_context().Pool(num_workers, _worker_init, (language, tokenizer, skip_invalid)) as pool:
                    pending: deque = deque()
                    for job in jobs:
                        pending.append(pool.apply_async(_worker_scan, (job,)))
                        if len(pending) >= 2 * num_workers:
                            handle(pending.popleft().get())
                    while pending:
                        handle(pending.popleft().get())
        finally:
            for fd in src_fds.values():
                os.close(fd)
    names = ", ".join(str(s) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
    if nlines == 0:
        if n_invalid:
            raise ValueError(f"no valid line in {names}: all {n_invalid} non-blank lines are invalid ({invalid_examples[:3]})")
        raise ValueError(f"source {names} is empty: nothing to index")
    if n_invalid:
        log.warning("build_index: skipped %d invalid line(s), e.g. %s", n_invalid, "; ".join(invalid_examples[:3]))
    _write_h5(tmp, raw_offsets, nlines)
    raw_offsets.unlink()
    meta = {
        "language": language,
        "nlines": nlines,
        "nbytes": offset,
        "length_distribute": {name: int(c) for (name, _), c in zip(LENGTH_BUCKETS, buckets)},
        "avg_token_per_line": sum_tokens / nlines,
        "data_sample": truncate_sample(first),
        "n_invalid": n_invalid,
        "n_blank": n_blank,
        "invalid_examples": invalid_examples,
        "token_count": f"tokenizer:{tok_name}" if tokenizer is not None else "estimate",
        "sources": [str(s) for s in sources],
    }
    (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta
