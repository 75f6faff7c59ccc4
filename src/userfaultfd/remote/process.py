"""How the handler process is started (forked or spawned) and watched from the application."""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import weakref

from .handler import PageSource, handler_main

# The application ends of every live server's socket. A handler process closes its copies, or
# the application closing one would not reach that server's handler as EOF.
app_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def _main_reference() -> list[str]:
    """How a spawned handler finds the application's ``__main__``, which the source refers to
    (a function or class defined in the script): as multiprocessing does, the handler runs the
    script (or module) as ``__mp_main__``, so what the ``if __name__ == "__main__"`` guard
    protects does not run there. TypeError where there is no file to run (``-c``, a REPL)."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return ["module", spec.name.removesuffix(".__main__")]
    path = getattr(main, "__file__", None)
    if path and os.path.exists(path):
        return ["path", os.path.abspath(path)]
    raise TypeError(
        "start='spawn' needs a source the handler can import: this one is defined in a "
        "__main__ with no file (python -c, an interactive session); define it in a module or "
        "a script, or use start='fork'"
    )


class HandlerProcess:
    """The handler process: forked (the source is inherited as it is), or spawned as a fresh
    interpreter (the source travels pickled; nothing of the application's threads comes
    along). Not a multiprocessing.Process: multiprocessing's exit hook terminates every daemon
    process it knows, and it runs in a plain os.fork() child of the application too, which
    would kill the parent's handler when that child exits."""

    def __init__(
        self,
        sock: socket.socket,
        source: PageSource,
        start: str,
        board: int,
        timeout: float | None,
    ) -> None:
        self._exitcode: int | None = None
        app_pid = os.getpid()
        if start == "spawn":
            self.pid = self._spawn(sock, source, board, timeout)
        else:
            self.pid = os.fork()
            if self.pid == 0:
                handler_main(sock, source, board, list(app_sockets), app_pid, timeout)
        self.pidfd = os.pidfd_open(self.pid)

    @staticmethod
    def _spawn(sock: socket.socket, source: PageSource, board: int, timeout: float | None) -> int:
        try:
            payload = pickle.dumps(source)
        except Exception as e:
            raise TypeError(
                f"start='spawn' needs a picklable source (a module-level function or class "
                f"instance): {e}"
            ) from None
        main = [*_main_reference(), *sys.argv] if b"__main__" in payload else []
        settings = [
            str(sock.fileno()),
            str(board),
            str(os.getpid()),
            "none" if timeout is None else str(timeout),
        ]
        code = "from userfaultfd.remote.handler import spawned_main; spawned_main()"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r, w = os.pipe()
        inherited = (sock.fileno(), board)
        for fd in inherited:
            os.set_inheritable(fd, True)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-c", code, *settings, *main],
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)],
            )
        finally:
            for fd in inherited:
                os.set_inheritable(fd, False)
            os.close(r)
        with open(w, "wb") as pipe:  # the child reads it at once: no deadlock past the buffer
            pipe.write(payload)
        return pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit status, or minus the signal that ended it."""
        if self._exitcode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._exitcode = os.waitstatus_to_exitcode(status)
        return self._exitcode

    def join(self, timeout: float) -> int | None:
        """Waits up to timeout seconds for it to end (and reaps it); its exit code or None."""
        if self.exitcode is None:
            select.select([self.pidfd], [], [], timeout)
        return self.exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        if self.is_alive():
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
