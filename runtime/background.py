"""Run an iterator in a background thread, a few items ahead of its consumer.

The thread never outlives its consumer: when the consumer stops (the items ran out, it stopped
early, it raised, or it was interrupted), the producer is told to stop and joined before control
returns. A producer still inside torch or zarr native code at interpreter exit can abort the
process ("terminate called without an active exception", exit status 134) after its work is
done, which a script chaining commands with && would take for a failure.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()
THREAD_NAME = "activation-prefetch"


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """Run `items` in a background thread, `depth` items ahead; errors surface in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer, re-raised there
            put(err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the producer's own generators finish in this thread

    thread = threading.Thread(target=produce, daemon=True, name=THREAD_NAME)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()  # it stops at its next put, after the item it is producing
