"""``redact``: hide credentials in text shown to people (error messages, logs, run folders).

Two forms are hidden, wherever they appear in the text:

* the password of a URI's user information, ``scheme://user:secret@host`` ->
  ``scheme://user:***@host``; user information without a password is taken for a token
  (``https://ghp_abc@github.com``) and hidden whole: ``https://***@github.com``;
* the value of a secret-looking ``name=value`` parameter (a query string, a DSN, an override):
  ``password``, ``passwd``, ``pwd``, ``pass``, ``token``, ``secret``, ``api_key``/``apikey``,
  ``access_key``, ``private_key``, ``signature``, ``sig``, ``credential(s)``, ``auth``, alone or
  as the last word of a longer name (``access_token``, ``client_secret``, ``X-Amz-Signature``):
  ``?token=abc&x=1`` -> ``?token=***&x=1``.

``redact`` is idempotent, and leaves text without such forms unchanged.

``redact_mapping`` applies it to every string of a nested mapping (a resolved config, the
hyperparameters sent to a tracker, an environment) and also hides the whole value of a key whose
name says it holds a secret (:func:`is_secret_name`: ``WANDB_API_KEY``, ``hf_token``,
``client_secret``, ``MLFLOW_TRACKING_PASSWORD``), so nothing written to a run folder or sent to
a tracker carries a credential.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "is_secret_name", "redact", "redact_mapping"]

#: What a hidden secret is replaced by.
MASK = "***"

# scheme://user:password@ : the password runs to the last "@" of the URI (it may hold an
# unencoded "@" or "/"); user information without a colon is a token, hidden whole.
_SCHEME = r"(?P<scheme>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://)"
_USER_PASSWORD = re.compile(_SCHEME + r"(?P<user>[^:/?#\s'\"<>@]*):[^\s'\"<>]*@")
_USER_TOKEN = re.compile(_SCHEME + r"[^:/?#\s'\"<>@]+@")
_SECRET_WORDS = (
    r"password|passwd|pwd|pass|token|secret|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    r"|signature|sig|credentials?|auth"
)
_PARAM = re.compile(
    rf"(?P<name>(?<![A-Za-z0-9])(?:[A-Za-z0-9-]*[_-])?(?:{_SECRET_WORDS})=)"
    r"(?P<value>[^&\s#'\";,)\]}>]+)",
    re.IGNORECASE,
)


# Name parts that mark a secret anywhere in a name, and those that do only as its last part
# (``pad_token_id`` and ``tokenizer`` are not secrets; ``hf_token`` and ``api_key`` are).
_SECRET_ANYWHERE = frozenset({"SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASSPHRASE"})
_SECRET_LAST = frozenset({"KEY", "APIKEY", "TOKEN", "CREDENTIAL", "CREDENTIALS", "PWD"})
_NAME_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def is_secret_name(name: str) -> bool:
    """Whether a key or environment variable called ``name`` holds a secret: it has a part
    SECRET or PASSWORD (any case, parts split at ``_``, ``-``, ``.`` and camelCase), or ends
    in KEY or TOKEN (``WANDB_API_KEY``, ``hfToken``, ``AWS_SECRET_ACCESS_KEY``)."""
    parts = [p.upper() for p in _NAME_PARTS.findall(name)]
    if not parts:
        return False
    return bool(_SECRET_ANYWHERE.intersection(parts)) or parts[-1] in _SECRET_LAST


def redact_mapping(data: Any) -> Any:
    """A copy of ``data`` (mappings, lists, scalars) with every string passed through
    :func:`redact` and the value of every secret-named key (:func:`is_secret_name`) replaced by
    :data:`MASK` (when it is set: None, booleans and empty strings stay as they are).

    >>> redact_mapping({"hf_token": "hf_abc", "uri": "https://u:pw@h", "tokenizer": "byte"})
    {'hf_token': '***', 'uri': 'https://u:***@h', 'tokenizer': 'byte'}
    """
    if isinstance(data, Mapping):
        return {
            key: (
                MASK
                if isinstance(key, str)
                and is_secret_name(key)
                and value not in (None, "")
                and not isinstance(value, bool)
                else redact_mapping(value)
            )
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return type(data)(redact_mapping(v) for v in data)
    if isinstance(data, str):
        return redact(data)
    return data


def redact(text: str) -> str:
    """``text`` with URI passwords and secret-looking ``name=value`` parameters hidden.

    >>> redact("https://alice:hunter2@example.com/data?token=abc&page=2")
    'https://alice:***@example.com/data?token=***&page=2'

    Args:
        text: any text that may contain a URI or a parameter string.

    Returns:
        The same text with every secret replaced by :data:`MASK`.
    """
    text = _USER_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _USER_TOKEN.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _PARAM.sub(lambda m: m["name"] + MASK, text)
