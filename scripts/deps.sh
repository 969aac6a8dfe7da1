#!/usr/bin/env bash
# Installs what Sandforge needs on Debian 12, idempotently: Debian packages
# (only the missing ones), the default template (built once, cached in
# /var/cache/sandforge/templates) and the microVM guest kernel and root
# image (cached in /var/cache/sandforge/guest), and virtiofsd (host mounts
# in microVMs; built once from crates.io into /var/cache/sandforge/virtiofsd).
# Safe to run again and again.
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

PKGS=(runc debootstrap sqlite3 file iproute2 util-linux python3 ca-certificates qemu-system-x86 qemu-utils e2fsprogs kmod lz4 curl
      libseccomp-dev libcap-ng-dev pkg-config nftables tmux shellcheck
      docker-registry skopeo busybox-static)
missing_pkgs() {
  local p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
# Two rounds: installing one package can remove another (Debian's
# qemu-system-x86 7.2 replaces a backports qemu-utils 10), so what is
# missing is computed again after the first install.
updated=
for _round in 1 2; do
  mapfile -t missing < <(missing_pkgs)
  [ ${#missing[@]} -eq 0 ] && break
  echo "installing: ${missing[*]}"
  if [ -z "$updated" ]; then apt-get update -qq; updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
done
mapfile -t missing < <(missing_pkgs)
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: could not install: ${missing[*]}" >&2
  exit 1
fi
for tool in qemu-img qemu-system-x86_64 runc nft; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing after install" >&2; exit 1; }
done

VIRTIOFSD_VERSION=1.14.0
VIRTIOFSD_ROOT=/var/cache/sandforge/virtiofsd
if ! "$VIRTIOFSD_ROOT/bin/virtiofsd" --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
  echo "building virtiofsd $VIRTIOFSD_VERSION (once, about 2 minutes) ..."
  cargo install --quiet --locked virtiofsd --version "$VIRTIOFSD_VERSION" --root "$VIRTIOFSD_ROOT"
fi

scripts/build-template.sh default
scripts/build-guest.sh
