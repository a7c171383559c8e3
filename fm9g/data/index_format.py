"""The index directory format, and reading one: :class:`IndexedDataset`, :func:`read_offsets`.

An index directory (docs/data.md) holds::

    data.jsonl   the valid source lines, byte for byte, each ending in "\\n"
    index        text, N+1 decimal byte offsets, one per line: 0, e_1, ..., e_N (line i is
                 bytes [offsets[i], offsets[i+1]) of data.jsonl)
    index.h5     HDF5, dataset "index": the same N+1 offsets (int64, contiguous)
    meta.json    one JSON line: language, nlines, nbytes, length_distribute, avg_token_per_line,
                 data_sample (the original's keys) and n_invalid, n_blank, token_count, sources

The original ``convert_json2index.py`` wrote ``index`` / ``index.h5`` *without* the leading 0 (end
offsets only), and the original reader then silently skipped the first line. :class:`IndexedDataset`
reads both forms (a first value other than 0 means the leading 0 is missing) and returns every line.
:func:`fm9g.data.indexed.build_index` writes an index directory.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fm9g._io import read_json

try:  # optional: 4-5x faster validation and reading; the standard library is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = ["DATA_FILE", "INDEX_FILE", "H5_FILE", "META_FILE", "JSON_PARSERS", "IndexedDataset",
           "IndexedDatasetError", "read_offsets", "is_index_dir"]

DATA_FILE = "data.jsonl"
INDEX_FILE = "index"
H5_FILE = "index.h5"
META_FILE = "meta.json"
_TEXT_INDEX_MAX_BYTES = 16 << 20  # read the text index below this size; the h5 index above
# orjson parses an integer outside [-2**63, 2**64) as a float (1e29 for a 30-digit id); any such
# float has at least this magnitude, and a line holding one is parsed again by the standard library
_INT64_LIMIT = 9223372036854775808.0
#: the ``json_parser`` values of :func:`fm9g.data.indexed.build_index` and :class:`IndexedDataset`:
#: ``"auto"`` (orjson when installed, else the standard library), ``"orjson"``, ``"stdlib"``
JSON_PARSERS = ("auto", "orjson", "stdlib")


class IndexedDatasetError(ValueError):
    """An index directory is missing files or does not match its data file."""


def _orjson_for(json_parser: str) -> Any:
    """The orjson module ``json_parser`` asks for, or None for the standard library's ``json``.

    Raises:
        ValueError: ``json_parser`` is not one of :data:`JSON_PARSERS`.
        ImportError: ``"orjson"`` is asked for and not installed.
    """
    if json_parser not in JSON_PARSERS:
        raise ValueError(f"json_parser must be one of {JSON_PARSERS}, got {json_parser!r}")
    if json_parser == "stdlib":
        return None
    if json_parser == "orjson" and _orjson is None:
        raise ImportError("json_parser='orjson' needs orjson, which is not installed: pip install orjson "
                          "(or pass json_parser='auto' to use the standard library without it)")
    return _orjson


def is_index_dir(path: str | Path) -> bool:
    """True when ``path`` looks like an index directory (data.jsonl plus index, index.h5 or meta.json)."""
    p = Path(path)
    return (p / DATA_FILE).is_file() and any((p / f).is_file() for f in (INDEX_FILE, H5_FILE, META_FILE))


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
    try:
        return _read_h5_offsets(h5py, path)
    except IndexedDatasetError:
        raise
    except (OSError, ValueError) as err:  # not HDF5, truncated, or an unreadable dataset
        raise IndexedDatasetError(f"{path} is not a readable HDF5 index ({err})") from err


def _read_h5_offsets(h5py: Any, path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        if "index" not in f:
            raise IndexedDatasetError(f"{path} has no dataset 'index' (found {list(f)})")
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
    auto = source == "auto"
    if auto:
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
        try:
            offsets = _read_h5_index(h5)
        except IndexedDatasetError as err:
            if auto and txt.is_file():  # a damaged index.h5 beside a text index: read the text one
                offsets = _parse_text_index(txt)
            else:
                there = f"read the text {INDEX_FILE} with source='text', or " if txt.is_file() else (
                    f"the directory has no text {INDEX_FILE} to read instead: ")
                raise IndexedDatasetError(f"{err}; {there}rebuild the index with `fm9g build-index SRC {p}`") from err
    else:
        raise ValueError(f"source must be 'auto', 'text' or 'h5', got {source!r}")
    if len(offsets) == 0 or offsets[0] != 0:  # original convert_json2index: end offsets, no leading 0
        offsets = np.concatenate([np.zeros(1, np.int64), np.asarray(offsets, dtype=np.int64)])
    return offsets


def _has_inexact_number(obj: Any) -> bool:
    """Whether a value orjson parsed holds a float of magnitude >= 2**63: perhaps an integer
    literal orjson could not keep exact (see ``_INT64_LIMIT``)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        t = type(o)
        if t is dict:
            stack.extend(o.values())
        elif t is list:
            stack.extend(o)
        elif t is float and not -_INT64_LIMIT < o < _INT64_LIMIT:
            return True
    return False


class IndexedDataset(Sequence):
    """Random access to the lines of an index directory, through a memory-mapped ``data.jsonl``.

    Args:
        path: the index directory (ours, or one written by the original tools).
        index_source: ``"auto"``, ``"text"`` or ``"h5"`` (see :func:`read_offsets`).
        check: verify ``meta.json`` and the offsets against the data file (cheap: sizes, counts and
            up to 1024 sampled line ends).
        json_parser: what parses a line: ``"auto"`` (orjson when installed, else the standard
            library), ``"orjson"`` or ``"stdlib"`` (:data:`JSON_PARSERS`). Both give the same dicts:
            a line orjson refuses, or one holding an integer beyond 64 bits, is parsed again by
            the standard library.

    ``len(ds)`` is N; ``ds[i]`` is line i parsed (dict); ``ds[a:b]`` a list of dicts read with one
    contiguous read; ``ds.read_raw(i)`` the raw bytes of line i (with its ``"\\n"``);
    ``ds.offsets`` the N+1 offsets; ``ds.meta`` the meta.json dict (``{}`` when absent).
    Datasets pickle (the map is reopened lazily), so they work in DataLoader workers.

    Raises:
        IndexedDatasetError: missing files, or data that does not match the index / meta.json
            (truncated or modified after the index was built).
        ImportError: ``json_parser="orjson"`` without orjson installed.
    """

    def __init__(self, path: str | Path, *, index_source: str = "auto", check: bool = True,
                 json_parser: str = "auto") -> None:
        self._use_orjson = _orjson_for(json_parser) is not None  # a flag, not the module: datasets pickle
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
                self.meta = read_json(meta_path, expect=dict, error=IndexedDatasetError)
            except IndexedDatasetError as err:
                raise IndexedDatasetError(
                    f"{err}: {META_FILE} holds one JSON object (the index's line and byte counts, docs/data.md); "
                    f"rebuild the index with `fm9g build-index SRC {self.path}`"
                ) from None
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
        if self._use_orjson:
            try:
                obj = _orjson.loads(raw)
            except ValueError:
                pass  # the standard library accepts a little more (lone surrogate escapes) and words the error
            else:
                if not _has_inexact_number(obj):
                    return obj  # else an integer beyond 64 bits: the standard library keeps it exact
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
