"""Where sweep cells run: in this process, in local worker processes, or on a Ray cluster.

Every backend maps a top-level (picklable) function over payloads and yields results as they
finish. Cells write their own outputs atomically, so a backend that dies mid-sweep loses only
the cells in flight; the next run skips the finished ones.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

BackendName = Literal["auto", "local", "process", "ray"]
BACKENDS: tuple[str, ...] = ("auto", "local", "process", "ray")


@runtime_checkable
class Backend(Protocol):
    def map(self, fn: Callable[[Any], Any], payloads: Sequence[Any]) -> Iterator[Any]: ...


class LocalBackend:
    """Run cells one after another in this process."""

    def map(self, fn: Callable[[Any], Any], payloads: Sequence[Any]) -> Iterator[Any]:
        for p in payloads:
            yield fn(p)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class ProcessBackend:
    """Local worker processes, `threads` torch threads each.

    Start method: ``fork`` where the platform has it (workers inherit the imported toolkit, so
    they start in milliseconds rather than re-importing TransformerLens; each worker then sets
    its own thread count before any torch op, as torch's DataLoader workers do), else ``spawn``.
    Pass `start_method="spawn"` to get fresh interpreters.
    """

    def __init__(self, workers: int, threads: int = 1, start_method: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        methods = multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise ValueError(f"start_method: expected one of {methods}, got {start_method!r}")
        self.workers, self.threads = workers, threads
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")

    def map(self, fn: Callable[[Any], Any], payloads: Sequence[Any]) -> Iterator[Any]:
        if not payloads:
            return
        ctx = multiprocessing.get_context(self.start_method)
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(payloads)), mp_context=ctx,
                                   initializer=_init_worker, initargs=(self.threads,))
        try:
            futures = [pool.submit(fn, p) for p in payloads]
            for fut in as_completed(futures):
                yield fut.result()
        finally:  # interrupted: cells not yet started are cancelled, running ones finish
            pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Ray tasks (optional extra: ``pip install 'interp[ray]'``).

    Uses the Ray instance this process is already connected to; otherwise starts a local one
    (`address=None`) or connects to `address` ("auto" or "ray://host:port"), and shuts down only
    what it started. `gpus`: GPUs reserved per task (fractions share one), for cells that put
    their model on ``cuda``.
    """

    def __init__(self, workers: int | None = None, address: str | None = None, gpus: float = 0.0) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ImportError("Ray backend: expected the `ray` package, got ImportError; install the "
                              "optional extra with `pip install 'interp[ray]'`") from e
        if gpus < 0:
            raise ValueError(f"gpus: expected >= 0 GPUs per task, got {gpus}")
        self.workers, self.address, self.gpus = workers, address, gpus

    def map(self, fn: Callable[[Any], Any], payloads: Sequence[Any]) -> Iterator[Any]:
        import ray

        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is not None:
                kwargs["address"] = self.address
            elif self.workers is not None:
                kwargs["num_cpus"] = self.workers
            ray.init(**kwargs)
            started = True
        pending: list[Any] = []
        try:
            remote = ray.remote(num_cpus=1, num_gpus=self.gpus)(fn)
            pending = [remote.remote(p) for p in payloads]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            # interrupted (an error, or the caller stopped iterating): cancel what is left and wait until
            # it has settled, so no task of this map still writes a cell after it returns
            if pending:
                for ref in pending:
                    ray.cancel(ref)
                ray.wait(pending, num_returns=len(pending), timeout=60)
            if started:
                ray.shutdown()


def get_backend(name: str, workers: int = 1, address: str | None = None, gpus: float = 0.0) -> Backend:
    """`auto`: local for one worker, processes for more; `ray` needs the optional extra (`gpus`
    per task applies to Ray only)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")
    if name == "ray":
        return RayBackend(workers=workers if workers > 1 else None, address=address, gpus=gpus)
    if name == "process" or (name == "auto" and workers > 1):
        return ProcessBackend(workers)
    return LocalBackend()
