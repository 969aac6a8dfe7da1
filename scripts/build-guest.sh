#!/usr/bin/env bash
# Builds what the microVM backend boots, cached OUTSIDE any daemon state
# directory (like scripts/build-template.sh):
#
#   /var/cache/sandforge/guest/                 kernel + modules, shared by all VMs
#       vmlinuz  kernel.release
#       vmlinux                                 the same kernel uncompressed (ELF,
#                                               PVH entry): QEMU boots it without
#                                               the decompression step (faster)
#       modules/*.ko  modules/order             uncompressed; order = load order
#       guest.json                              written last: marks completeness
#   /var/cache/sandforge/templates/<name>/rootfs.ext4
#                                               the template as a raw ext4 image,
#                                               ownership unshifted (root = 0),
#                                               read-only base for qcow2 overlays
#
# The kernel is Debian's linux-image-cloud-amd64 (apt-get download, never
# installed on the host). Idempotent: a complete guest dir (guest.json of the
# current format) is kept; an image newer than the template's template.json is
# kept. Everything is built in a temporary directory and renamed into place, so
# a half-built result is never visible. Rebuilding an image under existing
# qcow2 overlays would corrupt them: rebuild a template only when no sandbox
# uses it.
#
# Usage: scripts/build-guest.sh [template name, default "default"]
set -euo pipefail

CACHE=${SANDFORGE_CACHE_DIR:-/var/cache/sandforge}
GUEST=${SANDFORGE_GUEST_DIR:-$CACHE/guest}
TEMPLATES=${SANDFORGE_TEMPLATE_DIR:-$CACHE/templates}
NAME=${1:-default}
KPKG=${SANDFORGE_GUEST_KERNEL_PACKAGE:-linux-image-cloud-amd64}
# The modules the init loads (their dependencies are added, first).
WANT=(virtio_ring virtio virtio_mmio virtio_console virtio_blk virtio_net fuse virtiofs)

if [ "$(id -u)" != 0 ]; then
  echo "error: run as root" >&2
  exit 1
fi

# Tools this script needs (Debian package per command).
missing=()
for pair in modinfo:kmod mkfs.ext4:e2fsprogs python3:python3 dpkg-deb:dpkg lz4:lz4; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$CACHE"
WORK=
cleanup() { [ -n "$WORK" ] && rm -rf "$WORK"; return 0; }
trap cleanup EXIT

# ---------------------------------------------------------------- kernel --
build_kernel() {
  # Bump FORMAT when the layout changes: an older cache is rebuilt.
  local FORMAT=3
  complete() { [ -f "$GUEST/guest.json" ] && grep -q "\"format\": ${FORMAT}[,}]" "$GUEST/guest.json"; }
  if complete; then
    echo "guest kernel already built at $GUEST ($(cat "$GUEST/kernel.release"))"
    return
  fi
  exec 8>"$CACHE/.guest.lock"
  flock 8
  if complete; then
    echo "guest kernel already built at $GUEST ($(cat "$GUEST/kernel.release"))"
    return
  fi
  local t0=$SECONDS
  WORK=$(mktemp -d "$CACHE/.build-guest.XXXXXX")

  # The meta package depends on exactly one versioned image package.
  local pkg
  resolve() { apt-cache depends "$KPKG" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -1; }
  pkg=$(resolve)
  if [ -z "$pkg" ]; then
    echo "[guest 1/3] apt-get update (no $KPKG in the package lists) ..."
    apt-get update -qq
    pkg=$(resolve)
  fi
  [ -n "$pkg" ] || { echo "error: cannot resolve the package $KPKG depends on" >&2; exit 1; }

  echo "[guest 1/3] downloading $pkg ..."
  (cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
  dpkg-deb -x "$WORK"/"$pkg"_*.deb "$WORK/deb"

  local rel
  rel=$(ls "$WORK/deb/lib/modules")
  [ "$(echo "$rel" | wc -l)" = 1 ] || { echo "error: expected one kernel in $pkg, found: $rel" >&2; exit 1; }
  local kdir="$WORK/deb/lib/modules/$rel/kernel"
  local out="$WORK/guest"
  mkdir -p "$out/modules"
  cp "$WORK/deb/boot/vmlinuz-$rel" "$out/vmlinuz"
  echo "$rel" > "$out/kernel.release"
  # The bzImage's payload is an LZ4 (legacy frame) stream holding the ELF
  # vmlinux: find the frame whose output is an ELF file.
  python3 - "$out/vmlinuz" "$out/vmlinux" <<'PY'
import subprocess, sys
data = open(sys.argv[1], "rb").read()
magic = b"\x02\x21\x4c\x18"
pos = data.find(magic)
while pos >= 0:
    out = subprocess.run(["lz4", "-dc"], input=data[pos:], capture_output=True).stdout
    if out[:4] == b"\x7fELF":
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit("error: no LZ4-compressed ELF kernel in " + sys.argv[1])
PY

  echo "[guest 2/3] collecting modules for $rel ..."
  local order=() seen=" "
  add() { # add <module name>: its dependencies first, then itself
    local m=${1//-/_} f dep
    case "$seen" in *" $m "*) return ;; esac
    seen="$seen$m "
    f=$(find "$kdir" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -1)
    [ -n "$f" ] || { echo "error: module $m not found in $pkg (built in?)" >&2; exit 1; }
    for dep in $(modinfo -F depends "$f" | tr ',' ' '); do add "$dep"; done
    case "$f" in
      *.ko) cp "$f" "$out/modules/$m.ko" ;;
      *.ko.xz) xz -dc "$f" > "$out/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" > "$out/modules/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" > "$out/modules/$m.ko" ;;
      *) echo "error: unexpected module file $f" >&2; exit 1 ;;
    esac
    order+=("$m.ko")
  }
  local m
  for m in "${WANT[@]}"; do add "$m"; done
  printf '%s\n' "${order[@]}" > "$out/modules/order"

  echo "[guest 3/3] finishing ..."
  cat > "$out/guest.json" <<JSON
{"format": $FORMAT, "kernel_package": "$pkg", "kernel_release": "$rel", "modules": [$(printf '"%s",' "${order[@]}" | sed 's/,$//')], "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
  chmod 0755 "$out" "$out/modules"
  chmod 0644 "$out"/vmlinuz "$out"/vmlinux "$out"/kernel.release "$out"/guest.json "$out"/modules/*
  # Replace an older or incomplete cache (running VMs have read theirs).
  if [ -e "$GUEST" ]; then
    mv "$GUEST" "$WORK/old"
  fi
  mv "$out" "$GUEST"
  rm -rf "$WORK"
  WORK=
  echo "guest kernel $rel ready at $GUEST ($(du -sh "$GUEST" | cut -f1), $((SECONDS - t0)) s; modules: ${order[*]})"
}

# ------------------------------------------------------------ root image --
build_image() {
  local dest="$TEMPLATES/$NAME" img="$TEMPLATES/$NAME/rootfs.ext4"
  if [ -f "$img" ] && [ "$img" -nt "$dest/template.json" ]; then
    echo "image for template '$NAME' already built at $img"
    return
  fi
  # The same lock as build-template.sh: never read a template being built.
  exec 9>"$TEMPLATES/.$NAME.lock"
  flock 9
  [ -f "$dest/template.json" ] || { echo "error: template '$NAME' not built (run scripts/build-template.sh $NAME)" >&2; exit 1; }
  if [ -f "$img" ] && [ "$img" -nt "$dest/template.json" ]; then
    echo "image for template '$NAME' already built at $img"
    return
  fi
  local t0=$SECONDS shift
  shift=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("uid_shift", 0))' "$dest/template.json")
  WORK=$(mktemp -d "$CACHE/.build-image-$NAME.XXXXXX")
  local tree="$WORK/tree"

  echo "[image 1/3] copying template '$NAME' ..."
  cp -a "$dest/rootfs" "$tree"
  mkdir -p "$tree/.sandforge"
  chmod 0755 "$tree/.sandforge"

  echo "[image 2/3] unshifting ownership by $shift ..."
  python3 - "$tree" "$shift" <<'PY'
import os, sys
root, shift = sys.argv[1], int(sys.argv[2])
def fix(p):
    st = os.lstat(p)
    uid = st.st_uid - shift if st.st_uid >= shift else st.st_uid
    gid = st.st_gid - shift if st.st_gid >= shift else st.st_gid
    if (uid, gid) == (st.st_uid, st.st_gid):
        return
    link = os.path.islink(p)
    cap = None
    if not link:
        try:
            cap = os.getxattr(p, "security.capability")
        except OSError:
            pass
    os.lchown(p, uid, gid)
    # chown clears setuid/setgid bits and file capabilities: restore them.
    if not link and st.st_mode & 0o6000:
        os.chmod(p, st.st_mode & 0o7777)
    if cap is not None:
        os.setxattr(p, "security.capability", cap)
fix(root)
for d, dirs, files in os.walk(root):
    for n in dirs + files:
        fix(os.path.join(d, n))
PY
  # The image's root directory takes its owner and mode from the tree's root.
  chown 0:0 "$tree"
  chmod 0755 "$tree"

  local used size
  used=$(du -sm "$tree" | cut -f1)
  size=$((used * 14 / 10))
  [ "$size" -ge $((used + 512)) ] || size=$((used + 512))
  echo "[image 3/3] mkfs.ext4 ${size} MiB (tree ${used} MiB) ..."
  mkfs.ext4 -q -F -L sandforge-root -E root_owner=0:0 -d "$tree" "$WORK/rootfs.ext4" "${size}M" >/dev/null
  rm -rf "$tree"
  chmod 0444 "$WORK/rootfs.ext4"
  mv -f "$WORK/rootfs.ext4" "$img"
  rm -rf "$WORK"
  WORK=
  echo "image for template '$NAME' ready at $img (${size} MiB, $(du -sm "$img" | cut -f1) MiB allocated, $((SECONDS - t0)) s)"
}

build_kernel
build_image
