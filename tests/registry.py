"""Reading the Prometheus registry that /metrics serves, in tests."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Delta:
    """`with Delta("name", label=...) as d: ...; d.value` is how much the sample moved."""

    def __init__(self, name: str, **labels: str) -> None:
        self.name, self.labels = name, labels
        self.value = 0.0

    def __enter__(self) -> Delta:
        self.before = sample(self.name, **self.labels)
        return self

    def __exit__(self, *exc: object) -> None:
        self.value = sample(self.name, **self.labels) - self.before
