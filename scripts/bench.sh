#!/usr/bin/env bash
# Benchmarks (tests/benches/core.rs, microvm.rs, then templates.rs): the real daemon against
# host baselines, printed as a markdown table. Builds what it needs (the
# static agent and the release workspace, since the bench profile runs the
# daemon from target/release), then runs it. BENCH_N sets the runs per row
# (default 20, plus one discarded warm-up); BENCH_VM_N the VM boots (default
# 5). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "error: run as root (sandboxes need namespaces, cgroups and mounts)" >&2
  exit 1
fi
scripts/deps.sh
scripts/build-agent.sh
cargo build --quiet --release --workspace
cargo bench --quiet -p sandforge-tests --bench core "$@"
echo
cargo bench --quiet -p sandforge-tests --bench microvm "$@"
echo
cargo bench --quiet -p sandforge-tests --bench templates "$@"
