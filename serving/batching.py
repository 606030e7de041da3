"""Micro-batching: concurrent requests share one ONNX call.

The batcher waits for a job and for a free worker, gathers up to `max_batch` jobs (optionally
waiting up to `max_wait_ms` for more), and runs them in a worker thread. Up to `workers` calls run
at once (onnxruntime sessions take concurrent runs). Each part of a batch is answered on the
event loop as soon as it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from serving.bundle import Bundle


@dataclass(eq=False)
class Job:
    """One request's model call: its history and exclusions as item indices of `bundle`."""

    bundle: Bundle  # the bundle the ids were mapped with (a hot swap may land mid-batch)
    history: list[int]
    exclude: list[int]
    k: int
    future: asyncio.Future


# (user vector, top-k item indices, their scores) of one job.
Answer = tuple[np.ndarray, np.ndarray, np.ndarray]


class Batcher:
    def __init__(self, max_batch: int, max_wait_ms: float, workers: int,
                 observe_batch: Callable[[int], None] = lambda size: None):
        self.max_batch, self.max_wait_ms, self.workers = max_batch, max_wait_ms, workers
        self.observe_batch = observe_batch
        self.queue: asyncio.Queue[Job] | None = None
        self.running: set[asyncio.Task] = set()

    async def submit(self, bundle: Bundle, history: list[int], exclude: list[int], k: int) -> Answer:
        assert self.queue is not None, "the batcher is not running"
        job = Job(bundle, history, exclude, k, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        """The batching loop (a task for the service's lifetime)."""
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        workers = asyncio.Semaphore(self.workers)
        while True:
            first = await self.queue.get()
            await workers.acquire()
            batch = [first]
            # Whatever queued up while the workers were busy joins at once; then, optionally,
            # wait up to max_wait_ms for more (0: never wait, the natural batching of a busy
            # server is enough and costs no latency).
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch and self.max_wait_ms > 0:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            task = asyncio.create_task(self._run_batch(batch))
            task.add_done_callback(lambda _: workers.release())
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run_batch(self, batch: list[Job]) -> None:
        by_bundle: dict[int, list[Job]] = {}
        for job in batch:  # each request runs on the bundle it mapped ids with
            by_bundle.setdefault(id(job.bundle), []).append(job)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._run_jobs, loop, list(by_bundle.values()))

    def _run_jobs(self, loop: asyncio.AbstractEventLoop, per_bundle: list[list[Job]]) -> None:
        """In a worker thread: each part of the batch is answered on the event loop as soon as
        it is done (one thread hand-off for the whole batch)."""
        for jobs in per_bundle:
            bundle = jobs[0].bundle
            try:
                for rows, users, top, scores in bundle.recommend_parts(
                        [j.history for j in jobs], [j.exclude for j in jobs], max(j.k for j in jobs)):
                    loop.call_soon_threadsafe(self._answer, [jobs[r] for r in rows], (users, top, scores))
            except Exception as exc:
                loop.call_soon_threadsafe(self._answer, jobs, exc)

    def _answer(self, jobs: list[Job], result: tuple[np.ndarray, np.ndarray, np.ndarray] | Exception) -> None:
        self.observe_batch(len(jobs))
        for r, job in enumerate(jobs):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result((result[0][r], result[1][r], result[2][r]))
