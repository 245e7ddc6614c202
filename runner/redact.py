"""Secrets out of what the tool writes: one function for every summary, manifest, ledger row and log line.

    redact("https://me:sk-123@proxy.example/v1?key=abc")  # 'https://***@proxy.example/v1?key=***'

A key pasted into an endpoint URL (as its user-info, or as a query parameter) is needed to send, but
must never be written down: the Job carries the URL as sent (`base_url`) and a redacted one for every
record (`endpoint_name`); anything else that writes a URL or a command line passes it through here.
"""

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
