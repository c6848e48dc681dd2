"""Run an area's QEMU VM: the command line, starting it, its runtime files, saved states.

``vml run`` starts ``qemu-system-*`` from the area's description
(``description``) with what live saves need:

- the guest's RAM in a file of the area, ``<stem>.ram``
  (``memory-backend-file,share=on``), so a save reads memory as a flat file,
  every page at a fixed offset;
- a QMP socket, ``.vml/run/qmp.sock``, and the ``x-ignore-shared``
  migration capability, so a device-state save skips that RAM (~0.5 MB);
- ``-S`` (or ``-incoming defer`` to resume): nothing runs before VML has set
  the capability up, then ``cont``.

Runtime files live in ``<area>/.vml/run/``: ``qmp.sock`` (a symlink to a
short path when the area's path is too long for a unix socket),
``qemu.pid``, ``console.log`` (the serial console), ``qemu.log`` (QEMU's own
messages), ``run.json`` (how it was started) and ``exit`` (QEMU's exit
status, once it ended).  A small shell parent waits for QEMU and then
removes the memory file unless a saved state needs it: the memory of a VM
that is off is garbage and must not be saved with the area.

A saved running state, ``<stem>.vmstate``, is a header (``MAGIC``, then one
line of JSON: QEMU version, machine type, accelerator, memory size) followed
by QEMU's migration stream.  It goes with the memory file of the same stem.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vml.errors import AreaError, IncompatibleState, QMPError, VMControlError
from vml.plumbing.vm.description import QemuSpec
from vml.plumbing.vm.formats import data_ranges
from vml.plumbing.vm.ignore import VML_DIR

if TYPE_CHECKING:
    # Only a running VM talks QMP: a save at rest does not load it.
    from vml.plumbing.vm.qmp import QMPClient

RUN_DIR = "run"
STAGE_DIR = "stage"
MAGIC = b"VML-QEMU-STATE 1\n"
#: The memory backend's id; the same on every start, as migration requires.
RAM_ID = "vml-ram"
STATE_FD = "vmlstate"
#: Runstates of a VM that is stopped and may continue with ``cont``.
PAUSED = ("paused", "postmigrate", "prelaunch", "finish-migrate", "save-vm")


@dataclass(frozen=True)
class RunPaths:
    """The runtime files of the VM VML runs for ``area``."""

    area: Path

    @property
    def dir(self) -> Path:
        """``<area>/.vml/run``."""
        return self.area / VML_DIR / RUN_DIR

    @property
    def qmp(self) -> Path:
        """The QMP socket (or a symlink to it)."""
        return self.dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        """QEMU's pid, written by QEMU."""
        return self.dir / "qemu.pid"

    @property
    def console(self) -> Path:
        """The serial console's log."""
        return self.dir / "console.log"

    @property
    def log(self) -> Path:
        """QEMU's own messages (stderr)."""
        return self.dir / "qemu.log"

    @property
    def exit(self) -> Path:
        """QEMU's exit status, written when it ended."""
        return self.dir / "exit"

    @property
    def disk_list(self) -> Path:
        """The VM's disk images (NUL-separated), whose ``stat`` is taken when QEMU ends."""
        return self.dir / "disks"

    @property
    def closed(self) -> Path:
        """Each disk's size, mtime, ctime and inode as QEMU left them (written when it ended)."""
        return self.dir / "closed"

    @property
    def info(self) -> Path:
        """``run.json``: how the VM was started."""
        return self.dir / "run.json"

    @property
    def keeper_qmp(self) -> Path:
        """A second QMP socket, the dirty-range keeper's (``vml.plumbing.keeper``), for raw disks."""
        return self.dir / "keeper.sock"

    @property
    def keeper_lock(self) -> Path:
        """Locked (``flock``) by the keeper as long as it lives."""
        return self.dir / "keeper.lock"

    @property
    def keeper_log(self) -> Path:
        """What the keeper did, and why not (its ``stderr``)."""
        return self.dir / "keeper.log"

    @property
    def stage(self) -> Path:
        """``<area>/.vml/stage``: copies live saves make while the VM is paused (one folder per pid)."""
        return self.area / VML_DIR / STAGE_DIR

    def socket_target(self, link: Path | None = None) -> Path:
        """Where QEMU binds its QMP socket ``link`` (default ``qmp``): itself, or a short path if that is too long."""
        from vml.plumbing.vm.qmp import SUN_PATH_MAX

        link = (link or self.qmp).absolute()
        if len(os.fsencode(link)) <= SUN_PATH_MAX:
            return link
        digest = hashlib.sha256(os.fsencode(self.area.absolute())).hexdigest()[:20]
        return Path(tempfile.gettempdir()) / f"vml-{os.getuid()}" / f"{digest}.{link.stem}"


# --- the QEMU installed here -------------------------------------------------


@dataclass(frozen=True)
class QemuBuild:
    """One ``qemu-system-*`` binary: where, which version, which machine types."""

    binary: str
    version: str
    #: Machine type or alias -> concrete machine type (``q35`` -> ``pc-q35-7.2``).
    machines: dict[str, str]

    def resolve_machine(self, machine: str) -> str | None:
        """The concrete machine type ``machine`` names here, or None if unknown."""
        return self.machines.get(machine)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"7.2.22"`` -> ``(7, 2, 22)`` (non-numbers count as 0)."""
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


def qemu_build(arch: str) -> QemuBuild:
    """Find ``qemu-system-<arch>`` and ask it for its version and machine types."""
    binary = shutil.which(f"qemu-system-{arch}")
    if binary is None:
        pkg = {"x86_64": "qemu-system-x86", "i386": "qemu-system-x86"}.get(arch, "qemu-system")
        raise VMControlError(
            f"qemu-system-{arch} is not installed", f"install it (apt-get install {pkg})"
        )
    try:
        ver = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        mach = subprocess.run(
            [binary, "-machine", "help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VMControlError(f"cannot run {binary}: {e}", "check the QEMU installation") from e
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", ver.stdout)
    if m is None:
        raise VMControlError(f"{binary} --version says no version", "check the QEMU installation")
    machines: dict[str, str] = {}
    for line in mach.stdout.splitlines():
        parts = line.split()
        if not parts or line.startswith("Supported"):
            continue
        alias = re.search(r"\(alias of ([^)\s]+)\)", line)
        machines[parts[0]] = alias.group(1) if alias else parts[0]
    return QemuBuild(binary, m.group(1), machines)


_KVM_PROBE = r"""
import ctypes, fcntl, mmap, os, struct
kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
vm = fcntl.ioctl(kvm, 0xAE01, 0)                      # KVM_CREATE_VM
mem = mmap.mmap(-1, 4096)
mem[0xFF0] = 0xF4                                     # hlt at the reset vector
addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
fcntl.ioctl(vm, 0x4020AE46, struct.pack("=IIQQQ", 0, 0, 0xFFFFF000, 4096, addr))
vcpu = fcntl.ioctl(vm, 0xAE41, 0)                     # KVM_CREATE_VCPU
size = fcntl.ioctl(kvm, 0xAE04, 0)                    # KVM_GET_VCPU_MMAP_SIZE
run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
fcntl.ioctl(vcpu, 0xAE80, 0)                          # KVM_RUN
raise SystemExit(0 if struct.unpack_from("=I", run, 8)[0] == 5 else 1)  # KVM_EXIT_HLT
"""


def kvm_usable() -> bool:
    """Whether KVM really runs guests here.

    ``/dev/kvm`` may exist and even create VMs where the CPU has no
    virtualisation extensions (nested guests without them): QEMU then hangs
    in the guest's first instructions.  So: the CPU must show ``vmx`` or
    ``svm``, and a one-instruction guest (``hlt``) must run, in a child
    process that is killed if it hangs.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
        if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
            return False
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
        done = subprocess.run([sys.executable, "-c", _KVM_PROBE], capture_output=True, timeout=3)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# --- saved running states -----------------------------------------------------


@dataclass(frozen=True)
class StateHeader:
    """What a saved running state records about the QEMU that saved it."""

    qemu: str  # version, e.g. "7.2.22"
    machine: str  # concrete machine type, e.g. "pc-q35-7.2"
    arch: str
    accel: str
    memory_mib: int
    ram_file: str  # area-relative memory file that goes with it
    saved: str  # ISO time

    def encode(self) -> bytes:
        """The header as written at the start of the state file."""
        return MAGIC + json.dumps(asdict(self), sort_keys=True).encode() + b"\n"


def read_state_header(path: Path) -> tuple[StateHeader, int]:
    """Read a state file's header; return it and the offset of QEMU's stream."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            line = f.readline(65536)
    except OSError as e:
        raise AreaError(f"cannot read the saved state {path}: {e.strerror}", "") from e
    try:
        if magic != MAGIC:
            raise ValueError("no VML header")
        doc = json.loads(line)
        header = StateHeader(**{k: doc[k] for k in StateHeader.__dataclass_fields__})
        if not isinstance(header.memory_mib, int) or not isinstance(header.machine, str):
            raise ValueError("bad field types")
    except (ValueError, KeyError, TypeError) as e:
        raise IncompatibleState(
            f"{path.name} is not a saved state VML can resume ({e})",
            "boot afresh with `vml run --discard-state`",
        ) from None
    return header, len(magic) + len(line)


def check_loadable(header: StateHeader, spec: QemuSpec, build: QemuBuild, accel: str) -> None:
    """Refuse, with one clear line, a saved state this QEMU cannot load.

    QEMU loads states saved by the same or an older version, for a machine
    type it still knows, with the same memory size and accelerator.
    """
    if version_tuple(build.version) < version_tuple(header.qemu):
        raise IncompatibleState(
            f"the saved state of {spec.stem} was made by QEMU {header.qemu}; "
            f"this QEMU is {build.version} and cannot load it"
        )
    if header.machine not in build.machines:
        raise IncompatibleState(
            f"the saved state of {spec.stem} needs machine type {header.machine}, "
            f"which QEMU {build.version} does not have"
        )
    if header.arch != spec.arch or header.memory_mib != spec.memory_mib:
        raise IncompatibleState(
            f"the saved state of {spec.stem} is of a {header.arch} VM with "
            f"{header.memory_mib} MiB; the description says {spec.arch} with {spec.memory_mib} MiB",
            "put the description back as it was, or boot afresh with `vml run --discard-state`",
        )
    if header.accel != accel:
        raise IncompatibleState(
            f"the saved state of {spec.stem} was made under {header.accel}, not {accel}",
            f"resume it with --accel {header.accel} where that works",
        )


# --- the command line ---------------------------------------------------------


def _display_args(display: str) -> list[str]:
    if display == "none":
        return ["-display", "none"]
    if display.startswith("vnc="):
        return ["-device", "VGA", "-display", "none", "-vnc", display[4:]]
    return ["-device", "VGA", "-display", display]


def _disk_args(area: Path, spec: QemuSpec) -> list[str]:
    out: list[str] = []
    scsi = False
    for i, d in enumerate(spec.disks):
        path = str((area / d.path).absolute()).replace(",", ",,")
        drive = f"file={path},format={d.format},id=vml-disk{i},if=none"
        if d.interface == "virtio":
            dev = f"virtio-blk-pci,drive=vml-disk{i}"
        elif d.interface == "ide":
            dev = f"ide-hd,drive=vml-disk{i}"
        elif d.interface == "nvme":
            dev = f"nvme,drive=vml-disk{i},serial=vml{i}"
        else:
            if not scsi:
                out += ["-device", "virtio-scsi-pci,id=vml-scsi"]
                scsi = True
            dev = f"scsi-hd,drive=vml-disk{i},bus=vml-scsi.0"
        out += ["-drive", drive, "-device", dev]
    return out


def build_command(
    area: Path,
    spec: QemuSpec,
    build: QemuBuild,
    *,
    accel: str,
    machine: str,
    console: bool = False,
    incoming: bool = False,
    keeper: bool = False,
) -> list[str]:
    """The ``qemu-system-*`` command line that runs ``spec`` for ``area``.

    ``machine`` is the concrete machine type (a resumed state needs the one
    it was saved with).  ``console`` puts the serial console on the
    terminal (and still logs it); otherwise it goes to ``console.log``.
    ``keeper``: a second QMP socket, for the dirty-range keeper.
    """
    paths = RunPaths(area)
    area = area.absolute()
    ram = str(area / spec.ram_file).replace(",", ",,")
    log = str(paths.console.absolute()).replace(",", ",,")
    size = f"{spec.memory_mib}M"
    cmd = [
        build.binary,
        "-name",
        f"guest={spec.name.replace(',', ',,')}",
        "-machine",
        f"{machine},memory-backend={RAM_ID}",
        "-accel",
        accel,
        "-m",
        size,
        "-smp",
        str(spec.cpus),
        "-object",
        f"memory-backend-file,id={RAM_ID},size={size},mem-path={ram},share=on",
        "-nodefaults",
        "-no-user-config",
        *_display_args(spec.display),
    ]
    if console:
        cmd += [
            "-chardev",
            f"stdio,id=vml-console,mux=on,signal=off,logfile={log},logappend=on",
            "-serial",
            "chardev:vml-console",
            "-mon",
            "chardev=vml-console,mode=readline",
        ]
    else:
        cmd += ["-chardev", f"file,id=vml-console,path={log},append=on"]
        cmd += ["-serial", "chardev:vml-console"]
    cmd += ["-qmp", f"unix:{paths.socket_target()},server=on,wait=off"]
    if keeper:
        cmd += ["-qmp", f"unix:{paths.socket_target(paths.keeper_qmp)},server=on,wait=off"]
    cmd += ["-pidfile", str(paths.pidfile.absolute())]
    cmd += _disk_args(area, spec)
    if spec.network == "user":
        cmd += ["-nic", "user,model=virtio-net-pci"]
    else:
        cmd += ["-nic", "none"]
    for key in ("kernel", "initrd"):
        rel = getattr(spec, key)
        if rel:
            cmd += [f"-{key}", str(area / rel)]
    if spec.append:
        cmd += ["-append", spec.append]
    cmd += ["-S"]
    if incoming:
        cmd += ["-incoming", "defer"]
    cmd += list(spec.qemu_args)
    return cmd


def format_command(cmd: list[str]) -> str:
    """A command line as a shell would take it."""
    return " ".join(shlex.quote(c) for c in cmd)


# --- starting, watching, stopping ----------------------------------------------

#: The shell parent of a detached QEMU: wait for it, drop the memory file
#: unless a saved state needs it, note each disk's ``stat`` as QEMU left
#: it (a later write by anything else shows), then record QEMU's exit
#: status (last: who sees ``exit`` sees the clean-up done).
_WRAPPER = (
    '( run=$1 ram=$2 state=$3; shift 3; "$@" >>"$run/qemu.log" 2>&1 </dev/null; '
    'rc=$?; [ -e "$state" ] || rm -f "$ram"; rm -f "$run/qemu.pid"; '
    'xargs -0 stat -c "%s %.9Y %.9Z %i" -- <"$run/disks" >"$run/closed.tmp" '
    '&& mv "$run/closed.tmp" "$run/closed"; '
    'echo $rc >"$run/exit.tmp"; mv "$run/exit.tmp" "$run/exit" ) </dev/null >/dev/null 2>&1 &'
)


def write_disk_list(area: Path, spec: QemuSpec) -> None:
    """Name the disks whose ``stat`` the shell parent takes when QEMU ends."""
    paths = RunPaths(area)
    names = b"".join(os.fsencode((area / d.path).absolute()) + b"\0" for d in spec.disks)
    paths.disk_list.write_bytes(names)


def note_closed(area: Path, spec: QemuSpec) -> None:
    """Note each disk's ``stat`` now that QEMU ended (what the shell parent does, from Python)."""
    lines = []
    for d in spec.disks:
        st = os.stat(area / d.path)
        lines.append(
            f"{st.st_size} {st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d} "
            f"{st.st_ctime_ns // 10**9}.{st.st_ctime_ns % 10**9:09d} {st.st_ino}\n"
        )
    tmp = RunPaths(area).closed.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, RunPaths(area).closed)


def closed_stats(area: Path, spec: QemuSpec) -> dict[str, list[int]] | None:
    """Disk path -> ``[size, mtime_ns, ctime_ns, inode]`` as QEMU left it; None if unknown."""
    try:
        lines = RunPaths(area).closed.read_text().splitlines()
    except OSError:
        return None
    if len(lines) != len(spec.disks):
        return None
    out: dict[str, list[int]] = {}
    try:
        for d, line in zip(spec.disks, lines, strict=True):
            size, mtime, ctime, ino = line.split()
            out[d.path] = [int(size), _ns(mtime), _ns(ctime), int(ino)]
    except ValueError:
        return None
    return out


def _ns(text: str) -> int:
    sec, _, frac = text.partition(".")
    return int(sec) * 10**9 + int((frac + "000000000")[:9])


def prepare_run_dir(area: Path, keeper: bool = False) -> RunPaths:
    """Clear what a previous run left in ``.vml/run`` and make the sockets' places (``keeper``: its too)."""
    paths = RunPaths(area)
    paths.dir.mkdir(parents=True, exist_ok=True)
    # The keeper's lock too: a new file, as a keeper of an earlier run, should one still live, holds the old one.
    for p in (paths.qmp, paths.pidfile, paths.exit, paths.info, paths.log, paths.closed):
        p.unlink(missing_ok=True)
    for p in (paths.keeper_qmp, paths.keeper_lock, paths.keeper_log):
        p.unlink(missing_ok=True)
    for link in (paths.qmp, paths.keeper_qmp) if keeper else (paths.qmp,):
        target = paths.socket_target(link)
        if target != link.absolute():
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            link.symlink_to(target)
    return paths


def launch_detached(cmd: list[str], spec: QemuSpec, area: Path) -> None:
    """Start ``cmd`` in the background, in its own session, under the shell parent."""
    paths = RunPaths(area)
    ram = (area / spec.ram_file).absolute()
    state = (area / spec.state_file).absolute()
    write_disk_list(area, spec)
    with contextlib.suppress(OSError):
        paths.console.open("ab").close()
    parent = subprocess.Popen(
        ["/bin/sh", "-c", _WRAPPER, "sh", str(paths.dir.absolute()), str(ram), str(state), *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    parent.wait()  # the outer shell returns at once; the inner one lives on


def write_run_info(paths: RunPaths, doc: dict[str, Any]) -> None:
    """Record how the VM was started (``run.json``)."""
    tmp = paths.info.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, paths.info)


def read_run_info(area: Path) -> dict[str, Any]:
    """``run.json`` of the VM VML runs for ``area`` (empty if unreadable)."""
    try:
        doc = json.loads(RunPaths(area).info.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def log_tail(paths: RunPaths, lines: int = 3) -> str:
    """The last lines QEMU wrote to ``qemu.log``, on one line."""
    try:
        text = paths.log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text[-lines:])


def wait_for_qmp(
    paths: RunPaths, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> QMPClient:
    """Wait until QEMU listens on its QMP socket, and connect.

    Raises ``VMControlError`` with QEMU's own words if it ends first (its
    shell parent wrote ``exit``, or ``proc``, QEMU run in the foreground, ended).
    """
    from vml.plumbing.vm.qmp import QMPClient, is_listening

    deadline = time.monotonic() + timeout
    while True:
        if paths.exit.exists() or (proc is not None and proc.poll() is not None):
            why = log_tail(paths) or "no message"
            raise VMControlError(f"QEMU did not start: {why}", f"see {paths.log}")
        if is_listening(paths.qmp):
            return QMPClient.connect(paths.qmp, timeout=max(deadline - time.monotonic(), 5.0))
        if time.monotonic() > deadline:
            raise VMControlError(
                f"QEMU did not open its QMP socket in {timeout:.0f} s", f"see {paths.log}"
            )
        time.sleep(0.02)


def set_capabilities(client: QMPClient) -> None:
    """Turn on what live saves need: skip the shared memory file in migrations."""
    client.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
    )


def wait_finalized(client: QMPClient, timeout: float = 10.0) -> str:
    """After a migration ended: wait until QEMU's run state has left ``finish-migrate``.

    QEMU says a migration is ``completed`` (or cancelled) before it moves
    its run state on to ``postmigrate``: the migration thread sets the one,
    then takes the main lock for the other.  A ``cont`` in between is
    refused ("Migration is not finalized yet"): the guest stays paused, its
    disks inactive (handed over), and a merge of an overlay then fails with
    "Block node is read-only".  Returns the run state (still
    ``finish-migrate`` after ``timeout``: the ``cont`` that follows says so).
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        status = str(client.execute("query-status").get("status"))
        if status != "finish-migrate" or time.monotonic() > deadline:
            return status
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _wait_migration(client: QMPClient, what: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        info = client.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            wait_finalized(client)  # so that the caller's `cont` is not refused
            return info  # type: ignore[no-any-return]
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", status)
            raise VMControlError(f"QEMU could not {what}: {why}", "")
        if time.monotonic() > deadline:
            with contextlib.suppress(QMPError):
                client.execute("migrate_cancel")
            raise VMControlError(f"QEMU did not {what} in {timeout:.0f} s", "")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def save_device_state(
    client: QMPClient, dest: Path, header: StateHeader, timeout: float = 60.0
) -> int:
    """Write the header and QEMU's device state (migration stream) to ``dest``.

    The VM must be stopped.  The stream goes through a file descriptor passed
    over QMP (``getfd``), so no shell or helper process is involved.
    Returns the file's size.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, header.encode())
        client.execute("getfd", {"fdname": STATE_FD}, fds=[fd])
    finally:
        os.close(fd)  # QEMU holds its own copy now
    client.execute("migrate", {"uri": f"fd:{STATE_FD}"})
    _wait_migration(client, "save the device state", timeout)
    return dest.stat().st_size


#: The slowest a saved state is expected to load (bytes/s): sets the wait for a big one.
LOAD_FLOOR_RATE = 20e6


def load_device_state(client: QMPClient, path: Path, offset: int, timeout: float = 120.0) -> None:
    """Feed QEMU (started with ``-incoming defer``) the saved device state in ``path``.

    ``timeout`` grows with the state: a stream holding a big guest's RAM
    (a save through QMP) loads at the disk's pace, not in a fixed time.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    timeout = max(timeout, os.fstat(fd).st_size / LOAD_FLOOR_RATE)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        client.execute("getfd", {"fdname": STATE_FD}, fds=[fd])
    finally:
        os.close(fd)
    client.execute("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
    _wait_migration(client, "load the saved state", timeout)


def current_machine(client: QMPClient) -> str:
    """The concrete machine type of a running QEMU (``pc-q35-7.2``)."""
    kind = client.execute("qom-get", {"path": "/machine", "property": "type"})
    return str(kind).removesuffix("-machine")


# --- is it running? -----------------------------------------------------------


@dataclass(frozen=True)
class RunningVM:
    """A QEMU that VML started for an area and that still runs."""

    pid: int
    qmp: Path


def _alive_qemu(pid: int, needle: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line holds ``needle``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state != ["Z"] and needle.encode() in cmdline


def vml_vm(area: Path) -> RunningVM | None:
    """The QEMU VML runs for ``area``, if one is running.

    It must be the process in ``qemu.pid`` (alive, its command line naming
    this area's QMP socket, so a reused pid is not mistaken for it) and
    listen on that socket.
    """
    paths = RunPaths(area)
    try:
        pid = int(paths.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    from vml.plumbing.vm.qmp import is_listening

    if not _alive_qemu(pid, str(paths.socket_target())) or not is_listening(paths.qmp):
        return None
    return RunningVM(pid, paths.qmp)


def runstate(area: Path, timeout: float = 1.0) -> str | None:
    """QEMU's runstate (``running``, ``paused``, ``postmigrate``...) or None if unknown.

    Unknown also when another client (a save in progress) holds the socket
    for longer than ``timeout``.
    """
    from vml.plumbing.vm.qmp import QMPClient

    try:
        with QMPClient.connect(RunPaths(area).qmp, timeout=timeout) as c:
            st = c.execute("query-status", timeout=timeout)
    except QMPError:
        return None
    return str(st.get("status")) if isinstance(st, dict) else None


def run_status(area: Path) -> dict[str, object] | None:
    """``{"pid": N, "state": "running"|"paused"|...}`` when VML runs the area's VM, else None.

    ``state`` is ``busy`` while another client (a save) holds the QMP socket.
    """
    vm = vml_vm(area)
    if vm is None:
        return None
    return {"pid": vm.pid, "state": runstate(area) or "busy"}


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for process ``pid`` to end; whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive_qemu(pid, ""):
            return True
        time.sleep(0.05)
    return not _alive_qemu(pid, "")


def kill(pid: int) -> None:
    """End QEMU at once (SIGKILL), like pulling the plug."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def now_iso() -> str:
    """The time now, ISO 8601 UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- copies that keep holes ------------------------------------------------------

_FICLONE = 0x40049409


def copy_sparse(src: Path, dst: Path, *, skip_unwritten: bool = False) -> int:
    """Copy ``src`` to ``dst`` keeping holes, permission bits and mtime; return bytes copied.

    A reflink (``FICLONE``) where the file system shares blocks (btrfs, XFS)
    costs nothing; otherwise each data extent (``data_ranges``) goes through
    ``copy_file_range``, in the kernel.  Holes stay holes, and with
    ``skip_unwritten`` so do unwritten extents (they read as zeros; a file
    that has some has its dirty pages written back first: see
    ``data_ranges``).  The copy stands for ``src`` in an entry, so it
    carries ``src``'s mode and times.
    """
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        st = os.fstat(fi.fileno())
        try:
            copied = _copy_data(fi.fileno(), fo.fileno(), st.st_size, skip_unwritten)
        finally:
            os.fchmod(fo.fileno(), st.st_mode & 0o7777)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return copied


def _copy_data(fi: int, fo: int, size: int, skip_unwritten: bool) -> int:
    """The data of ``fi`` into ``fo`` (both open, ``fo`` empty); bytes copied (0 for a reflink)."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fo, _FICLONE, fi)
        return 0
    copied = 0
    for start, end in data_ranges(fi, size, skip_unwritten=skip_unwritten):
        off = start
        while off < end:
            n = os.copy_file_range(fi, fo, end - off, off, off)
            if n <= 0:
                break
            off += n
        copied += off - start
    os.ftruncate(fo, size)
    return copied
