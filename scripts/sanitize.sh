#!/usr/bin/env bash
# Build mrgd_ext with AddressSanitizer + UndefinedBehaviorSanitizer and run the CPU kernel tests under them.
#
# A kernel that reads one element past a chunk, or an index computation that overflows, can still pass every
# numeric test; the sanitizers turn either into a failure with a stack trace. The build lives apart from the
# development one (its own venv and scikit-build-core build folder), in RelWithDebInfo with the symbols
# kept (install.strip=false), so the traces name files and lines.
#
# Python and torch are not instrumented, so the sanitizer runtimes are preloaded (LD_PRELOAD) ahead of them.
# Leak detection is off: the interpreter's own allocations at exit are not leaks of ours.
#
# usage: scripts/sanitize.sh [PYTEST ARGS...]     (default: the CPU kernel tests below)
# env:   MRGD_SANITIZE_VENV   the venv (default <repo>/build/sanitize-venv; created with torch and the build tools)
#        MRGD_TORCH_SPEC      torch to install into a new venv (default torch==2.13.0, as scripts/setup_env.sh)
#        CXX                  the compiler (default c++); its sanitizer runtimes are the ones preloaded
# Exit status non-zero on a build failure, a test failure or any sanitizer report.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
venv=${MRGD_SANITIZE_VENV:-$repo/build/sanitize-venv}
torch_spec=${MRGD_TORCH_SPEC:-torch==2.13.0}
cxx=${CXX:-c++}
start=$SECONDS
step() { echo "sanitize: [$((SECONDS - start))s] $*"; }
fail() { echo "sanitize: FAILED: $*" >&2; exit 1; }

if [[ ! -x $venv/bin/python ]]; then
  step "creating $venv"
  python3 -m venv "$venv" || fail "cannot create the venv $venv"
fi
py=$venv/bin/python
pip=("$py" -m pip install --disable-pip-version-check -q)
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  step "installing $torch_spec"
  "${pip[@]}" "$torch_spec" || fail "cannot install $torch_spec into $venv"
fi
"${pip[@]}" numpy "pybind11>=2.12" "scikit-build-core>=0.10" "cmake>=3.26" ninja pytest pytest-timeout \
  || fail "cannot install the build and test tools into $venv"

# The runtimes the instrumented module links against; they must come first in the process.
asan=$("$cxx" -print-file-name=libasan.so)
ubsan=$("$cxx" -print-file-name=libubsan.so)
[[ -f $asan && -f $ubsan ]] || fail "$cxx has no shared libasan/libubsan (install the compiler's sanitizer runtimes)"

# -fno-sanitize-recover: the first report of either sanitizer aborts the process (a failed test run).
san_flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
step "building mrgd_ext with $san_flags (RelWithDebInfo, build/sanitize)"
CMAKE_ARGS="-DCMAKE_CXX_FLAGS='$san_flags' -DCMAKE_MODULE_LINKER_FLAGS='-fsanitize=address,undefined'" \
MRGD_CUDA=OFF CXX=$cxx \
  "${pip[@]}" --no-build-isolation --no-deps \
  -C cmake.build-type=RelWithDebInfo -C install.strip=false -C build-dir=build/sanitize . \
  || fail "the sanitizer build failed"

# The tests import the installed package; run them from the repo so conftest.py's helpers are found.
tests=("$@")
[[ ${#tests[@]} -gt 0 ]] || tests=(tests/test_kernels.py tests/test_block_orthogonalize.py tests/test_optim.py)
step "running ${tests[*]} under ASan + UBSan"
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=0:strict_init_order=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1
LD_PRELOAD="$asan $ubsan" "$py" -c "import mrgd_ext; assert mrgd_ext.build_info()['cuda'] is False" \
  || fail "the instrumented mrgd_ext does not load under the preloaded sanitizer runtimes"
# Plain pytest options: the unit tier of these files (their marks apply as in a normal run).
LD_PRELOAD="$asan $ubsan" "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" \
  || fail "tests failed or a sanitizer reported an error (see above)"
step "clean: no sanitizer reports"
