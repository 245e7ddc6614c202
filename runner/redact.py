"""Secrets out of what the tool writes: one function for every summary, manifest, ledger row and log
line. A key in an endpoint URL (user-info or query) is sent but never written down."""

from __future__ import annotations

import re

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")
_QUERY_VALUE = re.compile(r"(?P<name>[?&;][^=&;#\s]*=)[^&;#\s]*")
# Keys as the platforms issue them: Zhipu's <32 hex>.<16 letters and digits>, and sk-... keys.
_KEY_LIKE = re.compile(r"\b[0-9a-fA-F]{32}\.[A-Za-z0-9]{16}\b|\bsk-[A-Za-z0-9_-]{16,}")


def redact(text: str) -> str:
    """`text` with URL user-info, every URL query value and anything shaped like an API key masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "://" in text:
        text = _QUERY_VALUE.sub(lambda m: f"{m['name']}{MASK}", text)
    return _KEY_LIKE.sub(MASK, text)
