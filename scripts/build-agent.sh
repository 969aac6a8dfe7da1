#!/usr/bin/env bash
# Builds sandforge-agent as a static binary (glibc, crt-static; no musl target
# here) at target/x86_64-unknown-linux-gnu/release/sandforge-agent, where the
# daemon looks for it. RUSTFLAGS apply only to the target triple because
# --target is explicit, so host build scripts and proc-macros are unaffected.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p sandforge-agent --target x86_64-unknown-linux-gnu
bin=target/x86_64-unknown-linux-gnu/release/sandforge-agent
if ! file "$bin" | grep -q 'static'; then
  echo "error: $bin is not statically linked" >&2
  exit 1
fi
echo "agent: $bin"
