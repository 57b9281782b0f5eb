"""Masking anything key-like in text that is stored, logged or shown (provider errors quote keys).

OpenAI's 401 answer quotes the start and the end of the key it was sent; a proxy may echo a bearer token
or a URL with a password. Every provider error passes through :func:`mask_secrets` before it reaches a
log, the failures table, asset metadata or an exception.
"""

from __future__ import annotations

import re

_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}"),  # OpenAI keys (sk-..., sk-proj-...), also as quoted with stars
    re.compile(r"\bAIza[0-9A-Za-z_\-]{10,}"),  # Google API keys
    re.compile(r"(?i)\b(bearer\s+|(?:api[-_]?key|x-goog-api-key|key)\s*[=:]\s*)[A-Za-z0-9_\-*.~+/=]{8,}"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password in a URL
]
MASK = "***"


def mask_secrets(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def _mask(match: re.Match[str]) -> str:
    groups = match.groups()
    if groups and groups[0]:  # keep the label ("Bearer ", "api_key="), drop the value
        return groups[0] + MASK
    return MASK
