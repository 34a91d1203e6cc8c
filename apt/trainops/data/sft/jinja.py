"""``template: tokenizer``: the jinja ``chat_template`` of a Hugging Face tokenizer folder.

The template is read from the ``tokenizer_config.json`` beside the tokenizer's
``tokenizer.json`` and rendered in jinja2's immutable sandbox (a template is code from a
download: it may not touch Python objects). Which characters are an assistant's answer is
found by rendering the conversation as it grows: the text an assistant turn adds after the
generation prompt of the messages before it is trained; the rest is not. A template whose
renderings do not grow that way (one that rewrites earlier turns) is refused for that example.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt.core.errors import ConfigError, DataError
from apt.trainops.data.sft.examples import Message
from apt.trainops.data.sft.templates import Piece
from apt.trainops.data.tokenizers import Tokenizer

__all__ = ["TOKENIZER_CONFIG", "TokenizerTemplate"]

#: The Hugging Face file that holds a tokenizer's chat template.
TOKENIZER_CONFIG = "tokenizer_config.json"
_USE_BUILTIN = "set data.source.template: builtin (no jinja2 needed)"


def _config_file(tokenizer: Tokenizer) -> Path:
    path = getattr(tokenizer, "path", None)
    if not isinstance(path, Path):
        raise ConfigError(
            f"data.source.template: tokenizer needs a tokenizer with a chat template, and the "
            f"{tokenizer.name} tokenizer has none. To fix: {_USE_BUILTIN}, or use data.tokenizer: "
            "{kind: hf, path: FOLDER} with a folder whose tokenizer_config.json has a "
            "chat_template."
        )
    return path.parent / TOKENIZER_CONFIG


def _read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"data.source.template: tokenizer: {file} not found, so the tokenizer has no chat "
            f"template. To fix: {_USE_BUILTIN}, or put the tokenizer_config.json of the "
            "tokenizer beside its tokenizer.json."
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.source.template: tokenizer: cannot read {file} ({exc}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"data.source.template: tokenizer: {file} is not a JSON object.")
    return config


def _template_source(config: dict[str, Any], file: Path) -> str:
    """The ``chat_template`` text: a string, or the ``default`` of a list of named ones."""
    found = config.get("chat_template")
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default", next(iter(named.values()), None))
    if not isinstance(found, str) or not found.strip():
        raise ConfigError(
            f"data.source.template: tokenizer: {file} has no chat_template. To fix: "
            f"{_USE_BUILTIN}, or use a tokenizer folder that has one."
        )
    return found


def _special_tokens(config: dict[str, Any], tokenizer: Tokenizer) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... as the template sees them (text, or "" when unset)."""
    tokens = {"bos_token": "", "eos_token": str(getattr(tokenizer, "eos_token", ""))}
    for key, value in config.items():
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _raise_exception(message: str) -> None:
    """The ``raise_exception`` templates call to refuse a conversation."""
    raise DataError(f"the chat template refuses this conversation: {message}")


def _compile(source: str, file: Path) -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError(
            "data.source.template: tokenizer renders the tokenizer's jinja chat template, and "
            f"jinja2 is not installed. To fix: pip install jinja2, or {_USE_BUILTIN}."
        ) from None
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"data.source.template: tokenizer: the chat_template of {file} is not valid jinja "
            f"({exc.message}, template line {exc.lineno}). To fix: {_USE_BUILTIN}."
        ) from None


class TokenizerTemplate:
    """The chat template of the tokenizer's own folder (``tokenizer_config.json``).

    Args:
        tokenizer: a tokenizer read from a folder (``data.tokenizer: {kind: hf, path: ...}``).

    Raises:
        ConfigError: the tokenizer has no folder, the folder no ``tokenizer_config.json`` or no
            ``chat_template``, the template is not valid jinja, or jinja2 is not installed.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.file = _config_file(tokenizer)
        config = _read_config(self.file)
        self._template = _compile(_template_source(config, self.file), self.file)
        self._tokens = _special_tokens(config, tokenizer)
        self.description = f"the chat_template of {self.file}"

    def _render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        import jinja2

        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self._template.render(
                messages=turns, add_generation_prompt=add_generation_prompt, **self._tokens
            )
        except jinja2.TemplateError as exc:
            raise DataError(
                f"the chat template of {self.file} fails on this conversation "
                f"({type(exc).__name__}: {exc}). To fix: {_USE_BUILTIN}."
            ) from None
        return str(text)

    def pieces(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[Piece]:
        """The rendered text, cut into untrained stretches and the assistant answers.

        Raises:
            DataError: the template fails, or its rendering of the conversation does not grow
                turn by turn (an answer's text cannot be told apart).
        """
        if add_generation_prompt:
            return [Piece(self._render(messages, add_generation_prompt=True), False)]
        full = self._render(messages, add_generation_prompt=False)
        out: list[Piece] = []
        done = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if len(before) < done or not through.startswith(before) or not full.startswith(through):
                raise DataError(
                    f"the chat template of {self.file} does not render this conversation turn by "
                    f"turn (assistant turn {i} changes the text before it), so its answer "
                    f"cannot be told apart. To fix: {_USE_BUILTIN}."
                )
            out += [
                Piece(full[done : len(before)], False),
                Piece(full[len(before) : len(through)], True),
            ]
            done = len(through)
        return [*out, Piece(full[done:], False)]
