#!/usr/bin/env bash
# Builds the default sandbox template: a Debian 12 root filesystem (debootstrap
# minbase + bash, coreutils, python3, git, ca-certificates, nodejs, npm), cached
# OUTSIDE any daemon state directory so every fresh --state-dir finds it.
#
# The template has the user `user` (uid 1000, gid 1000, group `user`, home
# /home/user, shell /bin/bash) besides root; sandboxes still run as root unless
# a request names a user.
#
# Idempotent: an existing, complete template (marked by template.json) of the
# current FORMAT is kept; one of an older format (or none) is rebuilt once. The
# tree is built in a temporary directory and renamed into place, so a
# half-built template is never visible. Ownership is shifted by SANDFORGE_UID_SHIFT
# (default 100000) so that root inside a user-namespaced container owns its files.
#
# Paths: SANDFORGE_TEMPLATE_DIR, else $SANDFORGE_CACHE_DIR/templates, else
# /var/cache/sandforge/templates. Rebuilding replaces the tree (and so, through
# scripts/build-guest.sh, the microVM image): do it when no sandbox uses the
# template. An old tree still mounted by a running container is kept aside as
# .<name>.old-<time> rather than deleted.
set -euo pipefail

# Bump when what the template contains changes: an older cache is rebuilt.
# 1 (no marker): root only; 2: the user `user`.
FORMAT=2
CACHE=${SANDFORGE_TEMPLATE_DIR:-${SANDFORGE_CACHE_DIR:-/var/cache/sandforge}/templates}
NAME=${1:-default}
SHIFT=${SANDFORGE_UID_SHIFT:-100000}
MIRROR=${SANDFORGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEST="$CACHE/$NAME"

current() {
  [ -f "$DEST/template.json" ] && grep -q "\"format\": *${FORMAT}[,} ]" "$DEST/template.json"
}
if current; then
  echo "template '$NAME' already built at $DEST"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.$NAME.lock"
flock 9
current && { echo "template '$NAME' already built at $DEST"; exit 0; }
[ -f "$DEST/template.json" ] && echo "template '$NAME' at $DEST is of an older format: rebuilding it (format $FORMAT)"

WORK=$(mktemp -d "$CACHE/.build-$NAME.XXXXXX")
trap 'umount -R "$WORK/rootfs/proc" 2>/dev/null || true; rm -rf "$WORK"' EXIT
ROOT="$WORK/rootfs"

echo "[1/5] debootstrap bookworm (minbase + python3 git ca-certificates) ..."
debootstrap --variant=minbase --include=python3,git,ca-certificates,bash,coreutils,procps,iproute2 \
  bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log"; exit 1; }

echo "[2/5] apt-get install nodejs npm (in the chroot) ..."
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c \
  'apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*'
umount "$ROOT/proc"
: > "$ROOT/etc/resolv.conf"
echo "sandbox" > "$ROOT/etc/hostname"

echo "[3/5] the user 'user' (uid 1000, home /home/user) ..."
# In the chroot and before the shift, so /home/user is owned by 1000 inside.
chroot "$ROOT" /usr/sbin/groupadd --gid 1000 user
chroot "$ROOT" /usr/sbin/useradd --uid 1000 --gid 1000 --create-home --home-dir /home/user \
  --shell /bin/bash user
[ "$(stat -c %u:%g "$ROOT/home/user")" = 1000:1000 ] || { echo "error: /home/user is not 1000:1000" >&2; exit 1; }

echo "[4/5] shifting ownership by $SHIFT for the user namespace ..."
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

echo "[5/5] finishing ..."
SIZE=$(du -sm "$ROOT" | cut -f1)
cat > "$WORK/template.json" <<JSON
{"name": "$NAME", "format": $FORMAT, "distro": "debian-12", "uid_shift": $SHIFT, "size_mb": $SIZE, "shell": "/bin/bash", "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
rm -f "$WORK/debootstrap.log"
chmod 0755 "$WORK"
if [ -e "$DEST" ]; then
  # An older format: swap it out, then drop it unless a running container's
  # overlay still has its rootfs as the lower layer.
  OLD="$CACHE/.$NAME.old-$(date -u +%Y%m%dT%H%M%S)"
  mv "$DEST" "$OLD"
  mv "$WORK" "$DEST"
  trap - EXIT
  if grep -qF "lowerdir=$DEST/rootfs" /proc/mounts; then
    echo "the old template stays at $OLD while running sandboxes use it (remove it later)"
  else
    rm -rf "$OLD"
  fi
else
  mv "$WORK" "$DEST"
  trap - EXIT
fi
echo "template '$NAME' ready at $DEST (${SIZE} MB)"
