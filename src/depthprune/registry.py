"""Named plug-ins: the selection criteria, evaluation tasks and healing methods each live in one registry.

An entry is a small frozen dataclass declared in its own module (``select/deepest.py``,
``evaluate/boolq.py``, ``heal/methods/lora.py``, ...) and added with ``REGISTRY.register(entry)`` when that
module is imported; the package's ``__init__`` imports its built-in modules. The CLI's choices, the
sweep's validation, the results table and the report's titles all read the registries, so a new entry
is one new module (and its test), as with peft's ``register_peft_method`` or mergekit's merge methods.

Entry modules keep their top level light (no torch import) so ``depthprune --help`` stays fast: the
heavy work happens inside the functions an entry points to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from .errors import DepthpruneError


class Named(Protocol):
    name: str
    description: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries of one kind by name, in the order they were registered."""

    def __init__(self, kind: str):
        self.kind = kind  # 'criterion', 'task', 'healing method': used in error messages
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' is registered twice")
        self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise DepthpruneError(f"unknown {self.kind} '{name}': choose one of {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, names) -> list[str]:
        """``names`` as a list, each checked (one-line error naming the first unknown one)."""
        names = list(names)
        for name in names:
            self.get(name)
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def help(self) -> str:
        """'name: description' of every entry, for ``--help`` texts."""
        return "; ".join(f"{e.name}: {e.description}" for e in self)
