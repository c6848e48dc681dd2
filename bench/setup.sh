#!/usr/bin/env bash
# Install what the benchmark needs and is missing: the peer tools (borg 1.2,
# bup, restic from Debian), the workload makers (qemu-img/qemu-io, mke2fs),
# /usr/bin/time and matplotlib for the chart. Safe to run again: it only
# installs what is not there yet.
set -euo pipefail

need=()
command -v borg >/dev/null || need+=(borgbackup)
command -v bup >/dev/null || need+=(bup)
command -v restic >/dev/null || need+=(restic)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
[[ -x /usr/bin/time ]] || need+=(time)

if ((${#need[@]})); then
    # apt-get needs root; the CI and developer machines run as root.
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q "matplotlib>=3.8"

borg --version
bup --version
restic version
qemu-img --version | head -1
