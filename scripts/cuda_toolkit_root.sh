#!/usr/bin/env bash
# Build the merged CUDA toolkit root that a GPU-less machine needs to compile and link mrgd_ext's CUDA code
# against a CUDA build of torch (docs/design.md section 3), and print its path.
#
# usage: scripts/cuda_toolkit_root.sh ROOT_DIR [PYTHON]
#   ROOT_DIR  folder to (re)build; created when missing. It only ever holds symlinks and a marker file.
#   PYTHON    interpreter whose torch install supplies site-packages/nvidia/cu13 (default: python3).
#   CUDA_HOME (env) the system toolkit (default: /usr/local/cuda).
#
# NOTE: [merged toolkit root]
# Torch's CMake wants one toolkit root with nvcc, cudart, cuBLAS and nvrtc. The system toolkit has nvcc,
# cudart and CCCL but no cuBLAS/nvrtc; the torch wheel's nvidia-* dependencies bring those under
# site-packages/nvidia/cu13/{include,lib}, without unversioned libX.so links (so find_library misses them).
# The merged root links bin/, targets/ and nvvm/ to the system toolkit (nvcc finds cicc and its headers
# relative to itself), and holds in include/ and lib64/ one link per entry of both sources. On a name in both,
# the system toolkit wins, so nvcc compiles against the headers of its own release. Then every versioned
# libX.so.N without a libX.so gets that link. lib/ points at lib64/ so either spelling finds everything.
# Idempotent: include/ and lib64/ are rebuilt from scratch on each run, so links to a previous PYTHON's
# site-packages never linger.
set -euo pipefail

die() { echo "cuda_toolkit_root.sh: error: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 ROOT_DIR [PYTHON]"
root_arg=$1
python=${2:-python3}
cuda_home=${CUDA_HOME:-/usr/local/cuda}
marker=.mrgd_cuda_toolkit_root

[[ -x $cuda_home/bin/nvcc ]] || die "no nvcc at $cuda_home/bin/nvcc (set CUDA_HOME to the system CUDA toolkit)"
cuda_home=$(readlink -f "$cuda_home")
sys_include=$cuda_home/include
sys_lib=$cuda_home/lib64
[[ -d $sys_lib ]] || sys_lib=$cuda_home/lib
[[ -d $sys_include && -d $sys_lib ]] || die "$cuda_home lacks include/ or lib64/"

site=$("$python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))') \
  || die "cannot import torch with $python"
cu_include=$site/nvidia/cu13/include
cu_lib=$site/nvidia/cu13/lib
[[ -d $cu_include && -d $cu_lib ]] || die "$site/nvidia/cu13/{include,lib} not found: is $python's torch a CUDA 13 build?"

mkdir -p "$root_arg"
root=$(cd "$root_arg" && pwd -P)
if [[ ! -e $root/$marker ]] && [[ -n $(ls -A "$root") ]]; then
  die "$root is not empty and was not made by this script; refusing to touch it"
fi
touch "$root/$marker"

for d in bin targets nvvm; do
  [[ -e $cuda_home/$d ]] && ln -sfn "$cuda_home/$d" "$root/$d"
done

# link_entries SRC DST: a link in DST to each entry of SRC whose name DST does not hold yet.
link_entries() {
  local src=$1 dst=$2 e name
  shopt -s nullglob dotglob
  for e in "$src"/*; do
    name=${e##*/}
    [[ -e $dst/$name || -L $dst/$name ]] || ln -s "$e" "$dst/$name"
  done
  shopt -u nullglob dotglob
}

for d in include lib64; do
  rm -rf "${root:?}/$d.tmp"
  mkdir "$root/$d.tmp"
done
link_entries "$sys_include" "$root/include.tmp"
link_entries "$cu_include" "$root/include.tmp"
link_entries "$sys_lib" "$root/lib64.tmp"
link_entries "$cu_lib" "$root/lib64.tmp"

# Unversioned links: libfoo.so.13 (or libfoo.so.13.0) -> libfoo.so, when no libfoo.so exists.
shopt -s nullglob
for e in "$root"/lib64.tmp/lib*.so.*; do
  name=${e##*/}
  base=${name%%.so.*}.so
  [[ -e $root/lib64.tmp/$base || -L $root/lib64.tmp/$base ]] || ln -s "$name" "$root/lib64.tmp/$base"
done
shopt -u nullglob

for d in include lib64; do
  rm -rf "${root:?}/$d"
  mv "$root/$d.tmp" "$root/$d"
done
ln -sfn lib64 "$root/lib"

for f in bin/nvcc include/cuda_runtime.h include/cublas_v2.h include/nvrtc.h lib64/libcudart.so \
         lib64/libcublas.so lib64/libnvrtc.so; do
  [[ -e $root/$f ]] || die "merged root $root lacks $f"
done
echo "$root"
