// The tiling of the CUDA nearest-code kernel, written once for two callers: the kernel itself
// (vq_cuda.cu) and a CPU emulation of it (vq_emulate.cpp) that steps every block and every
// thread through the same functions, with shared memory as an array, each __syncthreads() as the
// end of a phase that all threads of the block finish before any starts the next, and the warp
// shuffles as an exchange between snapshots. The CPU tests run the emulation on exact ties, sizes
// off the tile sizes and NaN, so they check the arithmetic and the indexing that the GPU runs;
// benchmarks/gpu_check.py checks that a GPU returns the emulation's codes.
//
// Register blocking: a block of kThreads = 256 threads serves kRows = 128 rows of z. Thread
// (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 i and codes tx + 16 j of each codebook tile
// (i, j < 8): 64 dot products in registers, fed by 8 + 8 shared-memory loads per dimension, so
// the inner loop does four FMAs per load. The 16 threads that share rows are 16 adjacent lanes
// of one warp and merge their (min, index) pairs with xor shuffles at the end.
#pragma once

#include "vq_common.h"

#include <cstdint>

#if defined(__CUDACC__)
#define VQ_UNROLL _Pragma("unroll")
#else
#define VQ_UNROLL
#endif

namespace vq {
namespace tiling {

constexpr int kThreadRows = 16;                         // ty: threads along rows of z
constexpr int kThreadCols = 16;                         // tx: threads along codes, adjacent lanes
constexpr int kThreads = kThreadRows * kThreadCols;     // 256 threads per block
constexpr int kRowsPerThread = 8;
constexpr int kCodesPerThread = 8;
constexpr int kRows = kThreadRows * kRowsPerThread;     // 128 rows of z per block
constexpr int kTileK = kThreadCols * kCodesPerThread;   // 128 codes per shared-memory tile
constexpr int kTileD = 16;                              // dims per shared-memory tile
static_assert(kThreads % 32 == 0 && 32 % kThreadCols == 0, "the threads of a row must share one warp");
static_assert((kRows * kTileD) % kThreads == 0 && (kTileK * kTileD) % kThreads == 0,
              "every thread stages the same number of elements");

// d-major tiles: in the inner loop the 16 lanes of a half-warp read 16 consecutive codes (16
// banks) and one row (a broadcast). The +1 keeps the transposing stores to 2-way bank conflicts.
template <typename acc_t>
struct SharedTiles {
  acc_t z[kTileD][kRows + 1];
  acc_t e[kTileD][kTileK + 1];
};

// What one thread keeps in registers.
template <typename acc_t>
struct ThreadState {
  acc_t dot[kRowsPerThread][kCodesPerThread];  // <z_row, e_code> over the dims staged so far
  acc_t best[kRowsPerThread];                  // running minimum of d_k per row
  int64_t best_k[kRowsPerThread];
};

template <typename acc_t>
C10_HOST_DEVICE inline void start_rows(ThreadState<acc_t>& s) {
  VQ_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    s.best[i] = no_distance<acc_t>();
    s.best_k[i] = 0;
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline void clear_dots(ThreadState<acc_t>& s) {
  VQ_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    VQ_UNROLL
    for (int j = 0; j < kCodesPerThread; ++j) s.dot[i][j] = acc_t(0);
  }
}

// Phase 1, between two barriers: thread tid copies its share of the block's rows [row0, row0 +
// kRows) of z and of the codes [k0, k0 + kTileK), dims [d0, d0 + kTileD), into shared memory.
// Consecutive threads read consecutive dims (coalesced); entries past N, K or D are 0, which adds
// nothing to a dot product.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void stage_tiles(SharedTiles<acc_t>& tiles, int tid, const scalar_t* z,
                                        const scalar_t* codebook, int64_t row0, int64_t k0, int64_t d0,
                                        int64_t N, int64_t K, int64_t D) {
  VQ_UNROLL
  for (int s = 0; s < kRows * kTileD / kThreads; ++s) {
    const int i = tid + s * kThreads, r = i / kTileD, d = i % kTileD;
    const int64_t n = row0 + r, dd = d0 + d;
    tiles.z[d][r] = (n < N && dd < D) ? static_cast<acc_t>(z[n * D + dd]) : acc_t(0);
  }
  VQ_UNROLL
  for (int s = 0; s < kTileK * kTileD / kThreads; ++s) {
    const int i = tid + s * kThreads, c = i / kTileD, d = i % kTileD;
    const int64_t k = k0 + c, dd = d0 + d;
    tiles.e[d][c] = (k < K && dd < D) ? static_cast<acc_t>(codebook[k * D + dd]) : acc_t(0);
  }
}

// Phase 2: the staged dims added to the thread's 8 x 8 dot products, in increasing d, so a dot
// product is the same sequential sum whatever the tile sizes.
template <typename acc_t>
C10_HOST_DEVICE inline void accumulate(ThreadState<acc_t>& s, const SharedTiles<acc_t>& tiles, int tid) {
  const int ty = tid / kThreadCols, tx = tid % kThreadCols;
  VQ_UNROLL
  for (int d = 0; d < kTileD; ++d) {
    acc_t zr[kRowsPerThread], er[kCodesPerThread];
    VQ_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) zr[i] = tiles.z[d][ty + i * kThreadRows];
    VQ_UNROLL
    for (int j = 0; j < kCodesPerThread; ++j) er[j] = tiles.e[d][tx + j * kThreadCols];
    VQ_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      VQ_UNROLL
      for (int j = 0; j < kCodesPerThread; ++j) s.dot[i][j] = dot_step(s.dot[i][j], zr[i], er[j]);
    }
  }
}

// Phase 3, once all dims of the tile of codes at k0 are in: d_k = ||e_k||^2 - 2 <z, e_k> into the
// running arg-min of each row. A thread meets its codes in increasing index order (j, then the
// tiles), as argmin_update requires for ties to go to the lowest index.
template <typename acc_t>
C10_HOST_DEVICE inline void update_best(ThreadState<acc_t>& s, const acc_t* norm_sq, int tid, int64_t k0,
                                        int64_t K) {
  const int tx = tid % kThreadCols;
  VQ_UNROLL
  for (int j = 0; j < kCodesPerThread; ++j) {
    const int64_t k = k0 + tx + j * kThreadCols;
    if (k < K) {
      const acc_t norm = norm_sq[k];
      VQ_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) argmin_update(s.best[i], s.best_k[i], code_distance(norm, s.dot[i][j]), k);
    }
  }
}

// Phase 4, one step of the butterfly over the kThreadCols threads of a row group, for offsets
// kThreadCols / 2, ..., 1: exchange(i, best, best_k, other, other_k) returns the values of row i
// held by the thread tid ^ offset before this step; the lower index wins ties, so after the last
// step every thread of the group holds the group's arg-min of each of its rows.
template <typename acc_t, typename Exchange>
C10_HOST_DEVICE inline void merge_step(ThreadState<acc_t>& s, Exchange exchange) {
  VQ_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    acc_t other;
    int64_t other_k;
    exchange(i, s.best[i], s.best_k[i], other, other_k);
    argmin_merge(s.best[i], s.best_k[i], other, other_k);
  }
}

// Phase 5: the first thread of each row group writes its rows (-1 where the best distance is not
// finite, see row_result).
template <typename acc_t>
C10_HOST_DEVICE inline void store_rows(const ThreadState<acc_t>& s, int tid, int64_t row0, int64_t N, int64_t* out) {
  const int ty = tid / kThreadCols, tx = tid % kThreadCols;
  if (tx != 0) return;
  VQ_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t n = row0 + ty + i * kThreadRows;
    if (n < N) out[n] = row_result(s.best[i], s.best_k[i]);
  }
}

}  // namespace tiling
}  // namespace vq
