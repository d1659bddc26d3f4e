#!/usr/bin/env bash
# Compile the CUDA sources with nvcc for setup.py's default architecture list
# (the gencode flags torch derives from it), so that a syntax or type error in
# csrc/vq_cuda.cu, or an architecture the toolkit cannot build, fails CI
# although no GPU is here to run it.
# Compile only (-c): the installed torch is a CPU build, with no libc10_cuda to
# link against. Its headers are enough: vq_cuda.cu uses only c10/cuda headers,
# and -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips the one generated header
# (c10/cuda/impl/cuda_cmake_macros.h) that a CPU wheel does not ship.
# The CUDA branch of bindings.cpp (-DVQVAE_WITH_CUDA) is syntax-checked too.
set -euo pipefail
trap 'echo "compile_cuda.sh: FAILED: the CUDA sources do not compile (errors above)" >&2' ERR
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [[ ! -x $NVCC ]]; then
  echo "compile_cuda.sh: FAILED: nvcc not found (set NVCC or install the CUDA toolkit)" >&2
  exit 1
fi

# The include paths, C++ ABI and nvcc flags that torch.utils.cpp_extension uses.
read -r -a CXX_FLAGS < <(python -c '
import sysconfig, torch
from torch.utils import cpp_extension as ce
print(*["-I" + p for p in ce.include_paths() + [sysconfig.get_paths()["include"]]], "-std=c++20",
      f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")')
read -r -a NVCC_FLAGS < <(python -c 'from torch.utils import cpp_extension as ce; print(*ce.COMMON_NVCC_FLAGS)')
ARCH_LIST=$(sed -n 's/^DEFAULT_CUDA_ARCH_LIST = "\(.*\)".*/\1/p' setup.py)
read -r -a ARCH_FLAGS < <(TORCH_CUDA_ARCH_LIST=$ARCH_LIST python -c '
from torch.utils import cpp_extension as ce; print(*ce._get_cuda_arch_flags())')
ARCHS=$(printf '%s\n' "${ARCH_FLAGS[@]}" | sed 's/.*code=//' | paste -sd, -)

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$SECONDS
"$NVCC" --version | tail -n 1
"$NVCC" -c csrc/vq_cuda.cu -o "$OUT/vq_cuda.o" "${CXX_FLAGS[@]}" "${NVCC_FLAGS[@]}" --threads 2 \
  -O3 -DVQVAE_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Xcompiler -fPIC -Werror all-warnings \
  "${ARCH_FLAGS[@]}"
c++ -fsyntax-only csrc/bindings.cpp "${CXX_FLAGS[@]}" -Wall \
  -DVQVAE_WITH_CUDA "-DVQVAE_CUDA_ARCHS=$ARCHS" -DTORCH_EXTENSION_NAME=vqvae_ext -DTORCH_API_INCLUDE_EXTENSION_H
echo "compile_cuda.sh: OK: csrc/vq_cuda.cu compiled for $ARCHS ($ARCH_LIST) in $((SECONDS - start)) s"
