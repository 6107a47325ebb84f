"""The errors a backend raises, each safe to show to a person, and short_error for any other exception.

Apart from the contract (api.py) so that what api.py imports (input_images.py) can raise them too.
"""

from __future__ import annotations

import re


class BackendError(Exception):
    """Base of the errors a backend raises; the message is safe to show to a person."""


class InvalidRequest(BackendError):
    """The request cannot run as asked; the message names the field and what is allowed."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class BackendUnavailable(BackendError):
    """The backend cannot be reached or used right now (down, unreachable, no credentials)."""


class GenerationFailed(BackendError):
    """The backend ran the request and it broke."""


class GenerationCancelled(BackendError):
    """The person stopped the generation before it finished."""


def short_error(exc: BaseException) -> str:
    """An exception as one line, without this machine's paths, for a user's eyes."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"(?<![\w.-])(/[^\s'\"]+)+", "<path>", text)
    return f"{type(exc).__name__}: {text}"[:300]
