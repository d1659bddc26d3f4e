// CUDA kernels of vqvae_ext: nearest-code search and the EMA statistics.
//
// nearest_code: a block of 256 threads serves kRows = 32 rows of z, 8 threads
// per row. Codebook tiles of kTileK codes x kTileD dims and the matching slice
// of the block's rows are staged in shared memory; each thread accumulates the
// dot products of its row with kTileK / 8 codes of the tile, keeps a running
// (min, index) across tiles, and the 8 threads of a row merge their results
// with warp shuffles. fp16/bf16 inputs accumulate in fp32 (at::opmath_type).
//
// Only c10/cuda headers are used on the host side (not ATen/cuda/CUDAContext.h,
// which pulls in cuBLAS/cuSPARSE headers), so this file also compiles against
// the headers of a CPU-only torch wheel plus nvcc (see .ci/compile_cuda.sh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "vq_common.h"

namespace {

constexpr int kRows = 32;                              // rows of z per block
constexpr int kThreadsPerRow = 8;                      // threads sharing one row
constexpr int kThreads = kRows * kThreadsPerRow;       // 256 threads per block
constexpr int kTileK = 64;                             // codes per shared-memory tile
constexpr int kTileD = 32;                             // dims per shared-memory tile
constexpr int kCodesPerThread = kTileK / kThreadsPerRow;

template <typename scalar_t, typename acc_t>
__global__ void nearest_code_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ codebook,
                                    const acc_t* __restrict__ norm_sq, int64_t* __restrict__ out,
                                    int64_t N, int64_t K, int64_t D) {
  // +1 padding: the 8 threads of a row read 8 different codes at the same dim,
  // which then fall in different shared-memory banks.
  __shared__ acc_t z_tile[kRows][kTileD + 1];
  __shared__ acc_t e_tile[kTileK][kTileD + 1];

  const int r = threadIdx.x / kThreadsPerRow;  // row within the block
  const int t = threadIdx.x % kThreadsPerRow;  // this thread handles codes t, t + 8, ... of a tile
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  acc_t best = vq::no_distance<acc_t>();
  int64_t best_k = 0;

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    acc_t dot[kCodesPerThread];
    for (int c = 0; c < kCodesPerThread; ++c) dot[c] = acc_t(0);

    for (int64_t d0 = 0; d0 < D; d0 += kTileD) {
      __syncthreads();  // the previous tile is no longer read
      // Cooperative, coalesced loads along D; out-of-range entries are 0 so
      // they add nothing to the dot products.
      for (int i = threadIdx.x; i < kRows * kTileD; i += kThreads) {
        const int64_t n = row0 + i / kTileD, d = d0 + i % kTileD;
        z_tile[i / kTileD][i % kTileD] = (n < N && d < D) ? static_cast<acc_t>(z[n * D + d]) : acc_t(0);
      }
      for (int i = threadIdx.x; i < kTileK * kTileD; i += kThreads) {
        const int64_t k = k0 + i / kTileD, d = d0 + i % kTileD;
        e_tile[i / kTileD][i % kTileD] = (k < K && d < D) ? static_cast<acc_t>(codebook[k * D + d]) : acc_t(0);
      }
      __syncthreads();
      for (int d = 0; d < kTileD; ++d) {
        const acc_t zd = z_tile[r][d];
        for (int c = 0; c < kCodesPerThread; ++c) {
          dot[c] = vq::dot_step(dot[c], zd, e_tile[c * kThreadsPerRow + t][d]);
        }
      }
    }
    // This thread's codes in increasing index order, as argmin_update requires.
    for (int c = 0; c < kCodesPerThread; ++c) {
      const int64_t k = k0 + c * kThreadsPerRow + t;
      if (k < K) vq::argmin_update(best, best_k, vq::code_distance(norm_sq[k], dot[c]), k);
    }
  }

  // Merge the 8 partial results of the row; the 8 threads are adjacent lanes of one warp.
  for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t other_k = __shfl_xor_sync(0xffffffffu, best_k, offset);
    vq::argmin_merge(best, best_k, other, other_k);
  }
  const int64_t n = row0 + r;
  if (t == 0 && n < N) out[n] = vq::row_result(best, best_k);
}

// One thread per element of z: counts[k] += 1 once per row (integer atomics: exact and
// deterministic), sums[k, d] += z[n, d] (float atomics: the order of additions varies, which
// is why bindings.cpp takes index_add_ instead under torch.use_deterministic_algorithms).
template <typename scalar_t, typename acc_t>
__global__ void ema_stats_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ indices,
                                 unsigned long long* __restrict__ counts, acc_t* __restrict__ sums, int64_t N,
                                 int64_t D) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * D; i += stride) {
    const int64_t n = i / D, d = i % D, k = indices[n];
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
  const int64_t blocks = (N + kRows - 1) / kRows;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nearest_code_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    nearest_code_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), norm_sq.data_ptr<acc_t>(),
        out.data_ptr<int64_t>(), N, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// counts (K,) int64 and sums (K, D) of the accumulation dtype, zero-filled by the caller.
void ema_stats_cuda(const at::Tensor& z, const at::Tensor& indices, at::Tensor& counts, at::Tensor& sums) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t total = z.numel();
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ema_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ema_stats_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        z.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
        sums.data_ptr<acc_t>(), z.size(0), z.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
