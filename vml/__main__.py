"""``python -m vml``."""

from vml.cli.app import main

main()
