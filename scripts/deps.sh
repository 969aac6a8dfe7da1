#!/usr/bin/env bash
# Installs what Sandforge needs on Debian 12, idempotently: Debian packages
# (only the missing ones), the default template (built once, cached in
# /var/cache/sandforge/templates) and the microVM guest kernel and root
# image (cached in /var/cache/sandforge/guest). Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "error: run as root (sandboxes need namespaces, cgroups and mounts)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found: install a Rust toolchain (1.80+) first" >&2
  exit 1
fi

PKGS=(runc debootstrap sqlite3 file iproute2 util-linux python3 ca-certificates qemu-system-x86 qemu-utils e2fsprogs kmod lz4 curl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

scripts/build-template.sh default
scripts/build-guest.sh
