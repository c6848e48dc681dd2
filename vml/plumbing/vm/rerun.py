"""Resume a running state saved through QMP: the QEMU command line it was saved from, again.

``resume_command`` adapts the saved command line (``resume.ResumeInfo``) to
the area it is checked out to; ``resume_qmp`` runs it in the background
under VML (``.vml/run/``, as ``vml run`` does), feeds it the saved stream
and continues the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vml.errors import AreaError, HostileRepository, IncompatibleState, VMControlError
from vml.plumbing.vm.libvirt import inside, parse_domain, remap_xml, virsh
from vml.plumbing.vm.qemu import (
    RunPaths,
    load_device_state,
    now_iso,
    prepare_run_dir,
    version_tuple,
    wait_finalized,
    wait_for_qmp,
    write_run_info,
)
from vml.plumbing.vm.qmp import QMPClient
from vml.plumbing.vm.resume import ResumeInfo, discard, remap

#: Options of the user's command line that ``vml run`` replaces (with their argument).
_REPLACED_WITH_ARG = ("-qmp", "-qmp-pretty", "-monitor", "-pidfile", "-incoming")
_REPLACED = ("-daemonize", "-S")


def _machine_arg(value: str, machine: str) -> str:
    """A ``-machine`` argument with its type replaced by ``machine``."""
    parts = re.split(r"(?<!,),(?!,)", value)
    for i, p in enumerate(parts):
        if p.startswith("type="):
            parts[i] = f"type={machine}"
            return ",".join(parts)
    if parts and "=" not in parts[0]:
        parts[0] = machine
    else:
        parts.insert(0, machine)
    return ",".join(parts)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: The programs a saved command line may run: QEMU's system emulators.
_QEMU_NAME = re.compile(r"qemu-system-[a-z0-9_]+|qemu-kvm")

#: QEMU options that take no argument; every other option takes one.
_FLAGS = _words(
    "-h -help -version -mem-prealloc -audio-help -snapshot -usb -nographic -portrait "
    "-full-screen -win2k-hack -no-fd-bootchk -no-acpi -no-hpet -singlestep -preconfig -S -s "
    "-enable-kvm -xen-attach -xen-domid-restrict -no-reboot -no-shutdown -daemonize "
    "-only-migratable -nodefaults -no-user-config -async-teardown -enable-sync-profile "
    "-no-quit -alt-grab -ctrl-grab -no-frame -sdl -curses -localtime -no-kvm -enable-fips "
    "-show-cursor -semihosting -nodefconfig"
)
#: Options whose argument is one file QEMU opens or writes.
_FILE_OPTS = _words(
    "-kernel -initrd -dtb -bios -pflash -hda -hdb -hdc -hdd -cdrom -fda -fdb -sd -mtdblock "
    "-mem-path -D -option-rom -dump-vmstate -writeconfig"
)
#: Of those, the ones QEMU only reads (a kernel, firmware code, a CD-ROM image).
_READONLY_OPTS = _words("-kernel -initrd -dtb -bios -cdrom -option-rom")
#: Of those, the ones that take an image name (``file:``, ``json:``, ``nbd:``...), as ``-drive file=``.
_IMAGE_OPTS = _words("-hda -hdb -hdc -hdd -cdrom -fda -fdb -sd -mtdblock -pflash")
#: Options whose argument is a character device: ``file:PATH``, ``unix:PATH``, a device node.
_CHARDEV_OPTS = _words("-serial -parallel -debugcon -gdb -vnc -qtest -virtioconsole")
#: Options taking an argument that names no file (QEMU 7.2's ``-help``).
_PLAIN_OPTS = _words(
    "-cpu -smp -m -k -name -uuid -append -boot -L -vga -rotate -usbdevice -display -accel -numa "
    "-seed -d -dfilter -xen-domid -action -loadvm -icount -watchdog-action -watchdog -echr "
    "-chroot -runas -sandbox -msg -overcommit -compat -mon -iscsi -add-fd -tb-size -realtime "
    "-audio -soundhw -rtc"
)
#: Options VML does not run: they load code, or name files VML cannot see.
_REFUSED = frozenset(("-plugin", "-readconfig"))
#: Keys (the last part of a dotted key) of ``key=value`` arguments that name files.
_FILE_KEYS = _words("file filename path mem-path logfile dumpdtb evdev events cancel-path romfile")
#: Keys naming programs QEMU runs (``-netdev tap,script=``); only ``no`` is accepted.
_EXEC_KEYS = frozenset(("script", "downscript", "helper"))


def _split_opts(value: str) -> list[str]:
    """QEMU's ``a=b,c=d`` split at single commas (``,,`` is a comma, kept doubled)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur, i = cur + ",,", i + 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    return [*parts, cur]


PathFn = Callable[[str], str]


class _CommandPaths:
    """Finds the files a QEMU command line names, and maps each through ``fn``.

    Files QEMU only reads (``-cdrom``, ``-kernel``, a ``-drive`` with
    ``readonly=on`` or ``media=cdrom``, a read-only ``-blockdev``) go through
    ``readonly`` instead.
    """

    def __init__(self, fn: PathFn, readonly: PathFn | None = None) -> None:
        self.fn = fn
        self.readonly = readonly or fn

    @contextlib.contextmanager
    def _reading(self, only: bool) -> Iterator[None]:
        """Within: files are mapped as read-only ones when ``only``."""
        fn = self.fn
        if only:
            self.fn = self.readonly
        try:
            yield
        finally:
            self.fn = fn

    def image(self, value: str) -> str:
        """An image name: a path, or ``file:``/``json:`` one; other protocols are not files."""
        m = re.match(r"([\w+.-]+):", value)
        if m is None:
            return self.fn(value)
        proto, rest = m.group(1), value[m.end() :]
        if proto == "file":
            return "file:" + self.fn(rest)
        if proto == "json":
            return "json:" + self.json(rest, "-drive")
        return value

    def keyed(self, opt: str, key: str, value: str) -> str:
        """The value of ``key`` in ``opt``'s argument, its files mapped."""
        last = key.rsplit(".", 1)[-1]
        if last in _EXEC_KEYS and value not in ("", "no"):
            raise IncompatibleState(
                f"the saved command line runs a program ({opt} {key}={value}), "
                "which VML does not do",
                "resume it by hand (the area's *.resume.json says how)",
            )
        if last not in _FILE_KEYS or (opt == "-blockdev" and last == "file"):
            return value  # -blockdev file=: a node's name, or its options
        if opt == "-drive" and last == "file":
            return self.image(value)
        return self.fn(value)

    def json(self, text: str, opt: str) -> str:
        """A JSON argument (``-blockdev {...}``, ``json:{...}``), its files mapped."""
        try:
            doc = json.loads(text)
        except ValueError:
            raise IncompatibleState(
                f"the saved command line has a {opt} argument VML cannot read: {text[:60]}",
                "resume it by hand (the area's *.resume.json says how)",
            ) from None
        with self._reading(isinstance(doc, dict) and doc.get("read-only") is True):
            return self._json(doc, opt)

    def _json(self, doc: Any, opt: str) -> str:

        def walk(node: Any) -> Any:
            if isinstance(node, list):
                return [walk(v) for v in node]
            if not isinstance(node, dict):
                return node
            out = {}
            for k, v in node.items():
                out[k] = self.keyed(opt, str(k), v) if isinstance(v, str) else walk(v)
            return out

        return json.dumps(walk(doc), separators=(",", ":"))

    def opts(self, opt: str, value: str) -> str:
        """A ``key=value,...`` argument (or a JSON one), its files mapped."""
        if value.lstrip().startswith("{"):
            return self.json(value, opt)
        parts = _split_opts(value)
        flags = {p.strip().lower() for p in parts}
        only = opt == "-drive" and bool(
            flags & {"readonly=on", "readonly=true", "readonly=yes", "media=cdrom"}
        )
        with self._reading(only):
            for i, part in enumerate(parts):
                key, eq, raw = part.partition("=")
                if not eq:
                    continue
                val = raw.replace(",,", ",")
                new = self.keyed(opt, key, val)
                if new != val:
                    parts[i] = f"{key}={new.replace(',', ',,')}"
        return ",".join(parts)

    def chardev(self, value: str) -> str:
        """A character device argument (``file:PATH``, ``unix:PATH,server``, ``/dev/ttyS0``)."""
        for prefix in ("file:", "pipe:"):
            if value.startswith(prefix):
                return prefix + self.fn(value[len(prefix) :])
        if value.startswith("unix:"):
            first, *rest = _split_opts(value[5:])
            new = self.fn(first.replace(",,", ",")).replace(",", ",,")
            return ",".join(["unix:" + new, *rest])
        return self.fn(value) if value.startswith("/") else value

    def argument(self, opt: str, value: str) -> str:
        """The argument of option ``opt``, its files mapped."""
        if opt in _REFUSED:
            raise IncompatibleState(
                f"the saved command line has {opt} {value}, which VML does not run "
                "(it loads code or files VML cannot check)",
                "resume it by hand (the area's *.resume.json says how)",
            )
        with self._reading(opt in _READONLY_OPTS):
            if opt in _IMAGE_OPTS:
                return self.image(value)
            if opt in _FILE_OPTS:
                return self.fn(value)
        if opt in _CHARDEV_OPTS:
            return self.chardev(value)
        if opt in _PLAIN_OPTS:
            return value
        # Options of key=value arguments, and any VML does not know: checked as such.
        return self.opts(opt, value)


def map_command_paths(
    args: list[str], fn: PathFn, bare: PathFn, readonly: PathFn | None = None
) -> list[str]:
    """``args`` (a QEMU command line without its program) with each file it names mapped.

    ``fn`` maps the files of known options, and the words that follow no
    option (QEMU takes them for disk images); ``bare`` maps the arguments
    of options VML does not know, which might be files; ``readonly`` (by
    default ``fn``) the files QEMU only reads.
    """
    paths, out, i = _CommandPaths(fn, readonly), [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            out.append(paths.image(a))
            i += 1
            continue
        opt = "-" + a.lstrip("-")
        if opt in _FLAGS or i + 1 == len(args):
            out.append(a)
            i += 1
            continue
        value = args[i + 1]
        known = opt in _FILE_OPTS | _CHARDEV_OPTS | _PLAIN_OPTS | _REFUSED or value.startswith("{")
        if known or "=" in value:
            out += [a, paths.argument(opt, value)]
        else:  # an option VML does not know, or a key-less value: it may be a file
            out += [a, bare(value)]
        i += 2
    return out


class _Remap:
    """Paths of the area a state was saved from, moved into the area it resumes in.

    A path reaches the old area by its name (``info.area``, resolved when
    saved), through a symbolic link (compared by real path), or relative to
    the folder QEMU ran in (``info.cwd``): each becomes the same file of the
    new area.  ``outside`` collects the files that are still not in the new
    area (relative ones resolved against ``cwd``, where QEMU will run).
    """

    def __init__(self, area: Path, info: ResumeInfo) -> None:
        self.old = info.area.rstrip("/") or "/"
        self.olds = {self.old, os.path.realpath(self.old)}
        self.new = str(area.absolute())
        self.real_new = os.path.realpath(area)
        self.old_cwd = info.cwd
        self.cwd = self.new
        if info.cwd:
            cwd = self.into_area(os.path.normpath(os.path.join("/", info.cwd)))
            if os.path.isdir(cwd) and self.inside(cwd):
                self.cwd = cwd
        self.outside: list[str] = []

    def into_area(self, path: str) -> str:
        """Absolute ``path`` in the new area if it reaches the old one, else itself."""
        norm = os.path.normpath(path)
        if self.inside(norm):
            return norm if norm == path else path
        for candidate in (norm, os.path.realpath(norm)):
            for old in self.olds:
                if candidate == old or candidate.startswith(old.rstrip("/") + "/"):
                    rel = os.path.relpath(candidate, old)
                    return self.new if rel == "." else os.path.join(self.new, rel)
        return path

    def inside(self, path: str) -> bool:
        """Whether ``path`` (relative to ``cwd``) is a file of the new area, or a device."""
        real = os.path.realpath(os.path.join(self.cwd, path))
        if real == self.real_new or real.startswith(self.real_new.rstrip("/") + "/"):
            return True
        with contextlib.suppress(OSError):
            return stat.S_ISCHR(os.stat(real).st_mode)  # /dev/urandom, a tty: no data to lose
        return False

    def file(self, path: str) -> str:
        """A file a known option names: made absolute, moved into the new area, checked."""
        if not path:
            return path
        if not os.path.isabs(path) and self.old_cwd:
            path = os.path.join(self.old_cwd, path)
        return self._check(self.into_area(path) if os.path.isabs(path) else path)

    def read_only(self, path: str) -> str:
        """A file QEMU only reads: moved into the new area if it was in the old; may be elsewhere.

        A firmware image from ``/usr/share`` or an ISO in a shared folder is
        the same file for the resumed guest; reading it loses nothing.
        """
        if not path:
            return path
        if not os.path.isabs(path) and self.old_cwd:
            path = os.path.join(self.old_cwd, path)
        return self.into_area(path) if os.path.isabs(path) else path

    def word(self, value: str) -> str:
        """A word that may be a file: moved if it is an absolute path into the old area; checked.

        A relative word is left as it is (it may be no file at all): QEMU
        runs in ``cwd``, inside the new area, and it is checked there.
        """
        return self._check(self.into_area(value) if os.path.isabs(value) else value)

    def _check(self, path: str) -> str:
        if not self.inside(path):
            self.outside.append(path)
        return path


def check_program(command: tuple[str, ...] | list[str]) -> None:
    """Refuse a saved command line whose program is not a QEMU system emulator."""
    name = Path(command[0]).name if command else ""
    if not _QEMU_NAME.fullmatch(name):
        raise HostileRepository(
            f"the saved running state would run {command[0] if command else 'nothing'!r}, "
            "not a QEMU (qemu-system-*): VML does not run it",
            "do not resume this entry; remove the area's *.resume.json to use its disks",
        )


def resume_command(area: Path, info: ResumeInfo) -> list[str]:
    """The command line that resumes ``info`` in ``area``: the saved one, adapted.

    Paths into the area it was saved from point into ``area``; the machine
    type is the concrete one the state was saved with; the user's QMP and
    monitor sockets, pid file, ``-daemonize`` and ``-S`` give way to VML's
    own (``.vml/run/``), and it waits for the state (``-incoming defer``).
    Refused: a program that is not QEMU (``HostileRepository``), and a
    command line naming a file outside ``area`` (``AreaError``): resuming
    must not touch another area's disks, nor anything else.
    """
    if not info.command:
        raise IncompatibleState(
            "the saved running state does not record QEMU's command line "
            "(it could not be read when it was saved)",
            info.resume.replace("`vml run AREA` resumes it; by hand: ", "resume it with "),
        )
    check_program(info.command)
    old, new = info.area, str(area.absolute())
    cmd: list[str] = []
    args = list(info.command[1:])
    machine_seen = False
    i = 0
    while i < len(args):
        a = args[i]
        opt = "-" + a.lstrip("-") if a.startswith("-") else a
        if opt in _REPLACED_WITH_ARG:
            i += 2
            continue
        if opt in _REPLACED:
            i += 1
            continue
        if opt in ("-machine", "-M") and i + 1 < len(args):
            cmd += [a, _machine_arg(remap(args[i + 1], old, new), info.machine)]
            machine_seen = True
            i += 2
            continue
        cmd.append(remap(a, old, new))
        i += 1
    if not machine_seen:
        cmd += ["-machine", info.machine]
    moved = _Remap(area, info)
    cmd = [info.command[0], *map_command_paths(cmd, moved.file, moved.word, moved.read_only)]
    if moved.outside:
        raise AreaError(
            f"the saved command line names files outside the area {area}: "
            + ", ".join(dict.fromkeys(moved.outside)),
            "resuming would use them; copy them into the area and save again, "
            "or resume it by hand (the area's *.resume.json says how)",
        )
    paths = RunPaths(area)
    cmd += ["-qmp", f"unix:{paths.socket_target()},server=on,wait=off"]
    cmd += ["-pidfile", str(paths.pidfile.absolute()), "-S", "-incoming", "defer"]
    return cmd


def resume_cwd(area: Path, info: ResumeInfo) -> Path:
    """The folder a resumed QEMU runs in: its old one moved into ``area``, or ``area``."""
    return Path(_Remap(area, info).cwd)


def _afresh(rel: str, info: ResumeInfo) -> str:
    """How to give up a saved running state: the files to remove."""
    return f"or remove {rel} and {info.state} from the area to start the VM afresh yourself"


def check_qemu(
    info: ResumeInfo, binary: str, area: Path, rel: str, *, timeout: float = 30.0
) -> str:
    """The QEMU ``binary`` as an absolute path; refuse one missing, older, or not QEMU.

    ``binary`` is a name found on ``PATH`` or an absolute path to an
    executable outside ``area`` (which a repository could fill).
    """
    check_program([binary])
    found = shutil.which(binary) if "/" not in binary else binary
    real = os.path.realpath(found) if found else ""
    if (
        found is None
        or not os.path.isabs(found)
        or not os.path.isfile(real)
        or not os.access(real, os.X_OK)
    ):
        raise IncompatibleState(
            f"the saved running state needs {binary}, which is not here",
            f"install QEMU {info.qemu} or newer, {_afresh(rel, info)}",
        )
    if real.startswith(os.path.realpath(area).rstrip("/") + "/"):
        raise HostileRepository(
            f"the saved running state would run {binary}, a file of the area: VML does not",
            "do not resume this entry; remove the area's *.resume.json to use its disks",
        )
    try:
        done = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise IncompatibleState(
            f"{found} --version did not answer in {timeout:.0f} s",
            f"check that this QEMU works (run `{found} --version`), {_afresh(rel, info)}",
        ) from None
    except OSError as e:
        raise IncompatibleState(
            f"{found} cannot be run: {e.strerror or e}",
            f"install QEMU {info.qemu} or newer, {_afresh(rel, info)}",
        ) from None
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", done.stdout)
    if m is None or version_tuple(m.group(1)) < version_tuple(info.qemu):
        raise IncompatibleState(
            f"the saved running state was made by QEMU {info.qemu}; {found} is "
            f"{m.group(1) if m else 'of unknown version'} and cannot load it",
            f"install QEMU {info.qemu} or newer, {_afresh(rel, info)}",
        )
    return found


def restored_xml(area: Path, info: ResumeInfo, uri: str) -> str:
    """The domain XML ``virsh restore`` gets to resume ``info`` in ``area`` (its paths moved)."""
    text = virsh(uri, "save-image-dumpxml", str((area / info.state).absolute()), "--security-info")
    return remap_xml(text, info.area, str(area.absolute()))


def check_restore_xml(area: Path, xml: str) -> None:
    """Refuse a domain XML that would write a file outside ``area`` (``AreaError``).

    Its disks that are written, its UEFI variables (``<nvram>``) and the
    files its consoles write must be files of the area: a path left
    pointing into the area it was saved from (through a symbolic link, say)
    would resume against that area's disks.
    """
    dom = parse_domain(xml)
    written: list[tuple[str, str | None]] = [
        (d.target or "disk", d.source)
        for d in dom.disks
        if d.device not in ("cdrom", "floppy") and not d.readonly and d.source
    ]
    root = ET.fromstring(xml)
    written += [("nvram", (el.text or "").strip()) for el in root.iter("nvram") if el.text]
    for dev in root.iterfind("devices/*[@type='file']"):
        written += [(dev.tag, src.get("path")) for src in dev.iterfind("source") if src.get("path")]
    outside = [f"{what} ({path})" for what, path in written if inside(area, path) is None]
    if outside:
        raise AreaError(
            f"the saved domain would write files outside the area {area}: " + ", ".join(outside),
            "resuming would use them; resume it by hand (the area's *.resume.json says how)",
        )


#: The shell parent of a resumed QEMU: wait for it, then record its exit status.
_WRAPPER = (
    '( run=$1; shift; "$@" >>"$run/qemu.log" 2>&1 </dev/null; rc=$?; rm -f "$run/qemu.pid"; '
    'echo $rc >"$run/exit.tmp"; mv "$run/exit.tmp" "$run/exit" ) </dev/null >/dev/null 2>&1 &'
)


def resume_qmp(area: Path, rel: str, info: ResumeInfo, cmd: list[str]) -> None:
    """Start ``cmd`` (``resume_command``) in the background, load the state, continue.

    The caller holds the area's lock.  The state and resume file are deleted
    once the guest runs; on failure QEMU is ended and both stay.
    """
    paths = prepare_run_dir(area)
    write_run_info(
        paths,
        {"accel": info.accel, "machine": info.machine, "qemu": info.qemu, "command": cmd,
         "description": rel, "started": now_iso()},
    )  # fmt: skip
    # Relative names in the command line are relative to QEMU's folder then.
    subprocess.Popen(
        ["/bin/sh", "-c", _WRAPPER, "sh", str(paths.dir.absolute()), *cmd],
        cwd=resume_cwd(area, info),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    ).wait()
    try:
        with wait_for_qmp(paths) as client:
            try:
                load_device_state(client, area / info.state, 0)
            except VMControlError as e:
                raise IncompatibleState(
                    f"QEMU could not load the saved running state: {e.message}",
                    "remove the area's *.resume.json and state to start afresh",
                ) from e
            client.execute("cont")
    except BaseException:
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(paths.pidfile.read_text().split()[0]), 9)
        raise
    discard(area, rel)


#: Migration states in which a migration still runs (``query-migrate``).
_MIGRATING = ("setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling")
#: Run states ``cont`` continues from.
_CONTINUABLE = ("paused", "postmigrate", "prelaunch", "finish-migrate")


def continue_qmp(qmp: Path, *, timeout: float = 30.0) -> bool:
    """``cont`` the QEMU on ``qmp`` if it is paused; whether it was running already.

    A ``vml commit --qmp`` killed mid-migration can leave QEMU migrating,
    or paused before the switch-over (``finish-migrate``, ``pre-switchover``)
    with ``pause-before-switchover`` on: that migration (a save's, whose
    saver is gone) is cancelled first, waiting up to ``timeout`` seconds,
    and the capability is turned off again, so the next migration is not
    held up either.
    """
    with QMPClient.connect(qmp) as c:
        status = c.execute("query-status").get("status")
        migration = str(c.execute("query-migrate").get("status", "none"))
        caps = {
            x.get("capability"): x.get("state") for x in c.execute("query-migrate-capabilities")
        }
        held = bool(caps.get("pause-before-switchover"))
        if migration in _MIGRATING and (held or status != "running"):
            if migration != "cancelling":
                c.execute("migrate_cancel")
            migration = _wait_migration_end(c, qmp, timeout)
        if held and migration not in _MIGRATING:
            c.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "pause-before-switchover", "state": False}]},
            )
        now = c.execute("query-status").get("status")
        if now == "finish-migrate" and migration not in _MIGRATING:
            now = wait_finalized(c, timeout)  # the migration ended; QEMU is finalizing it
        if now == "running":
            return bool(status == "running")
        if now not in _CONTINUABLE:
            raise VMControlError(
                f"the QEMU on {qmp} is {now} and cannot be continued",
                "see QEMU's own output; `query-status` on its QMP socket says more",
            )
        c.execute("cont")
    return False


def _wait_migration_end(c: QMPClient, qmp: Path, timeout: float) -> str:
    """Wait until the migration on ``c`` is over (cancelled, failed, completed); its status."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(c.execute("query-migrate").get("status", "none"))
        if status not in _MIGRATING:
            return status
        if time.monotonic() > deadline:
            raise VMControlError(
                f"the migration of the QEMU on {qmp} did not end in {timeout:.0f} s ({status})",
                "try again, or end it with QMP `migrate_cancel` and continue it with `cont`",
            )
        time.sleep(0.02)
