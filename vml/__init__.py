"""VML: git-style versioning for virtual machines."""

__version__ = "0.1.0"
