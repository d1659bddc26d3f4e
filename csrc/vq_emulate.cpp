// The CUDA nearest-code kernel run on the CPU, for tests: every block and every thread goes
// through the phases of vq_tiling.h in the order the kernel gives them. Within a block, all
// threads finish a phase before any starts the next (the kernel's __syncthreads()), the shared
// tiles are one array that every thread writes and reads, and a shuffle step reads the partner's
// values from a snapshot taken before the step (all lanes exchange at once). Slow by design: one
// scalar thread after another.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "vq_tiling.h"

namespace {

namespace tiling = vq::tiling;

template <typename scalar_t>
void emulate(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using State = tiling::ThreadState<acc_t>;
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* ep = codebook.data_ptr<scalar_t>();
  const acc_t* norm = norm_sq.data_ptr<acc_t>();
  int64_t* idx = out.data_ptr<int64_t>();
  auto tiles = std::make_unique<tiling::SharedTiles<acc_t>>();
  std::vector<State> threads(tiling::kThreads), before(tiling::kThreads);

  for (int64_t block = 0; block * tiling::kRows < N; ++block) {
    const int64_t row0 = block * tiling::kRows;
    for (State& s : threads) tiling::start_rows(s);
    for (int64_t k0 = 0; k0 < K; k0 += tiling::kTileK) {
      for (State& s : threads) tiling::clear_dots(s);
      for (int64_t d0 = 0; d0 < D; d0 += tiling::kTileD) {
        for (int tid = 0; tid < tiling::kThreads; ++tid)
          tiling::stage_tiles(*tiles, tid, zp, ep, row0, k0, d0, N, K, D);
        for (int tid = 0; tid < tiling::kThreads; ++tid) tiling::accumulate(threads[tid], *tiles, tid);
      }
      for (int tid = 0; tid < tiling::kThreads; ++tid) tiling::update_best(threads[tid], norm, tid, k0, K);
    }
    for (int offset = tiling::kThreadCols / 2; offset > 0; offset /= 2) {
      before = threads;
      for (int tid = 0; tid < tiling::kThreads; ++tid) {
        const State& partner = before[tid ^ offset];  // lane ^ offset of the same warp
        tiling::merge_step(threads[tid], [&](int i, acc_t, int64_t, acc_t& other, int64_t& other_k) {
          other = partner.best[i];
          other_k = partner.best_k[i];
        });
      }
    }
    for (int tid = 0; tid < tiling::kThreads; ++tid) tiling::store_rows(threads[tid], tid, row0, N, idx);
  }
}

}  // namespace

// Inputs validated and contiguous (bindings.cpp); the four dtypes of the CUDA kernel.
void nearest_code_emulated_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq,
                                at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nearest_code_emulated_cuda",
                                  [&] { emulate<scalar_t>(z, codebook, norm_sq, out); });
}
