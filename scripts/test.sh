#!/usr/bin/env bash
# The second command: the whole test suite. Installs what is missing
# (idempotent, cached), builds the workspace and the static agent, then runs
# formatting and lint checks, unit tests and the integration tests (real daemon, real containers, real
# SQLite) with cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build-agent.sh
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo build --quiet --workspace --all-targets
cargo test --workspace "$@"
