#!/usr/bin/env bash
# The CUDA check (docs/BENCHMARKS.md, "CUDA"): on a machine with an NVIDIA
# GPU, runs the host unit tests of a `cuda` build with CLOISTER_REQUIRE_GPU=1
# (a silent fall-back to the CPU fails them), then the demo with the CUDA
# build and with the CPU build, and prints both summaries and times.
# Usage: bench/cuda_check.sh DIR [OUTDIR]; DIR holds cloister-cuda,
# cloister-cpu and host-tests-cuda, built on a machine with the CUDA toolkit
# (docs/training.md, "GPUs").
set -uo pipefail
dir="$1"; out="${2:-$(mktemp -d)}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "cpus: $(nproc)"
# cuBLAS and cuRAND of CUDA 13, from wherever this machine keeps them.
lib=$(dirname "$(find /usr /opt -name 'libcublas.so.13' 2>/dev/null | head -1)")
rand=$(dirname "$(find /usr /opt -name 'libcurand.so.10' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$lib:$rand:${LD_LIBRARY_PATH:-}"
ldd "$dir/cloister-cuda" | grep -E 'cuda|cublas|curand'
echo "## host unit tests, cuda build, CLOISTER_REQUIRE_GPU=1"
CLOISTER_REQUIRE_GPU=1 "$dir/host-tests-cuda" --test-threads 4 2>&1 | tee "$out/unit.txt" | grep -E 'test result|FAILED|panicked|failures' 
for build in cuda cpu; do
  echo "## demo, $build build"
  start=$(date +%s.%N)
  CLOISTER_LOG=info timeout 240 "$dir/cloister-$build" demo >"$out/demo-$build.txt" 2>"$out/demo-$build.log"
  rc=$?
  end=$(date +%s.%N)
  echo "exit $rc, wall $(python3 -c "print(f'{$end-$start:.1f}')") s"
  grep -E 'dense layers|CUDA' "$out/demo-$build.log" | head -3
  tail -n 25 "$out/demo-$build.txt"
done
