// CPU kernels of vqvae_ext: nearest-code search and the EMA statistics.
//
// nearest_code never builds the (N, K) distance matrix. Rows of z are taken in
// blocks of R rows; each thread owns one (R, K) buffer, about the size of a core's
// L2 cache, into which BLAS writes the block's dot products <z, e_k>.
// The block is then reduced at once with the arg-min of vq_common.h while it is
// still in cache. Extra memory: threads * R * K elements (512 KiB per thread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "vq_common.h"

// On x86-64 Linux with GCC or Clang, the row reduction is compiled twice, for
// AVX2 and for the baseline SSE2, and the loader picks the clone the CPU runs
// (function multiversioning through glibc's ifunc): no -march flag, one binary
// for every x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__)
#define VQ_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VQ_CPU_CLONES
#endif

namespace {

// Rows per block: the (R, K) dot-product buffer takes about 512 KiB. Larger
// blocks spread BLAS's per-call packing of the codebook over more rows, until
// the buffer no longer fits in L2 (the sizes were compared with
// benchmarks/bench_quantize.py; docs/extension.md).
int64_t block_rows(int64_t K, int64_t elem_size) {
  constexpr int64_t kBufferBytes = 512 * 1024;
  return std::clamp<int64_t>(kBufferBytes / (K * elem_size), 8, 1024);
}

// 32-byte SIMD vectors through GCC/Clang vector extensions: one AVX2 register
// in the AVX2 clone, two SSE2 (or NEON) registers elsewhere, with no -march
// flag. Arithmetic, `<` (giving a lane mask) and `?:` act lane by lane, so the
// scalar templates of vq_common.h run unchanged on them. Each lane carries a
// code index of the same width as its value.
template <typename scalar_t>
struct Simd;
template <>
struct Simd<float> {
  using Int = int32_t;
  typedef float Value __attribute__((vector_size(32)));
  typedef int32_t Index __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  using Int = int64_t;
  typedef double Value __attribute__((vector_size(32)));
  typedef int64_t Index __attribute__((vector_size(32)));
};

template <typename V, typename T>
V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}

// Arg-min of d_k = norm_sq[k] - 2 dot[k] over k in [0, K). kVectors vectors of
// W lanes each keep a running (min, index); lane l of them sees codes l, l + L,
// l + 2L, ... (L = kVectors * W) in increasing order, so it keeps its lowest
// index among equal distances, and merging the lanes with the lower index
// winning ties gives the lowest index overall.
template <typename scalar_t>
__attribute__((always_inline)) inline int64_t row_argmin(const scalar_t* norm_sq, const scalar_t* dot, int64_t K) {
  using V = typename Simd<scalar_t>::Value;
  using I = typename Simd<scalar_t>::Index;
  using Int = typename Simd<scalar_t>::Int;
  constexpr int64_t W = sizeof(V) / sizeof(scalar_t);
  constexpr int64_t kVectors = 4;  // independent chains hide the compare-select latency
  constexpr int64_t L = kVectors * W;
  scalar_t inf[L];
  Int iota[L];
  for (int64_t l = 0; l < L; ++l) {
    inf[l] = vq::no_distance<scalar_t>();
    iota[l] = static_cast<Int>(l);
  }
  V best[kVectors];
  I best_k[kVectors], k[kVectors];
  for (int64_t v = 0; v < kVectors; ++v) {
    best[v] = load<V>(inf + v * W);
    best_k[v] = I{};
    k[v] = load<I>(iota + v * W);
  }
  int64_t k0 = 0;
  for (; k0 + L <= K; k0 += L) {
    for (int64_t v = 0; v < kVectors; ++v) {
      const V d = vq::code_distance(load<V>(norm_sq + k0 + v * W), load<V>(dot + k0 + v * W));
      vq::argmin_update(best[v], best_k[v], d, k[v]);
      k[v] += static_cast<Int>(L);
    }
  }
  scalar_t row_best = vq::no_distance<scalar_t>();
  int64_t row_k = 0;
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t j = 0; j < W; ++j) vq::argmin_merge(row_best, row_k, scalar_t(best[v][j]), int64_t(best_k[v][j]));
  }
  for (; k0 < K; ++k0) {  // tail, K not a multiple of L: higher indices than all above
    vq::argmin_update(row_best, row_k, vq::code_distance(norm_sq[k0], dot[k0]), k0);
  }
  return vq::row_result(row_best, row_k);
}

// The arg-min of each row of a block of dot products, for each dtype (the
// clones of a multiversioned function must not be templates).
VQ_CPU_CLONES void argmin_rows(const float* norm_sq, const float* dots, int64_t rows, int64_t K, int64_t* out) {
  for (int64_t i = 0; i < rows; ++i) out[i] = row_argmin(norm_sq, dots + i * K, K);
}
VQ_CPU_CLONES void argmin_rows(const double* norm_sq, const double* dots, int64_t rows, int64_t K, int64_t* out) {
  for (int64_t i = 0; i < rows; ++i) out[i] = row_argmin(norm_sq, dots + i * K, K);
}

template <typename scalar_t>
void nearest_code_impl(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq,
                       at::Tensor& out) {
  const int64_t N = z.size(0), K = codebook.size(0);
  const int64_t R = block_rows(K, sizeof(scalar_t));
  const at::Tensor codebook_t = codebook.t();  // (D, K) view, no copy
  const scalar_t* norm = norm_sq.data_ptr<scalar_t>();
  int64_t* idx = out.data_ptr<int64_t>();

  at::parallel_for(0, (N + R - 1) / R, /*grain_size=*/1, [&](int64_t b_begin, int64_t b_end) {
    at::Tensor dots = at::empty({R, K}, z.options());  // this thread's block buffer
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * R, rows = std::min(R, N - r0);
      at::Tensor block = dots.narrow(0, 0, rows);
      at::mm_out(block, z.narrow(0, r0, rows), codebook_t);  // (rows, D) @ (D, K)
      argmin_rows(norm, block.data_ptr<scalar_t>(), rows, K, idx + r0);
    }
  });
}

// Per-code counts and sums of the rows assigned to each code. Each thread owns a
// range of codes and scans all rows in order, so the sums are deterministic and
// accumulate in the same order as index_add_, without atomics or a one-hot matrix.
template <typename scalar_t>
void ema_stats_impl(const at::Tensor& z, const at::Tensor& codes, at::Tensor& counts, at::Tensor& sums) {
  const int64_t N = z.size(0), D = z.size(1), K = counts.size(0);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const int64_t* idx = codes.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  scalar_t* sum = sums.data_ptr<scalar_t>();
  at::parallel_for(0, K, /*grain_size=*/16, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t k = idx[i];
      if (k < k_begin || k >= k_end) continue;
      cnt[k] += 1;
      for (int64_t d = 0; d < D; ++d) sum[k * D + d] += zp[i * D + d];
    }
  });
}

}  // namespace

// Inputs are validated and made contiguous by bindings.cpp. out[i] = -1 flags a
// row with a non-finite best distance.
void nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq,
                      at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "nearest_code_cpu",
                             [&] { nearest_code_impl<scalar_t>(z, codebook, norm_sq, out); });
}

// counts (K,) int64 and sums (K, D) of z's dtype, both zero-filled by the caller.
void ema_stats_cpu(const at::Tensor& z, const at::Tensor& codes, at::Tensor& counts, at::Tensor& sums) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ema_stats_cpu",
                             [&] { ema_stats_impl<scalar_t>(z, codes, counts, sums); });
}
