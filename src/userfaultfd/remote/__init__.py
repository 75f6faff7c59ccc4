"""Pages produced by Python code, served from a handler process.

A Python source cannot run in a process whose threads fault while holding the GIL, so
:class:`PythonSourceServer` starts a handler process (with its own GIL), hands it the uffd over a
UNIX socket in Firecracker's format (handoff.py), and the handler calls the source for every fault.
An exception in the source poisons the pages it was asked for (the toucher gets SIGBUS) and comes
back to the application, traceback included, as a SourceError at its next call.

``application``: the application's side; ``process``: starting and watching the handler process;
``handler``: what runs in it; ``messages``: what the two sides say to each other."""

from .application import PythonSourceServer, RemoteRegion
from .handler import PageSource

__all__ = ["PageSource", "PythonSourceServer", "RemoteRegion"]
