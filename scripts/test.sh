#!/usr/bin/env bash
# The second command: the whole test suite. Installs what is missing
# (idempotent, cached), builds the workspace and the static agent, then runs
# formatting and lint checks, unit tests and the integration tests (real
# daemon, real containers and microVMs, real SQLite) with cargo test. The
# API suite runs twice, as a matrix: once against containers, once against
# microVMs (SANDFORGE_TEST_ISOLATION=microvm makes the harness create VMs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build-agent.sh
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo build --quiet --workspace --all-targets
cargo test --workspace "$@"
echo "== the API suite again, against microVMs =="
SANDFORGE_TEST_ISOLATION=microvm cargo test -p sandforge-tests \
  --test api --test files --test errors --test isolation --test durability --test cli \
  --test network --test terminal --test proxy --test lifecycle --test snapshots --test security \
  --test templates --test users --test template_build --test template_import "$@"
