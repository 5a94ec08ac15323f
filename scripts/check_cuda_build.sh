#!/usr/bin/env bash
# CI step: compile and link mrgd_ext with its CUDA kernels on a machine without a GPU, then check that the
# built extension loads and registered CUDA kernels for every operator. Nothing here runs a kernel.
#
# usage: scripts/check_cuda_build.sh [VENV]
#   VENV (or env MRGD_CUDA_VENV): a virtual environment holding torch==2.14.1 (the CUDA 13.0 build), numpy,
#        pybind11, scikit-build-core, ninja and cmake; default <repo>/.venv-cuda. Created with those packages
#        (pip takes torch from this machine's disk) when it does not exist.
# env:   CUDA_HOME         system CUDA toolkit (default /usr/local/cuda)
#        MRGD_CUDA_TOOLKIT merged toolkit root to (re)build (default <repo>/build/cuda-toolkit)
#        MRGD_CUDA_BUILD_DIR scikit-build-core build folder (default build/cuda-check, apart from the CPU build)
#        CMAKE_BUILD_PARALLEL_LEVEL compile jobs (default: number of cores)
# The extension is installed into VENV (not into the CPU development venv). Exit status non-zero on failure.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
venv=${1:-${MRGD_CUDA_VENV:-$repo/.venv-cuda}}
toolkit=${MRGD_CUDA_TOOLKIT:-$repo/build/cuda-toolkit}
build_dir=${MRGD_CUDA_BUILD_DIR:-build/cuda-check}
torch_spec=torch==2.14.1
start=$SECONDS

fail() { echo "check_cuda_build: FAILED: $*" >&2; exit 1; }
step() { echo "check_cuda_build: [$((SECONDS - start))s] $*"; }

if [[ ! -x $venv/bin/python ]]; then
  step "creating $venv with $torch_spec (CUDA 13.0 build)"
  python3 -m venv "$venv" || fail "cannot create the venv $venv"
  "$venv/bin/pip" install --quiet "$torch_spec" numpy pybind11 "scikit-build-core>=0.10" ninja cmake \
    || fail "cannot install $torch_spec and the build tools into $venv"
fi
py=$venv/bin/python
torch_info=$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")') \
  || fail "cannot import torch in $venv"
read -r torch_version torch_cuda <<<"$torch_info"
[[ $torch_cuda != none ]] || fail "torch $torch_version in $venv is not a CUDA build"
"$py" -c 'import pybind11, scikit_build_core, ninja, cmake' 2>/dev/null \
  || fail "$venv lacks one of pybind11, scikit-build-core, ninja, cmake (pip install them into it)"
step "torch $torch_version (CUDA $torch_cuda) in $venv"

root=$(bash "$repo/scripts/cuda_toolkit_root.sh" "$toolkit" "$py") || fail "cannot build the merged CUDA toolkit root"
step "merged CUDA toolkit root: $root"

export CUDACXX=$root/bin/nvcc
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MRGD_CUDA=ON
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step "building with MRGD_CUDA=ON, CUDACXX=$CUDACXX, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST into $build_dir"
log=$build_dir.log
mkdir -p "$(dirname "$log")"
if ! "$venv/bin/pip" install --no-build-isolation --no-deps -v . \
      -C "build-dir=$build_dir" \
      -C cmake.define.MRGD_CUDA=ON \
      -C "cmake.define.CUDA_TOOLKIT_ROOT_DIR=$root" \
      -C "cmake.define.CUDAToolkit_ROOT=$root" >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  fail "the CUDA build failed (full log: $log)"
fi
grep -E "mrgd_ext: torch" "$log" || true
step "build done"

# The operator names come from the registry (python/mrgd_ext/ops/registry.py), the one list of them.
ops=$(cd / && "$py" -m mrgd_ext.ops.registry) || fail "cannot read the operator names from mrgd_ext.ops.registry"
[[ -n $ops ]] || fail "mrgd_ext.ops.registry lists no operator"
step "operators: $(echo $ops)"

# Load the extension module itself, not the mrgd_ext package: loading the library is what registers the
# operators, and the check below must see what the library alone registers.
(cd / && MRGD_OPS="$ops" "$py" - <<'EOF') || fail "the installed extension does not register working CUDA kernels (see above)"
import glob, importlib.machinery, importlib.util, os, subprocess, sys
import torch

spec = importlib.util.find_spec("mrgd_ext")
assert spec is not None and spec.submodule_search_locations, "mrgd_ext is not installed in this venv"
pkg_dir = list(spec.submodule_search_locations)[0]
libs = glob.glob(os.path.join(pkg_dir, "_C*.so"))
assert len(libs) == 1, f"expected one _C extension in {pkg_dir}, found {libs}"
loader = importlib.machinery.ExtensionFileLoader("mrgd_ext._C", libs[0])
mod_spec = importlib.util.spec_from_file_location("mrgd_ext._C", libs[0], loader=loader)
_C = importlib.util.module_from_spec(mod_spec)
loader.exec_module(_C)

info = dict(_C.build_info())
print("build_info:", info)
assert info["cuda"] is True, "build_info()['cuda'] is not True: the CUDA kernels were not compiled"
assert "9.0" in info["cuda_archs"], f"unexpected cuda_archs {info['cuda_archs']!r}"
assert info["torch_version"] == torch.__version__, (info["torch_version"], torch.__version__)

missing = []
for op in os.environ["MRGD_OPS"].split():
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mrgd_ext::{op}", key):
            missing.append(f"mrgd_ext::{op} [{key}]")
assert not missing, f"no kernel registered for: {missing}"

# Device code for sm_90 must be embedded (a fat binary section), or the kernels could never launch.
sections = subprocess.run(["readelf", "-S", "-W", libs[0]], capture_output=True, text=True, check=True).stdout
assert ".nv_fatbin" in sections, f"{libs[0]} has no .nv_fatbin section: no device code was linked"
print(f"OK: {os.path.basename(libs[0])} has CUDA kernels for every mrgd_ext operator "
      f"(torch {torch.__version__}, cuda available here: {torch.cuda.is_available()})")
EOF
step "check passed in $((SECONDS - start))s"
