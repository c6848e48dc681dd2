#!/usr/bin/env bash
# Install what the benchmark needs and is missing: the peer tools (borg 1.2,
# bup, restic from Debian), the workload makers (qemu-img/qemu-io, mke2fs),
# /usr/bin/time and matplotlib for the chart; for W2 (the real guest) also
# qemu-system-x86 and busybox-static, and it builds the guest once (Debian's
# cloud kernel, fetched with apt-get download; cached in ~/.cache/vml-guest).
# Safe to run again: it only installs what is not there yet.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v borg >/dev/null || need+=(borgbackup)
command -v bup >/dev/null || need+=(bup)
command -v restic >/dev/null || need+=(restic)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
[[ -x /usr/bin/time ]] || need+=(time)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# The guest's initramfs needs a static busybox (Debian's busybox is dynamic).
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)

# apt-get needs root; the CI and developer machines run as root.
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
# The guest's kernel package is found through apt's lists.
if ((${#need[@]})) || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    $sudo apt-get update -qq
fi
if ((${#need[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q "matplotlib>=3.8"

borg --version
bup --version
restic version
qemu-img --version | head -1
qemu-system-x86_64 --version | head -1
python3 -m tests.guest.build
