"""Prompts for generation in the format a run trained on (``eval_prompts``, ``fm9g chat``).

:class:`PromptFormat` turns a user's question into the token ids a trained model expects: the
run's own chat transform when its data has one (``chatml``, ``chatml-original``, ``userai``: the
format the model learned), else the tokenizer's chat template when it has one, else the text as
it is. The ids are those of a training sample up to where its answer starts (made by the same
:class:`fm9g.data.tokenize.SampleTokenizer`, so BOS follows the same rule), and generation stops at
the tokenizer's EOS or ChatML's ``<|im_end|>``.
"""
from __future__ import annotations

from typing import Any, Sequence

from fm9g.data.tokenize import IGNORE_INDEX, SampleTokenizer
from fm9g.data.transforms import BUILTIN_TRANSFORMS

__all__ = ["PromptFormat", "CHAT_TRANSFORMS"]

#: built-in transforms that are chat formats (a prompt is rendered through them)
CHAT_TRANSFORMS = ("chatml", "chatml-original", "userai")


class PromptFormat:
    """Render questions the way a run's training samples were rendered.

    Args:
        tokenizer: the run's tokenizer (Hugging Face or fm9g's own).
        transform: the name of the run's data transform (see :meth:`from_entries`); a chat one
            renders the prompt, anything else falls back to the tokenizer's chat template.
        max_length: the longest prompt kept (tokens).
    """

    def __init__(self, tokenizer: Any, transform: str | None = None, max_length: int = 1 << 20) -> None:
        self.tokenizer = tokenizer
        self.transform = transform if transform in CHAT_TRANSFORMS else None
        self.encoder = SampleTokenizer(tokenizer, max_length)

    @classmethod
    def from_entries(cls, tokenizer: Any, entries: Sequence[Any] | None, max_length: int = 1 << 20) -> "PromptFormat":
        """The format of the first dataset entry whose ``transforms`` is a built-in chat one."""
        for e in entries or []:
            t = getattr(e, "transforms", None) if not isinstance(e, dict) else e.get("transforms")
            if isinstance(t, str) and t in CHAT_TRANSFORMS:
                return cls(tokenizer, t, max_length)
        return cls(tokenizer, None, max_length)

    @property
    def kind(self) -> str:
        """``"transform:<name>"``, ``"chat_template"`` or ``"plain"``: how prompts are rendered."""
        if self.transform:
            return f"transform:{self.transform}"
        return "chat_template" if getattr(self.tokenizer, "chat_template", None) else "plain"

    def text(self, question: str) -> str:
        """The prompt text of ``question`` (before tokenization)."""
        if self.transform:
            return BUILTIN_TRANSFORMS[self.transform]({"input": question, "output": ""})["input"]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        return question

    def ids(self, question: str) -> list[int]:
        """Token ids of the prompt: a training sample's ids up to the first trained position."""
        enc = self.encoder
        windows = enc.from_ids(enc.encode(self.text(question)), enc.encode("x"))
        if not windows:
            raise ValueError(f"the prompt {question[:60]!r} is longer than max_length={enc.max_length} tokens")
        sample = windows[0]
        first = next(j for j, t in enumerate(sample.labels) if t != IGNORE_INDEX)
        return list(sample.input_ids[: first + 1])

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an answer: EOS, and ``<|im_end|>`` when the vocabulary has it."""
        stops = [] if self.encoder.eos_id is None else [int(self.encoder.eos_id)]
        im_end = self.encoder.encode("<|im_end|>")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if len(im_end) == 1 and im_end[0] != unk and im_end[0] not in stops:  # one token: a special of the vocabulary
            stops.append(int(im_end[0]))
        return stops

    def decode(self, ids: Sequence[int]) -> str:
        """The answer's text (special tokens and the stop token dropped)."""
        stops = set(self.stop_ids)
        kept = []
        for t in ids:
            if int(t) in stops:
                break
            kept.append(int(t))
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()
