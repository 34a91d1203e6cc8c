"""Fine-tuning examples: a ``.jsonl`` file -> checked conversations.

One JSON object a line, in one of two layouts (``data.source.format``):

* ``{"prompt": "...", "completion": "..."}``: read as a user turn and an assistant turn;
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``: a
  conversation with at least one assistant turn.

Other keys of a record (an ``id``, a source) are ignored; blank lines are skipped. A record that
breaks these rules stops the read with a :class:`~apt.core.errors.DataError` naming the file, the
line and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apt.core.errors import DataError

__all__ = ["ROLES", "Example", "Message", "parse_example", "read_examples"]

#: The roles a message may have; only ``assistant`` turns are trained on.
ROLES = ("system", "user", "assistant")

Format = Literal["auto", "prompt_completion", "messages"]

_PROMPT_COMPLETION = '{"prompt": "...", "completion": "..."}'
_MESSAGES = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}'


@dataclass(frozen=True)
class Message:
    """One turn of a conversation.

    Attributes:
        role: ``system``, ``user`` or ``assistant``.
        content: the turn's text.
    """

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One fine-tuning example.

    Attributes:
        messages: the conversation; a prompt/completion record is a user turn then an
            assistant turn.
        where: ``file:line`` the example was read from, for messages.
        layout: the record's layout, ``prompt_completion`` or ``messages``.
    """

    messages: tuple[Message, ...]
    where: str
    layout: Literal["prompt_completion", "messages"]

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as ``{"role", "content"}`` dicts (what a chat template takes)."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _text(record: dict[str, Any], key: str, where: str, layout: str) -> str:
    if key not in record:
        raise DataError(
            f"{where}: no {key!r} key (the record has {sorted(record) or 'no keys'}). A "
            f"{layout} record looks like "
            f"{_PROMPT_COMPLETION if layout == 'prompt_completion' else _MESSAGES}."
        )
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {key!r} is a {type(value).__name__}, not a string. Write the text as a "
            "JSON string."
        )
    return value


def _prompt_completion(record: dict[str, Any], where: str) -> tuple[Message, ...]:
    prompt = _text(record, "prompt", where, "prompt_completion")
    completion = _text(record, "completion", where, "prompt_completion")
    if not completion.strip():
        raise DataError(
            f"{where}: the completion is empty, so the example has nothing to learn. Fill it "
            "in or remove the line."
        )
    return Message("user", prompt), Message("assistant", completion)


def _message(item: Any, number: int, where: str) -> Message:
    at = f"{where}: messages[{number}]"
    if not isinstance(item, dict):
        raise DataError(
            f"{at} is a {type(item).__name__}; each message is an object "
            '{"role": "user", "content": "..."}.'
        )
    role = item.get("role")
    if role not in ROLES:
        raise DataError(
            f"{at}: unknown role {role!r}; valid roles: {', '.join(ROLES)}. Rename the role "
            "or remove the message."
        )
    content = item.get("content")
    if not isinstance(content, str):
        found = "no content" if content is None else f"content of type {type(content).__name__}"
        raise DataError(f"{at} has {found}; give its text as a JSON string under 'content'.")
    if role == "assistant" and not content.strip():
        raise DataError(
            f"{at}: an empty assistant turn has nothing to learn. Fill it in or remove it."
        )
    return Message(role, content)


def _messages(record: dict[str, Any], where: str) -> tuple[Message, ...]:
    items = record.get("messages")
    if not isinstance(items, list):
        found = "no 'messages' key" if items is None else f"'messages' a {type(items).__name__}"
        raise DataError(f"{where}: {found}; a messages record holds a list of turns: {_MESSAGES}.")
    messages = tuple(_message(item, n, where) for n, item in enumerate(items))
    if not any(m.role == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn. "
            "Add the assistant's answer or remove the line."
        )
    return messages


def _layout(record: dict[str, Any], fmt: Format, where: str) -> str:
    if fmt != "auto":
        return fmt
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    raise DataError(
        f"{where}: neither 'messages' nor 'prompt'/'completion' (the record has "
        f"{sorted(record) or 'no keys'}). Write {_PROMPT_COMPLETION} or {_MESSAGES}."
    )


def _record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: not JSON ({exc.msg} at column {exc.colno}). Each line must be one JSON "
            f"object, such as {_PROMPT_COMPLETION}."
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: a JSON {type(record).__name__}, not an object. Each line must be one "
            f"JSON object, such as {_PROMPT_COMPLETION}."
        )
    return record


def parse_example(record: Any, *, fmt: Format = "auto", where: str) -> Example:
    """One record (a JSON object, or a dict in Python) as an :class:`Example`.

    Args:
        record: ``{"prompt", "completion"}`` or ``{"messages": [...]}``.
        fmt: the layout it must have, or ``auto`` (by its keys).
        where: where it came from (``file:line``, ``train_dataset[3]``), for messages.

    Raises:
        DataError: not a mapping, a missing key, an empty completion, an unknown role or no
            assistant turn; the message starts with ``where``.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: a {type(record).__name__}, not an object. Each example must be one "
            f"mapping, such as {_PROMPT_COMPLETION}."
        )
    if _layout(record, fmt, where) == "messages":
        return Example(_messages(record, where), where, "messages")
    return Example(_prompt_completion(record, where), where, "prompt_completion")


def read_examples(path: str | Path, *, fmt: Format = "auto", key: str) -> list[Example]:
    """The examples of one ``.jsonl`` file, in file order.

    Args:
        path: the file (``~`` expanded).
        fmt: the layout every record has, or ``auto`` (each record by its keys).
        key: the config key that named the file, for messages.

    Raises:
        DataError: no such file, unreadable, no example in it, or a bad record (not JSON, a
            missing key, an empty completion, an unknown role, no assistant turn); the message
            names the file and line.
    """
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{key}: {file} not found. Point it at a .jsonl file of examples."
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{key}: {file} is not UTF-8 text ({exc.reason}); save it as UTF-8."
        ) from None
    except OSError as exc:
        raise DataError(f"{key}: cannot read {file}: {exc.strerror or exc}.") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        examples.append(parse_example(_record(line, where), fmt=fmt, where=where))
    if not examples:
        raise DataError(
            f"{key}: {file} holds no example (no non-blank line). Write one JSON object a line, "
            f"such as {_PROMPT_COMPLETION}."
        )
    return examples
