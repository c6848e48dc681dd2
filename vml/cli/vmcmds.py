"""Commands that run the area's QEMU VM: ``vml vm init``, ``vml run``, ``vml stop``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vml.cli.common import AreaArg, Connect, Json, Quiet, flag, handled, qmp_option
from vml.cli.params import Count, Memory, Seconds
from vml.cli.plain import escape
from vml.cli.render import emit_json, out, size

if TYPE_CHECKING:
    from vml.porcelain.run import RunResult

# Commands import their porcelain when they run (start-up time: see common.py).

commands = typer.Typer()
vm_app = typer.Typer(
    name="vm",
    help="Describe the area's QEMU VM for `vml run`.",
    no_args_is_help=True,
)
commands.add_typer(vm_app, name="vm")


@vm_app.command("init")
@handled
def vm_init(
    area: AreaArg = Path("."),
    disk: Annotated[
        list[Path] | None,
        typer.Option("--disk", help="A disk image in the area (raw or qcow2); repeat for more."),
    ] = None,
    memory: Annotated[
        int, typer.Option("--memory", help="RAM, e.g. 256M or 2G.", click_type=Memory())
    ] = "1G",  # type: ignore[assignment]  # parsed by Memory into MiB
    cpus: Annotated[int, typer.Option("--cpus", help="Virtual CPUs.", click_type=Count())] = 1,
    kernel: Annotated[
        Path | None, typer.Option("--kernel", help="Boot this kernel (copied in if outside).")
    ] = None,
    initrd: Annotated[
        Path | None, typer.Option("--initrd", help="Its initrd (copied in if outside).")
    ] = None,
    append: Annotated[str | None, typer.Option("--append", help="Kernel command line.")] = None,
    qemu_arg: Annotated[
        list[str] | None,
        typer.Option("--qemu-arg", help="An extra qemu-system argument (--qemu-arg=-no-reboot)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The VM's name (default: the area's).")
    ] = None,
    machine: Annotated[str, typer.Option("--machine", help="QEMU machine type.")] = "q35",
    network: Annotated[str, typer.Option("--network", help="user or none.")] = "user",
    display: Annotated[
        str, typer.Option("--display", help="none, gtk, sdl or vnc=:N (default none).")
    ] = "none",
    interface: Annotated[
        str, typer.Option("--interface", help="How disks attach: virtio, ide, scsi or nvme.")
    ] = "virtio",
    no_copy: Annotated[
        bool, flag("--no-copy", "Refuse a kernel or initrd outside the area.")
    ] = False,
    force: Annotated[bool, flag("--force", "Replace the area's description.")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Write AREA's VM description (<name>.qemu.json) for `vml run`."""
    from vml.porcelain.vminit import vm_init as init_mod

    res = init_mod(
        area,
        disks=disk or [],
        memory=memory,
        cpus=cpus,
        kernel=kernel,
        initrd=initrd,
        append=append,
        qemu_args=qemu_arg or [],
        name=name,
        machine=machine,
        network=network,
        display=display,
        interface=interface,
        copy_boot=not no_copy,
        force=force,
    )
    if json_:
        emit_json(res)
        return
    spec = res.spec
    disks = ", ".join(f"{d.path} ({d.format})" for d in spec.disks)
    out.print(
        f"wrote {escape(res.description)}: {escape(spec.name)}, {size(spec.memory_mib << 20)} "
        f"of memory, {spec.cpus} CPU{'s' if spec.cpus > 1 else ''}, disks {escape(disks)}"
    )
    for c in res.copied:
        out.print(f"[yellow]note:[/yellow] copied {escape(c)} into the area")
    out.print(f"start it with `vml run {escape(str(area))}`")


def _started(res: RunResult) -> None:
    how = "resumed" if res.resumed else "started"
    if res.domain is not None:
        out.print(
            f"resumed the VM in {escape(res.area)} as libvirt domain {escape(res.domain)} "
            f"({escape(res.machine)})"
        )
        return
    out.print(
        f"{how} the VM in {escape(res.area)} under QEMU (pid {res.pid}, {res.accel}, {res.machine})"
    )


@commands.command()
@handled
def run(
    area: AreaArg = Path("."),
    dry_run: Annotated[
        bool, flag("--dry-run", "Print the QEMU command line, start nothing.")
    ] = False,
    console: Annotated[
        bool, flag("--console", "Stay in the foreground with the serial console here.")
    ] = False,
    accel: Annotated[
        str | None, typer.Option("--accel", help="kvm or tcg (default: kvm where it works).")
    ] = None,
    cont: Annotated[
        bool, flag("--continue", "Continue a VM that is paused (after a save).")
    ] = False,
    discard_state: Annotated[
        bool, flag("--discard-state", "Drop a saved running state and boot afresh.")
    ] = False,
    qmp: Annotated[
        Path | None, qmp_option("With --continue: the QMP socket of a QEMU VML did not start.")
    ] = None,
    connect: Connect = None,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Start the VM of AREA with QEMU (resuming a saved running state)."""
    from vml.plumbing.vm.qemu import format_command
    from vml.porcelain import run as run_mod

    def attach(res: RunResult) -> None:
        """Say what is running before the terminal goes to the console."""
        _started(res)
        out.print("serial console follows; Ctrl-A X quits QEMU, Ctrl-A C its monitor")

    res = run_mod.run(
        area,
        accel=accel,
        dry_run=dry_run,
        console=console,
        cont=cont,
        discard_state=discard_state,
        on_console=attach,
        qmp=qmp,
        libvirt_uri=connect or None,
    )
    if json_:
        emit_json(res)
        return
    if res.dry_run:
        out.print(format_command(res.command), markup=False)
        return
    if res.continued:
        state = "was running already" if res.already_running else "continues"
        pid = f" (QEMU pid {res.pid})" if res.pid else ""
        out.print(f"the VM in {escape(res.area)} {state}{pid}")
        return
    if console:
        out.print(f"QEMU ended (exit status {res.exit_status})")
        return
    _started(res)
    if res.domain is not None:
        out.print(
            f"`virsh console {escape(res.domain)}` or virt-manager shows it; "
            f"`virsh shutdown {escape(res.domain)}` powers it off"
        )
        return
    out.print(f"console: {escape(res.console_log)}; `vml stop {escape(str(area))}` powers it off")


@commands.command()
@handled
def stop(
    area: AreaArg = Path("."),
    save: Annotated[
        bool, flag("--save", "Save the running state and quit (`vml run` resumes it).")
    ] = False,
    kill: Annotated[bool, flag("--kill", "End QEMU at once (like pulling the plug).")] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", help="Seconds to wait for the guest to power off.", click_type=Seconds()
        ),
    ] = 60.0,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Power off the VM of AREA (ACPI), or save its state (--save), or end it (--kill)."""
    from vml.errors import UsageError
    from vml.porcelain import stop as stop_mod

    if save and kill:
        raise UsageError("choose one of --save and --kill", "")
    res = stop_mod.stop(area, save=save, force_kill=kill, timeout=timeout)
    if json_:
        emit_json(res)
        return
    if res.state_file:
        out.print(
            f"saved the running state of the VM in {escape(res.area)} "
            f"({escape(res.state_file)}, {size(res.state_bytes)} of device state) and stopped it, "
            f"{res.seconds:.2f} s; `vml run` resumes it"
        )
    else:
        out.print(f"the VM in {escape(res.area)} {res.how}, {res.seconds:.2f} s")
    for note in res.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
