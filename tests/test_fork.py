"""fork() of a process with PageServer regions: served in the child where the kernel grants
UFFD_FEATURE_EVENT_FORK (root), a clear message naming the region where it does not."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

import userfaultfd as u
from userfaultfd.sources import Buffer

from .conftest import run_child

pytestmark = pytest.mark.needs_uffd
MIB = 1 << 20
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="EVENT_FORK needs CAP_SYS_PTRACE")


@root_only
@pytest.mark.parametrize("memory", ["anonymous", "shmem"])
def test_a_forked_child_is_served_from_the_same_source(memory: str) -> None:
    data = os.urandom(8 * MIB)
    with u.PageServer("thread") as server:
        assert server.serves_forks
        region = server.map(len(data), Buffer(data), memory=memory)  # type: ignore[arg-type]
        assert region[:4096] == data[:4096]  # the parent has one page; the child faults the rest
        pid = os.fork()
        if pid == 0:
            os._exit(0 if region[:] == data else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert region.stats().faults >= 8 * MIB // 4096 - 1  # the child's faults are counted
        assert region[:] == data
        assert server.errors() == []
        region.close()


POOL = textwrap.dedent(
    """
    import multiprocessing
    import numpy as np
    import userfaultfd as u
    values = np.random.default_rng(7).integers(0, 1000, 4 << 20, dtype=np.int64)
    shared = []  # inherited by the pool's forked workers, never pickled

    def chunk_sum(bounds):
        lo, hi = bounds
        return int(shared[0][lo:hi].sum())

    with u.PageServer("thread") as server:
        region = server.map(values.nbytes, u.sources.Buffer(values.tobytes()))
        shared.append(np.frombuffer(region, dtype=np.int64))  # nothing loaded yet
        n = len(values)
        parts = [(k * n // 8, (k + 1) * n // 8) for k in range(8)]
        with multiprocessing.get_context("fork").Pool(4) as pool:
            sums = pool.map(chunk_sum, parts, chunksize=1)
        shared.clear()
        assert sums == [int(values[lo:hi].sum()) for lo, hi in parts]
        assert region.stats().faults >= values.nbytes // u.PAGE_SIZE  # all in the workers
        assert server.errors() == []
        print("OK")
        region.close()
    """
)


@root_only
def test_a_multiprocessing_fork_pool_over_a_lazily_loaded_numpy_array() -> None:
    """In a child interpreter: a hang there (a fork waiting on its event) ends with a timeout."""
    proc = run_child(POOL)
    assert proc.returncode == 0 and proc.stdout == "OK\n", proc.stderr


def test_a_child_touching_an_unserved_region_is_told_why() -> None:
    """Unprivileged (run as nobody when we are root) the kernel refuses EVENT_FORK: the child
    dies of SIGSEGV as before, with a message naming the region and the reason."""
    code = textwrap.dedent(
        """
        import os, sys
        import userfaultfd as u
        if os.geteuid() == 0:  # the interpreter is loaded: now as nobody
            os.setgid(65534)
            os.setuid(65534)
        try:
            server = u.PageServer("thread")
        except PermissionError as e:
            print("SKIP", e)
            sys.exit(0)
        assert not server.serves_forks
        region = server.map(4 * 4096, u.sources.Fill(b"x"))
        pid = os.fork()
        if pid == 0:
            region[0]
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        print("parent", bytes(region[:2]).decode())
        """
    )
    proc = run_child(code)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert f"child {-signal.SIGSEGV}" in proc.stdout and "parent xx" in proc.stdout
    assert "(a forked child) touched <Region 0 16384 bytes anonymous" in proc.stderr
    assert "from <userfaultfd.sources.Fill" in proc.stderr or "Fill" in proc.stderr
    assert "EVENT_FORK (it needs CAP_SYS_PTRACE)" in proc.stderr


def test_sigbus_mode_regions_name_the_reason_in_a_forked_child() -> None:
    code = textwrap.dedent(
        """
        import os
        import userfaultfd as u
        server = u.PageServer("sigbus")
        assert not server.serves_forks
        region = server.map(4096)
        pid = os.fork()
        if pid == 0:
            region[0]
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    proc = run_child(code)
    assert proc.returncode == 0, proc.stderr
    assert f"child {-signal.SIGSEGV}" in proc.stdout
    assert "a sigbus-mode server serves only the process that created it" in proc.stderr


def test_serve_forks_false_leaves_children_without_regions_and_says_so() -> None:
    code = textwrap.dedent(
        """
        import os
        import userfaultfd as u
        server = u.PageServer("thread", serve_forks=False)
        assert not server.serves_forks
        region = server.map(4096)
        pid = os.fork()
        if pid == 0:
            region[0]
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    proc = run_child(code)
    assert proc.returncode == 0, proc.stderr
    assert f"child {-signal.SIGSEGV}" in proc.stdout
    assert "its server was created with serve_forks=False" in proc.stderr
