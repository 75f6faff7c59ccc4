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


class HandlerProcess:
    """The handler process: forked (the source is inherited as it is), or spawned as a fresh
    interpreter (the source travels pickled; nothing of the application's threads comes
    along). Not a multiprocessing.Process: multiprocessing's exit hook terminates every daemon
    process it knows, and it runs in a plain os.fork() child of the application too, which
    would kill the parent's handler when that child exits."""

    def __init__(self, sock: socket.socket, source: PageSource, start: str, board: int) -> None:
        self._exitcode: int | None = None
        if start == "spawn":
            self.pid = self._spawn(sock, source, board)
        else:
            self.pid = os.fork()
            if self.pid == 0:
                handler_main(sock, source, board, list(app_sockets))
        self.pidfd = os.pidfd_open(self.pid)

    @staticmethod
    def _spawn(sock: socket.socket, source: PageSource, board: int) -> int:
        try:
            payload = pickle.dumps(source)
        except Exception as e:
            raise TypeError(
                f"start='spawn' needs a picklable source (a module-level function or class "
                f"instance): {e}"
            ) from None
        code = "from userfaultfd.remote.handler import spawned_main; spawned_main()"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r, w = os.pipe()
        inherited = (sock.fileno(), board)
        for fd in inherited:
            os.set_inheritable(fd, True)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-c", code, str(sock.fileno()), str(board)],
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
