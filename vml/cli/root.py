"""The ``vml`` command line as a whole: the root app with every command group attached.

Each group of commands is a typer app of its own, in its own module
(``entries``, ``inspection``, ``names``, ``maintenance``, ``sharing``,
``vmcmds``), built on ``common`` and ``render``; the root's own options are
``toplevel``'s.  This module only attaches them.  Nothing imports it but
the entry point, ``app.main``, when a command needs the whole app (the
root's help, completion, a nested command): a command run alone is
``toplevel.one_command``'s, which imports its own group only.
"""

from __future__ import annotations

from vml.cli import entries, inspection, maintenance, names, sharing, vmcmds
from vml.cli.toplevel import new_root, one_command

# In this order in `vml --help` (toplevel.GROUP_MODULES names them).
GROUPS = (entries, inspection, names, maintenance, sharing, vmcmds)

app = new_root()
for group in GROUPS:
    app.add_typer(group.commands)

__all__ = ["GROUPS", "app", "one_command"]
