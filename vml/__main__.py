"""``python -m vml``."""

from vml.cli.app import run

run()
