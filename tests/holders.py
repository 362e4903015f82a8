"""A process that holds a lock while a test runs: started, waited for, and always killed.

`lock_held(code, *args)` runs `code` in a new interpreter, which takes its lock and prints
`locked`; the context yields the process once that line arrived and kills it on leaving (if it is
still there), so no holder outlives its test.
"""

import contextlib
import subprocess
import sys
from collections.abc import Iterator

READY_TIMEOUT_S = 60


@contextlib.contextmanager
def lock_held(code: str, *args, **kwargs) -> Iterator[subprocess.Popen]:
    """A process running `code` with `args`, once it printed `locked` (killed on leaving)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )
    try:
        line = _readline(holder, READY_TIMEOUT_S)
        assert line.strip() == "locked", f"the holder said {line!r} (exit {holder.poll()})"
        yield holder
    finally:
        kill(holder)
        holder.stdout.close()


def kill(process: subprocess.Popen) -> None:
    """Kills `process` (SIGKILL, as a crash would end it) and waits for it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def _readline(process: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return process.stdout.readline()
