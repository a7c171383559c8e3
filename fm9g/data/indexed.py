"""Indexed jsonl datasets: :func:`build_index` writes an index directory, :class:`IndexedDataset`
reads it.

The directory's format and the reader are in :mod:`fm9g.data.index_format`; the validation and
measuring of source lines in :mod:`fm9g.data.index_scan` (meta.json's length statistics are
described there); this module builds an index and re-exports the public names of both. See
docs/data.md.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fm9g._io import atomic_dir
from fm9g.data.index_format import (
    DATA_FILE,
    H5_FILE,
    INDEX_FILE,
    META_FILE,
    IndexedDataset,
    IndexedDatasetError,
    JSON_PARSERS,
    _orjson_for,
    is_index_dir,
    read_offsets,
)
from fm9g.data.index_scan import LENGTH_BUCKETS, _BlockResult, _Job, _Scanner, estimate_tokens, worker_init, worker_scan
from fm9g.data.records import FORMATS
from fm9g.data.tokenizers import load_tokenizer

__all__ = [
    "build_index",
    "IndexedDataset",
    "InvalidLineError",
    "IndexedDatasetError",
    "JSON_PARSERS",
    "LENGTH_BUCKETS",
    "estimate_tokens",
    "truncate_sample",
    "read_offsets",
    "is_index_dir",
]

log = logging.getLogger(__name__)

LANGUAGES = ("zh", "en", "code")
SOURCE_SUFFIXES = (".jsonl", ".json", ".txt")
_DEFAULT_BLOCK = 8 << 20


class InvalidLineError(ValueError):
    """A source line is not a usable record: a JSON object with a string ``output`` (and optional
    string ``input``), or a chat record (messages / ShareGPT / Alpaca) with an assistant turn."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(
            f"{path}:{line}: {problem} (each line must be a JSON object with a string 'output' and an "
            f"optional string 'input', or a chat record with 'messages', 'conversations' or 'instruction' "
            f"(docs/data.md); fix the line, or pass skip_invalid=True / --skip-invalid to skip bad lines)"
        )


def truncate_sample(value: Any, max_chars: int = 50) -> Any:
    """Shorten a record for ``meta.json``'s ``data_sample`` (docs/data.md).

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
    trust_remote_code: bool = False,
    format: str = "auto",
    chat_template: str | None = None,
    json_parser: str = "auto",
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
        tokenizer: a tokenizer object or a local path for :func:`fm9g.data.tokenizers.load_tokenizer`;
            when given, token statistics are real token counts of input + output.
        skip_invalid: skip (and count, ``n_invalid``) bad lines instead of raising.
        overwrite: replace an existing index directory (or a non-empty non-index directory).
        num_workers: validating processes (default: ``min(2, cpu count)`` without a tokenizer, 1
            with one, whose batch encoding is multi-threaded already; 1 = in this process).
        block_size: bytes per validation job.
        trust_remote_code: let a tokenizer directory given as a path run the Python code it ships
            (off by default: such a folder is refused with a message naming this option).
        format: the record format of every jsonl line: ``"auto"`` (detected per line from its keys),
            ``"io"`` (``{input, output}``), ``"messages"``, ``"sharegpt"`` or ``"alpaca"``
            (:mod:`fm9g.data.records`). Lines are stored byte for byte whatever the format.
        chat_template: with a `tokenizer`, render every record through this template
            (``"tokenizer"``, a built-in name or a ``.jinja`` path) as training will: a record it
            cannot render is a bad line (file and line named, nothing written).
        json_parser: what validates the jsonl lines: ``"auto"`` (orjson when installed, about 5×
            faster, else the standard library), ``"orjson"`` or ``"stdlib"``
            (:data:`~fm9g.data.index_format.JSON_PARSERS`). Both accept and refuse the same lines
            with the same messages, and write the same index.

    Returns:
        The meta.json dict.

    Raises:
        InvalidLineError: a bad line (file, 1-based line number, problem) without ``skip_invalid``.
        ValueError: an empty source, no valid lines, a bad language, or an output inside the input.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        FileNotFoundError: ``src`` does not exist.
        ImportError: ``json_parser="orjson"`` without orjson installed.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if block_size < 64:
        raise ValueError(f"block_size must be at least 64 bytes, got {block_size}")
    _orjson_for(json_parser)  # a bad or unavailable parser is refused before anything is read
    src_p = Path(src).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    sources = _list_sources(src_p)
    _check_output(src_p, sources, out, overwrite)
    if isinstance(tokenizer, (str, Path)):
        tok_name = str(tokenizer)
        tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    else:
        tok_name = getattr(tokenizer, "name_or_path", None) or (type(tokenizer).__name__ if tokenizer is not None else None)
    _check_chat_template(tokenizer, chat_template, format)
    if num_workers is None:  # a tokenizer batch-encodes on all cores by itself: no need to fork it
        num_workers = 1 if tokenizer is not None else min(2, os.cpu_count() or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    with atomic_dir(out, tmp_prefix=f".{out.name}.tmp-{os.getpid()}-") as tmp:  # see _remove_stale_temporaries
        meta = _build_into(tmp, sources, language, tokenizer, tok_name, skip_invalid, num_workers, block_size,
                           format, chat_template, json_parser)
    return meta


def _check_chat_template(tokenizer: Any, chat_template: str | None, fmt: str) -> None:
    """Raise before anything is written when `chat_template` cannot be used (no tokenizer, no
    template in the tokenizer, a missing file)."""
    if chat_template is None:
        return
    if tokenizer is None:
        raise ValueError("chat_template needs a tokenizer (--tokenizer): the template is rendered with it")
    from fm9g.data.chat import ChatTokenizer

    ChatTokenizer(tokenizer, chat_template=chat_template, fmt=fmt)


def _build_into(
    tmp: Path,
    sources: list[Path],
    language: str,
    tokenizer: Any,
    tok_name: str | None,
    skip_invalid: bool,
    num_workers: int,
    block_size: int,
    fmt: str = "auto",
    chat_template: str | None = None,
    json_parser: str = "auto",
) -> dict[str, Any]:
    """Write the index of ``sources`` into the empty folder ``tmp``; return its meta.json dict."""
    writer = _IndexWriter(tmp, sources, skip_invalid)
    try:
        _scan_all(_plan_jobs(sources, block_size), writer.add, language, tokenizer, skip_invalid, num_workers,
                  (fmt, chat_template), json_parser)
    finally:
        writer.close()
    writer.check_not_empty()
    _write_h5(tmp, writer.raw_offsets, writer.nlines)
    writer.raw_offsets.unlink()
    meta = {
        "language": language,
        "nlines": writer.nlines,
        "nbytes": writer.offset,
        "length_distribute": {name: int(c) for (name, _), c in zip(LENGTH_BUCKETS, writer.buckets)},
        "avg_token_per_line": writer.sum_tokens / writer.nlines,
        "data_sample": truncate_sample(writer.first),
        "n_invalid": writer.n_invalid,
        "n_blank": writer.n_blank,
        "invalid_examples": writer.invalid_examples,
        "token_count": f"tokenizer:{tok_name}" if tokenizer is not None else "estimate",
        "sources": [str(s) for s in sources],
    }
    (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _scan_all(
    jobs: Iterator[_Job], handle: Callable[[_BlockResult], None], language: str, tokenizer: Any,
    skip_invalid: bool, num_workers: int, records: tuple[str, str | None] = ("auto", None),
    json_parser: str = "auto",
) -> None:
    """Scan every job and pass the results to ``handle`` in job order (in ``num_workers`` processes);
    ``records`` is ``(format, chat_template)``."""
    if num_workers <= 1:
        scanner = _Scanner(language, tokenizer, skip_invalid, json_parser, *records)
        for job in jobs:
            handle(scanner(job))
        return
    import multiprocessing as mp

    with mp.get_context().Pool(num_workers, worker_init, (language, tokenizer, skip_invalid, json_parser, *records)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(worker_scan, (job,)))
            if len(pending) >= 2 * num_workers:
                handle(pending.popleft().get())
        while pending:
            handle(pending.popleft().get())


class _IndexWriter:
    """Appends scanned blocks, in source order, to a new index's data file and offset files, and
    keeps the counts meta.json reports."""

    def __init__(self, tmp: Path, sources: list[Path], skip_invalid: bool) -> None:
        self.sources, self.skip_invalid = sources, skip_invalid
        self.nlines = self.offset = self.n_invalid = self.n_blank = 0
        self.buckets = np.zeros(len(LENGTH_BUCKETS), np.int64)
        self.sum_tokens = 0.0
        self.invalid_examples: list[str] = []
        self.first: dict | None = None
        self.line_base = [0] * len(sources)  # physical lines seen so far per file
        self.raw_offsets = tmp / ".offsets.bin"
        self.src_fds: dict[int, int] = {}
        self.data_f = open(tmp / DATA_FILE, "wb", buffering=0)
        self.index_f = open(tmp / INDEX_FILE, "w")
        self.offs_f = open(self.raw_offsets, "wb")
        self.index_f.write("0\n")

    def add(self, res: _BlockResult) -> None:
        """Append one block's kept lines (raise :class:`InvalidLineError` on a bad line unless skipping)."""
        path = self.sources[res.file_no]
        for k, problem in res.invalid:
            where = f"{path}:{self.line_base[res.file_no] + k}"
            if not self.skip_invalid:
                raise InvalidLineError(path, self.line_base[res.file_no] + k, problem)
            if len(self.invalid_examples) < 10:
                self.invalid_examples.append(f"{where}: {problem}")
        self.line_base[res.file_no] += res.n_physical
        self.n_invalid += res.n_invalid
        self.n_blank += res.n_blank
        if len(res.lengths) == 0:
            return
        if self.first is None:
            self.first = res.first
        self._copy(res, path)
        ends = self.offset + np.cumsum(res.lengths)
        self.index_f.write("\n".join(map(str, ends.tolist())) + "\n")
        self.offs_f.write(ends.astype("<i8").tobytes())
        self.offset = int(ends[-1])
        self.nlines += len(ends)
        self.buckets += res.buckets
        self.sum_tokens += res.sum_tokens

    def _copy(self, res: _BlockResult, path: Path) -> None:
        """Append the block's kept bytes to data.jsonl (from the source file, or its payload)."""
        dst = self.data_f.fileno()
        if res.mode == "bytes":
            _write_all(dst, res.payload)
            return
        fd = self.src_fds.get(res.file_no)
        if fd is None:
            for old in self.src_fds.values():
                os.close(old)
            self.src_fds.clear()
            fd = self.src_fds[res.file_no] = os.open(path, os.O_RDONLY)
        ranges = [(res.start, res.end)] if res.mode == "copy" else res.ranges
        for a, b in ranges:
            _copy_range(fd, dst, a, b)
        if res.add_newline:
            _write_all(dst, b"\n")

    def close(self) -> None:
        """Close the source files, then the files written."""
        try:
            for fd in self.src_fds.values():
                os.close(fd)
        finally:
            self.data_f.close()
            self.index_f.close()
            self.offs_f.close()

    def check_not_empty(self) -> None:
        """Raise ValueError when no line was kept; warn about skipped invalid lines."""
        names = ", ".join(str(s) for s in self.sources[:3]) + (" ..." if len(self.sources) > 3 else "")
        if self.nlines == 0:
            if self.n_invalid:
                raise ValueError(
                    f"no valid line in {names}: all {self.n_invalid} non-blank lines are invalid "
                    f"({self.invalid_examples[:3]})"
                )
            raise ValueError(f"source {names} is empty: nothing to index")
        if self.n_invalid:
            log.warning("build_index: skipped %d invalid line(s), e.g. %s", self.n_invalid, "; ".join(self.invalid_examples[:3]))
