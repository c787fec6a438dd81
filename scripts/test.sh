#!/usr/bin/env bash
# Every check the project has, as CI runs it: formatting, lints, the test suite
# (unit + integration tests against the real binary), and mergekit's conformance
# kit when it sits beside the repository (../shared/conformance).
# Installs what it needs (idempotent, quiet).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test (release: the integration tests run the optimised binary)"
cargo test --release --all --quiet 2>&1 | tee /tmp/fleetmerge-test.log
grep -q "test result" /tmp/fleetmerge-test.log

kit=../shared/conformance
if [ -d "$kit" ]; then
  step "conformance kit ($kit)"
  venv=${FLEETMERGE_VENV:-/tmp/fleetmerge-venv}
  if ! "$venv/bin/python" -c "import numpy" >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check numpy
  fi
  PYTHON="$venv/bin/python" "$kit/check.sh" target/release/fleetmerge
else
  step "conformance kit: $kit not found; the same cases run from tests/fixtures above"
fi
