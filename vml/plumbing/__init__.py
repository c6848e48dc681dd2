"""Storage layer: one module per on-disk concept. No typer, no rich, no environment, no exits."""
