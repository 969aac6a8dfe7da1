#!/usr/bin/env bash
# Builds the default sandbox template: a Debian 12 root filesystem (debootstrap
# minbase + bash, coreutils, python3, git, ca-certificates, nodejs, npm), cached
# OUTSIDE any daemon state directory so every fresh --state-dir finds it.
#
# Idempotent: an existing, complete template (marked by template.json) is kept.
# The tree is built in a temporary directory and renamed into place, so a
# half-built template is never visible. Ownership is shifted by SANDFORGE_UID_SHIFT
# (default 100000) so that root inside a user-namespaced container owns its files.
set -euo pipefail

CACHE=${SANDFORGE_TEMPLATE_DIR:-/var/cache/sandforge/templates}
NAME=${1:-default}
SHIFT=${SANDFORGE_UID_SHIFT:-100000}
MIRROR=${SANDFORGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEST="$CACHE/$NAME"

if [ -f "$DEST/template.json" ]; then
  echo "template '$NAME' already built at $DEST"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.$NAME.lock"
flock 9
[ -f "$DEST/template.json" ] && { echo "template '$NAME' already built at $DEST"; exit 0; }

WORK=$(mktemp -d "$CACHE/.build-$NAME.XXXXXX")
trap 'umount -R "$WORK/rootfs/proc" 2>/dev/null || true; rm -rf "$WORK"' EXIT
ROOT="$WORK/rootfs"

echo "[1/4] debootstrap bookworm (minbase + python3 git ca-certificates) ..."
debootstrap --variant=minbase --include=python3,git,ca-certificates,bash,coreutils,procps,iproute2 \
  bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log"; exit 1; }

echo "[2/4] apt-get install nodejs npm (in the chroot) ..."
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c \
  'apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*'
umount "$ROOT/proc"
: > "$ROOT/etc/resolv.conf"
echo "sandbox" > "$ROOT/etc/hostname"

echo "[3/4] shifting ownership by $SHIFT for the user namespace ..."
python3 - "$ROOT" "$SHIFT" <<'PY'
import os, sys
root, shift = sys.argv[1], int(sys.argv[2])
def fix(p):
    st = os.lstat(p)
    mode = st.st_mode
    os.lchown(p, st.st_uid + shift, st.st_gid + shift)
    # chown clears setuid/setgid bits on regular files: restore them.
    if not os.path.islink(p) and mode & 0o6000:
        os.chmod(p, mode & 0o7777)
fix(root)
for d, dirs, files in os.walk(root):
    for n in dirs + files:
        fix(os.path.join(d, n))
PY

echo "[4/4] finishing ..."
SIZE=$(du -sm "$ROOT" | cut -f1)
cat > "$WORK/template.json" <<JSON
{"name": "$NAME", "distro": "debian-12", "uid_shift": $SHIFT, "size_mb": $SIZE, "shell": "/bin/bash", "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
rm -f "$WORK/debootstrap.log"
chmod 0755 "$WORK"
mv "$WORK" "$DEST"
trap - EXIT
echo "template '$NAME' ready at $DEST (${SIZE} MB)"
