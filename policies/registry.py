"""A tiny name → class registry, so that YAML picks a policy by name."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.kind} policy {name!r} registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return add

    @property
    def names(self) -> list[str]:
        return sorted(self._classes)

    def build(self, name: str, **kwargs: Any) -> T:
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} policy {name!r}; known: {', '.join(self.names)}")
        return self._classes[name](**kwargs)
