"""Decode and preprocess images in worker processes, with a hang guard and crash isolation.

Each worker process handles one file at a time, so a file that hangs its decoder (killed
after ``timeout_s``) or crashes it (segfault, out-of-memory kill) is named exactly, and the
worker is replaced; the other files are unaffected. A manager thread keeps the workers busy
while the caller runs the detector, and at most ``max_in_flight`` decoded images exist at
once (bounded memory). With ``num_workers=0`` everything runs in the calling process (no
timeout), for tests and small runs.

Workers start with the ``forkserver`` method where available (else ``spawn``): never a bare
``fork`` of a process that runs torch threads. The preprocess function is therefore sent by
reference and must be importable (a module-level function or a class's staticmethod).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, SupportsFloat

import numpy as np

from feature_extraction.errors import ImageLoadError
from feature_extraction.images.decode import DEFAULT_MAX_PIXELS, load_image

if TYPE_CHECKING:
    import torch

# (H, W, 3) uint8 RGB -> ((3, h, w) tensor or array, scale: h / H, or what gives it as float())
PreprocessFn = Callable[[np.ndarray], "tuple[torch.Tensor | np.ndarray, SupportsFloat]"]
_READY = "ready"
_POLL_S = 0.2
_MAX_START_FAILURES = 3  # workers dying before they are ready: a broken setup, not a bad file
# Imported once by the fork server so that each (re)started worker is ready at once.
_FORKSERVER_PRELOAD = ["__main__", "numpy", "PIL.Image", "torch", "feature_extraction.images.decode"]


@dataclass
class DecodedImage:
    """A file decoded and preprocessed for the detector."""

    index: int  # position of the file in the task list
    pixels: np.ndarray  # (3, h, w) float32, what preprocess returned (BGR, mean-subtracted)
    scale: float  # h / H, as returned by preprocess
    size: tuple[int, int]  # (H, W) of the decoded image, EXIF orientation applied


@dataclass
class DecodeFailure:
    """A file that could not be decoded or preprocessed."""

    index: int
    reason: str
    permanent: bool = True  # False: worth retrying later even if the file is unchanged


DecodeResult = DecodedImage | DecodeFailure


def decode_one(index: int, path: str, preprocess: PreprocessFn, max_pixels: int | None) -> DecodeResult:
    """Load + preprocess one file; every failure becomes a :class:`DecodeFailure`."""
    try:
        rgb = load_image(path, max_pixels=max_pixels)  # (H, W, 3) uint8
    except ImageLoadError as exc:
        return DecodeFailure(index, exc.reason, exc.permanent)
    except Exception as exc:  # a bug or an exotic failure: still only this file's
        return DecodeFailure(index, f"could not load image ({type(exc).__name__}: {exc})")
    try:
        tensor, scale = preprocess(rgb)
        pixels = _as_chw_float32(tensor)
    except MemoryError:
        return DecodeFailure(index, "not enough memory to preprocess", permanent=False)
    except Exception as exc:
        return DecodeFailure(index, f"preprocessing failed ({type(exc).__name__}: {exc})")
    return DecodedImage(index, pixels, float(scale), (int(rgb.shape[0]), int(rgb.shape[1])))


def _as_chw_float32(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (3, h, w) torch tensor or array -> a contiguous float32 numpy array (cheap to pickle)."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().numpy()
    arr = np.ascontiguousarray(tensor, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"preprocess returned shape {arr.shape}, expected (3, h, w)")
    return arr


def iter_decoded(paths: Sequence[str], preprocess: PreprocessFn, *, num_workers: int = 2,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, timeout_s: float | None = 60.0,
                 max_in_flight: int = 16, start_method: str | None = None) -> Iterator[DecodeResult]:
    """Yield one result per path, in completion order (``.index`` says which path).

    Args:
        paths: files to decode.
        preprocess: importable function applied to each decoded RGB array in the worker.
        num_workers: worker processes; 0 decodes in this process.
        max_pixels: pixel cap of :func:`load_image`.
        timeout_s: a file taking longer than this in a worker is abandoned (worker killed).
        max_in_flight: decoded images dispatched or waiting to be consumed, at most.
        start_method: ``forkserver`` (default where available), ``spawn`` or ``fork``.
    """
    if not paths:
        return
    if num_workers <= 0:
        for i, path in enumerate(paths):
            yield decode_one(i, path, preprocess, max_pixels)
        return
    pool = DecodePool(paths, preprocess, num_workers=num_workers, max_pixels=max_pixels,
                      timeout_s=timeout_s, max_in_flight=max_in_flight, start_method=start_method)
    with pool:
        yield from pool


def _worker_main(conn: multiprocessing.connection.Connection, preprocess: PreprocessFn,
                 max_pixels: int | None) -> None:
    """Worker loop: receive (index, path), send back a DecodeResult; exit on None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_threads()
    try:
        conn.send(_READY)
        while True:
            task = conn.recv()
            if task is None:
                return
            index, path = task
            conn.send(decode_one(index, path, preprocess, max_pixels))
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the parent went away


def _limit_threads() -> None:
    """One compute thread per worker: the workers are the parallelism."""
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:
        pass


def _default_start_method() -> str:
    methods = mp.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class _Worker:
    """One worker process and the task it holds."""

    def __init__(self, ctx: Any, preprocess: PreprocessFn, max_pixels: int | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, preprocess, max_pixels), daemon=True,
                                name="ldot-decode")
        self.proc.start()
        child.close()
        self.ready = False
        self.task: int | None = None
        self.started = 0.0

    def assign(self, index: int, path: str) -> None:
        self.conn.send((index, path))
        self.task, self.started = index, time.monotonic()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def request_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass


class DecodePool:
    """Worker processes fed by a manager thread; iterate it for the results (see module doc)."""

    def __init__(self, paths: Sequence[str], preprocess: PreprocessFn, *, num_workers: int,
                 max_pixels: int | None, timeout_s: float | None, max_in_flight: int,
                 start_method: str | None = None) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.num_workers = max(1, min(num_workers, len(self.paths) or 1))
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self._ctx = mp.get_context(start_method or _default_start_method())
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # no effect once the server runs
        self._start_failures = 0
        self._slots = threading.Semaphore(max(1, max_in_flight))
        self._out: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._workers: list[_Worker] = []
        self._thread = threading.Thread(target=self._run, name="ldot-decode-manager", daemon=True)
        self._started = False

    def __enter__(self) -> DecodePool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def __iter__(self) -> Iterator[DecodeResult]:
        self.start()
        for _ in range(len(self.paths)):
            item = self._next()
            self._slots.release()
            yield item

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def _next(self) -> DecodeResult:
        while True:
            try:
                item = self._out.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("decode manager thread ended unexpectedly") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        """Stop the manager thread and every worker process."""
        self._stop.set()
        if self._started:
            self._thread.join(10)
        for w in self._workers:
            w.request_stop()
        deadline = time.monotonic() + 2.0  # a worker busy with a big image gets killed after this
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers.clear()

    # -- manager thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._workers = [self._spawn() for _ in range(self.num_workers)]
            self._loop()
        except BaseException as exc:  # surfaced to the consumer
            self._out.put(exc)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.preprocess, self.max_pixels)

    def _loop(self) -> None:
        next_task = 0
        while not self._stop.is_set():
            next_task = self._dispatch(next_task)
            if next_task >= len(self.paths) and all(w.task is None for w in self._workers):
                return
            self._collect()

    def _dispatch(self, next_task: int) -> int:
        for w in self._workers:
            if next_task >= len(self.paths):
                break
            if w.ready and w.task is None and self._slots.acquire(blocking=False):
                w.assign(next_task, self.paths[next_task])
                next_task += 1
        return next_task

    def _collect(self) -> None:
        waitables = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        multiprocessing.connection.wait(waitables, timeout=_POLL_S)
        for i, w in enumerate(self._workers):
            self._workers[i] = self._check_worker(w)

    def _check_worker(self, w: _Worker) -> _Worker:
        """Read a finished result, or replace a dead or stuck worker; returns the worker to keep."""
        if self._read_message(w):
            return w
        if not w.proc.is_alive():
            if not w.ready:
                self._start_failures += 1
                if self._start_failures >= _MAX_START_FAILURES:
                    raise RuntimeError(f"decode workers die on start ({_describe_exit(w.proc.exitcode)}); "
                                       "is the preprocess function importable?")
            return self._replace(w, f"decoder process died ({_describe_exit(w.proc.exitcode)})")
        if w.task is not None and self.timeout_s is not None and time.monotonic() - w.started > self.timeout_s:
            return self._replace(w, f"decoding took longer than {self.timeout_s:g} s: stopped")
        return w

    def _read_message(self, w: _Worker) -> bool:
        try:
            if not w.conn.poll():
                return False
            msg = w.conn.recv()
        except (EOFError, OSError):
            return False
        if msg == _READY:
            w.ready = True
            self._start_failures = 0
        elif isinstance(msg, (DecodedImage, DecodeFailure)):
            w.task = None
            self._out.put(msg)
        return True

    def _replace(self, w: _Worker, reason: str) -> _Worker:
        task = w.task
        w.kill()
        if task is not None:
            self._out.put(DecodeFailure(task, reason, permanent=True))
        return self._spawn()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def worker_count(requested: int | None) -> int:
    """A sensible default number of decode workers: CPUs - 1 (at least 1), capped at 8."""
    if requested is not None:
        return requested
    return max(1, min(8, (os.cpu_count() or 2) - 1))
