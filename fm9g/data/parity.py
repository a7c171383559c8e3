"""Parity between training and serving for chat data (docs/data.md, "Check parity with serving").

For each record and each trained assistant turn ``k`` of its messages ``m``, serving sees the prompt
``P = tokenizer.apply_chat_template(m[:k], add_generation_prompt=True)`` and should answer with
``A``: the tokens ``apply_chat_template(m[:k+1])`` has after ``P``, through the first special token
(the end of turn). Training must show the model exactly ``P`` as the context of the answer's first
token, and its labels must be exactly ``A``. :func:`check_chat_parity` reports every record where a
token differs (record, turn, position, both tokens) and every record with nothing to train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fm9g.data.chat import ChatTemplateError, ChatTokenizer
from fm9g.data.records import RecordError, to_chat

__all__ = ["ParityProblem", "ParityReport", "check_chat_parity"]


@dataclass(frozen=True)
class ParityProblem:
    """One difference between training and serving.

    Attributes:
        record: the record's number (0-based line of the index).
        message: what differs, in words (names the turn, the position and both tokens).
        turn: index in the messages of the assistant turn concerned (``None``: the whole record).
        position: token position in the training sequence (``None`` when not about one token).
    """

    record: int
    message: str
    turn: int | None = None
    position: int | None = None


@dataclass
class ParityReport:
    """What :func:`check_chat_parity` found.

    Attributes:
        records: records checked.
        turns: assistant turns compared.
        problems: every difference found (empty when training matches serving).
    """

    records: int = 0
    turns: int = 0
    problems: list[ParityProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no token differs and every record trains something."""
        return not self.problems

    def summary(self) -> str:
        """One line, then one line per problem."""
        head = (f"parity: {self.records} records, {self.turns} assistant turns: "
                + ("training matches serving" if self.ok else f"{len(self.problems)} problem(s)"))
        return "\n".join([head] + [f"  record {p.record} (line {p.record + 1}): {p.message}" for p in self.problems])


def _token(tokenizer: Any, tid: int | None) -> str:
    if tid is None:
        return "nothing"
    return f"{tokenizer.convert_ids_to_tokens(int(tid))!r} (id {int(tid)})"


def _ids(tokenizer: Any, messages: list[dict], tools: Any, template: str | None, gen: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True,
                                        add_generation_prompt=gen)
    out = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in out]


def _compare_turn(tok: Any, ids: list[int], labels: list[int], prompt: list[int], answer: list[int]) -> tuple[int, str] | None:
    """``(position, words)`` of the first token where training differs from serving, or None."""
    for t, want in enumerate(prompt):
        got = ids[t] if t < len(ids) else None
        if got != want:
            return t, f"prompt token {t} differs: training {_token(tok, got)}, serving {_token(tok, want)}"
    for m, want in enumerate(answer):
        j = len(prompt) - 1 + m
        got = labels[j] if 0 <= j < len(labels) else None
        if got != want:
            return j, (f"answer token {m} (label at position {j}) differs: training "
                       f"{'no label' if got == -100 else _token(tok, got)}, serving {_token(tok, want)}")
    return None


def _check_record(n: int, record: dict, trainer: ChatTokenizer, tok: Any, serve: str | None,
                  report: ParityReport) -> None:
    try:
        windows = trainer(record)
    except (RecordError, ChatTemplateError) as err:
        report.problems.append(ParityProblem(n, f"cannot be rendered for training: {err}"))
        return
    if not windows:
        report.problems.append(ParityProblem(n, "the trained span is empty: no token carries a label"))
        return
    ids, labels = windows[0].input_ids, windows[0].labels
    messages, tools = to_chat(record, trainer.fmt)
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if trainer.train_on == "last_assistant":
        turns = turns[-1:]
    specials = trainer.special_ids
    for k in turns:
        report.turns += 1
        prompt = _ids(tok, messages[:k], tools, serve, True)
        full = _ids(tok, messages[: k + 1], tools, serve, False)
        if full[: len(prompt)] != prompt:
            report.problems.append(ParityProblem(n, "the serving template's prompt is not a prefix of the turn", k))
            continue
        answer = full[len(prompt):]
        end = next((i for i, t in enumerate(answer) if t in specials), None)
        answer = answer[: end + 1] if end is not None else answer + [trainer.eos_id]
        diff = _compare_turn(tok, ids, labels, prompt, answer)
        if diff is not None:
            report.problems.append(ParityProblem(n, f"assistant turn at message {k}: {diff[1]}", k, diff[0]))


def check_chat_parity(records: str | Path | Iterable[dict], tokenizer: Any, *, chat_template: str = "tokenizer",
                      train_on: str = "assistant", bos: str = "auto", limit: int | None = 20,
                      serve_template: str | None = None, base_dir: str | Path | None = None) -> ParityReport:
    """Compare what training sees with what serving sees, token by token (module docstring).

    Args:
        records: an index directory, or records (dicts of any chat format, or ``{input, output}``).
        tokenizer: the Hugging Face tokenizer of the model (its ``apply_chat_template`` is serving).
        chat_template: the training template (``"tokenizer"``, a built-in name or a ``.jinja`` path).
        train_on / bos: as the dataset entry's.
        limit: check the first `limit` records (``None``: all).
        serve_template: the template serving uses (default: the tokenizer's own).
        base_dir: folder a relative template path is resolved against.

    Returns:
        A :class:`ParityReport`; ``report.ok`` is True when every trained token matches serving.

    Raises:
        ChatTemplateError: the training template is missing or invalid.
    """
    if isinstance(records, (str, Path)):
        from fm9g.data.index_format import IndexedDataset

        ds = IndexedDataset(records)
        records = (ds[i] for i in range(len(ds) if limit is None else min(limit, len(ds))))
    trainer = ChatTokenizer(tokenizer, chat_template=chat_template, train_on=train_on, bos=bos, base_dir=base_dir)
    report = ParityReport()
    for n, record in enumerate(records):
        if limit is not None and n >= limit:
            break
        report.records += 1
        _check_record(n, record, trainer, tokenizer, serve_template, report)
    return report
