"""Storage layer: one module per on-disk concept. No typer, no rich, no environment, no exits."""

# Registers with repository.py the finishing of a rewrite a killed command left,
# so that every command, whatever it imports, finishes it first.
from vml.plumbing import journal as _journal  # noqa: F401
