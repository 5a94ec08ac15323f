#!/usr/bin/env bash
# One-shot GPU suite for a machine with an NVIDIA GPU, a CUDA build of torch and no network (no pip index):
# build mrgd_ext with its CUDA kernels against the installed torch, run the CUDA tests, run a short CUDA test
# subset under compute-sanitizer (memcheck; racecheck for the shared-memory subspace projection and Lanczos
# orthogonalisation) when it is on PATH, then the GPU benchmarks. Everything is logged into OUT_DIR;
# OUT_DIR/summary.txt says what ran.
#
# usage: benchmarks/gpu_suite.sh [--dry-run] [--skip-build] [--budget SECONDS] OUT_DIR
#   --dry-run     print the steps and their commands, run nothing, write nothing
#   --skip-build  test and benchmark the mrgd_ext already installed (e.g. a rerun on the same machine)
#   --budget S    wall-clock budget of the whole suite (default 470 s: under 8 minutes with the reserve)
# env: PYTHON                 interpreter to use (default: python, else python3, on PATH; no venv assumed)
#      TORCH_CUDA_ARCH_LIST   architectures to compile (default: the device's compute capability, e.g. 9.0)
#      CUDA_HOME              CUDA toolkit (default: the one holding nvcc on PATH, else /usr/local/cuda)
#      MRGD_MEMCHECK_K, MRGD_RACECHECK_K  pytest -k expressions of the sanitizer subsets (defaults below)
#
# Every step runs under `timeout` with its own budget, cut to what is left of the suite's budget; a failed
# step is recorded and the suite goes on (steps that need what it should have produced are skipped, with
# the reason). Exit status: 0 when every step that ran passed, 1 otherwise, 2 on a usage mistake.
#
# NOTE: [installing without a venv]
# `pip install --no-build-isolation --no-deps .` with PIP_NO_INDEX=1 builds against the torch already
# installed and never touches the network (an index lookup would hang until it timed out). A system Python
# marked externally managed (PEP 668) refuses the install; on this throwaway machine the suite then retries
# once with --break-system-packages and says so in the log.
#
# NOTE: [merged toolkit root]
# torch's CMake wants one CUDA root holding nvcc, cudart, cuBLAS and nvrtc. When CUDA_HOME lacks cuBLAS or
# nvrtc (they may come only with the torch wheel's nvidia-* packages), the build uses the merged root of
# scripts/cuda_toolkit_root.sh (docs/design.md section 3), as scripts/check_cuda_build.sh does.
set -u

usage() { echo "usage: $0 [--dry-run] [--skip-build] [--budget SECONDS] OUT_DIR" >&2; exit 2; }

dry_run=0
skip_build=0
budget=470
out_arg=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --skip-build) skip_build=1 ;;
    --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage; budget=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1" >&2; usage ;;
    *) [[ -z $out_arg ]] || usage; out_arg=$1 ;;
  esac
  shift
done
[[ -n $out_arg ]] || usage

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo" || exit 2
if [[ $out_arg = /* ]]; then out=$out_arg; else out=$PWD/$out_arg; fi
logs=$out/logs

py=${PYTHON:-}
if [[ -z $py ]]; then
  py=$(command -v python || command -v python3 || true)
fi
if [[ -z $py ]]; then
  echo "gpu_suite.sh: no python or python3 on PATH (or set PYTHON)" >&2
  exit 2
fi

MEMCHECK_K=${MRGD_MEMCHECK_K:-"(multirate_step_cuda_matches and (odd or chunky or lots) and dtype0]) or (multirate_step_cuda_matches and offset1 and odd and dtype2]) or (subspace_project_cuda_matches and (odd or chunky) and dtype0] and basis_dtype1-) or (subspace_step_cuda_matches and (odd or chunky) and dtype0] and basis_dtype1-) or block_orthogonalize_cuda_other_round_counts or block_orthogonalize_cuda_edges or (block_orthogonalize_cuda_matches_truth and 1001-)"}
RACECHECK_K=${MRGD_RACECHECK_K:-"(subspace_project_cuda_matches and (odd or chunky or lots) and dtype0] and basis_dtype0-) or (block_orthogonalize_cuda_matches_truth and 1001-f32) or block_orthogonalize_cuda_other_round_counts"}

suite_start=$SECONDS
deadline=$((suite_start + budget))
min_step=15     # a step with less time than this left is skipped rather than started
declare -a names=() statuses=() secs=() logfiles=() notes=()
failed=0

# record NAME STATUS SECONDS LOG NOTE
record() {
  names+=("$1"); statuses+=("$2"); secs+=("$3"); logfiles+=("$4"); notes+=("$5")
  case $2 in FAILED*|TIMEOUT*) failed=$((failed + 1)) ;; esac
  local line
  line=$(printf '[%4ds] %-22s %-14s %s' "$((SECONDS - suite_start))" "$1" "$2" "$5")
  echo "$line"
}

# run_step NAME BUDGET CMD...: run CMD under timeout with min(BUDGET, time left) seconds, output to its log.
# Sets step_rc (the command's exit status; 124 = timed out, -1 = not run).
step_no=0
run_step() {
  local name=$1 want=$2
  shift 2
  step_no=$((step_no + 1))
  local log tag
  tag=$(printf '%02d_%s' "$step_no" "$name")
  log=$logs/$tag.log
  step_rc=-1
  if [[ $dry_run -eq 1 ]]; then
    printf '[dry-run] %-24s budget %4ss: ' "$tag" "$want"
    local arg
    for arg in "$@"; do
      if [[ $arg == *$'\n'* ]]; then printf '<inline script> '; else printf '%q ' "$arg"; fi
    done
    echo
    return 0
  fi
  local left=$((deadline - SECONDS - 5))
  if [[ $left -lt $min_step ]]; then
    record "$name" "SKIPPED" 0 "-" "suite budget used up (${budget}s)"
    return 0
  fi
  local limit=$want
  [[ $left -lt $limit ]] && limit=$left
  local t0=$SECONDS
  {
    printf '$ '
    printf '%q ' "$@"
    printf '\n# budget %ss, started %s\n' "$limit" "$(date -u +%FT%TZ)"
  } >"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  step_rc=$?
  local dt=$((SECONDS - t0)) status
  if [[ $step_rc -eq 0 ]]; then
    status=ok
  elif [[ $step_rc -eq 124 || $step_rc -eq 137 ]]; then
    status="TIMEOUT"
    echo "# killed after ${limit}s" >>"$log"
  else
    status="FAILED($step_rc)"
  fi
  local note=${step_note:-}
  if [[ $status != ok ]]; then
    # The last line of output usually says why (an assertion, "N failed", a compiler error).
    note="${note:+$note; }$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-120)"
  fi
  record "$name" "$status" "$dt" "logs/$tag.log" "$note"
  step_note=""
  if [[ $status != ok ]]; then
    tail -n 20 "$log" | sed 's/^/    /' >&2
  fi
  return 0
}

skip() {  # skip NAME REASON
  step_no=$((step_no + 1))
  if [[ $dry_run -eq 1 ]]; then
    printf '[dry-run] %02d_%-21s skipped: %s\n' "$step_no" "$1" "$2"
    return 0
  fi
  record "$1" "SKIPPED" 0 "-" "$2"
}

# ---- build helper, run under timeout through `bash -c` (so it must be exported) -------------------------
build_ext() {  # build_ext PY TOOLKIT_ROOT_OR_EMPTY
  local py=$1 root=$2
  # --config-settings (pip >= 22.1) rather than its newer short form -C: the GPU machine's pip may be older.
  local -a cmd=("$py" -m pip install --no-build-isolation --no-deps -v . --config-settings=build-dir=build/gpu-suite)
  if [[ -n $root ]]; then
    cmd+=("--config-settings=cmake.define.CUDAToolkit_ROOT=$root"
          "--config-settings=cmake.define.CUDA_TOOLKIT_ROOT_DIR=$root")
  fi
  echo "+ ${cmd[*]}"
  local tmp rc
  tmp=$(mktemp)
  "${cmd[@]}" 2>&1 | tee "$tmp"
  rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]] && grep -q "externally-managed-environment" "$tmp"; then
    echo "+ the interpreter is externally managed (PEP 668): retrying with --break-system-packages"
    "${cmd[@]}" --break-system-packages
    rc=$?
  fi
  rm -f "$tmp"
  return "$rc"
}
export -f build_ext

VERIFY_PY='
import os, sys, torch, mrgd_ext
info = mrgd_ext.build_info()
print("mrgd_ext", mrgd_ext.__file__)
print("build_info", info)
assert info["cuda"] is True, "build_info()[\"cuda\"] is not True: the CUDA kernels were not compiled"
want = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
assert not want or want in info["cuda_archs"], (want, info["cuda_archs"])
from mrgd_ext.ops.registry import OPS
missing = [name for name, op in OPS.items() if not op.has_kernel("cuda")]
assert not missing, f"no CUDA kernel registered for {missing}"
p = torch.arange(1000, dtype=torch.float32, device="cuda").requires_grad_()
g = torch.ones_like(p)
opt = mrgd_ext.MrGD([p], plan=[0.5], fused=True)
p.grad = g
opt.step()
torch.cuda.synchronize()
assert torch.equal(p.cpu(), torch.arange(1000, dtype=torch.float32) - 0.5), "fused CUDA step gave a wrong result"
print("OK: CUDA kernels load and one fused step on", torch.cuda.get_device_name(0), "is exact")
'

PREFLIGHT_PY='
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: no usable GPU (or torch is not a CUDA build)")
major, minor = torch.cuda.get_device_capability(0)
print("device", torch.cuda.get_device_name(0))
print(f"capability {major}.{minor}")
'

# ---- steps ---------------------------------------------------------------------------------------------
if [[ $dry_run -eq 0 ]]; then
  mkdir -p "$logs" || { echo "gpu_suite.sh: cannot create $logs" >&2; exit 2; }
  echo "gpu_suite.sh: logs and results in $out (budget ${budget}s, python $py)"
fi
command -v timeout >/dev/null 2>&1 || { echo "gpu_suite.sh: coreutils timeout is required" >&2; exit 2; }

# 1. preflight: interpreter, torch, GPU, capability -> TORCH_CUDA_ARCH_LIST; the toolchain.
if command -v nvidia-smi >/dev/null 2>&1; then
  run_step nvidia-smi 20 nvidia-smi
fi
step_note=""
run_step preflight 60 "$py" -c "$PREFLIGHT_PY"
preflight_ok=$([[ $dry_run -eq 1 || $step_rc -eq 0 ]] && echo 1 || echo 0)
capability=""
if [[ $dry_run -eq 0 && $preflight_ok -eq 1 ]]; then
  capability=$(sed -n 's/^capability \([0-9]*\.[0-9]*\)$/\1/p' "$logs/$(printf '%02d' "$step_no")_preflight.log")
fi
if [[ $dry_run -eq 1 ]]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"<device capability>"}
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${capability:-unknown}}
fi

# The toolkit: CUDA_HOME if set, else the folder above the nvcc on PATH, else /usr/local/cuda; a candidate
# counts only with bin/nvcc and include/cuda_runtime.h (an nvcc on PATH may be a wrapper script elsewhere).
if [[ -z ${CUDA_HOME:-} ]]; then
  CUDA_HOME=/usr/local/cuda
  nvcc_path=$(command -v nvcc 2>/dev/null || true)
  if [[ -n $nvcc_path ]]; then
    cand=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
    [[ -x $cand/bin/nvcc && -e $cand/include/cuda_runtime.h ]] && CUDA_HOME=$cand
  fi
fi
export CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH
toolkit_root=""
toolkit_mode="system toolkit $CUDA_HOME"
if [[ ! -e $CUDA_HOME/include/cublas_v2.h || ! -e $CUDA_HOME/include/nvrtc.h ]]; then
  toolkit_mode="merged root build/gpu-suite-toolkit ($CUDA_HOME lacks cuBLAS or nvrtc)"
fi

# 2. build (or not)
build_ok=1
if [[ $skip_build -eq 1 ]]; then
  skip build "--skip-build: testing the installed mrgd_ext"
elif [[ $preflight_ok -ne 1 ]]; then
  skip build "preflight failed"
  build_ok=0
else
  if [[ $toolkit_mode == merged* ]]; then
    step_note="merged CUDA root"
    run_step toolkit-root 60 bash scripts/cuda_toolkit_root.sh build/gpu-suite-toolkit "$py"
    if [[ $dry_run -eq 1 || $step_rc -eq 0 ]]; then
      toolkit_root=$repo/build/gpu-suite-toolkit
    fi
  fi
  step_note="arch $TORCH_CUDA_ARCH_LIST"
  run_step build 240 env MRGD_CUDA=ON PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDACXX="${toolkit_root:-$CUDA_HOME}/bin/nvcc" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 8)" \
    TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" bash -c 'build_ext "$@"' build_ext "$py" "$toolkit_root"
  [[ $dry_run -eq 1 || $step_rc -eq 0 ]] || build_ok=0
fi

# 3. the installed extension has working CUDA kernels
if [[ $preflight_ok -ne 1 || $build_ok -ne 1 ]]; then
  skip verify "no GPU or no build"
  verify_ok=0
else
  run_step verify 60 "$py" -c "$VERIFY_PY"
  verify_ok=$([[ $dry_run -eq 1 || $step_rc -eq 0 ]] && echo 1 || echo 0)
fi

# 4. tests: the CUDA kernel tests (a skip is a failure here), then every other test marked cuda.
pytest_args=(-q -p no:cacheprovider -o addopts= -rfEs)
if [[ $verify_ok -ne 1 ]]; then
  for s in test-cuda-kernels test-cuda-marked memcheck racecheck benchmarks; do
    skip "$s" "the CUDA build did not verify"
  done
else
  run_step test-cuda-kernels 150 env MRGD_REQUIRE_CUDA=1 "$py" -m pytest "${pytest_args[@]}" \
    tests/test_cuda_kernels.py --junitxml="$out/junit_cuda_kernels.xml"
  # pytest exits 5 when it selects no test: no other test is marked cuda, which is not a failure.
  run_step test-cuda-marked 90 bash -c '"$@"; rc=$?; if [[ $rc -eq 5 ]]; then echo "no other test is marked cuda"; exit 0; fi; exit $rc' _ \
    env MRGD_REQUIRE_CUDA=1 "$py" -m pytest "${pytest_args[@]}" -m cuda tests --ignore=tests/test_cuda_kernels.py \
    --junitxml="$out/junit_cuda_marked.xml"

  # 5. compute-sanitizer on short subsets. The caching allocator is off so that memcheck sees each tensor's
  # own allocation (an overrun into a pooled neighbour is otherwise invisible); API errors are not reported
  # because torch probes the driver on purpose. Exit status 5 from pytest = the -k subset matched nothing.
  sanitizer=$(command -v compute-sanitizer 2>/dev/null || true)
  if [[ -z $sanitizer && $dry_run -eq 1 ]]; then
    echo "[dry-run] (compute-sanitizer is not on PATH here; on a machine that has it:)"
    sanitizer=compute-sanitizer
  fi
  if [[ -n $sanitizer ]]; then
    step_note="subset: MRGD_MEMCHECK_K"
    run_step memcheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 MRGD_REQUIRE_CUDA=1 "$sanitizer" --tool memcheck \
      --error-exitcode 99 --report-api-errors no --leak-check no --print-limit 50 \
      "$py" -m pytest "${pytest_args[@]}" -x tests/test_cuda_kernels.py tests/test_block_orthogonalize.py -k "$MEMCHECK_K"
    step_note="subset: MRGD_RACECHECK_K"
    run_step racecheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 MRGD_REQUIRE_CUDA=1 "$sanitizer" --tool racecheck \
      --racecheck-report all --error-exitcode 99 --report-api-errors no --print-limit 50 \
      "$py" -m pytest "${pytest_args[@]}" -x tests/test_cuda_kernels.py tests/test_block_orthogonalize.py -k "$RACECHECK_K"
  else
    skip memcheck "compute-sanitizer is not on PATH"
    skip racecheck "compute-sanitizer is not on PATH"
  fi

  # 6. GPU benchmarks (run_all passes --device cuda to those that take it; results in OUT/bench). Its
  # per-benchmark limit keeps it inside this step's budget, so its summary.md is always written.
  left=$((deadline - SECONDS - 5))
  bench_budget=$((left < 150 ? left : 150))
  n_bench=$(ls benchmarks/bench_*.py 2>/dev/null | wc -l)
  per_bench=$(( (bench_budget - 30) / (n_bench > 0 ? n_bench : 1) ))
  [[ $per_bench -lt 20 ]] && per_bench=20
  step_note="results: bench/summary.md"
  run_step benchmarks "$bench_budget" "$py" benchmarks/run_all.py --device cuda --out "$out/bench" \
    --timeout "$per_bench" --quiet
fi

# ---- summary -------------------------------------------------------------------------------------------
if [[ $dry_run -eq 1 ]]; then
  echo "[dry-run] then: $out/summary.txt (every step's status, time and log), exit status 1 if any step failed"
  exit 0
fi

pytest_line() {  # the final "N passed, M skipped in Xs" line of a pytest log
  local f=$1
  [[ -f $f ]] && grep -E "(passed|failed|error|no tests ran)" "$f" | tail -n 1
}
summary=$out/summary.txt
{
  echo "mrgd_ext GPU suite, $(date -u +%FT%TZ), host $(hostname 2>/dev/null || echo '?')"
  echo "repository: $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
  echo "python: $py"
  pf=$(ls "$logs"/*_preflight.log 2>/dev/null | head -n 1)
  [[ -n $pf ]] && grep -E "^(torch|device|capability) " "$pf"
  echo "TORCH_CUDA_ARCH_LIST: $TORCH_CUDA_ARCH_LIST; CUDA: $toolkit_mode"
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 1
  echo "budget: ${budget}s, used: $((SECONDS - suite_start))s"
  echo
  printf '%-20s %-12s %6s  %-34s %s\n' step status secs log note
  for i in "${!names[@]}"; do
    printf '%-20s %-12s %6s  %-34s %s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}" "${logfiles[$i]}" "${notes[$i]}"
  done
  echo
  for f in "$logs"/*_test-cuda-kernels.log "$logs"/*_test-cuda-marked.log; do
    [[ -f $f ]] && echo "$(basename "$f" .log): $(pytest_line "$f")"
  done
  for f in "$logs"/*_memcheck.log "$logs"/*_racecheck.log; do
    [[ -f $f ]] || continue
    echo "$(basename "$f" .log): $(pytest_line "$f"); $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$f" | tail -n 1)"
  done
  if [[ -f $out/bench/summary.md ]]; then
    echo
    echo "benchmarks ($out/bench/summary.md):"
    grep -E "^\| " "$out/bench/summary.md" | head -n 12
  fi
  echo
  if [[ $failed -eq 0 ]]; then
    echo "overall: PASS (every step that ran passed)"
  else
    echo "overall: FAIL ($failed step(s) failed or timed out)"
  fi
} >"$summary" 2>&1
cat "$summary"
[[ $failed -eq 0 ]]
