"""Which files in a working area are not part of the VM: logs, locks, dumps.

Rules come from two places, both in gitignore syntax and matched by dulwich's
own gitignore engine (so VML and git agree on what a pattern means):

1. ``DEFAULT_PATTERNS`` below: hypervisor logs, lock files, crash dumps and
   swap files.  Matched case-insensitively, since VMware and VirtualBox run on
   case-insensitive file systems and their file names vary in case.
2. ``.vmlignore`` at the area's root, case-sensitive like ``.gitignore``.
   Its rules are consulted first, and a rule there that decides a path wins
   over the defaults, so ``!vmware.log`` keeps the log.

Two paths are fixed: ``.vml`` (VML's own folder, at any depth) is always
ignored, and the root ``.vmlignore`` is never ignored, because it is saved
with the VM like any other file.
"""

from __future__ import annotations

from pathlib import Path

from dulwich.ignore import IgnoreFilter, IgnoreFilterStack, read_ignore_patterns

IGNORE_FILE = ".vmlignore"
VML_DIR = ".vml"
#: A state saved through QMP or libvirt is described by ``<state stem>.resume.json``
#: in the area (``resume``); kept here so that knowing the name loads no resume code.
RESUME_SUFFIX = ".resume.json"

#: Files every hypervisor writes while running that are no part of the VM.
DEFAULT_PATTERNS: tuple[str, ...] = (
    # VMware: logs, lock folders/files (disk.vmdk.lck, vm.vmx.lck), crash dumps,
    # and the host swap file ESXi/Workstation keep only while the VM runs.
    "vmware*.log",
    "vmware-*.log",
    "mksSandbox*.log",
    "*.lck",
    "vmware-vmx*.dmp",
    "vmware*.dmp",
    "*.vswp",
    "*.scoreboard",
    # VirtualBox: logs (Logs/VBox.log, VBox.log.1, VBoxHardening.log) and the
    # temporary settings file it writes before renaming it to .vbox.
    "VBox.log*",
    "VBoxHardening.log*",
    "**/Logs/*.log",
    "**/Logs/*.log.*",
    "*.vbox-tmp",
    # Host metadata that desktop file managers scatter around.
    ".DS_Store",
)


class IgnoreRules:
    """The ignore rules of one working area."""

    def __init__(self, user_patterns: list[bytes]) -> None:
        """Build rules from the defaults plus ``user_patterns`` (gitignore lines)."""
        defaults = IgnoreFilter([p.encode() for p in DEFAULT_PATTERNS], ignorecase=True)
        user = IgnoreFilter(user_patterns, path=IGNORE_FILE)
        self._stack = IgnoreFilterStack([user, defaults])
        self.user_patterns = tuple(user_patterns)

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        """Load the rules of the area at ``root``; a missing ``.vmlignore`` adds none.

        An unreadable ``.vmlignore`` (e.g. it is a folder) is treated as empty
        rather than an error, so that describing an area never fails on it.
        """
        try:
            with open(root / IGNORE_FILE, "rb") as f:
                patterns = list(read_ignore_patterns(f))
        except OSError:
            patterns = []
        return cls(patterns)

    def is_ignored(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether ``relpath`` (relative to the area, ``/``-separated) is ignored.

        Pass ``is_dir=True`` for folders: ``*.lck`` folders are ignored and
        everything under an ignored folder is ignored with it.
        """
        rel = relpath.replace("\\", "/").strip("/")
        while rel.startswith("./"):
            rel = rel[2:]
        if not rel or rel == ".":
            return False
        if VML_DIR in rel.split("/"):
            return True
        if rel == IGNORE_FILE and not is_dir:
            return False
        return bool(self._stack.is_ignored(rel + "/" if is_dir else rel))
