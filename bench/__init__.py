"""The VML benchmark: VML against borg, bup, restic and cp on one VM workload."""
