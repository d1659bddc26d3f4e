// Device-independent math of the nearest-code search, shared by the CPU kernel
// (vq_cpu.cpp, compiled by the host compiler) and the CUDA kernel (vq_cuda.cu,
// compiled by nvcc), so the CPU tests exercise the same arithmetic and the same
// tie-breaking that runs on the GPU.
//
// Eq. 1 of the paper picks k = argmin_j ||z_e(x) - e_j||_2, the same code as the
// arg-min of the squared distance
//   ||z - e_k||^2 = ||z||^2 - 2 <z, e_k> + ||e_k||^2.
// ||z||^2 is the same for every k, so the arg-min only needs
//   d_k = ||e_k||^2 - 2 <z, e_k>,
// which is what torch.addmm(||e||^2, z, e.T, alpha=-2).argmin(1) computes.
#pragma once

#include <c10/macros/Macros.h>  // C10_HOST_DEVICE: __host__ __device__ under nvcc, empty otherwise

#include <cmath>  // INFINITY, std::fma
#include <cstdint>

namespace vq {

// One step of the dot product <z, e_k>, accumulated in acc_t (fp32 for fp16/bf16 inputs, so long
// rows do not lose precision), as an explicit fused multiply-add: nvcc contracts z * e + acc to
// one anyway, and the CPU emulation of the CUDA kernel (vq_tiling.h) then rounds as the GPU does.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t dot_step(acc_t acc, acc_t z, acc_t e) {
#if defined(__CUDA_ARCH__)
  return fma(z, e, acc);
#else
  return std::fma(z, e, acc);
#endif
}

// d_k from the code's squared norm and the dot product. dot + dot is exactly
// 2 * dot, so this rounds once, like addmm's beta * C + alpha * (A @ B) with
// alpha = -2, and it also works on the SIMD vector types of vq_cpu.cpp.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t code_distance(acc_t norm_sq, acc_t dot) {
  return norm_sq - (dot + dot);
}

// Start of a running minimum: any finite distance replaces it. (INFINITY, not
// std::numeric_limits, which device code cannot call without nvcc's
// --expt-relaxed-constexpr.)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t no_distance() {
  return static_cast<acc_t>(INFINITY);
}

// Running arg-min over codes visited in increasing index order. The strict <
// keeps the first (lowest) index among equal distances, and a NaN distance
// never replaces the current best. Written with selects, not branches, so that
// it also runs lane-wise on SIMD vectors (`better` is then a vector mask).
template <typename acc_t, typename index_t>
C10_HOST_DEVICE inline void argmin_update(acc_t& best, index_t& best_k, acc_t d, index_t k) {
  const auto better = d < best;
  best = better ? d : best;
  best_k = better ? k : best_k;
}

// Merge two partial results (lanes, threads) that each saw a subset of codes:
// on equal distances the lower index wins, so the merged answer does not
// depend on how the codes were split or in which order the parts are merged.
template <typename acc_t, typename index_t>
C10_HOST_DEVICE inline void argmin_merge(acc_t& best, index_t& best_k, acc_t other, index_t other_k) {
  const bool better = other < best || (other == best && other_k < best_k);
  best = better ? other : best;
  best_k = better ? other_k : best_k;
}

// The index stored for a row. x - x == 0 holds exactly for finite x, so a row
// whose best distance is NaN or +-Inf (NaN/Inf in z, or overflow) gets -1,
// which the caller turns into an error.
template <typename acc_t, typename index_t>
C10_HOST_DEVICE inline int64_t row_result(acc_t best, index_t best_k) {
  return best - best == acc_t(0) ? static_cast<int64_t>(best_k) : int64_t(-1);
}

}  // namespace vq
