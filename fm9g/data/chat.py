"""Chat records -> token ids and labels through a Jinja chat template (docs/data.md, "Chat data").

A record (any format of :mod:`fm9g.data.records`) becomes messages, the messages are rendered to
one string by the chat template, the string is tokenized once, and a token carries a label when
its first character lies in a trained span of the rendered string. Masks come from character
offsets of the rendered text, never from re-tokenized pieces, so a tokenizer merge at a turn
boundary cannot shift them.

The trained span of assistant turn ``k`` (messages ``m``) runs from the end of
``render(m[:k], add_generation_prompt=True)`` (the prompt the model is served) to the end of
``render(m[:k+1])`` without trailing whitespace: the turn's content, anything the template writes
inside the turn (``<think>…</think>`` as the template renders it), and its end-of-turn token
(``<|im_end|>``). When the last trained token is not a special token (a template with no
end-of-turn marker), the tokenizer's EOS is appended as a trained token, so the model learns to
stop.

``train_on``: ``"assistant"`` (every assistant turn, the default), ``"last_assistant"`` (only the
last one), ``"all"`` (every token of the rendered text).

``chat_template``: ``"tokenizer"`` (the tokenizer's own template, ``tokenizer_config.json`` /
``chat_template.jinja``), a built-in name of :data:`BUILTIN_TEMPLATES`, or a path to a ``.jinja``
file.
"""
from __future__ import annotations

from bisect import bisect_right
from pathlib import Path
from typing import Any

from fm9g._io import ConfigError
from fm9g.data.records import RecordError, is_chat_record, to_chat
from fm9g.data.tokenize import DROP_NO_TARGET, IGNORE_INDEX, BOS_POLICIES, Dropped, SampleTokenizer, TokenizedSample, resolve_bos

__all__ = ["ChatTemplateError", "ChatTokenizer", "BUILTIN_TEMPLATES", "TRAIN_ON", "resolve_chat_template",
           "tokenize_record"]

#: values of ``train_on``
TRAIN_ON = ("assistant", "last_assistant", "all")

_CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + ROLE + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: built-in chat templates (Jinja, rendered like a tokenizer's own)
BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML as Qwen2 writes it: a default system prompt when the dialogue has none
    "chatml": _CHATML.replace("ROLE", "message['role']"),
    # the original add_template.py text: the user role written "User" (served templates write "user")
    "chatml-original": _CHATML.replace("ROLE", "('User' if message['role'] == 'user' else message['role'])"),
    # the 2B / 8B era: <用户>question<AI>answer, each answer closed by EOS
    "userai": (
        "{%- for message in messages %}{%- if message['role'] == 'user' %}"
        "{{- '<用户>' + message['content'] + '<AI>' }}{%- elif message['role'] == 'assistant' %}"
        "{{- message['content'] + eos_token }}{%- else %}{{- message['content'] }}{%- endif %}{%- endfor %}"
    ),
}


class ChatTemplateError(ConfigError):
    """A chat template is missing, cannot be read, or fails to render a record."""


def resolve_chat_template(spec: str, tokenizer: Any, base_dir: str | Path | None = None) -> str:
    """The Jinja source of a ``chat_template`` setting.

    Args:
        spec: ``"tokenizer"``, a name of :data:`BUILTIN_TEMPLATES`, or a ``.jinja`` file path.
        tokenizer: the tokenizer (for ``"tokenizer"``).
        base_dir: directory a relative path is resolved against (the dataset config's folder).

    Returns:
        The template text.

    Raises:
        ChatTemplateError: the tokenizer has no template, the file is missing, or the name is unknown.
    """
    if spec == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if not isinstance(template, str) or not template:
            where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ChatTemplateError(
                f"chat_template is 'tokenizer' but the tokenizer {where} has no chat template (none in its "
                f"tokenizer_config.json or chat_template.jinja): name a built-in one ({sorted(BUILTIN_TEMPLATES)}) "
                "or a .jinja file in the dataset entry's \"chat_template\"")
        return template
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.suffix != ".jinja" and not path.is_file():
        raise ChatTemplateError(f"unknown chat_template {spec!r}: use 'tokenizer', one of "
                                f"{sorted(BUILTIN_TEMPLATES)}, or a path to a .jinja file")
    if not path.is_file():
        raise ChatTemplateError(f"chat template file {path} not found (relative paths are resolved against the "
                                "dataset config's folder)")
    return path.read_text(encoding="utf-8")


def _compiled(template: str) -> Any:
    """transformers' compiled Jinja template (its sandbox, filters and ``{% generation %}`` tag)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers layout: render through apply_chat_template
        return None
    try:
        return _compile_jinja_template(template)
    except Exception as err:
        raise ChatTemplateError(f"the chat template does not compile: {type(err).__name__}: {err}") from err


class ChatTokenizer:
    """Render and tokenize chat records into :class:`~fm9g.data.tokenize.TokenizedSample` windows.

    Args:
        tokenizer: a Hugging Face fast tokenizer (offsets are needed).
        max_length: longest sample; longer ones follow `oversize_rule` (``None``: no limit).
        chat_template: ``"tokenizer"``, a built-in name or a ``.jinja`` path (module docstring).
        train_on: ``"assistant"``, ``"last_assistant"`` or ``"all"``.
        bos: ``"auto"`` (the template decides, as ``apply_chat_template`` does at serving time),
            ``"always"`` (BOS first, added when the rendered text does not start with it), ``"never"``.
        oversize_rule / min_tail_tokens: as :class:`~fm9g.data.tokenize.SampleTokenizer`.
        base_dir: folder a relative template path is resolved against.
        fmt: the records' format (``"auto"`` detects it per record).

    ``.stats`` counts like :class:`SampleTokenizer` plus ``dropped_no_target`` (nothing to train).

    Raises:
        ChatTemplateError: bad template, ``train_on`` or ``bos``; a tokenizer without offsets.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None, *, chat_template: str = "tokenizer",
                 train_on: str = "assistant", bos: str = "auto", oversize_rule: str = "segment",
                 min_tail_tokens: int = 9, base_dir: str | Path | None = None, fmt: str = "auto") -> None:
        if train_on not in TRAIN_ON:
            raise ChatTemplateError(f"train_on must be one of {list(TRAIN_ON)}, got {train_on!r}")
        if bos not in BOS_POLICIES:
            raise ChatTemplateError(f"bos must be one of {list(BOS_POLICIES)}, got {bos!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError("chat templates need a Hugging Face fast tokenizer (tokenizer.json), for the "
                                    f"character offsets of its tokens; got {type(tokenizer).__name__}")
        self.tokenizer, self.train_on, self.fmt = tokenizer, train_on, fmt
        self.template = resolve_chat_template(chat_template, tokenizer, base_dir)
        self._jinja = _compiled(self.template)
        self._special = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        self._windows = SampleTokenizer(tokenizer, max_length or 1 << 62, oversize_rule=oversize_rule,
                                        min_tail_tokens=min_tail_tokens, bos="never")
        self.stats = self._windows.stats
        self.eos_id = self._windows.eos_id
        self.bos_id = self._windows.bos_id
        self.add_bos = bos == "always" and resolve_bos(tokenizer, "always", self.bos_id)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or []) | {self.eos_id}

    def render_messages(self, messages: list[dict], tools: list | None = None, *,
                        add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` (what ``apply_chat_template(..., tokenize=False)`` gives)."""
        try:
            if self._jinja is not None:
                return self._jinja.render(messages=messages, tools=tools, documents=None,
                                          add_generation_prompt=add_generation_prompt, **self._special)
            return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.template,
                                                      add_generation_prompt=add_generation_prompt, tokenize=False)
        except ChatTemplateError:
            raise
        except Exception as err:  # jinja's raise_exception, an undefined variable, a type error ...
            raise ChatTemplateError(f"the chat template failed to render: {type(err).__name__}: {err}") from err

    def render(self, record: dict) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the rendered record and the ``[start, end)`` character spans trained.

        Raises:
            RecordError: the record is not a chat (or has no assistant turn to train).
            ChatTemplateError: the template fails, or renders a turn differently once later turns follow.
        """
        messages, tools = to_chat(record, self.fmt)
        text = self.render_messages(messages, tools)
        if self.train_on == "all":
            return text, [(0, len(text.rstrip()))]
        turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
        if not turns:
            raise RecordError(f"the dialogue has no assistant turn to train (train_on {self.train_on!r})")
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        return text, [self._turn_span(messages, tools, k, text) for k in turns]

    def _turn_span(self, messages: list[dict], tools: list | None, k: int, text: str) -> tuple[int, int]:
        """Character span of assistant turn ``k`` in `text` (module docstring)."""
        prompt = self.render_messages(messages[:k], tools, add_generation_prompt=True) if k else ""
        if not text.startswith(prompt):
            raise ChatTemplateError(
                f"the template renders the dialogue before assistant turn {k} differently when later turns "
                "follow (its generation prompt is not a prefix of the whole dialogue): use train_on "
                "'last_assistant' or another template")
        turn = (text if k + 1 == len(messages) else self.render_messages(messages[: k + 1], tools)).rstrip()
        if text.startswith(turn):
            return len(prompt), len(turn)
        # the template rewrites a turn once others follow (e.g. drops its reasoning): find it in the text
        content = messages[k].get("content") or ""
        at = turn.rfind(content) if content else -1
        tail = turn[at + len(content):] if at >= 0 else ""
        pos = text.find(content + tail, len(prompt)) if at >= 0 else -1
        if pos < 0:
            raise ChatTemplateError(f"cannot find assistant turn {k} in the rendered dialogue: use train_on "
                                    "'last_assistant' or another template")
        return len(prompt), pos + len(content) + len(tail)

    def _sample(self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[TokenizedSample]:
        """Windows of one rendered record from its token ids, their offsets and the trained spans."""
        bounds = [x for span in sorted(spans) for x in span]  # a token is trained when it starts inside a span:
        trained = [bisect_right(bounds, s) & 1 == 1 for s, _ in offsets]  # an odd number of bounds <= its start
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids, trained = [self.bos_id] + ids, [False] + trained
        last = max((i for i, t in enumerate(trained) if t), default=-1)
        self.stats["samples"] += 1
        if last < 1:
            self.stats["dropped_no_target"] += 1
            return Dropped(DROP_NO_TARGET)
        stream, trained = ids[: last + 1], trained[: last + 1]
        if stream[-1] not in self.special_ids:  # no end-of-turn token: EOS teaches the model to stop
            stream, trained = stream + [self.eos_id], trained + [True]
        labels = [t if m else IGNORE_INDEX for t, m in zip(stream[1:], trained[1:])]
        return self._windows.windows(stream[:-1], labels)

    def batch(self, records: list[dict]) -> list[list[TokenizedSample]]:
        """Windows of each record, with one batched tokenizer call.

        Raises:
            RecordError / ChatTemplateError: as :meth:`render`; ``.index`` on the error is the
            position of the record in `records`.
        """
        rendered = []
        for i, record in enumerate(records):
            try:
                rendered.append(self.render(record))
            except (RecordError, ChatTemplateError) as err:
                err.index = i  # type: ignore[attr-defined]
                raise
        enc = self.tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        return [self._sample(list(ids), list(offs), spans)
                for ids, offs, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]

    def __call__(self, record: dict) -> list[TokenizedSample]:
        """Windows of one record (see :meth:`batch`)."""
        return self.batch([record])[0]


def tokenize_record(record: dict, tokenizer: Any, *, chat_template: str | None = None, train_on: str = "assistant",
                    bos: str = "auto", base_dir: str | Path | None = None) -> tuple[list[int], list[int]]:
    """What trains for one record: its input ids and aligned labels (the loader uses the same code).

    Args:
        record: a record of any format (``{"input", "output"}``, ``{"messages"}``, ShareGPT, Alpaca).
        tokenizer: a Hugging Face tokenizer.
        chat_template: ``None`` (an ``{input, output}`` record is tokenized as is; a chat record uses
            ``"tokenizer"``), ``"tokenizer"``, a built-in name or a ``.jinja`` path.
        train_on: ``"assistant"``, ``"last_assistant"`` or ``"all"`` (chat records).
        bos: ``"auto"``, ``"always"`` or ``"never"`` (docs/data.md).
        base_dir: folder a relative template path is resolved against.

    Returns:
        ``(input_ids, labels)``: equal-length lists; ``labels[j]`` is the token position ``j``
        predicts, or -100 where no loss is taken. No length limit is applied.

    Raises:
        RecordError: a record that is not usable (no assistant turn, unknown role, no ``output``).
        ChatTemplateError: the template is missing or fails to render.
    """
    if chat_template is None and not is_chat_record(record):
        if not isinstance(record, dict) or not isinstance(record.get("output"), str):
            raise RecordError("an {input, output} record needs a string 'output'")
        windows = SampleTokenizer(tokenizer, 1 << 62, bos=bos)(record)
    else:
        windows = ChatTokenizer(tokenizer, chat_template=chat_template or "tokenizer", train_on=train_on, bos=bos,
                                base_dir=base_dir)(record)
    if not windows:
        return [], []
    return list(windows[0].input_ids), list(windows[0].labels)
