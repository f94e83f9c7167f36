"""Overlap metric computation with the forward pass: one background thread, in order, bounded.

The hooks hand each layer's tensors to :class:`Pipeline`, which queues the callback; a single
worker thread runs the callbacks in submission order (so results are identical to running them
inline) while the main thread goes on with the next layer. The queue is bounded, so at most
``depth`` layers' tensors are in flight and memory stays flat. An error raised by a callback
(e.g. NaN activations) is re-raised in the main thread at the next submission or at
:meth:`Pipeline.join`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

_STOP = object()


class Pipeline:
    """A single background worker for the capture callbacks.

    Args:
        threads: intra-op threads for the worker's torch operations (``None`` keeps the default).
        depth: queued callbacks before the forward pass waits for the worker.

    Example:
        >>> with Pipeline() as p:
        ...     out = []
        ...     p.wrap(lambda x: out.append(x.sum().item()))(torch.ones(3))
        ...     p.join()
        >>> out
        [3.0]
    """

    def __init__(self, threads: int | None = 1, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._threads = threads
        self._thread = threading.Thread(target=self._run, name="vitspec-metrics", daemon=True)
        self._thread.start()

    def wrap(self, fn: Callable[..., None]) -> Callable[..., None]:
        """A callback with ``fn``'s signature that queues ``fn`` on the worker."""

        def submit(*args) -> None:
            self._raise()
            # the tensors are handed over as they are, not copied: the queue holds a reference,
            # so their memory is not reused, and timm's blocks never modify their outputs or the
            # attention maps in place (a model that did would need copies here)
            self._queue.put((fn, args))

        return submit

    def join(self) -> None:
        """Wait until every queued callback has run; re-raise the first error."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put((_STOP, ()))
        self._thread.join()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # drop pending work: the caller is unwinding
            self._drain()
        self.close()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                return

    def _run(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                fn, args = self._queue.get()
                try:
                    if fn is _STOP:
                        return
                    if self._error is None:
                        fn(*args)
                except BaseException as err:  # handed to the main thread
                    self._error = err
                finally:
                    self._queue.task_done()
