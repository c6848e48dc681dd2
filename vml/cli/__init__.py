"""The typer application and its rich rendering."""
