"""Chat templates: a conversation -> token ids, and which of them the loss covers.

A template turns the messages of an :class:`~apt.trainops.data.sft.examples.Example` into
*pieces*: texts to encode (or single token ids), each marked trained or not. The pieces of an
assistant turn's content and its end marker are trained; everything else (system and user turns,
role headers) gets label -100. Encoding piece by piece keeps the training ids exactly the ids a
generation prompt gives (:meth:`ChatTemplate.pieces` with ``add_generation_prompt``).

* ``builtin`` (:class:`BuiltinTemplate`): ``<|user|>\\n{content}<|end|>\\n<|assistant|>\\n
  {content}<|end|>`` then end-of-text. A tokenizer that has the markers as single tokens (the
  BPE tokenizers of ``python -m apt data tokenizer``:
  :data:`~apt.model.tokenizers.SPECIAL_TOKENS`) gets those ids; another (the byte tokenizer)
  gets the same markers as plain text. No jinja2 needed.
* ``plain`` (:class:`PlainTemplate`): end-of-text, the contents back to back, end-of-text:
  a prompt/completion pair read as one document, as in pre-training.
* ``tokenizer``: the ``chat_template`` of a Hugging Face tokenizer folder
  (:mod:`apt.trainops.data.sft.jinja`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from apt.trainops.data.sft.examples import Message
from apt.trainops.data.tokenizers import Tokenizer

__all__ = [
    "TEMPLATES",
    "BuiltinTemplate",
    "ChatTemplate",
    "Piece",
    "PlainTemplate",
    "build_template",
    "encode_pieces",
    "encode_prompt",
]

#: The builtin template's role headers and end-of-turn marker (the BPE special tokens).
_HEADERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
_END = "<|end|>"


class Piece(NamedTuple):
    """A text to encode, or one token id, and whether the loss covers its tokens."""

    value: str | int
    trained: bool


class ChatTemplate(Protocol):
    """What the fine-tuning data needs from a chat template.

    Attributes:
        name: the ``data.source.template`` value.
        description: a few words for the run log (which markers it uses).
    """

    name: str
    description: str

    def pieces(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[Piece]:
        """The pieces of ``messages``; ``add_generation_prompt``: end with what precedes an
        assistant answer (for generation), and mark nothing trained.

        Raises:
            DataError: the template cannot render these messages (the message says why).
        """
        ...


def _single_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes it as one token, else None."""
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 else None


class BuiltinTemplate:
    """Role headers and an end-of-turn marker around each message, end-of-text at the end.

    A turn is ``HEADER "\\n" content END "\\n"``; an assistant turn's content and ``END`` are
    trained (the model learns to close its answer), and so is the final end-of-text when the
    conversation ends with an assistant turn. The markers are the tokenizer's special tokens
    when it encodes each as one id, else their text (the byte tokenizer).

    Args:
        tokenizer: the tokenizer the examples are encoded with.
    """

    name = "builtin"

    def __init__(self, tokenizer: Tokenizer) -> None:
        marks = {role: _single_id(tokenizer, text) for role, text in _HEADERS.items()}
        end = _single_id(tokenizer, _END)
        special = end is not None and all(mark is not None for mark in marks.values())
        # All or nothing: a mix of ids and texts would be a format no one else writes.
        self._headers: dict[str, str | int] = {
            role: (mark if special and mark is not None else _HEADERS[role])
            for role, mark in marks.items()
        }
        self._end: str | int = end if special and end is not None else _END
        self._eos = tokenizer.eos_id
        self.special_tokens = special
        self.description = "builtin, " + ("special tokens" if special else "markers as text")

    def pieces(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[Piece]:
        out: list[Piece] = []
        for message in messages:
            trained = message.role == "assistant" and not add_generation_prompt
            out += [
                Piece(self._headers[message.role], False),
                Piece("\n", False),
                Piece(message.content, trained),
                Piece(self._end, trained),
                Piece("\n", False),
            ]
        if add_generation_prompt:
            return [*out, Piece(self._headers["assistant"], False), Piece("\n", False)]
        ends_answered = bool(messages) and messages[-1].role == "assistant"
        return [*out, Piece(self._eos, ends_answered)]


class PlainTemplate:
    """End-of-text, then the contents back to back, then end-of-text: no role markers.

    The assistant contents and the final end-of-text (after an assistant turn) are trained.
    Meant for prompt/completion pairs that are one text (code to complete, a document to
    continue); the leading end-of-text gives the first token a predecessor, as every document
    has in packed pre-training text.

    Args:
        tokenizer: the tokenizer the examples are encoded with.
    """

    name = "plain"
    description = "plain, no markers"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._eos = tokenizer.eos_id

    def pieces(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[Piece]:
        out = [Piece(self._eos, False)]
        for message in messages:
            trained = message.role == "assistant" and not add_generation_prompt
            out.append(Piece(message.content, trained))
        if add_generation_prompt:
            return out
        ends_answered = bool(messages) and messages[-1].role == "assistant"
        return [*out, Piece(self._eos, ends_answered)]


def _tokenizer_template(tokenizer: Tokenizer) -> ChatTemplate:
    from apt.trainops.data.sft.jinja import TokenizerTemplate

    return TokenizerTemplate(tokenizer)


#: Template factories by ``data.source.template`` value.
TEMPLATES: dict[str, Callable[[Tokenizer], ChatTemplate]] = {
    "builtin": BuiltinTemplate,
    "plain": PlainTemplate,
    "tokenizer": _tokenizer_template,
}


def build_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """The template ``name`` (``data.source.template``) for ``tokenizer``.

    Raises:
        ConfigError: ``tokenizer`` and the tokenizer has no chat template, or jinja2 is
            missing (the message gives the pip line).
        KeyError: an unknown name (the config schema admits only the keys of TEMPLATES).
    """
    return TEMPLATES[name](tokenizer)


def encode_pieces(pieces: Sequence[Piece], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, trained)``: the token ids of ``pieces`` (int64) and a bool mask of the trained
    ones, both 1-D and of one length."""
    ids: list[int] = []
    trained: list[bool] = []
    for value, is_trained in pieces:
        chunk = [value] if isinstance(value, int) else tokenizer.encode(value) if value else []
        ids += chunk
        trained += [is_trained] * len(chunk)
    return np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)


def encode_prompt(
    messages: Sequence[Message], template: ChatTemplate, tokenizer: Tokenizer
) -> np.ndarray:
    """The int64 ids that ask a fine-tuned model for the next assistant turn after
    ``messages``: what it saw before each answer in training."""
    ids, _ = encode_pieces(template.pieces(messages, add_generation_prompt=True), tokenizer)
    return ids
