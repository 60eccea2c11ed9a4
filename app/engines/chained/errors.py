"""One error type for the three Together services, so the engine handles them alike."""

from __future__ import annotations

__all__ = ["ProviderError"]


class ProviderError(Exception):
    """A Together service failed; `retryable` says whether trying again may help."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
