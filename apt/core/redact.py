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
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact"]

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
