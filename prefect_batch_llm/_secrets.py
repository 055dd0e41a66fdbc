"""Keep credentials out of every text the package stores or shows.

Provider SDK errors can carry the request, headers included (google-genai's `APIError`
holds the `x-goog-api-key` header). Nothing the package writes (results, reports, logs,
task run states, events) is built from such an object: only from `scrub()`-ed text.
`scrub()` removes the secret values credentials blocks registered in this process and any
value after a key-like name (`x-goog-api-key: ...`, `?key=...`, `Authorization: Bearer ...`).
"""

from __future__ import annotations

import re

_MASK = "***"
_known: set[str] = set()
_KEY_VALUE = re.compile(
    r"""(?ix)
    (\b(?:x-goog-api-key|x-api-key|api[_-]?key|authorization|key|token|access_token|secret)
     ['"]?\s*[:=]\s*['"]?(?:bearer\s+)?)
    ([A-Za-z0-9_\-./+=]{6,})
    """
)


def register_secret(value: str | None) -> None:
    """Remember a secret value (an API key) so `scrub()` removes it from any text."""
    if value and len(value) >= 6:
        _known.add(value)


def scrub(text: str) -> str:
    """`text` without any registered secret or key-like value."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, _MASK)
    return _KEY_VALUE.sub(lambda m: m.group(1) + _MASK, text)
