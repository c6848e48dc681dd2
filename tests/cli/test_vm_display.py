"""The VM in ``vml log``, ``show``, ``status``, ``areas`` and ``checkout``, text and --json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vml.cli.root import app
from vml.plumbing.repository import Repository

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vm"
VM_KEYS = {
    "hypervisor",
    "name",
    "guest_os",
    "memory_mib",
    "power_state",
    "config",
    "disks",
    "config_external",
    "crash_consistent",
    "external_files",
    "live",
    "vml_run",
}


@pytest.fixture
def cli(repo: Repository, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VML_REPO", raising=False)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        res = runner.invoke(app, ["--repo", str(repo.path), *args])
        assert res.exit_code == code, res.output
        return res.output

    return invoke


def _ubuntu(tmp_path: Path) -> Path:
    area = tmp_path / "ubuntu"
    area.mkdir()
    shutil.copy(FIXTURES / "ubuntu.vmx", area / "ubuntu.vmx")
    (area / "disk-000001.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 8192 FLAT "disk-000001-flat.vmdk" 0\n'
    )
    (area / "disk-000001-flat.vmdk").write_bytes(b"\1" * (8192 * 512))
    return area


def test_log_show_areas_status_name_the_vm(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    area = _ubuntu(tmp_path)
    assert "E1" in cli("commit", str(area), "-m", "fresh")
    logged = cli("log", "--all")
    assert 'vmware "Ubuntu "Dev" Box" off' in logged
    shown = cli("show", "E1")
    assert 'vm        vmware, "Ubuntu "Dev" Box", guest ubuntu-64, memory 2.0 GiB, off' in shown
    assert "disk    disk-000001.vmdk  vmdk-monolithicFlat  4.0 MiB virtual" in shown
    assert 'vmware "Ubuntu "Dev" Box" off' in cli("areas")
    st = cli("status", str(area))
    assert "vm now    vmware" in st and "nothing changed" in st


def test_crash_consistent_entry_is_flagged(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    area = _ubuntu(tmp_path)
    (area / "ubuntu.vmx.lck").mkdir()
    err = cli("commit", str(area), "-q", code=6)
    assert "looks running" in err and "ubuntu.vmx.lck" in err and "--force-running" in err
    saved = cli("commit", str(area), "--force-running")
    assert "crash-consistent" in saved
    assert "running, crash-consistent" in cli("log", "--all")
    assert "running when saved: crash-consistent" in cli("show", "E1")
    assert "vm now    vmware" in cli("status", str(area)) and "running" in cli("status", str(area))
    out = cli("checkout", "E1", str(tmp_path / "elsewhere"))
    assert "note: this entry was saved while the VM was running" in out
    assert "moved or copied" in out


def test_json_outputs_carry_the_same_vm_shape(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    area = _ubuntu(tmp_path)
    cli("commit", str(area), "-q")
    logged = json.loads(cli("log", "--all", "--json"))
    shown = json.loads(cli("show", "E1", "--json"))
    areas = json.loads(cli("areas", "--json"))
    st = json.loads(cli("status", str(area), "--json"))
    for vm in (logged[0]["vm"], shown["vm"], areas[0]["vm"], st["vm"]):
        assert set(vm) == VM_KEYS
        assert vm["name"] == 'Ubuntu "Dev" Box' and vm["crash_consistent"] is False
    assert logged[0]["vm"] == shown["vm"] == areas[0]["vm"]


def test_external_refused_then_saved(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    area = tmp_path / "vm"
    area.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data-flat.vmdk").write_bytes(b"\2" * 4096)
    (area / "data.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 8 FLAT "../shared/data-flat.vmdk" 0\n'
    )
    err = cli("commit", str(area), "-q", code=5)
    assert "needs files outside the area" in err and "data-flat.vmdk" in err
    out = cli("commit", str(area), "--include-external")
    assert "as .external/1/data-flat.vmdk" in out
    assert "outside " in cli("show", "E1") and ".external/1/data-flat.vmdk" in cli("show", "E1")
    co = cli("checkout", "E1", str(tmp_path / "copy"))
    assert 'edit data.vmdk to name ".external/1/data-flat.vmdk" instead' in co
    assert (tmp_path / "copy" / ".external" / "1" / "data-flat.vmdk").read_bytes() == b"\2" * 4096
