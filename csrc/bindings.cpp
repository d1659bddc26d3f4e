// The operators of vqvae_ext, registered with PyTorch's dispatcher (TORCH_LIBRARY), so that
// torch.compile and torch.library.opcheck see them as ordinary operators:
//
//   torch.ops.vqvae_ext.nearest_code(z (N, D), codebook (K, D)) -> (N,) int64, -1 for a row of z
//       with no finite distance (NaN/Inf in it, or an overflow): the caller decides (vqvae.py
//       raises its NonFiniteError, as its PyTorch path does)
//   torch.ops.vqvae_ext.ema_stats(z (N, D), codes (N,) int64, num_embeddings K)
//       -> (counts (K,) int64, sums (K, D))
//
// Each has a CPU kernel (vq_cpu.cpp), a CUDA kernel (vq_cuda.cu, when compiled in) and a Meta
// kernel that only infers shapes and dtypes, which is what torch.compile's fake tensors run.
// Every check names the argument, what was expected and what was received (RuntimeError in
// Python). Checks of values (a non-finite codebook, codes out of range) raise on the CPU; on
// CUDA they are asynchronous device-side asserts, so that no operator waits for the GPU.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

// Kernels: inputs already validated and contiguous (see the .cpp/.cu files).
void nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq, at::Tensor& out);
void ema_stats_cpu(const at::Tensor& z, const at::Tensor& codes, at::Tensor& counts, at::Tensor& sums);
void nearest_code_emulated_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq,
                                at::Tensor& out);
#ifdef VQVAE_WITH_CUDA
void nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq, at::Tensor& out);
void ema_stats_cuda(const at::Tensor& z, const at::Tensor& codes, at::Tensor& counts, at::Tensor& sums);
bool cuda_kernels_run_on(int64_t device);
#else
bool cuda_kernels_run_on(int64_t) { return false; }  // no CUDA kernels compiled in
#endif

namespace {

// Shape, dtype and device checks shared by every kernel, on symbolic sizes so that the Meta
// kernel also serves torch.compile with dynamic shapes.
void check_z(const at::Tensor& z, const char* fn, bool cpu_kernel = true) {
  TORCH_CHECK(z.dim() == 2, fn, ": z must be 2-D (N, D), got shape ", z.sym_sizes());
  TORCH_CHECK(z.sym_size(1) > 0, fn, ": z must have D >= 1, got shape ", z.sym_sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), fn, ": z must be a floating-point tensor, got dtype ",
              z.scalar_type());
  if (cpu_kernel && z.is_cpu()) {
    TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, fn,
                ": on CPU z must be float32 or float64, got dtype ", z.scalar_type());
  }
}

void check_nearest_code(const at::Tensor& z, const at::Tensor& codebook, bool cpu_kernel = true) {
  constexpr const char* fn = "nearest_code";
  check_z(z, fn, cpu_kernel);
  TORCH_CHECK(codebook.dim() == 2, fn, ": codebook must be 2-D (K, D), got shape ", codebook.sym_sizes());
  TORCH_CHECK(codebook.sym_size(0) > 0, fn, ": codebook must have K >= 1 codes, got shape ", codebook.sym_sizes());
  TORCH_CHECK(codebook.sym_size(1) == z.sym_size(1), fn, ": codebook must be (K, D) with D = ", z.sym_size(1),
              " to match z ", z.sym_sizes(), ", got codebook ", codebook.sym_sizes());
  TORCH_CHECK(codebook.device() == z.device(), fn, ": codebook must be on z's device ", z.device(), ", got ",
              codebook.device());
  TORCH_CHECK(codebook.scalar_type() == z.scalar_type(), fn, ": codebook must have z's dtype ", z.scalar_type(),
              ", got ", codebook.scalar_type());
}

void check_ema_stats(const at::Tensor& z, const at::Tensor& codes, int64_t num_embeddings) {
  constexpr const char* fn = "ema_stats";
  check_z(z, fn);
  TORCH_CHECK(num_embeddings > 0, fn, ": num_embeddings must be >= 1, got ", num_embeddings);
  TORCH_CHECK(codes.dim() == 1 && codes.sym_size(0) == z.sym_size(0), fn, ": codes must have shape (N,) = (",
              z.sym_size(0), ",) to match z ", z.sym_sizes(), ", got ", codes.sym_sizes());
  TORCH_CHECK(codes.scalar_type() == at::kLong, fn, ": codes must be int64, got dtype ", codes.scalar_type());
  TORCH_CHECK(codes.device() == z.device(), fn, ": codes must be on z's device ", z.device(), ", got ",
              codes.device());
}

// Sums accumulate and are returned in float64 for float64 z, float32 otherwise.
at::ScalarType sums_dtype(const at::Tensor& z) { return at::toOpMathType(z.scalar_type()); }

// ||e_k||^2 once per call, in the accumulation dtype (fp32 for fp16/bf16), the same way
// (e**2).sum(1) computes it on the PyTorch side.
at::Tensor code_norms(const at::Tensor& codebook) {
  return codebook.to(at::toOpMathType(codebook.scalar_type())).square().sum(1);
}

// ---------------------------------------------------------------- nearest_code

// Index of the nearest code for every row of z (Eq. 1 of the paper), ties to the lowest index.
at::Tensor nearest_code_meta(const at::Tensor& z, const at::Tensor& codebook) {
  check_nearest_code(z, codebook);
  return at::empty_symint({z.sym_size(0)}, z.options().dtype(at::kLong));
}

at::Tensor nearest_code_cpu_op(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  constexpr const char* fn = "nearest_code";
  check_nearest_code(z_in, codebook_in);
  // detach: the search is not differentiable and must not record autograd history from the
  // kernel's worker threads.
  const at::Tensor z = z_in.detach().contiguous(), codebook = codebook_in.detach().contiguous();
  const at::Tensor norm_sq = code_norms(codebook);
  TORCH_CHECK(at::isfinite(norm_sq).all().item<bool>(), fn,
              ": codebook contains NaN/Inf (or a code's squared norm overflows)");
  at::Tensor out = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  if (z.size(0) == 0) return out;
  nearest_code_cpu(z, codebook, norm_sq, out);  // -1 where a row's best distance is not finite
  return out;
}

#ifdef VQVAE_WITH_CUDA
at::Tensor nearest_code_cuda_op(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  check_nearest_code(z_in, codebook_in);
  const at::Tensor z = z_in.detach().contiguous(), codebook = codebook_in.detach().contiguous();
  const at::Tensor norm_sq = code_norms(codebook);
  at::Tensor out = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  if (z.size(0) == 0) return out;
  nearest_code_cuda(z, codebook, norm_sq, out);  // -1 where a row's best distance is not finite
  // Asynchronous: a failure surfaces at the next synchronisation as a device-side assert.
  at::_assert_async(at::isfinite(norm_sq).all(), "nearest_code: codebook contains NaN/Inf (or a code's squared "
                    "norm overflows)");
  return out;
}
#endif

// The CUDA kernel's tiling run on the CPU, thread by thread (vq_emulate.cpp), for tests: the
// codes nearest_code returns on a GPU for these inputs, any of the four dtypes, with -1 kept
// where a row has no finite distance. norm_sq: the codes' squared norms the GPU used (default:
// computed here), so that a GPU's answer can be compared bit for bit.
at::Tensor emulate_cuda_nearest_code(const at::Tensor& z_in, const at::Tensor& codebook_in,
                                     const std::optional<at::Tensor>& norm_sq_in) {
  constexpr const char* fn = "emulate_cuda_nearest_code";
  TORCH_CHECK(z_in.is_cpu(), fn, ": z must be on the CPU, got ", z_in.device());
  check_nearest_code(z_in, codebook_in, /*cpu_kernel=*/false);
  const at::Tensor z = z_in.detach().contiguous(), codebook = codebook_in.detach().contiguous();
  const at::Tensor norm_sq = norm_sq_in ? norm_sq_in->detach().cpu().contiguous() : code_norms(codebook);
  TORCH_CHECK(norm_sq.dim() == 1 && norm_sq.size(0) == codebook.size(0) &&
                  norm_sq.scalar_type() == at::toOpMathType(z.scalar_type()),
              fn, ": norm_sq must be (K,) = (", codebook.size(0), ",) of dtype ", at::toOpMathType(z.scalar_type()),
              ", got shape ", norm_sq.sizes(), " and dtype ", norm_sq.scalar_type());
  at::Tensor out = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  if (z.size(0) > 0) nearest_code_emulated_cuda(z, codebook, norm_sq, out);
  return out;
}

// ------------------------------------------------------------------ ema_stats

// Per-code statistics of the EMA codebook update (Appendix A.1 of the paper):
// counts[k] = n_k = #{i : codes[i] = k} (exact integers) and sums[k] = sum of z[i] over those i.
std::tuple<at::Tensor, at::Tensor> ema_stats_meta(const at::Tensor& z, const at::Tensor& codes,
                                                  int64_t num_embeddings) {
  check_ema_stats(z, codes, num_embeddings);
  return {at::empty({num_embeddings}, z.options().dtype(at::kLong)),
          at::empty_symint({c10::SymInt(num_embeddings), z.sym_size(1)}, z.options().dtype(sums_dtype(z)))};
}

std::tuple<at::Tensor, at::Tensor> ema_stats_cpu_op(const at::Tensor& z_in, const at::Tensor& codes_in,
                                                    int64_t num_embeddings) {
  check_ema_stats(z_in, codes_in, num_embeddings);
  if (codes_in.numel() > 0) {
    const auto [lo, hi] = at::aminmax(codes_in);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < num_embeddings, "ema_stats: codes must be in [0, num_embeddings) = [0, ",
                num_embeddings, "), got values in [", lo_v, ", ", hi_v, "]");
  }
  const at::Tensor z = z_in.detach().contiguous(), codes = codes_in.contiguous();
  at::Tensor counts = at::zeros({num_embeddings}, z.options().dtype(at::kLong));
  at::Tensor sums = at::zeros({num_embeddings, z.size(1)}, z.options());
  ema_stats_cpu(z, codes, counts, sums);
  return {counts, sums};
}

#ifdef VQVAE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> ema_stats_cuda_op(const at::Tensor& z_in, const at::Tensor& codes_in,
                                                     int64_t num_embeddings) {
  check_ema_stats(z_in, codes_in, num_embeddings);
  const at::Tensor z = z_in.detach().contiguous(), codes = codes_in.contiguous();
  if (codes.numel() > 0) {
    const auto [lo, hi] = at::aminmax(codes);
    at::_assert_async(lo.ge(0).logical_and(hi.lt(num_embeddings)),
                      "ema_stats: codes must be in [0, num_embeddings)");
  }
  if (at::globalContext().deterministicAlgorithms()) {
    // The float atomics of the kernel add in a varying order; bincount (integer) and index_add_
    // (sorted under this mode) are deterministic.
    return {at::bincount(codes, {}, num_embeddings),
            at::zeros({num_embeddings, z.size(1)}, z.options().dtype(sums_dtype(z)))
                .index_add_(0, codes, z.to(sums_dtype(z)))};
  }
  at::Tensor counts = at::zeros({num_embeddings}, z.options().dtype(at::kLong));
  at::Tensor sums = at::zeros({num_embeddings, z.size(1)}, z.options().dtype(sums_dtype(z)));
  ema_stats_cuda(z, codes, counts, sums);
  return {counts, sums};
}
#endif

// Build facts for Python: whether the CUDA kernels are compiled in. Whether they also run on a
// given GPU is cuda_kernels_run_on's answer (vq_cuda.cu), asked of the CUDA runtime.
py::dict build_info() {
  py::dict info;
#ifdef VQVAE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(vqvae_ext, m) {
  m.def("nearest_code(Tensor z, Tensor codebook) -> Tensor");
  m.def("ema_stats(Tensor z, Tensor codes, int num_embeddings) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqvae_ext, Meta, m) {
  m.impl("nearest_code", &nearest_code_meta);
  m.impl("ema_stats", &ema_stats_meta);
}

TORCH_LIBRARY_IMPL(vqvae_ext, CPU, m) {
  m.impl("nearest_code", &nearest_code_cpu_op);
  m.impl("ema_stats", &ema_stats_cpu_op);
}

#ifdef VQVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(vqvae_ext, CUDA, m) {
  m.impl("nearest_code", &nearest_code_cuda_op);
  m.impl("ema_stats", &ema_stats_cuda_op);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {  // vqvae_ext._C
  m.doc() =
      "Compiled nearest-code search and EMA statistics of the VQ-VAE quantizer (see vqvae.py). Importing it "
      "registers torch.ops.vqvae_ext.nearest_code(z (N, D), codebook (K, D)) -> (N,) int64, the argmin_k of "
      "||e_k||^2 - 2 <z, e_k> with ties to the lowest k (CPU: float32/float64; CUDA: also float16/bfloat16, "
      "fp32 accumulation), and torch.ops.vqvae_ext.ema_stats(z (N, D), codes (N,) int64, K) -> (counts (K,) "
      "int64, sums (K, D), float64 for float64 z, else float32).";
  m.def("emulate_cuda_nearest_code", &emulate_cuda_nearest_code, py::arg("z"), py::arg("codebook"),
        py::arg("norm_sq") = py::none(),
        "(N,) int64: the CUDA kernel's tiling run on the CPU thread by thread (tests and gpu_check.py); any of the "
        "four dtypes, -1 for a row with no finite distance; norm_sq (K,): the codes' squared norms to use.");
  m.def("build_info", &build_info, "dict: cuda (bool, CUDA kernels compiled in).");
  m.def("cuda_kernels_run_on", &cuda_kernels_run_on, py::arg("device"),
        "bool: the CUDA kernels are compiled in and the CUDA runtime can run them on GPU `device` (a binary "
        "for its architecture, or PTX the driver compiles for it). False without CUDA kernels or GPU.");
}
