"""The repository: a bare git repository plus VML's settings and lock.

A VML repository is an ordinary bare git repository.  VML's settings live in
its git ``config`` (section ``[vml]``), so ``git config -l`` shows them and a
``git clone --mirror`` keeps... nothing of the config, which is why every
setting a reader needs is also written into each manifest (see FORMAT.md).
Local, non-replicated state (the lock, the list of known areas) lives in the
folder ``vml/`` inside the git directory, which git ignores.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dulwich.config import ConfigFile
from dulwich.file import FileLocked
from dulwich.repo import Repo

from vml.errors import RepositoryBusy, RepositoryNotFound, UsageError
from vml.plumbing.packindex import PackHealth, guard_store

FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 1 << 20
PAGE_SIZE = 4096
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 64 << 20


_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_sync_file_range: Any = None


_LIBC: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, for the few calls Python's os module lacks.

    The process's own symbols (``CDLL(None)``) include libc wherever Python
    runs on Linux: ``ctypes.util.find_library`` would spawn ldconfig, a few
    milliseconds each time, on every command.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _sync_range_fn() -> Any:
    global _sync_file_range
    if _sync_file_range is None:
        try:
            fn = libc().sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = False
    return _sync_file_range


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting.

    Big files are written long before they are fsynced; starting writeback
    as we go lets the disk work while we compute, so the final ``fsync``
    waits for little.  Best effort: silently nothing where unsupported.
    """
    fn = _sync_range_fn()
    if fn:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class WriteBehind:
    """Sends a file being written front to back to the disk as it goes, and out of the cache.

    Told how far the file is complete (:meth:`advance`), it starts
    writeback of each new ``step`` bytes, and once the step before that is
    on the disk, drops those pages from the page cache
    (``POSIX_FADV_DONTNEED``).  The disk works while the caller computes,
    the final ``fsync`` waits for at most two steps, and the file's pages
    are given back as soon as they are written: a restore of a GiB then
    cycles through a few dozen MiB of page cache instead of taking a GiB
    of fresh pages, each reclaimed from other files first when memory is
    full of cache (as on any machine that has been up a while).  Measured
    (docs/BENCHMARKS.md, "The last-state restore"): the kernel's copy of a
    W2 restore's GiB into the cache took 1.60 s without this, 0.14 s with
    it; writing 1 GiB alone, 1.45 s of system time with writeback started
    per step and nothing dropped, 0.31 s this way.  Durability is
    unchanged: only ``fsync`` makes a file durable, and its caller still
    calls it.  Waiting for the older step also holds the caller to the
    disk's pace.  Best effort: nothing where ``sync_file_range`` is
    missing.
    """

    def __init__(self, fd: int, step: int) -> None:
        self.fd = fd
        self.step = step
        self.started = 0  # writeback started for [0, started)
        self.dropped = 0  # on the disk and out of the cache: [0, dropped)
        self._fn = _sync_range_fn()

    def advance(self, done: int) -> None:
        """Bytes ``[0, done)`` of the file are written: nothing below ``done`` changes now."""
        if not self._fn or done - self.started < self.step:
            return
        if self.started > self.dropped:
            length = self.started - self.dropped
            wait = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
            self._fn(self.fd, self.dropped, length, wait | _SYNC_FILE_RANGE_WAIT_AFTER)
            with suppress(OSError, AttributeError):
                os.posix_fadvise(self.fd, self.dropped, length, os.POSIX_FADV_DONTNEED)
            self.dropped = self.started
        self._fn(self.fd, self.started, done - self.started, _SYNC_FILE_RANGE_WRITE)
        self.started = done


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (dulwich never does)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file only.

    ``durable``: the data is fsynced before the rename and the folder after,
    so a power loss leaves the old file or the new one, never an empty one.
    ``tmp``: the temporary's name, in ``path``'s folder (default ``.<name>.tmp<pid>``).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}") if tmp is None else tmp
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


@contextmanager
def git_locked() -> Iterator[None]:
    """Turn dulwich's ``FileLocked`` (a git ``*.lock`` file in the way) into one clear error.

    git and dulwich write a ref or the config through ``<file>.lock``,
    created exclusively: another git or vml command writing the same file,
    or one killed while it did, leaves it there.  Nothing was written then.
    """
    try:
        yield
    except FileLocked as e:
        lock = os.fsdecode(e.lockfilename)
        raise RepositoryBusy(
            f"{os.fsdecode(e.filename)} is being written by another command ({lock} exists)",
            f"wait for it to finish; if no git or vml command runs (one was killed), remove {lock}",
        ) from None


def write_config(cfg: ConfigFile) -> None:
    """Write the repository's ``config`` durably: to ``config.lock``, fsynced, renamed, folder fsynced.

    dulwich's ``write_to_path`` does all but the last, so a power loss right
    after could bring back the old file (a remote added, or a setting, gone);
    a ``config.lock`` in the way is one clear error (:func:`git_locked`).
    """
    assert cfg.path is not None
    with git_locked():
        cfg.write_to_path()
    fsync_dir(Path(os.fsdecode(cfg.path)).parent)


#: Whoever waits for a lock longer than this says so once (logger ``vml.wait``, which the CLI
#: prints at once), naming the holder: a wait of up to 10 minutes is never silent.
WAIT_NOTICE = 2.0
_wait_log = logging.getLogger("vml.wait")


#: How a lock's holder is named when it is the keeper of a VM `vml run` started.
_KEEPER = "the keeper of `vml run`, keeping what the guest changed before it powered off"


@dataclass
class Holder:
    """Who holds a lock, as far as this machine can tell."""

    pid: int | None = None
    command: str = ""  # ``vml gc`` and the like, from its command line
    keeper: bool = False  # the keeper of `vml run` (its command line names no `vml`)
    stopped: bool = False  # SIGSTOP, Ctrl-Z, a debugger: it will not go on by itself

    def describe(self) -> str:
        """`` (pid 12, `vml gc`, stopped)``, or what is known of it."""
        if self.pid is None:
            return ""
        words = [f"pid {self.pid}"]
        if self.keeper:
            words.append(_KEEPER)
        elif self.command:
            words.append(f"`{self.command}`")
        if self.stopped:
            words.append("stopped")
        return f" ({', '.join(words)})"

    def remedy(self) -> str | None:
        """What to do when the holder is stopped (None: the error's usual remedy)."""
        if not self.stopped:
            return None
        return (
            f"it will not go on by itself: continue it (`kill -CONT {self.pid}`, or `fg` "
            "in its terminal) or end it, then try again"
        )


def lock_holder(fd: int) -> Holder:
    """The process a lock file (open as ``fd``) names as its holder, and its state."""
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return Holder()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return Holder()
    pid = int(text)
    out = Holder(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        out.stopped = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"T", b"t")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).decode(errors="replace").split("\0")
    except (OSError, ValueError):
        return out
    for i, word in enumerate(argv):
        # The keeper of `vml run` (vml.plumbing.keeper) starts as `python -S -c CODE`:
        # its command line names no `vml`, its code does.
        if "vml.plumbing.keeper" in word:
            out.keeper = True
            break
        if word == "vml" or word.endswith("/vml"):
            rest = [w for w in argv[i + 1 :] if w]
            out.command = " ".join(["vml", *rest])[:80]
            break
    return out


@contextmanager
def hold_flock(path: Path, timeout: float, busy: str) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); yields its fd.

    ``flock`` locks die with their process, so a killed vml never leaves a
    stale lock behind: the file may stay, the lock does not.  Waits up to
    ``timeout`` seconds (0: do not wait), then raises :class:`RepositoryBusy`
    with ``busy`` and the holder's pid.  The lock file may be unlinked by its
    holder, so after locking, the file at ``path`` must still be the one
    locked; otherwise the lock is taken again on the new file.
    """
    start = time.monotonic()
    deadline = start + timeout
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    now = time.monotonic()
                    if now >= deadline:
                        holder = lock_holder(fd)
                        raise RepositoryBusy(busy + holder.describe(), holder.remedy()) from None
                    if not said and now - start >= WAIT_NOTICE:
                        said = True
                        holder = lock_holder(fd)
                        left = f"waiting up to {deadline - start:.0f} s"
                        _wait_log.warning(
                            "%s",
                            f"{busy}{holder.describe()}; {holder.remedy() or left}".replace(
                                ", then try again", f" ({left})"
                            ),
                        )
                    time.sleep(0.05)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        # The file names its holder only while held: a pid left behind would
        # name a process that no longer holds it (vml stop asks whether the
        # keeper holds the area lock by this pid).
        with suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


#: Called with the repository each time its lock is taken, before the holder
#: goes on, and each time it is opened.  journal.py (imported with the package,
#: vml/plumbing/__init__.py) registers the finishing of a killed rewrite: it
#: needs modules that need this one.
LOCK_HOOKS: list[Callable[[Repository], None]] = []
OPEN_HOOKS: list[Callable[[Repository], None]] = []

# Like git's gc.autoPackLimit: look-ups try packs one by one.
DEFAULT_AUTO_PACK_LIMIT = 50


@dataclass
class Repository:
    """An open VML repository."""

    path: Path
    git: Repo
    block_size: int
    page_size: int
    # A save rolls small packs up once there are more than this many
    # (`git config vml.autoPackLimit N`; 0 turns it off, as git's gc.autoPackLimit).
    auto_pack_limit: int = DEFAULT_AUTO_PACK_LIMIT
    # Which packs may be read: a pack whose index is damaged or disagrees
    # with it is set aside, for VML's readers and dulwich's store alike.
    packs: PackHealth = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.packs = PackHealth(self.path / "objects" / "pack")
        guard_store(self.git.object_store, self.packs)

    @property
    def vml_dir(self) -> Path:
        """VML's local, non-replicated folder inside the git directory."""
        return self.path / "vml"

    @property
    def objects_dir(self) -> Path:
        return self.path / "objects"

    def close(self) -> None:
        """Release the dulwich repository's files."""
        self.git.close()

    def reopen_store(self) -> None:
        """Forget cached pack lists so packs written since are seen."""
        # Reading the property rescans the pack folder for new packs.
        _ = self.git.object_store.packs

    @contextmanager
    def lock(self, timeout: float = 30.0, what: str = "repository") -> Iterator[None]:
        """Hold the repository's write lock.

        ``flock`` locks die with their process, so a killed vml never leaves
        a stale lock behind.  Waits up to ``timeout`` seconds, then raises
        :class:`RepositoryBusy`.

        A forest rewrite its command could not finish (killed between two of
        its name moves) is finished first: whoever holds the lock sees every
        entry, tag, branch and area on the rewritten commits (journal.py).
        """
        self.vml_dir.mkdir(exist_ok=True)
        with hold_flock(
            self.vml_dir / "lock",
            timeout,
            f"the {what} at {self.path} is locked by another vml command",
        ):
            for hook in LOCK_HOOKS:
                hook(self)
            yield

    # -- areas known to this repository (local bookkeeping only) --

    def known_areas(self) -> list[str]:
        """Absolute paths of the areas that have used this repository."""
        try:
            data = json.loads((self.vml_dir / "areas.json").read_text())
        except (OSError, ValueError):
            return []
        return [str(p) for p in data.get("areas", []) if isinstance(p, str)]

    def register_area(self, area: Path, *, locked: bool = False) -> None:
        """Remember ``area`` so ``vml areas``, ``rm`` and ``prune`` see it.

        Read-modify-write under the repository lock (``locked``: the caller
        holds it): two areas saving at once must not drop each other (rm and
        prune keep what areas hold).
        """
        key = str(area.resolve())
        if key in self.known_areas():
            return
        if locked:
            self._add_area(key)
            return
        with self.lock(what="repository (area list)"):
            self._add_area(key)

    def _add_area(self, key: str) -> None:
        areas = self.known_areas()
        if key in areas:
            return
        areas.append(key)
        write_atomic(
            self.vml_dir / "areas.json", json.dumps({"areas": sorted(areas)}, indent=1).encode()
        )


def _config_int(cfg: ConfigFile, key: bytes, default: int) -> int:
    try:
        raw = cfg.get((b"vml",), key)
    except KeyError:
        return default
    try:
        return int(raw)
    except ValueError:
        raise RepositoryNotFound(
            f"the repository's vml.{key.decode()} is {raw.decode(errors='replace')!r}, not a number",
            "fix it with `git config`, or use another repository",
        ) from None


def is_repository(path: Path) -> bool:
    """True when ``path`` looks like a VML (bare git) repository."""
    return (path / "objects").is_dir() and (path / "refs").is_dir() and (path / "HEAD").exists()


# What init_repository puts in its folder (dulwich's bare repository and vml/).
REPOSITORY_NAMES = (
    "HEAD",
    "branches",
    "config",
    "description",
    "hooks",
    "info",
    "objects",
    "refs",
    "vml",
)


def make_folder(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the folders made, deepest first."""
    missing: list[Path] = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing


def undo_made(folder: Path, names: Iterable[str], folders: Iterable[Path] = ()) -> None:
    """Remove what a failed command made: ``names`` in ``folder``, then ``folders`` left empty.

    ``folders`` (deepest first, as :func:`make_folder` returns them) go only
    when empty: what another program put there meanwhile stays, and the
    folders that hold it.
    """
    for name in names:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(OSError):
                p.unlink()
    for f in folders:
        with suppress(OSError):  # not empty: not only ours
            f.rmdir()


def init_repository(path: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> Repository:
    """Create a new, empty VML repository at ``path``.

    A failure (the disk full, a folder we may not write) removes what it
    made: the repository's files, and the folders it created if then empty.
    """
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE:
        raise UsageError(
            f"block size {block_size} is out of range",
            f"choose a power of two between {MIN_BLOCK_SIZE >> 10} KiB and {MAX_BLOCK_SIZE >> 20} MiB",
        )
    if block_size & (block_size - 1) or block_size % PAGE_SIZE:
        raise UsageError(
            f"block size {block_size} is not a power of two",
            "choose a power of two such as 256K, 1M or 4M",
        )
    if is_repository(path):
        raise UsageError(f"{path} is already a repository", "use it as it is")
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"{path} exists and is not empty", "choose a new or empty folder")
    made = make_folder(path)
    try:
        # The claim: only one process can create vml/, and it is made before
        # anything else, so another `vml init` of this folder stops here and
        # what this one removes on failure was surely its own.
        os.mkdir(path / "vml")
    except (FileExistsError, FileNotFoundError):
        undo_made(path, [], made)
        raise RepositoryBusy(
            f"{path} is being made a repository by another command",
            "wait for it and use that repository, or choose another folder",
        ) from None
    except BaseException:
        undo_made(path, [], made)
        raise
    before = set(os.listdir(path)) - {"vml"}
    try:
        _init_bare(path, block_size)
        return open_repository(path)
    except BaseException:
        # vml/ (the claim) last: until then no other init can start here.
        undo_made(path, [n for n in REPOSITORY_NAMES if n not in before], made)
        raise


def _init_bare(path: Path, block_size: int) -> None:
    repo = Repo.init_bare(str(path))
    try:
        _configure(repo, path, block_size)
    finally:
        repo.close()


def _configure(repo: Repo, path: Path, block_size: int) -> None:
    cfg = repo.get_config()
    cfg.set((b"vml",), b"formatVersion", str(FORMAT_VERSION).encode())
    cfg.set((b"vml",), b"blockSize", str(block_size).encode())
    cfg.set((b"vml",), b"pageSize", str(PAGE_SIZE).encode())
    # Blocks never delta against each other usefully; stop git's own repack
    # from spending hours trying.
    cfg.set((b"pack",), b"window", b"0")
    cfg.set((b"pack",), b"depth", b"0")
    write_config(cfg)
    (path / "description").write_text("VML repository of virtual machine entries\n")


def open_repository(path: Path) -> Repository:
    """Open the VML repository at ``path`` or raise :class:`RepositoryNotFound`."""
    if not is_repository(path):
        raise RepositoryNotFound(f"no VML repository at {path}")
    try:
        repo = Repo(str(path))
    except Exception as e:  # dulwich raises NotGitRepository and friends
        raise RepositoryNotFound(f"{path} is not a git repository ({e})") from None
    cfg = repo.get_config()  # read and parsed once: dulwich reads the file on each call
    version = _config_int(cfg, b"formatVersion", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        repo.close()
        raise RepositoryNotFound(
            f"{path} uses VML format {version}, newer than this vml understands",
            "upgrade vml",
        )
    block_size = _config_int(cfg, b"blockSize", DEFAULT_BLOCK_SIZE)
    page_size = _config_int(cfg, b"pageSize", PAGE_SIZE)
    if (
        not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
        or not 512 <= page_size <= block_size
        or page_size & (page_size - 1)
    ):
        repo.close()
        raise RepositoryNotFound(
            f"{path} has an impossible block size ({block_size}) or page size ({page_size})",
            "fix vml.blockSize / vml.pageSize with `git config`, or use another repository",
        )
    auto_pack_limit = _config_int(cfg, b"autoPackLimit", DEFAULT_AUTO_PACK_LIMIT)
    out = Repository(Path(path), repo, block_size, page_size, auto_pack_limit)
    for hook in OPEN_HOOKS:
        hook(out)  # readers too see a killed rewrite finished
    return out
