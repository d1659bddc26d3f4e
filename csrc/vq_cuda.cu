// CUDA kernels of vqvae_ext: nearest-code search and the EMA statistics.
//
// nearest_code: register-blocked tiles of rows and codes (vq_tiling.h, which also describes the
// layout). The kernel below only sequences the phases of that header, with barriers between them
// and warp shuffles for the merge; the CPU emulation of the tests (vq_emulate.cpp) sequences the
// same phases with loops over the threads. fp16/bf16 inputs accumulate in fp32 (at::opmath_type).
//
// Only c10/cuda headers are used on the host side (not ATen/cuda/CUDAContext.h,
// which pulls in the cuBLAS/cuSPARSE headers).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "vq_tiling.h"

namespace {

namespace tiling = vq::tiling;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(tiling::kThreads)
    nearest_code_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ codebook,
                        const acc_t* __restrict__ norm_sq, int64_t* __restrict__ out, int64_t N, int64_t K,
                        int64_t D) {
  __shared__ tiling::SharedTiles<acc_t> tiles;
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * tiling::kRows;
  tiling::ThreadState<acc_t> s;
  tiling::start_rows(s);
  for (int64_t k0 = 0; k0 < K; k0 += tiling::kTileK) {
    tiling::clear_dots(s);
    for (int64_t d0 = 0; d0 < D; d0 += tiling::kTileD) {
      __syncthreads();  // every thread is done reading the previous tiles
      tiling::stage_tiles(tiles, tid, z, codebook, row0, k0, d0, N, K, D);
      __syncthreads();
      tiling::accumulate(s, tiles, tid);
    }
    tiling::update_best(s, norm_sq, tid, k0, K);
  }
  // All 32 lanes of every warp are here (no thread returned early), so the full mask is right.
  for (int offset = tiling::kThreadCols / 2; offset > 0; offset /= 2) {
    tiling::merge_step(s, [offset](int, acc_t best, int64_t best_k, acc_t& other, int64_t& other_k) {
      other = __shfl_xor_sync(0xffffffffu, best, offset);
      other_k = __shfl_xor_sync(0xffffffffu, best_k, offset);
    });
  }
  tiling::store_rows(s, tid, row0, N, out);
}

// One thread per element of z: counts[k] += 1 once per row (integer atomics: exact and
// deterministic), sums[k, d] += z[n, d] (float atomics: the order of additions varies, which
// is why bindings.cpp takes index_add_ instead under torch.use_deterministic_algorithms).
template <typename scalar_t, typename acc_t>
__global__ void ema_stats_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ codes,
                                 unsigned long long* __restrict__ counts, acc_t* __restrict__ sums, int64_t N,
                                 int64_t D) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * D; i += stride) {
    const int64_t n = i / D, d = i % D, k = codes[n];
    atomicAdd(&sums[k * D + d], static_cast<acc_t>(z[i]));
    if (d == 0) atomicAdd(&counts[k], 1ull);
  }
}

}  // namespace

// Inputs are validated and made contiguous by bindings.cpp; norm_sq has the
// accumulation dtype (fp32 for fp16/bf16). out[i] = -1 flags a non-finite row.
void nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq,
                       at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const int64_t blocks = (N + tiling::kRows - 1) / tiling::kRows;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nearest_code_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    nearest_code_kernel<scalar_t, acc_t><<<blocks, tiling::kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), norm_sq.data_ptr<acc_t>(),
        out.data_ptr<int64_t>(), N, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// counts (K,) int64 and sums (K, D) of the accumulation dtype, zero-filled by the caller.
void ema_stats_cuda(const at::Tensor& z, const at::Tensor& codes, at::Tensor& counts, at::Tensor& sums) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t total = z.numel();
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ema_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ema_stats_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        z.data_ptr<scalar_t>(), codes.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
        sums.data_ptr<acc_t>(), z.size(0), z.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Whether these kernels run on GPU `device`. The CUDA runtime answers: cudaFuncGetAttributes fails
// (cudaErrorNoKernelImageForDevice or cudaErrorInvalidDeviceFunction) when the module holds neither
// a binary for the GPU's architecture nor PTX that the driver can compile for it. Both kernels
// are built with the same architecture flags, so one instantiation of each stands for all.
bool cuda_kernels_run_on(int64_t device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    (void)cudaGetLastError();  // no GPU here: nothing runs, and the error must not linger
    return false;
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const bool runs = cudaFuncGetAttributes(&attributes, nearest_code_kernel<float, float>) == cudaSuccess &&
                    cudaFuncGetAttributes(&attributes, ema_stats_kernel<float, float>) == cudaSuccess;
  (void)cudaGetLastError();  // these errors are not sticky; clear them for the next CUDA call
  return runs;
}
