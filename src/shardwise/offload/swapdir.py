"""The swap directory of one rank: ``<nvme_path>/shardwise-swap/<job>/rank<r>/``.

[Note: swap directory ownership]
The directory appears atomically with its owner file (``owner.json``: pid, hostname, start
time, the process's kernel start tick and boot id): both are built in a temporary sibling and
renamed into place, and the owner file is ``flock``-ed for the directory's lifetime. When the
directory already exists, its owner is *alive* if the lock is held (any process on this kernel,
whatever its pid namespace; NFS forwards it), or, when the lock is free, if the owner file names
this host and boot, and a running, non-zombie process with that pid (and kernel start tick,
when recorded: a reused pid is not the owner). A live owner is refused (two runs sharing a job
name and rank would overwrite each other's state); a dead owner, or no owner file, means a
stale set from a killed run: it is removed with an :class:`OffloadWarning` saying how many
bytes were cleared. An owner on another host whose lock state cannot be read is treated as
alive (never delete what might be in use).

The directory is removed by :meth:`SwapDirectory.cleanup`, when the object is garbage, and at
interpreter exit (``weakref.finalize``); only by the process that created it (not by a forked
child) and only while the owner file still carries its token. A SIGKILL-ed run leaves it
behind for the next run to clear.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import tempfile
import time
import uuid
import warnings
import weakref

from shardwise.offload.aio import OffloadIOError, OffloadUsageError, OffloadWarning

OWNER = "owner.json"
ROOT = "shardwise-swap"


def default_job_name() -> str:
    """``SHARDWISE_JOB``, else ``TORCHELASTIC_RUN_ID`` (set by torchrun), else ``"default"``."""
    return os.environ.get("SHARDWISE_JOB") or os.environ.get("TORCHELASTIC_RUN_ID") or "default"


def check_nvme_path(path: str) -> str | None:
    """None if ``path`` is a directory this process can create files in, else what is wrong and the fix."""
    if not path:
        return "nvme_path is empty: set it to a directory on a fast local disk (NVMe or SSD)"
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return f"nvme_path {path!r} does not exist: create it (mkdir -p {path}) on a fast local disk, or fix the path"
    except OSError as e:
        return f"nvme_path {path!r} cannot be examined ({e.strerror}): fix its permissions or choose another path"
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        return f"nvme_path {path!r} is not a directory: point nvme_path at a directory (the swap files go inside it)"
    if not os.access(path, os.W_OK | os.X_OK):
        return (f"nvme_path {path!r} is not writable by this user (uid {os.getuid()}): change its owner or mode "
                f"(chmod u+w), or choose a directory you can write")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".shardwise-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return (f"nvme_path {path!r} is not writable: creating a file there failed ({e.strerror}): "
                f"choose a directory on a writable, mounted filesystem")
    return None


def _check_name(value: str, what: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value or value.startswith(".shardwise"):
        raise OffloadUsageError(f"swap directory: {what} {value!r} is not a valid file name (no '/', not '.', '..' "
                                f"or empty); set SHARDWISE_JOB to a plain name" if what == "job" else
                                f"swap directory: file name {value!r} is not a plain file name")


def _boot_id() -> str | None:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc."""
    try:
        rest = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return rest[0], int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: object, proc_start: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    st = _proc_stat(pid)
    if st is not None:
        if st[0] in "ZX":  # zombie or dead: it holds nothing
            return False
        if isinstance(proc_start, int) and st[1] != proc_start:
            return False  # the pid was reused by another process
    return True


def _lock_held(owner_file: pathlib.Path) -> bool | None:
    """True if another open file holds the owner file's lock, False if not, None if unknown."""
    try:
        fd = os.open(owner_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the probe's lock, if taken


def _read_owner(directory: pathlib.Path) -> dict | None:
    try:
        owner = json.loads((directory / OWNER).read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def _tree_size(directory: pathlib.Path) -> tuple[int, int]:
    total = files = 0
    for root, _, names in os.walk(directory):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def _rmtree(directory: pathlib.Path) -> None:
    def onerror(func, p, exc_info):
        if not isinstance(exc_info[1], FileNotFoundError):  # a racing cleaner removed it first: fine
            raise exc_info[1]

    shutil.rmtree(directory, onerror=onerror)


def _release(path: pathlib.Path, token: str, lock_fd: int, pid: int) -> None:
    """The finalizer: remove the rank directory (if still ours), then empty parents."""
    if os.getpid() != pid:
        return  # a forked child: the directory belongs to the parent
    try:
        if (_read_owner(path) or {}).get("token") == token:
            _rmtree(path)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (other ranks or jobs), or gone
    except OSError as e:
        warnings.warn(f"could not remove the swap directory {path} ({e.strerror}): delete it by hand",
                      OffloadWarning, stacklevel=2)
    finally:
        os.close(lock_fd)


class SwapDirectory:
    """The rank's swap directory under ``nvme_path`` (see [Note: swap directory ownership])."""

    def __init__(self, nvme_path: str, *, job: str, rank: int):
        problem = check_nvme_path(nvme_path)
        if problem:
            raise OffloadIOError(f"rank {rank}: {problem}", rank=rank, path=nvme_path)
        _check_name(job, "job")
        self.rank, self.job = rank, job
        self.path = pathlib.Path(nvme_path) / ROOT / job / f"rank{rank}"
        self._token = uuid.uuid4().hex
        lock_fd = self._claim()
        self._finalizer = weakref.finalize(self, _release, self.path, self._token, lock_fd, os.getpid())

    def _owner_record(self) -> dict:
        st = _proc_stat(os.getpid())
        return {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": time.time(),
                "proc_start": st[1] if st else None, "boot_id": _boot_id(), "job": self.job, "rank": self.rank,
                "token": self._token}

    def _claim(self) -> int:
        """Create the directory with its locked owner file; returns the lock's descriptor."""
        where = f"rank {self.rank}: swap directory {self.path}"
        for _ in range(5):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = pathlib.Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".shardwise-rank{self.rank}-"))
                fd = os.open(tmp / OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OffloadIOError(f"{where}: cannot create it ({e.strerror}); check nvme_path's permissions "
                                     f"and free space", rank=self.rank, path=self.path, os_error=e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # no lock support (some network filesystems): the pid check remains
            os.write(fd, json.dumps(self._owner_record()).encode())
            try:
                os.rename(tmp, self.path)  # atomic; fails if the directory exists and is not empty
                return fd
            except OSError as e:
                os.close(fd)
                _rmtree(tmp)
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise OffloadIOError(f"{where}: cannot create it ({e.strerror}): remove whatever is at that path",
                                         rank=self.rank, path=self.path, os_error=e) from e
            self._clear_stale()
        raise OffloadIOError(f"{where}: another process keeps recreating it; give this run its own job name "
                             f"(SHARDWISE_JOB)", rank=self.rank, path=self.path)

    def _clear_stale(self) -> None:
        owner = _read_owner(self.path)
        lock = _lock_held(self.path / OWNER)
        alive = bool(lock)
        if not alive and owner is not None:
            if owner.get("hostname") != socket.gethostname():
                alive = lock is None
            elif not (owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id()):
                alive = _pid_alive(owner.get("pid"), owner.get("proc_start"))
        if alive:
            o = owner or {}
            pid, host = o.get("pid", "?"), o.get("hostname", "?")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["start_time"])) \
                if isinstance(o.get("start_time"), (int, float)) else "?"
            if pid == os.getpid():
                who = "this process (another live SwapDirectory)"
                stop = "call cleanup() on the other SwapDirectory first"
            else:
                who, stop = f"pid {pid}", f"stop pid {pid} (if it is gone and was on another host, delete {self.path})"
            raise OffloadIOError(
                f"rank {self.rank}: swap directory {self.path} is in use by {who} on host {host} (since {since}): "
                f"two runs with job name {self.job!r} and rank {self.rank} would overwrite each other's offloaded "
                f"state. Fix: give this run its own job name (SHARDWISE_JOB=<name>) or another nvme_path, or {stop}",
                rank=self.rank, path=self.path)
        nbytes, files = _tree_size(self.path)
        try:
            _rmtree(self.path)
        except OSError as e:
            raise OffloadIOError(f"rank {self.rank}: cannot remove the stale swap directory {self.path} "
                                 f"({e.strerror}): delete it by hand", rank=self.rank, path=self.path,
                                 os_error=e) from e
        what = (f"owner pid {owner.get('pid')} on {owner.get('hostname')} is no longer running" if owner
                else "it has no owner file")
        warnings.warn(f"rank {self.rank}: removed the stale swap directory {self.path} left by a run that did not "
                      f"exit cleanly ({what}): cleared {nbytes} bytes in {files} files", OffloadWarning, stacklevel=4)

    def file(self, name: str) -> pathlib.Path:
        """The path of swap file ``name`` in this directory (a plain file name)."""
        _check_name(name, "file")
        if name == OWNER:
            raise OffloadUsageError(f"swap directory: {OWNER!r} is the owner file, not a swap file name")
        return self.path / name

    def cleanup(self) -> None:
        """Remove the rank directory, then the job directory and ``shardwise-swap`` when empty (idempotent)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"SwapDirectory({str(self.path)!r})"
