"""Produce an iterator's items on a thread of their own, a bounded number ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def read_ahead(items: Iterable[T], depth: int = 1, name: str = "tandem-read-ahead") -> Iterator[T]:
    """`items`, produced up to `depth` ahead while the consumer works on the last one (Label Studio serialises
    the next page while a job predicts; the GPU pipeline decodes the next batch while the network runs).

    An error is raised where its item would have been. A consumer that stops early stops the producer at its
    next item; the iterator is closed on the producer's own thread (a generator's `finally` and context
    managers, e.g. torch's thread-local inference mode, end where they began) and the thread is joined."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    source = iter(items)

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            value = slots.get()
            if value is _END:
                return
            if isinstance(value, _Failed):
                raise value.error
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        producer.join()


__all__ = ["read_ahead"]
