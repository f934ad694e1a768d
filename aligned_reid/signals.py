"""Ctrl-C at the moments it must wait: a few renames that belong together, and the forks of worker
processes. Python runs the at-fork hooks of os.fork (logging's, random's, ...) as Python code; a
KeyboardInterrupt raised inside one is printed as ignored and lost, and one raised between logging's
two hooks leaves logging's lock taken, so that the next getLogger (a PIL import, say) hangs."""
import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_deferred():
    """Holds SIGINT / SIGTERM / SIGHUP back for the block: their handlers are swapped for one that only
    records the signal, and a recorded signal is raised again, with the restored handler, on leaving.
    (Python runs signal handlers in the main thread whichever thread the kernel picks, so this holds
    where a thread's signal mask would not.) Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught:
            os.kill(os.getpid(), s)


def started(loader):
    """iter(loader) for a torch DataLoader (or any iterable), its worker processes forked with the
    signals deferred: a Ctrl-C that arrives meanwhile is raised once they run."""
    with signals_deferred():
        return iter(loader)
