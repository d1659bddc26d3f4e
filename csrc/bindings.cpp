// Python module vqvae_ext: input validation and device dispatch for the kernels
// in vq_cpu.cpp and vq_cuda.cu. Every check names the argument and says what
// was expected and what was received; TORCH_CHECK surfaces as RuntimeError.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <tuple>

// Kernels: inputs already validated and contiguous (see the .cpp/.cu files).
void nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq, at::Tensor& out);
void ema_stats_cpu(const at::Tensor& z, const at::Tensor& indices, at::Tensor& counts, at::Tensor& sums);
#ifdef VQVAE_WITH_CUDA
void nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& norm_sq, at::Tensor& out);
void ema_stats_cuda(const at::Tensor& z, const at::Tensor& indices, at::Tensor& counts, at::Tensor& sums);
#endif

namespace {

// z must be (N, D) floating point, D >= 1, of a dtype the device's kernel supports.
void check_z(const at::Tensor& z, const char* fn) {
  TORCH_CHECK(z.dim() == 2, fn, ": z must be 2-D (N, D), got shape ", z.sizes());
  TORCH_CHECK(z.size(1) > 0, fn, ": z must have D >= 1, got shape ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), fn, ": z must be a floating-point tensor, got dtype ",
              z.scalar_type());
  if (z.is_cpu()) {
    TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, fn,
                ": on CPU z must be float32 or float64, got dtype ", z.scalar_type());
  } else if (z.is_cuda()) {
#ifndef VQVAE_WITH_CUDA
    TORCH_CHECK(false, fn, ": z is on ", z.device(),
                " but vqvae_ext was built without CUDA kernels (reinstall with torch+CUDA and nvcc present)");
#endif
  } else {
    TORCH_CHECK(false, fn, ": z must be on CPU or CUDA, got device ", z.device());
  }
}

}  // namespace

// Index of the nearest code for every row of z, ties broken to the lowest index.
// z (N, D), codebook (K, D) of the same dtype and device -> (N,) int64.
// N = 0 gives an empty (0,) int64 tensor. NaN/Inf in z or the codebook raise.
at::Tensor nearest_code(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  constexpr const char* fn = "nearest_code";
  check_z(z_in, fn);
  TORCH_CHECK(codebook_in.dim() == 2, fn, ": codebook must be 2-D (K, D), got shape ", codebook_in.sizes());
  TORCH_CHECK(codebook_in.size(0) > 0, fn, ": codebook must have K >= 1 codes, got shape ", codebook_in.sizes());
  TORCH_CHECK(codebook_in.size(1) == z_in.size(1), fn, ": codebook must be (K, D) with D = ", z_in.size(1),
              " to match z ", z_in.sizes(), ", got codebook ", codebook_in.sizes());
  TORCH_CHECK(codebook_in.device() == z_in.device(), fn, ": codebook must be on z's device ", z_in.device(),
              ", got ", codebook_in.device());
  TORCH_CHECK(codebook_in.scalar_type() == z_in.scalar_type(), fn, ": codebook must have z's dtype ",
              z_in.scalar_type(), ", got ", codebook_in.scalar_type());

  // detach: the search is not differentiable, and must not record autograd
  // history from the kernel's worker threads.
  const at::Tensor z = z_in.detach().contiguous();
  const at::Tensor codebook = codebook_in.detach().contiguous();
  // ||e_k||^2 once per call, in the accumulation dtype (fp32 for fp16/bf16),
  // the same way (e**2).sum(1) computes it on the PyTorch side.
  const at::Tensor norm_sq = codebook.to(at::toOpMathType(codebook.scalar_type())).square().sum(1);
  TORCH_CHECK(at::isfinite(norm_sq).all().item<bool>(), fn,
              ": codebook contains NaN/Inf (or a code's squared norm overflows)");

  at::Tensor out = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  if (z.size(0) == 0) return out;
  if (z.is_cpu()) {
    nearest_code_cpu(z, codebook, norm_sq, out);
  } else {
#ifdef VQVAE_WITH_CUDA
    nearest_code_cuda(z, codebook, norm_sq, out);
#endif
  }
  // The kernels store -1 where a row's best distance is not finite.
  TORCH_CHECK(out.min().item<int64_t>() >= 0, fn, ": z contains NaN/Inf (or its distances to the codebook overflow)");
  return out;
}

// Per-code statistics of the EMA codebook update (Appendix A.1 of the paper):
// counts[k] = n_k = #{i : indices[i] = k} and sums[k] = sum of z[i] over those i,
// computed without a one-hot matrix.
// z (N, D), indices (N,) int64 in [0, K) -> counts (K,) float32, sums (K, D) float32.
std::tuple<at::Tensor, at::Tensor> ema_stats(const at::Tensor& z_in, const at::Tensor& indices_in,
                                             int64_t num_embeddings) {
  constexpr const char* fn = "ema_stats";
  check_z(z_in, fn);
  TORCH_CHECK(num_embeddings > 0, fn, ": num_embeddings must be >= 1, got ", num_embeddings);
  TORCH_CHECK(indices_in.dim() == 1 && indices_in.size(0) == z_in.size(0), fn, ": indices must have shape (N,) = (",
              z_in.size(0), ",) to match z ", z_in.sizes(), ", got ", indices_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, fn, ": indices must be int64, got dtype ",
              indices_in.scalar_type());
  TORCH_CHECK(indices_in.device() == z_in.device(), fn, ": indices must be on z's device ", z_in.device(), ", got ",
              indices_in.device());
  if (indices_in.numel() > 0) {
    const auto [lo, hi] = at::aminmax(indices_in);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < num_embeddings, fn, ": indices must be in [0, num_embeddings) = [0, ",
                num_embeddings, "), got values in [", lo_v, ", ", hi_v, "]");
  }

  const at::Tensor z = z_in.detach().contiguous();
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor counts = at::zeros({num_embeddings}, z.options().dtype(at::kFloat));
  // Sums accumulate in the kernel's dtype (fp32, or fp64 for float64 z), returned as float32.
  at::Tensor sums = at::zeros({num_embeddings, z.size(1)}, z.options().dtype(at::toOpMathType(z.scalar_type())));
  if (z.is_cpu()) {
    ema_stats_cpu(z, indices, counts, sums);
  } else {
#ifdef VQVAE_WITH_CUDA
    ema_stats_cuda(z, indices, counts, sums);
#endif
  }
  return {counts, sums.to(at::kFloat)};
}

bool has_cuda() {
#ifdef VQVAE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled nearest-code search and EMA statistics for the VQ-VAE quantizer (see vqvae.py).";
  m.def("nearest_code", &nearest_code, py::arg("z"), py::arg("codebook"),
        "nearest_code(z (N, D), codebook (K, D)) -> (N,) int64: argmin_k ||e_k||^2 - 2 <z, e_k>, ties to the lowest "
        "k. Same dtype and device for both; CPU: float32/float64, CUDA: also float16/bfloat16 (fp32 accumulation). "
        "N = 0 gives an empty tensor; NaN/Inf in z or codebook raise RuntimeError.");
  m.def("ema_stats", &ema_stats, py::arg("z"), py::arg("indices"), py::arg("num_embeddings"),
        "ema_stats(z (N, D), indices (N,) int64, num_embeddings K) -> (counts (K,) float32, sums (K, D) float32): "
        "per-code counts and sums of the rows of z assigned to each code.");
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled in.");
}
