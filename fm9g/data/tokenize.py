"""One sample -> token ids and aligned labels (docs/data.md; the original's quirks decided).

Layout of a sample that fits (``1 + len(input) + len(output) <= max_length``)::

    input_ids = [BOS] + input_tokens + output_tokens
    labels    = [-100] * len(input_tokens) + output_tokens + [EOS]

Labels are already aligned: position ``j`` predicts ``labels[j]`` (no shift in the loss). So no
position is trained to predict BOS or an input (prompt) token; the output tokens and the final
EOS are. When the output already ends with the EOS id (e.g. ChatML output ending in
``<|im_end|>`` with a tokenizer whose EOS is ``<|im_end|>``), no second EOS is added
(the original added one).

Texts are encoded with ``tokenizer(text, add_special_tokens=False)`` (or ``.encode``), so the only
special tokens are the BOS / EOS added here.

BOS follows the tokenizer (``bos="auto"``, the default): it is added only when the tokenizer adds
one itself when encoding text (``tokenizer("x")`` starts with ``bos_token_id`` and
``tokenizer("x", add_special_tokens=False)`` does not; the original FM9G / MiniCPM tokenizer does,
so ``<s>`` stays first; SmolLM2's and Qwen2's do not). A tokenizer object without the Hugging Face
interface decides by its ``add_bos_token`` attribute, else by having a ``bos_token_id`` (the FM9G-8B
``vocab.txt`` tokenizer: ``<s>`` first, as the original). ``bos="always"`` adds it whatever the
tokenizer does, ``"never"`` never does. Without BOS the first input token is predicted by nothing
(labels are shifted by one, still aligned).

Over-long samples: think of the sample as the stream of ``(input_id, label)`` pairs above, of
length ``n = 1 + len(input) + len(output)``. ``oversize_rule`` decides what happens when
``n > max_length`` — for pretraining text (empty input) and instruction samples alike:

``"segment"`` (default)
    Cut the stream into consecutive windows of ``max_length`` pairs. Every position is trained
    exactly once; the token a window's last label predicts is the first input id of the next
    window (which has no BOS), and labels continue the stream. Concatenating the windows gives
    back the whole stream. The final window is kept only if it has more than
    ``min_tail_tokens - 1`` (default: more than 8) tokens, as in the original: a tail of a few
    tokens with no context teaches little and costs a whole packed document; dropped tails are
    counted in ``stats["dropped_tail_tokens"]``. For instruction samples the prompt sits only in
    the first window (the original instead truncated them: use ``"head"`` for that).
``"head"``
    Keep only the first window (truncated, no EOS).
``"drop"``
    Drop the sample (counted in ``stats["dropped_oversize"]``).

A sample whose input alone leaves fewer than two positions for the output
(``len(input) >= max_length - 2``) is always dropped and counted in
``stats["dropped_input_overflow"]`` (unless ``do_compact`` can shorten it, below).

``do_compact=True``: an over-long instruction sample whose output leaves at least 128 positions
for the input keeps the first and last halves of that budget of input tokens (the middle of the
prompt is cut) so that the whole output and EOS fit; otherwise ``oversize_rule`` applies.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["TokenizedSample", "SampleTokenizer", "Dropped", "OVERSIZE_RULES", "IGNORE_INDEX", "BOS_POLICIES", "adds_bos"]

IGNORE_INDEX = -100
OVERSIZE_RULES = ("segment", "head", "drop")
#: values of ``bos`` (module docstring)
BOS_POLICIES = ("auto", "always", "never")
_COMPACT_MIN_INPUT = 128


class Dropped(list):
    """The windows of a record that trains nothing: an empty list (``[]`` wherever windows are
    expected) that says why, in ``reason`` (counted per task by the loader and logged)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # crosses to the loader from its worker processes
        return (Dropped, (self.reason,))


#: why a record is dropped (the values of :attr:`Dropped.reason`)
DROP_TRANSFORM = "the transform returned None"
DROP_EMPTY = "empty output"
DROP_PROMPT = "prompt longer than max_length"
DROP_OVERSIZE = "longer than max_length (oversize_rule drop)"
DROP_NO_TARGET = "no trained turn"


@dataclass(frozen=True)
class TokenizedSample:
    """One training sequence (a document or one window of one).

    Attributes:
        input_ids: token ids, length ``T <= max_length``.
        labels: aligned targets, length ``T``; ``-100`` where no loss is taken.
    """

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """Number of positions that carry loss (labels != -100)."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _special_id(tokenizer: Any, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def adds_bos(tokenizer: Any, bos_id: int | None = None) -> bool:
    """Whether `tokenizer` puts its BOS first when it encodes text (module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer, or an object with ``encode`` and ``bos_token_id``.
        bos_id: the BOS id to look for (default: the tokenizer's ``bos_token_id``).

    Returns:
        True for tokenizers such as the original FM9G / Llama-2 ones, False for SmolLM2 / Qwen2.
    """
    bos_id = _special_id(tokenizer, "bos_token_id") if bos_id is None else bos_id
    if bos_id is None:
        return False
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        return with_special[:1] == [bos_id] and plain[:1] != [bos_id]
    flag = getattr(tokenizer, "add_bos_token", None)
    return bool(flag) if flag is not None else True


def resolve_bos(tokenizer: Any, bos: str, bos_id: int | None) -> bool:
    """Whether a BOS is added under policy `bos`; raise ValueError for a bad policy or a missing BOS."""
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos must be one of {list(BOS_POLICIES)}, got {bos!r}")
    add = bos == "always" or (bos == "auto" and adds_bos(tokenizer, bos_id))
    if add and bos_id is None:
        raise ValueError("bos is 'always' but the tokenizer has no bos_token_id: set \"bos\": \"auto\" (or "
                         "\"never\") in the dataset entry, or pass bos_id=<id> to SampleTokenizer")
    return add


class SampleTokenizer:
    """Tokenize ``{"input", "output"}`` samples into :class:`TokenizedSample` windows.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``)
            or any object with ``encode(text)``.
        max_length: longest sequence emitted, in tokens (>= 4).
        oversize_rule: ``"segment"``, ``"head"`` or ``"drop"`` (module docstring).
        do_compact: cut the middle of over-long prompts when the output leaves room (module docstring).
        bos_id / eos_id: override the tokenizer's ``bos_token_id`` / ``eos_token_id``.
        bos: ``"auto"`` (BOS only where the tokenizer adds one itself), ``"always"`` or ``"never"``.
        min_tail_tokens: a final window of a segmented sample is kept only with at least this many
            tokens (default 9, i.e. "more than 8" as in the original).

    Calling the object returns a list of samples (``[]`` when the sample is dropped or empty);
    ``.stats`` counts what happened (``samples``, ``emitted``, ``windows``, ``segmented``,
    ``truncated_head``, ``compacted``, ``dropped_empty_output``, ``dropped_input_overflow``,
    ``dropped_oversize``, ``dropped_tail``, ``dropped_tail_tokens``, ``skipped_none``).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        *,
        oversize_rule: str = "segment",
        do_compact: bool = False,
        bos_id: int | None = None,
        eos_id: int | None = None,
        min_tail_tokens: int = 9,
        bos: str = "auto",
    ) -> None:
        if oversize_rule not in OVERSIZE_RULES:
            raise ValueError(f"oversize_rule must be one of {OVERSIZE_RULES}, got {oversize_rule!r}")
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.oversize_rule = oversize_rule
        self.do_compact = bool(do_compact)
        self.min_tail_tokens = int(min_tail_tokens)
        self.bos_id = bos_id if bos_id is not None else _special_id(tokenizer, "bos_token_id")
        self.eos_id = eos_id if eos_id is not None else _special_id(tokenizer, "eos_token_id")
        self.add_bos = resolve_bos(tokenizer, bos, self.bos_id)
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id: pass eos_id=<id> to SampleTokenizer")
        self.stats: Counter[str] = Counter()
        self._call_style = self._detect_call_style(tokenizer)

    # -- encoding -----------------------------------------------------------------------------
    @staticmethod
    def _detect_call_style(tokenizer: Any) -> str:
        if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
            return "hf"
        if hasattr(tokenizer, "encode"):
            return "encode"
        raise TypeError("tokenizer must be a Hugging Face tokenizer or have an encode(text) method")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if not text:
            return []
        if self._call_style == "hf":
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(self.tokenizer.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (one batched call for Hugging Face fast tokenizers)."""
        if self._call_style == "hf" and texts:
            nonempty = [t for t in texts if t]
            enc = iter(self.tokenizer(nonempty, add_special_tokens=False)["input_ids"]) if nonempty else iter(())
            return [list(next(enc)) if t else [] for t in texts]
        return [self.encode(t) for t in texts]

    # -- samples ------------------------------------------------------------------------------
    def __call__(self, sample: dict | None) -> list[TokenizedSample]:
        """Tokenize one sample; returns its windows (``[]`` when dropped). See the module docstring."""
        if sample is None:
            self.stats["skipped_none"] += 1
            return Dropped(DROP_TRANSFORM)
        output = sample.get("output")
        if not output:
            self.stats["samples"] += 1
            self.stats["dropped_empty_output"] += 1
            return Dropped(DROP_EMPTY)
        return self.from_ids(self.encode(sample.get("input") or ""), self.encode(output))

    def batch(self, samples: Iterable[dict | None]) -> list[list[TokenizedSample]]:
        """Like calling the object on each sample, with one batched tokenizer call."""
        samples = list(samples)
        texts: list[str] = []
        for s in samples:
            if s is not None and s.get("output"):
                texts += [s.get("input") or "", s["output"]]
        ids = iter(self.encode_batch(texts))
        result = []
        for s in samples:
            if s is None or not s.get("output"):
                result.append(self(s))
            else:
                inp = next(ids)
                result.append(self.from_ids(inp, next(ids)))
        return result

    def from_ids(self, input_tokens: list[int], output_tokens: list[int]) -> list[TokenizedSample]:
        """Build the windows of a sample from already tokenized input and output."""
        L = self.max_length
        st = self.stats
        st["samples"] += 1
        if not output_tokens:
            st["dropped_empty_output"] += 1
            return Dropped(DROP_EMPTY)
        # an output that already ends with EOS is not given a second one: EOS is the last label
        body = list(output_tokens[:-1] if output_tokens[-1] == self.eos_id else output_tokens)
        nb = 1 if self.add_bos else 0
        n_in, n_out = len(input_tokens), len(body)
        fits = nb + n_in + n_out <= L
        if not fits and self.do_compact and n_in:
            budget = L - nb - n_out
            if budget >= _COMPACT_MIN_INPUT and n_in > budget:
                input_tokens = list(input_tokens[: budget // 2]) + list(input_tokens[n_in - (budget - budget // 2) :])
                n_in = len(input_tokens)
                fits = True
                st["compacted"] += 1
        if n_in >= L - 2:
            st["dropped_input_overflow"] += 1
            return Dropped(DROP_PROMPT)
        # the stream of tokens and whether each is trained; position j predicts token j + 1
        stream = [self.bos_id] * nb + list(input_tokens) + body + [self.eos_id]
        trained = [False] * (nb + n_in) + [True] * (n_out + 1)
        ids = stream[:-1]
        labels = [t if m else IGNORE_INDEX for t, m in zip(stream[1:], trained[1:])]
        return self.windows(ids, labels)

    def windows(self, ids: list[int], labels: list[int]) -> list[TokenizedSample]:
        """Cut an aligned ``(input_ids, labels)`` stream into samples of at most ``max_length`` by
        ``oversize_rule`` (module docstring), counting what happens in :attr:`stats`.

        Args:
            ids: the input ids of one document.
            labels: its aligned labels (same length).

        Returns:
            The windows (``[]`` when dropped).
        """
        L = self.max_length
        st = self.stats
        if len(ids) <= L:
            st["emitted"] += 1
            st["windows"] += 1
            return [TokenizedSample(input_ids=list(ids), labels=list(labels))]
        if self.oversize_rule == "drop":
            st["dropped_oversize"] += 1
            return Dropped(DROP_OVERSIZE)
        if self.oversize_rule == "head":
            st["truncated_head"] += 1
            st["emitted"] += 1
            st["windows"] += 1
            return [TokenizedSample(input_ids=ids[:L], labels=labels[:L])]
        # segment: consecutive windows over the (input_id, label) stream
        windows = []
        for start in range(0, len(ids), L):
            w_ids, w_labels = ids[start : start + L], labels[start : start + L]
            if start and len(w_ids) < L and len(w_ids) < self.min_tail_tokens:
                st["dropped_tail"] += 1
                st["dropped_tail_tokens"] += len(w_ids)
                break
            windows.append(TokenizedSample(input_ids=w_ids, labels=w_labels))
        st["segmented"] += 1
        st["emitted"] += 1
        st["windows"] += len(windows)
        return windows
