#!/usr/bin/env bash
# The CUDA path's checks, for a machine with an NVIDIA GPU (CI has none):
#  1. build with the cuda feature; the engine's GPU unit tests (NVRTC compile,
#     opening the device);
#  2. every conformance case merged with --device cuda and on the CPU: the
#     shards must be byte-identical (the GPU kernels are bit-exact by design);
#  3. the speed benchmark's dense and MoE TIES merges on the GPU, checked
#     against the CPU, then on the CPU for the comparison.
# Usage: scripts/gpu-check.sh [cuda:N] [bench runs]   (needs libcuda + libnvrtc)
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda:0}
runs=${2:-3}
step() { printf '\n== %s\n' "$*"; }

step "build with the cuda feature"
if ! ldconfig -p 2>/dev/null | grep -q libnvrtc; then
  # NVRTC from PyPI when the machine has the driver but not the toolkit.
  venv=${FLEETMERGE_VENV:-/tmp/fleetmerge-venv}
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  # NVRTC no newer than the driver: the driver JIT-compiles NVRTC's PTX.
  cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\.[0-9]*\).*/\1/p' | head -1)
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc-cu12${cuda:+==$cuda.*}"
  LD_LIBRARY_PATH="$(echo "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib):${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH
fi
cargo build --release --features cuda -p fleetmerge -p fleetmerge-bench --quiet
cargo test --release --features cuda -p fleetmerge-engine --lib --quiet -- gpu:: exec::device
bin=$PWD/target/release/fleetmerge

step "conformance cases: --device $device vs the CPU, byte for byte"
work=$(mktemp -d)
failed=0
for case in tests/fixtures/cases/*/; do
  name=$(basename "$case")
  [[ $name == err_* ]] && continue
  cfg=$PWD/$case/config.yaml
  (cd examples && "$bin" run "$cfg" "$work/$name-cpu" --quiet) || { echo "FAIL $name (cpu)"; failed=1; continue; }
  (cd examples && "$bin" run "$cfg" "$work/$name-gpu" --quiet --device "$device") \
    || { echo "FAIL $name ($device)"; failed=1; continue; }
  for f in "$work/$name-cpu"/*.safetensors; do
    if ! cmp -s "$f" "$work/$name-gpu/$(basename "$f")"; then
      echo "FAIL $name: $(basename "$f") differs"
      failed=1
    fi
  done
  echo "ok   $name"
done
rm -rf "$work"
[ "$failed" = 0 ]

step "benchmark: TIES on $device (checked against the CPU), then on the CPU"
target/release/fleetmerge-bench --runs "$runs" --only dense-ties --only moe-ties \
  --device "$device" --compare-cpu
target/release/fleetmerge-bench --runs "$runs" --only dense-ties --only moe-ties
