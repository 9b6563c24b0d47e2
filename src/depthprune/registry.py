"""Named plug-ins: the selection criteria, evaluation tasks and healing methods each live in one registry.

An entry is a small frozen dataclass declared in its own module (``select/criteria/deepest.py``,
``evaluate/tasks/boolq.py``, ``heal/methods/lora.py``, ...) and added with ``REGISTRY.register(entry)`` when
that module is imported; each stage's package imports every module of its plug-in folder
(:func:`import_plugins`), so a new entry is one new file (and its test) and no other file changes, as with
peft's ``register_peft_method`` or mergekit's merge methods. The CLI's choices, the sweep's validation, the
results table and the report's titles all read the registries.

An entry may carry ``options``: a dataclass of :func:`depthprune.options.option` fields that its module
declares (its flags and YAML keys). Those names are one namespace across a registry: registering a second,
separate declaration of a name is refused. An entry's ``order`` places it among the others (lower first;
built-ins use 10, 20, ...; ties keep the registration order), so the CLI, the sweep's default table and the
report list the same entries in the same order whatever the order of discovery.

Entry modules keep their top level light (no torch import) so ``depthprune --help`` stays fast: the
heavy work happens inside the functions an entry points to.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from .errors import DepthpruneError

AFTER_BUILT_INS = 1000  # the order of an entry that gives none: after the built-in ones


class Named(Protocol):
    name: str
    description: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries of one kind by name, listed by their ``order``, then in the order they were registered."""

    def __init__(self, kind: str):
        self.kind = kind  # 'criterion', 'task', 'healing method': used in error messages
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' is registered twice")
        self._check_options(entry)
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove the entry ``name`` (a plug-in registered for a while, e.g. by a test) and return it."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def _check_options(self, entry: T) -> None:
        new = getattr(entry, "options", None)
        if new is None:
            return
        for other in self._entries.values():
            if getattr(other, "options", None) is None:
                continue
            theirs = {f.name: f for f in dataclasses.fields(other.options)}
            for f in dataclasses.fields(new):
                if f.name in theirs and theirs[f.name] is not f:
                    raise ValueError(f"{self.kind} '{entry.name}': option '{f.name}' is already an option of "
                                     f"{self.kind} '{other.name}' (one namespace of flags and keys): rename it")

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise DepthpruneError(f"unknown {self.kind} '{name}': choose one of {', '.join(self.names())}") from None

    def _ordered(self) -> list[T]:
        ranked = sorted(enumerate(self._entries.values()),
                        key=lambda item: (getattr(item[1], "order", AFTER_BUILT_INS), item[0]))
        return [entry for _, entry in ranked]

    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self._ordered())

    def option_classes(self) -> tuple[type, ...]:
        """The ``options`` dataclasses of the entries, in order, each once."""
        return tuple(dict.fromkeys(e.options for e in self._ordered() if getattr(e, "options", None) is not None))

    def check(self, names) -> list[str]:
        """``names`` as a list, each checked (one-line error naming the first unknown one)."""
        names = list(names)
        for name in names:
            self.get(name)
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._ordered())

    def __len__(self) -> int:
        return len(self._entries)

    def help(self) -> str:
        """'name: description' of every entry, for ``--help`` texts."""
        return "; ".join(f"{e.name}: {e.description}" for e in self)


def import_plugins(package: str) -> None:
    """Import every module of the plug-in folder ``package`` (e.g. ``depthprune.select.criteria``), in the
    order of their names; each registers its entries."""
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
