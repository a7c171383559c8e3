"""Scanning the byte blocks of an index build's source: validate every line, measure its length
in tokens, and say which bytes to copy. Runs in :func:`fm9g.data.indexed.build_index`'s worker
processes (or in the building process).

A line is an ``{input, output}`` record or a chat record (messages, ShareGPT, Alpaca: see
:mod:`fm9g.data.records`), detected per line or fixed by the build's ``format``.

Length statistics (meta.json's ``length_distribute``, ``avg_token_per_line``) use, per line of
data.jsonl (without its line terminator):

* with a tokenizer: ``len(tok(input)) + len(tok(output))``, both encoded with
  ``add_special_tokens=False`` (so BOS/EOS are not counted); for a chat record, the tokens of its
  messages' contents joined by newlines (the chat template is not counted);
* otherwise the original's estimate over the raw JSON text of the line: ``zh``:
  ``0.7 × characters``; ``en`` / ``code``: ``1.5 × (number of " " + 1)`` (pieces when splitting
  on the space character).
"""
from __future__ import annotations

import json
import json.scanner
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fm9g.data.index_format import _orjson_for
from fm9g.data.chat import ChatTemplateError, ChatTokenizer
from fm9g.data.records import RecordError, is_chat_record, record_problem, to_chat

__all__ = ["LENGTH_BUCKETS", "estimate_tokens"]

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
_JSON_WS = " \t\r\n"
_ZH_TOKENS_PER_CHAR = 0.7  # the original's token estimates, without a tokenizer
_TOKENS_PER_PIECE = 1.5


def estimate_tokens(line: str, language: str) -> float:
    """The token estimate of one raw data.jsonl line (without its ``"\\n"``).

    Args:
        line: the line's text (JSON syntax and escapes included).
        language: ``"zh"`` (0.7 × characters) or ``"en"`` / ``"code"`` (1.5 × space-separated pieces).
    """
    if language == "zh":
        return _ZH_TOKENS_PER_CHAR * len(line)
    return _TOKENS_PER_PIECE * (line.count(" ") + 1)


def _estimate_lengths(lines: list[bytes], language: str) -> np.ndarray:
    """:func:`estimate_tokens` of raw UTF-8 lines, as a float64 array."""
    n = len(lines)
    if language == "zh":
        return _ZH_TOKENS_PER_CHAR * np.fromiter((len(s.decode("utf-8")) for s in lines), dtype=np.float64, count=n)
    return _TOKENS_PER_PIECE * (np.fromiter((s.count(b" ") for s in lines), dtype=np.float64, count=n) + 1)


def _bucket_counts(lengths: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(_BUCKET_EDGES, lengths, side="right"), minlength=len(LENGTH_BUCKETS))


_ARRAY_HINT = (
    " (expected one JSON object per line, this looks like a JSON array: convert with "
    "`jq -c '.[]' FILE.json > FILE.jsonl` or `python -c \"import json,sys; "
    "[print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]\" FILE.json > FILE.jsonl`)"
)


def _refuse_constant(name: str) -> Any:
    """``parse_constant`` hook: NaN / Infinity / -Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON value (JSON has no NaN or Infinity): write null, or the value as a string")


def _finite_float(text: str) -> float:
    """``parse_float`` hook: a number beyond the float range is an error, as in orjson."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond the range of a 64-bit float: write it as a string")
    return value


def _file_format_hint(line: str) -> str:
    """What an unparsable line tells about the file's format (``""`` when nothing particular)."""
    if line.startswith("\ufeff"):
        return " (the line starts with a UTF-8 byte-order mark: save the file without BOM)"
    if "\r" in line.rstrip("\r\n"):
        return (" (the file has bare CR (\\r) line endings: lines must end in \\n or \\r\\n; convert with "
                "`tr '\\r' '\\n' < FILE > FILE.jsonl`)")
    body = line.strip(_JSON_WS)
    if body.startswith("["):
        return _ARRAY_HINT
    if body == "{":
        return (" (this looks like pretty-printed JSON, one object over several lines: expected one JSON object "
                "per line; rewrite it with `jq -c . FILE > FILE.jsonl`)")
    return ""


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

    def __init__(self, language: str, tokenizer: Any, skip_invalid: bool, json_parser: str = "auto",
                 fmt: str = "auto", chat_template: str | None = None) -> None:
        self.language = language
        self.fmt = fmt  # a format of fm9g.data.records.FORMATS
        # with a chat template, every record is rendered once: a template that fails names the line
        self.chat = ChatTokenizer(tokenizer, chat_template=chat_template, fmt=fmt) if chat_template else None
        self.tokenizer = tokenizer
        self.skip_invalid = skip_invalid
        # NaN / Infinity are refused as orjson refuses them, so both parsers accept the same lines
        self._scan = json.scanner.make_scanner(json.JSONDecoder(parse_constant=_refuse_constant))
        self._orjson = _orjson_for(json_parser)  # build_index's json_parser; None: the standard library

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
            return json.loads(s, parse_constant=_refuse_constant)
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
            json.loads(s, parse_constant=_refuse_constant, parse_float=_finite_float)
        except ValueError as err:
            return f"invalid JSON: {err}{_file_format_hint(s)}"
        return "invalid JSON: the line holds a value that cannot be represented (e.g. a lone surrogate escape)"

    @staticmethod
    def _check_fields(obj: Any) -> str:
        if not isinstance(obj, dict):
            hint = _ARRAY_HINT if isinstance(obj, list) else ""
            return f"expected a JSON object, got {type(obj).__name__}{hint}"
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
        if self.tokenizer is None:
            return _estimate_lengths(lines, self.language)
        texts: list[str] = []
        for r in records:
            if self.fmt != "io" and (self.fmt != "auto" or is_chat_record(r)):  # a chat: its messages' text
                messages, _ = to_chat(r, self.fmt)
                texts += ["", "\n".join(m.get("content") or "" for m in messages)]
                continue
            texts.append(r.get("input") or "")
            texts.append(r["output"])
        counts = _count_tokens(self.tokenizer, texts)
        return counts[0::2] + counts[1::2]

    def __call__(self, job: _Job) -> _BlockResult:
        """Validate and measure the lines that start in ``job``'s byte range."""
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
        res.n_physical = len(lines)
        txt = job.kind == "txt"
        scanned = self._scan_txt(lines, res) if txt else self._scan_jsonl(lines, res)
        if scanned is None:  # stopped at an invalid line
            return res
        records, kept_lines, keep_or_payload = scanned
        if records:
            # orjson turns integers beyond 64 bits into floats: meta.json's sample is parsed exactly
            res.first = json.loads(kept_lines[0]) if self._orjson is not None and not txt else records[0]
            lengths_tok = self._token_lengths(records, kept_lines)
            res.buckets = _bucket_counts(lengths_tok)
            res.sum_tokens = float(lengths_tok.sum())
        if txt:
            payload: list[bytes] = keep_or_payload  # type: ignore[assignment]
            res.mode = "bytes"
            res.payload = b"".join(payload)
            res.lengths = np.fromiter((len(p) for p in payload), dtype=np.int64, count=len(payload))
        else:
            self._locate(res, lines, keep_or_payload, ends_with_nl)  # type: ignore[arg-type]
        return res

    def _invalid(self, res: _BlockResult, k: int, problem: str) -> bool:
        """Count line ``k``'s problem; True when the scan stops here (``skip_invalid`` is off)."""
        res.n_invalid += 1
        if len(res.invalid) < 5:
            res.invalid.append((k + 1, problem))
        return not self.skip_invalid

    def _scan_txt(self, lines: list[bytes], res: _BlockResult) -> tuple[list[dict], list[bytes], list[bytes]] | None:
        """``(records, their JSON lines, payload)`` of text lines, or None when stopped at an invalid one."""
        records: list[dict] = []
        kept_lines: list[bytes] = []
        payload: list[bytes] = []
        for k, line in enumerate(lines):
            try:
                stripped = line.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                if self._invalid(res, k, f"invalid UTF-8: {err.reason} at byte {err.start} of the line"):
                    return None
                continue
            if not stripped:
                res.n_blank += 1
                continue
            obj = {"input": "", "output": stripped}
            line = json.dumps(obj, ensure_ascii=False).encode("utf-8")
            payload.append(line + b"\n")
            records.append(obj)
            kept_lines.append(line)
        return records, kept_lines, payload

    def _scan_jsonl(self, lines: list[bytes], res: _BlockResult) -> tuple[list[dict], list[bytes], np.ndarray] | None:
        """``(records, their lines, keep mask)`` of jsonl lines, or None when stopped at an invalid one."""
        parse = self._orjson.loads if self._orjson is not None else self._parse_std
        keep = np.ones(len(lines), dtype=bool)
        records: list[dict] = []
        kept_lines: list[bytes] = []
        for k, line in enumerate(lines):
            try:
                obj = parse(line)
                if self.fmt != "io" and (self.fmt != "auto" or is_chat_record(obj)):
                    problem = record_problem(obj, self.fmt)
                else:  # the original {input, output} record (the checks, and bytes, of before chat records)
                    problem = self._check_fields(obj) if type(obj) is not dict or type(obj.get("output")) is not str or (
                        "input" in obj and type(obj["input"]) is not str and obj["input"] is not None
                    ) else ""
            except (ValueError, StopIteration):  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
                problem = self._diagnose(line)
                if problem is None:
                    keep[k] = False
                    res.n_blank += 1
                    continue
            if not problem and self.chat is not None:
                problem = self._render_problem(obj)
            if not problem:
                records.append(obj)
                kept_lines.append(line)
                continue
            keep[k] = False
            if self._invalid(res, k, problem):
                return None
        return records, kept_lines, keep

    def _render_problem(self, record: dict) -> str:
        """Why the build's chat template cannot render `record` (``""`` when it can)."""
        try:
            self.chat.render(record)  # type: ignore[union-attr]
        except (RecordError, ChatTemplateError) as err:
            return str(err)
        return ""

    @staticmethod
    def _locate(res: _BlockResult, lines: list[bytes], keep: np.ndarray, ends_with_nl: bool) -> None:
        """Set the kept lines' lengths and how to copy them: the whole block, or byte ranges."""
        n = len(lines)
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
                res.ranges = [(res.start + int(starts[a]), res.start + int(ends[b])) for a, b in zip(run_starts, run_ends)]


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


# A worker process's scanner, built once by its pool's initializer (multiprocessing.Pool runs plain
# functions in the worker, so the scanner has to live at module level there).
_WORKER: _Scanner | None = None


def worker_init(language: str, tokenizer: Any, skip_invalid: bool, json_parser: str = "auto",
                fmt: str = "auto", chat_template: str | None = None) -> None:
    """Initializer of a build worker process: its own :class:`_Scanner`."""
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = _Scanner(language, tokenizer, skip_invalid, json_parser, fmt, chat_template)


def worker_scan(job: _Job) -> _BlockResult:
    """Scan ``job`` in a worker process started with :func:`worker_init`."""
    assert _WORKER is not None, "worker_init did not run in this process"
    return _WORKER(job)
