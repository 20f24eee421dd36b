"""The dynamic batchers of `vlmopt serve`: one per tower, each handing the tower's runner lists of up to `--max-batch`
items, one list at a time, in a thread of its own (the event loop keeps reading requests meanwhile).

- `RayBatcher`: Ray Serve's `@serve.batch`, in a Ray Serve replica (`--ray`).
- `QueueBatcher`: the single-process server's (the default). `@serve.batch` refuses to run outside a Serve replica
  (ray 2.60: `serve.get_replica_context()` raises), and LitServe's batcher is the loop of its own worker processes, not
  a component. It also forms its batches differently from `@serve.batch`, which cuts the next batch while the model
  still runs the previous one (its `_process_batches` waits `batch_wait_timeout_s` for the next batch, then queues it
  behind the running one): under load its batches hold what arrived within `--max-delay-ms`, 2.2 images on average
  with 32 requests waiting (`make bench-serve`). Here the next batch is taken when the model is free: everything waiting
  then, up to `--max-batch`, and only a batch short of it waits for more, until `--max-delay-ms` after its first item
  arrived. Under load the batches fill while the model runs; at low load a lone request waits at most the delay.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable
from typing import Any, Protocol

from vlmopt.serving.options import ServeOptions

#: run(items) -> one result per item; observe(batch size) hears each model call's size
Run = Callable[[list[Any]], list[Any]]


class Batcher(Protocol):
    def __init__(self, tower: str, run: Run, options: ServeOptions, observe: Callable[[int], None]) -> None: ...

    async def __call__(self, item: Any) -> Any: ...

    def close(self) -> None: ...


class QueueBatcher:
    """One tower's batcher in the server's own event loop: items wait in arrival order; each batch is formed when the
    runner is free (made on first use, in the running loop)."""

    def __init__(self, tower: str, run: Run, options: ServeOptions, observe: Callable[[int], None]):
        self._run, self._observe = run, observe
        self._max_batch, self._max_delay_s = options.max_batch, options.max_delay_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vlmopt-{tower}")
        self._waiting: collections.deque[tuple[float, Any, asyncio.Future[Any]]] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((loop.time(), item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._serve_batches())
        return await future

    async def _serve_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = self._waiting[0][0] + self._max_delay_s if self._waiting else loop.time()
            while len(self._waiting) < self._max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = []
            while self._waiting and len(batch) < self._max_batch:
                _, item, future = self._waiting.popleft()
                if not future.cancelled():  # its client went away while it waited
                    batch.append((item, future))
            if not self._waiting:
                self._arrived.clear()
            if batch:
                await self._answer(batch)

    async def _answer(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        self._observe(len(batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, [item for item, _ in batch])
        except Exception as exc:  # the batch's requests fail with it; the batcher serves on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)


class RayBatcher:
    """One tower's batcher in a Ray Serve replica: Ray Serve's `@serve.batch` gathers single items into lists of up to
    `max_batch` (waiting at most `max_delay_s` for them)."""

    def __init__(self, tower: str, run: Run, options: ServeOptions, observe: Callable[[int], None]):
        from ray import serve

        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vlmopt-{tower}")

        @serve.batch(max_batch_size=options.max_batch, batch_wait_timeout_s=options.max_delay_s)
        async def batched(items: list[Any]) -> list[Any]:
            observe(len(items))
            return await asyncio.get_running_loop().run_in_executor(self._executor, run, items)

        self._batched = batched

    async def __call__(self, item: Any) -> Any:
        return await self._batched(item)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
