#!/usr/bin/env bash
# The first command: on a fresh Debian 12 machine, install what is missing,
# build Sandforge (release), and (re)start the supervisor in the background
# with the default template. Idempotent; sandboxes survive the restart.
#
#   state:  /var/lib/sandforge          log:   /var/log/sandforge.log
#   token:  /etc/sandforge/token        API:   http://127.0.0.1:8585
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
echo "building sandforge (release) ..."
cargo build --quiet --release -p sandforge
scripts/build-agent.sh
install -m 0755 target/release/sandforge /usr/local/bin/sandforge
install -m 0755 target/x86_64-unknown-linux-gnu/release/sandforge-agent /usr/local/bin/sandforge-agent

mkdir -p /etc/sandforge
if [ ! -s /etc/sandforge/token ]; then
  (umask 077; echo "sf_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')" > /etc/sandforge/token)
fi
if [ ! -f /etc/sandforge/config.yaml ]; then
  cat > /etc/sandforge/config.yaml <<'YAML'
# Sandforge supervisor configuration (every key optional; see README).
listen: 127.0.0.1:8585
state_dir: /var/lib/sandforge
template_dir: /var/cache/sandforge/templates
# Host directories that sandboxes may mount (subdirectories included).
allowed_host_paths: [/srv/sandforge]
YAML
  mkdir -p /srv/sandforge
fi

pidfile=/run/sandforge.pid
# Stop the supervisor of this config, whether this script started it (the
# pid file) or someone else did (the same command line): sandboxes keep
# running and the new one re-attaches.
# Either source may find nothing (no pid file, no process): that is not an
# error, so neither may fail the pipeline under pipefail.
old=$( { if [ -f "$pidfile" ]; then cat "$pidfile"; fi
         pgrep -f "sandforge serve --config /etc/sandforge/config.yaml" || true; } 2>/dev/null | sort -u)
for pid in $old; do
  if kill -0 "$pid" 2>/dev/null; then
    echo "stopping the running supervisor $pid (sandboxes keep running) ..."
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
done
SANDFORGE_TOKEN=$(cat /etc/sandforge/token) setsid /usr/local/bin/sandforge serve \
  --config /etc/sandforge/config.yaml >>/var/log/sandforge.log 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$pidfile"
for _ in $(seq 100); do
  # Healthy, and served by the process just started (not a leftover).
  if kill -0 "$pid" 2>/dev/null && curl -fsS http://127.0.0.1:8585/health >/dev/null 2>&1; then
    echo "sandforge is running on http://127.0.0.1:8585 (log: /var/log/sandforge.log)"
    echo "token: export SANDFORGE_TOKEN=\$(cat /etc/sandforge/token)"
    exit 0
  fi
  sleep 0.1
done
echo "error: the supervisor did not come up; see /var/log/sandforge.log" >&2
tail -20 /var/log/sandforge.log >&2
exit 1
