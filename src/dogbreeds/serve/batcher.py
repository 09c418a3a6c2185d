"""An asyncio micro-batcher: concurrent requests share one forward pass.

Requests put their preprocessed input on a bounded queue and await a future. One consumer
task takes the first waiting input, then keeps collecting until the batch is full
(`max_batch`) or `max_wait_ms` has passed since that first input, and runs the forward pass
in a worker thread so the event loop keeps accepting and decoding requests meanwhile. While a
batch runs, new requests pile up in the queue and form the next, larger batch: that is where
the throughput gain comes from under load.

The queue is bounded (`max_queue`): when it is full, `submit` raises `Overloaded` at once, and
the service answers 503 with Retry-After instead of letting memory grow without limit.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


class Overloaded(Exception):
    """The queue is full; the client should retry later."""


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0
    rejected: int = 0

    def to_dict(self) -> dict:
        mean = self.items / self.batches if self.batches else 0.0
        return {"batches": self.batches, "items": self.items, "mean_batch": round(mean, 2),
                "max_batch_seen": self.max_batch_seen, "rejected": self.rejected}


class MicroBatcher:
    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int = 16,
                 max_wait_ms: float = 10.0, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; got {max_batch}, {max_queue}, {max_wait_ms}")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # Created here, inside the running loop, so the queue belongs to the server's loop.
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.create_task(self._run(), name="dogbreeds-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(Overloaded("the server is shutting down"))

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: np.ndarray) -> np.ndarray:
        """Queue one CHW input; returns its row of `forward`'s output (the app's forward is
        Predictor.forward: probabilities). Raises Overloaded if full."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited (the app's lifespan did not run)")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise Overloaded(f"{self.max_queue} requests are already waiting") from None
        return await future

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # Past the deadline, still take whatever is already waiting (no await).
                    if queue.empty():
                        break
                    batch.append(queue.get_nowait())
                    continue
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            await self._run_batch(batch)

    async def _run_batch(self, batch: list) -> None:
        # A client that gave up (cancelled future) needs no compute.
        live = [(item, future) for item, future in batch if not future.done()]
        if not live:
            return
        inputs = np.stack([item for item, _ in live])
        try:
            rows = await asyncio.to_thread(self.forward, inputs)
        except Exception as exc:  # every waiting request gets the error, the loop survives
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(live))
        for (_, future), row in zip(live, rows):
            if not future.done():
                future.set_result(row)
