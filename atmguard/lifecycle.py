"""The lifecycle shared by hardware roles, models and stores: construct (touches nothing), open, close."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Managed(ABC):
    """A resource: ``open()`` acquires it, ``close()`` releases it and is idempotent.

    As a context manager it opens on entry and closes on exit, whatever happened inside.
    """

    @abstractmethod
    def open(self) -> None:
        """Acquire the resource; raise a typed AtmguardError when it cannot."""

    @abstractmethod
    def close(self) -> None:
        """Release the resource; safe to call more than once and after a failed open()."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
