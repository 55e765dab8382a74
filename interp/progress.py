"""Progress of a long command: a spinner on a terminal, plain log lines elsewhere.

A spinner draws nothing when stdout is a file or a pipe (CI, `nohup`, `| tee`), so a 5-minute
run would look hung. Off a terminal, `progress` prints one line when the step starts, one every
`every` seconds while it runs, and leaves the "done" line to the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def progress(console: Console, text: str, *, every: float = 30.0) -> Iterator[None]:
    """Show that `text` is running: `console.status` on a terminal, else timestamped lines."""
    if console.is_terminal:
        with console.status(f"{text} ..."):
            yield
        return
    t0 = time.perf_counter()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            console.print(f"{time.strftime('%H:%M:%S')} {text}: still running ({time.perf_counter() - t0:.0f} s)",
                          markup=False, highlight=False)

    console.print(f"{time.strftime('%H:%M:%S')} {text} ...", markup=False, highlight=False)
    thread = threading.Thread(target=beat, name="interp-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
