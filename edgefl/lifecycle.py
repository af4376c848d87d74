"""The context-manager protocol, written once for objects that open and close.

A class names its two lifecycle steps ``open`` and ``close`` (or binds them, e.g.
``open = start``; ``close = stop``) and inherits the ``with`` (:class:`Lifecycle`) or
``async with`` (:class:`AsyncLifecycle`) protocol:

* entering calls ``open()`` (nothing by default: an object that is open once constructed) and
  yields the object itself;
* leaving calls ``close()``, whether the block raised or not, and never swallows the exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

__all__ = ["AsyncLifecycle", "Lifecycle"]


class Lifecycle(ABC):
    """``with obj:`` calls ``obj.open()``, yields ``obj``, then calls ``obj.close()``."""

    def open(self) -> object:
        """Acquire what the object needs; nothing by default (open once constructed)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds (each subclass defines it)."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLifecycle(ABC):
    """``async with obj:`` awaits ``obj.open()``, yields ``obj``, then awaits ``obj.close()``."""

    async def open(self) -> object:
        """Acquire what the object needs; nothing by default (open once constructed)."""
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release what the object holds (each subclass defines it)."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
