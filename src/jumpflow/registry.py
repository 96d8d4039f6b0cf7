"""Name -> factory tables, so the CLI, presets and benchmarks enumerate what exists instead of listing it."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from .errors import JumpflowError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # "method", "dataset", "backbone": used in error messages
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries))
            raise JumpflowError(f"unknown {self.what} {name!r}; valid {self.what}s: {valid}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> List[str]:
        return sorted(self._entries)
