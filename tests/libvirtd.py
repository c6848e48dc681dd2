"""A libvirt daemon for the tests: started where none runs, stopped after the last user.

``libvirt_uri`` (a session fixture) yields ``qemu:///system`` once ``virsh``
reaches a daemon there, or skips saying why it cannot.  A daemon that runs
already is used as it is and never stopped.  Otherwise one is started for
the test session (pytest-xdist workers share it: a lock and a list of users
in ``$TMPDIR/vml-test-libvirtd`` say who started it and who still needs
it; the last user stops it, by its pid).

The daemon is started in a private mount namespace (``unshare -m``) where
``/etc/libvirt`` is a copy with a ``qemu.conf`` of our own, so the host's
configuration is left alone:

- ``user = "root"``: QEMU then runs as the tests do and can open their
  ``tmp_path`` folders (mode 0700);
- the QEMU capability cache stays valid.  Where ``/dev/kvm`` exists but the
  default QEMU user cannot open it (these machines: no vmx/svm, root-only
  ``/dev/kvm``), libvirt 9 finds KVM when it probes QEMU, then finds it not
  usable, throws the probe away and probes again at every domain start:
  ``virsh create`` took 64 s, ``virsh restore`` 8 s.  As root both agree,
  and they take 0.4 s and 0.5 s;
- ``stdio_handler = "file"``: QEMU's log goes to a file, no ``virtlogd``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

URI = "qemu:///system"
STATE = Path(tempfile.gettempdir()) / "vml-test-libvirtd"
QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'
DIRS = ("/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt")


def _up() -> bool:
    try:
        done = subprocess.run(["virsh", "-c", URI, "-q", "list"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def _locked() -> Iterator[dict[str, object]]:
    """The shared state ({"started": pid or None, "users": [pids]}), under a lock."""
    STATE.mkdir(exist_ok=True)
    with open(STATE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = STATE / "state.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {"started": None, "users": []}
        users = doc.get("users")
        doc["users"] = (
            [p for p in users if Path(f"/proc/{p}").exists()] if isinstance(users, list) else []
        )
        yield doc
        path.write_text(json.dumps(doc))


def _start() -> int:
    """Start libvirtd (see the module doc); its pid.  ``RuntimeError`` saying why not."""
    for tool in ("libvirtd", "unshare", "mount"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} is not installed (apt-get install libvirt-daemon "
                "libvirt-daemon-driver-qemu libvirt-clients)"
            )
    if os.geteuid() != 0:
        raise RuntimeError("starting libvirtd needs root")
    for d in DIRS:
        os.makedirs(d, exist_ok=True)
    etc = STATE / "etc"
    shutil.rmtree(etc, ignore_errors=True)
    if Path("/etc/libvirt").is_dir():
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
    etc.mkdir(exist_ok=True)
    (etc / "qemu.conf").write_text(QEMU_CONF)
    pidfile = STATE / "libvirtd.pid"
    pidfile.unlink(missing_ok=True)
    script = 'mount --bind "$1" /etc/libvirt && exec libvirtd --daemon --pid-file "$2"'
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(etc),
         str(pidfile)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"libvirtd did not start: {done.stderr.strip() or done.returncode}")
    deadline = time.monotonic() + 30
    while not _up():
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd started but virsh cannot reach it within 30 s")
        time.sleep(0.2)
    return int(pidfile.read_text().split()[0])


@pytest.fixture(scope="session")
def libvirt_uri() -> Iterator[str]:
    """``qemu:///system`` with a daemon behind it (see the module doc), or a skip."""
    if shutil.which("virsh") is None:
        pytest.skip("virsh is not installed (apt-get install libvirt-clients)")
    me = os.getpid()
    why = None
    with _locked() as doc:
        users = doc["users"]
        assert isinstance(users, list)
        if not _up():
            try:
                doc["started"] = _start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                why = str(e)
        if why is None:
            users.append(me)
    if why is not None:
        pytest.skip(f"no libvirt daemon here: {why}")
    try:
        yield URI
    finally:
        with _locked() as doc:
            users = [p for p in doc["users"] if p != me]  # type: ignore[attr-defined]
            doc["users"] = users
            started = doc.get("started")
            if not users and isinstance(started, int):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started, signal.SIGTERM)
                doc["started"] = None


@contextlib.contextmanager
def domain(uri: str, xml: Path) -> Iterator[str]:
    """A transient domain created from ``xml``, destroyed at the end; its name."""
    done = subprocess.run(["virsh", "-c", uri, "create", str(xml)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    name = done.stdout.split("'")[1]
    try:
        yield name
    finally:
        destroy(uri, name)


def destroy(uri: str, name: str) -> None:
    """Destroy the domain ``name`` if it runs (a transient one is then gone)."""
    subprocess.run(["virsh", "-c", uri, "destroy", name], capture_output=True)


def state(uri: str, name: str) -> str:
    """``virsh domstate`` of ``name`` (empty when there is no such domain)."""
    done = subprocess.run(["virsh", "-c", uri, "domstate", name], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def disks(uri: str, name: str) -> list[str]:
    """The sources of the domain's disks (``virsh domblklist``)."""
    done = subprocess.run(
        ["virsh", "-c", uri, "-q", "domblklist", name], capture_output=True, text=True
    )
    return [line.split(None, 1)[1] for line in done.stdout.splitlines() if line.strip()]


def domain_xml(
    name: str,
    area: Path,
    disk: str,
    memory_mib: int = 16,
    kernel: tuple[str, str, str] | None = None,
) -> str:
    """A TCG domain whose disk and serial console are files of ``area``.

    ``kernel``: (kernel, initrd, command line), files of the area; without
    one SeaBIOS finds nothing to boot and waits, which is a running VM too.
    QEMU runs as root (``seclabel``) whatever the daemon's default user.
    """
    boot = ""
    if kernel is not None:
        boot = (
            f"<kernel>{area / kernel[0]}</kernel><initrd>{area / kernel[1]}</initrd>"
            f"<cmdline>{kernel[2]}</cmdline>"
        )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{area / disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{area / "console.log"}' append='on'/>
      <target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""
