"""``vml demo``: a newcomer's first minute, on a small generated VM."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import UsageError
from vml.plumbing.repository import init_repository, make_folder, undo_made
from vml.porcelain.checkout import CheckoutResult, checkout
from vml.porcelain.commit import CommitResult, commit
from vml.progress import ProgressFn, no_progress

NAME = "demo-vm"
SECTOR = 512


def _vmx(session: int, memsize: int) -> str:
    return (
        '.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "4"\n'
        f'displayName = "{NAME}"\nguestOS = "other26xlinux"\nmemsize = "{memsize}"\n'
        f'ide0:0.present = "TRUE"\nide0:0.fileName = "{NAME}.vmdk"\n'
        f'nvram = "{NAME}.nvram"\nannotation = "vml demo, session {session}"\n'
    )


def _descriptor(disk_bytes: int) -> str:
    sectors = disk_bytes // SECTOR
    cylinders = max(1, sectors // (16 * 63))
    return (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW {sectors} FLAT "{NAME}-flat.vmdk" 0\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\nddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'
    )


def make_demo_area(area: Path, disk_mib: int = 64, seed: int = 1) -> None:
    """A small VMware VM (monolithicFlat VMDK, sparse) with some data written."""
    rng = random.Random(seed)
    area.mkdir(parents=True, exist_ok=True)
    disk = disk_mib << 20
    (area / f"{NAME}.vmdk").write_text(_descriptor(disk))
    (area / f"{NAME}.vmx").write_text(_vmx(0, 256))
    (area / f"{NAME}.nvram").write_bytes(rng.randbytes(8192))
    with open(area / f"{NAME}-flat.vmdk", "wb") as f:
        f.truncate(disk)  # sparse: a fresh disk is mostly holes
        # a "file system": text-like and random data at scattered places
        for i in range(disk_mib // 4):
            f.seek(rng.randrange(0, disk - (512 << 10)) & ~4095)
            chunk = (f"line {i} of the physicist's data\n" * 4096).encode()[: 256 << 10]
            f.write(chunk if i % 2 else rng.randbytes(256 << 10))


def work_session(area: Path, session: int, seed: int = 1) -> None:
    """What a day in the VM does to its disk: a few MiB and some 4 KiB writes."""
    rng = random.Random(seed * 1000 + session)
    flat = area / f"{NAME}-flat.vmdk"
    size = flat.stat().st_size
    with open(flat, "r+b") as f:
        for _ in range(4):
            f.seek(rng.randrange(0, size - (1 << 20)) & ~4095)
            f.write(rng.randbytes(256 << 10))
        for _ in range(32):  # journal-like scattered page writes
            f.seek(rng.randrange(0, size // 50) & ~4095)
            f.write(bytes([rng.randrange(256)]) * 4096)
    (area / f"{NAME}.vmx").write_text(_vmx(session, 256))


@dataclass
class DemoResult:
    """Every step of the demo, for the CLI to narrate."""

    root: str
    repo: str
    area: str
    restored: str
    commits: list[CommitResult] = field(default_factory=list)
    checkouts: list[CheckoutResult] = field(default_factory=list)


def demo(root: Path, progress: ProgressFn = no_progress) -> DemoResult:
    """Make ``root/repo`` and ``root/physics-vm``, save three states, check one out."""
    if root.exists() and any(root.iterdir()):
        raise UsageError(f"{root} is not empty", "give `vml demo` a new folder")
    made = make_folder(root)
    try:
        return _demo(root, progress)
    except BaseException:
        # Everything in it is the demo's (it was empty): what another program
        # put there meanwhile stays, and the folder with it.
        undo_made(root, ["repo", "my-vm", "restored-vm"], made)
        raise


def _demo(root: Path, progress: ProgressFn) -> DemoResult:
    repo_path = root / "repo"
    area = root / "my-vm"
    restored = root / "restored-vm"
    make_demo_area(area)
    repo = init_repository(repo_path)
    try:
        out = DemoResult(str(root), str(repo_path), str(area), str(restored))
        out.commits.append(commit(repo, area, message="fresh install", progress=progress))
        work_session(area, 1)
        out.commits.append(commit(repo, area, message="after day 1", progress=progress))
        work_session(area, 2)
        out.commits.append(
            commit(
                repo,
                area,
                message="after day 2, against the base",
                kind="differential",
                tag="day2",
                progress=progress,
            )
        )
        out.checkouts.append(checkout(repo, "E2", restored, progress=progress))
        os.sync()
        return out
    finally:
        repo.close()
