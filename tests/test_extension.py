"""Tests of the compiled extension vqvae_ext (csrc/): its operators called directly.

nearest_code is checked against a float64 brute force of Eq. 1 of the paper,
k = argmin_j ||z - e_j||^2, with ties broken to the lowest index, and against
the pure-PyTorch formula addmm(||e||^2, z, e.T, alpha=-2).argmin(1).
ema_stats is checked against bincount / index_add_. torch.library.opcheck checks
the registration (schema, fake kernels, autograd, dynamic shapes).
"""
import pytest
import torch

from conftest import ROOT, require_extension

vqvae_ext = require_extension()
ops = torch.ops.vqvae_ext

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def addmm_reference(z, e):
    """The pure-PyTorch nearest code that the extension replaces."""
    return torch.addmm((e ** 2).sum(1), z, e.t(), alpha=-2).argmin(1)


# ---------------------------------------------------------------- nearest_code

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_data_matches_float64_brute_force(dtype, assert_nearest):
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(600, 32, generator=g, dtype=dtype), torch.randn(200, 32, generator=g, dtype=dtype)
    eps = EPS32 if dtype == torch.float32 else EPS64
    assert_nearest(ops.nearest_code(z, e), z, e, eps, min_clear=0.99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_data_equals_addmm_argmin_exactly(dtype):
    g = torch.Generator().manual_seed(1)
    z, e = torch.randn(4096, 64, generator=g, dtype=dtype), torch.randn(512, 64, generator=g, dtype=dtype)
    assert torch.equal(ops.nearest_code(z, e), addmm_reference(z, e))


@pytest.mark.parametrize("n", [1, 7, 511, 512, 513, 1100])
def test_rows_not_a_multiple_of_the_block(n, assert_nearest):
    # K = 256 float32 codes -> blocks of 512 rows on CPU
    g = torch.Generator().manual_seed(n)
    z, e = torch.randn(n, 16, generator=g), torch.randn(256, 16, generator=g)
    idx = ops.nearest_code(z, e)
    assert_nearest(idx, z, e)
    assert torch.equal(idx, addmm_reference(z, e))


@pytest.mark.parametrize("d", [1, 3, 17, 65])
@pytest.mark.parametrize("k", [1, 2, 15, 16, 17, 33])
def test_dims_and_codes_not_a_multiple_of_the_vector_width(d, k, assert_nearest):
    g = torch.Generator().manual_seed(100 * d + k)
    z, e = torch.randn(97, d, generator=g), torch.randn(k, d, generator=g)
    assert_nearest(ops.nearest_code(z, e), z, e)


def test_single_code_always_wins():
    z = torch.randn(50, 8)
    assert torch.equal(ops.nearest_code(z, torch.randn(1, 8)), torch.zeros(50, dtype=torch.int64))


def test_exact_tie_at_zero_goes_to_lowest_index():
    z = torch.zeros(5, 1)
    assert (ops.nearest_code(z, torch.tensor([[1.0], [-1.0]])) == 0).all()
    assert (ops.nearest_code(z, torch.tensor([[-1.0], [1.0]])) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p,q", [(0, 1), (1, 17), (1, 33), (15, 16), (31, 32), (3, 40), (0, 69), (64, 65)])
def test_equidistant_symmetric_codes_go_to_lowest_index(p, q, dtype):
    # e_q = -e_p and z = 0: identical distances in any precision. Of 70 codes, pairs in the same
    # SIMD lane (1, 33 for 32-byte float vectors; 1, 17 and 1, 33 for double), in adjacent lanes
    # and vectors (15, 16; 31, 32), in the main loop and the tail (0, 69), both in the tail (64, 65).
    g = torch.Generator().manual_seed(p * 70 + q)
    e = 3.0 + torch.rand(70, 6, generator=g, dtype=dtype)               # norms >= 3*sqrt(6)
    e[p] = torch.tensor([0.5, -0.25, 0.0, 1.0, 0.5, 0.25])
    e[q] = -e[p]
    assert (ops.nearest_code(torch.zeros(9, 6, dtype=dtype), e) == p).all()


def test_duplicated_codes_return_lowest_index(assert_nearest):
    g = torch.Generator().manual_seed(3)
    e = torch.randn(8, 4, generator=g).repeat(5, 1)                   # code j == code j + 8 == ...
    z = e[torch.randint(0, 40, (300,), generator=g)] + 0.01 * torch.randn(300, 4, generator=g)
    idx = ops.nearest_code(z, e)
    assert (idx < 8).all()
    assert_nearest(idx, z, e)
    assert (ops.nearest_code(z, torch.ones(70, 4)) == 0).all()  # all codes equal


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_huge_and_tiny_magnitudes(scale, assert_nearest):
    g = torch.Generator().manual_seed(4)
    z, e = scale * torch.randn(500, 24, generator=g), scale * torch.randn(100, 24, generator=g)
    idx = ops.nearest_code(z, e)
    assert_nearest(idx, z, e, min_clear=0.99)
    assert torch.equal(idx, addmm_reference(z, e))


def test_non_contiguous_inputs(assert_nearest):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(16, 300, generator=g).t()                          # (300, 16) transposed view
    e = torch.randn(64, 32, generator=g)[:, ::2]                        # (64, 16) strided slice
    assert not z.is_contiguous() and not e.is_contiguous()
    idx = ops.nearest_code(z, e)
    assert torch.equal(idx, ops.nearest_code(z.contiguous(), e.contiguous()))
    assert_nearest(idx, z, e)


def test_inputs_that_require_grad():
    z, e = torch.randn(10, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    assert torch.equal(ops.nearest_code(z, e), addmm_reference(z.detach(), e.detach()))


def test_inference_mode_inputs():
    # Large enough for several row blocks, so worker threads run outside inference mode.
    z, e = torch.randn(5000, 16), torch.randn(300, 16)
    with torch.inference_mode():
        z_inf, e_inf = z.clone(), e.clone()
        assert torch.equal(ops.nearest_code(z_inf, e_inf), addmm_reference(z, e))


def test_empty_z_returns_empty_int64():
    idx = ops.nearest_code(torch.empty(0, 8), torch.randn(4, 8))
    assert idx.shape == (0,) and idx.dtype == torch.int64


# ------------------------------------------------------------------ ema_stats

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_stats_equal_bincount_and_index_add(dtype):
    g = torch.Generator().manual_seed(6)
    n, d, k = 1000, 12, 64
    z = torch.randn(n, d, generator=g, dtype=dtype)
    codes = torch.randint(0, k - 5, (n,), generator=g)                # the last codes stay unused
    counts, sums = ops.ema_stats(z, codes, k)
    assert counts.dtype == torch.int64 and sums.dtype == dtype and counts.shape == (k,) and sums.shape == (k, d)
    assert torch.equal(counts, torch.bincount(codes, minlength=k))
    # Rows are added in index order, as index_add_ on the CPU does: bit-identical sums.
    assert torch.equal(sums, torch.zeros(k, d, dtype=dtype).index_add_(0, codes, z))


def test_ema_stats_non_contiguous_and_empty():
    z = torch.randn(8, 40).t()                                           # (40, 8) view
    codes = torch.arange(80)[::2] % 3
    counts, sums = ops.ema_stats(z, codes, 3)
    torch.testing.assert_close(sums, torch.zeros(3, 8).index_add_(0, codes, z))
    counts, sums = ops.ema_stats(torch.empty(0, 8), torch.empty(0, dtype=torch.int64), 3)
    assert torch.equal(counts, torch.zeros(3, dtype=torch.int64)) and torch.equal(sums, torch.zeros(3, 8))


@pytest.mark.parametrize("bad", [-1, 5])
def test_ema_stats_rejects_out_of_range_indices(bad):
    codes = torch.tensor([0, 1, bad, 2])
    with pytest.raises(RuntimeError, match=r"codes must be in \[0, num_embeddings\) = \[0, 5\)"):
        ops.ema_stats(torch.randn(4, 3), codes, 5)


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("z,e,message", [
    (torch.randn(8), torch.randn(4, 8), r"z must be 2-D \(N, D\), got shape \[8\]"),
    (torch.randn(2, 8, 1), torch.randn(4, 8), r"z must be 2-D"),
    (torch.randn(8, 4), torch.randn(4), r"codebook must be 2-D \(K, D\), got shape \[4\]"),
    (torch.randn(8, 4), torch.randn(4, 5), r"codebook must be \(K, D\) with D = 4 .* got codebook \[4, 5\]"),
    (torch.randn(8, 4), torch.randn(0, 4), r"codebook must have K >= 1 codes, got shape \[0, 4\]"),
    (torch.randn(8, 4), torch.randn(3, 4, dtype=torch.float64), r"codebook must have z's dtype Float, got Double"),
    (torch.ones(8, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64),
     r"z must be a floating-point tensor, got dtype Long"),
    (torch.randn(8, 4).half(), torch.randn(3, 4).half(), r"on CPU z must be float32 or float64, got dtype Half"),
    (torch.randn(8, 4), torch.randn(3, 4, device="meta"), r"codebook must be on z's device cpu, got meta"),
])
def test_nearest_code_rejects_bad_inputs_with_clear_messages(z, e, message):
    with pytest.raises(RuntimeError, match=message):
        ops.nearest_code(z, e)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_row_without_a_finite_distance_gets_minus_one_and_a_non_finite_codebook_raises(value):
    z, e = torch.randn(20, 4), torch.randn(6, 4)
    z_bad, e_bad = z.clone(), e.clone()
    z_bad[13, 2] = value
    e_bad[5, 1] = value
    codes = ops.nearest_code(z_bad, e)
    assert codes[13] == -1 and torch.equal(codes[torch.arange(20) != 13], ops.nearest_code(z, e)[torch.arange(20) != 13])
    with pytest.raises(RuntimeError, match="codebook contains NaN/Inf"):
        ops.nearest_code(z, e_bad)


def test_codebook_whose_squared_norm_overflows_raises():
    # Finite entries of 1e20: ||e||^2 = 4e40 overflows float32, and every distance with it.
    with pytest.raises(RuntimeError, match="codebook contains NaN/Inf"):
        ops.nearest_code(torch.randn(5, 4), torch.full((3, 4), 1e20))


@pytest.mark.parametrize("codes,k,message", [
    (torch.zeros(4, dtype=torch.int32), 3, r"codes must be int64, got dtype Int"),
    (torch.zeros(5, dtype=torch.int64), 3, r"codes must have shape \(N,\) = \(4,\) .* got \[5\]"),
    (torch.zeros(4, dtype=torch.int64), 0, r"num_embeddings must be >= 1, got 0"),
])
def test_ema_stats_rejects_bad_inputs_with_clear_messages(codes, k, message):
    with pytest.raises(RuntimeError, match=message):
        ops.ema_stats(torch.randn(4, 3), codes, k)


def test_meta_kernels_infer_shapes_and_dtypes():
    z, e = torch.empty(10, 4, device="meta", dtype=torch.float64), torch.empty(3, 4, device="meta", dtype=torch.float64)
    idx = ops.nearest_code(z, e)
    assert idx.shape == (10,) and idx.dtype == torch.int64 and idx.device.type == "meta"
    counts, sums = ops.ema_stats(z, idx, 7)
    assert counts.shape == (7,) and counts.dtype == torch.int64
    assert sums.shape == (7, 4) and sums.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"codebook must be \(K, D\) with D = 4"):
        ops.nearest_code(z, torch.empty(3, 5, device="meta", dtype=torch.float64))


# ------------------------------------------------------------- registration

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_opcheck_both_operators(dtype, n):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, 6, generator=g, dtype=dtype)
    e = torch.randn(5, 12, generator=g, dtype=dtype)[:, ::2]          # non-contiguous codebook
    torch.library.opcheck(ops.nearest_code.default, (z, e))
    torch.library.opcheck(ops.nearest_code.default, (z.clone().requires_grad_(), e))
    torch.library.opcheck(ops.ema_stats.default, (z, ops.nearest_code(z, e), 5))


def test_build_info_says_whether_cuda_kernels_are_compiled_in_and_why_not():
    info = vqvae_ext.build_info()
    assert set(info) == {"cuda", "why"} and isinstance(info["cuda"], bool)
    assert (info["why"] is None) == info["cuda"] or not (ROOT / "csrc/vqvae_ext/_build.json").exists()
    if not info["cuda"]:
        assert vqvae_ext._C.cuda_kernels_run_on(0) is False


def test_the_package_wraps_the_compiled_module():
    assert vqvae_ext._C.__name__ == "vqvae_ext._C"
    assert {"supports", "describe", "build_info", "emulate_cuda_nearest_code"} <= set(dir(vqvae_ext))


# ------------------------------------------ the CUDA kernel's tiling, emulated on the CPU
# vqvae_ext.emulate_cuda_nearest_code runs the phases of csrc/vq_tiling.h for every block and thread
# (blocks of 128 rows, tiles of 128 codes x 16 dims, 8 x 8 dot products per thread, 16 threads per
# row merged by shuffles), so these tests check on a CPU the indexing and arithmetic a GPU runs.
emulate = vqvae_ext.emulate_cuda_nearest_code
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (127, 129, 15), (128, 128, 16), (129, 127, 17), (300, 513, 70),
                                   (257, 1000, 3)])
def test_emulated_cuda_tiling_matches_float64_brute_force(n, k, d, dtype, assert_nearest):
    # Sizes on, below and above the tile sizes; several blocks, the last one partly filled.
    g = torch.Generator().manual_seed(n + k + d)
    z, e = torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(dtype)
    eps = EPS64 if dtype == torch.float64 else EPS32            # fp16/bf16 accumulate in fp32
    assert_nearest(emulate(z, e), z, e, eps, min_clear=0.97)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("p,q", [(0, 1), (0, 16), (3, 19), (15, 16), (5, 133), (127, 128), (0, 299), (256, 257)])
def test_emulated_cuda_tiling_breaks_exact_ties_to_the_lowest_index(p, q, dtype):
    # e_q = -e_p and z = 0: equal distances in any precision. Pairs held by one thread (0, 16: codes
    # tx + 16 j), by neighbouring lanes (0, 1; 15, 16), across lanes and j (3, 19), across tiles of
    # 128 codes (5, 133; 127, 128; 0, 299) and within the last, partial tile (256, 257).
    g = torch.Generator().manual_seed(p * 300 + q)
    e = 3.0 + torch.rand(300, 6, generator=g)                          # norms >= 3 sqrt(6)
    e[p] = torch.tensor([0.5, -0.25, 0.0, 1.0, 0.5, 0.25])
    e[q] = -e[p]
    assert (emulate(torch.zeros(200, 6, dtype=dtype), e.to(dtype)) == p).all()


def test_emulated_cuda_tiling_duplicated_codes_and_nan_rows(assert_nearest):
    g = torch.Generator().manual_seed(9)
    e = torch.randn(100, 20, generator=g).repeat(3, 1)                 # code j == j + 100 == j + 200
    z = e[torch.randint(0, 300, (260,), generator=g)] + 0.01 * torch.randn(260, 20, generator=g)
    z[[7, 200]] = torch.tensor([float("nan"), float("inf")])[:, None]  # one row in each of two blocks
    idx = emulate(z, e)
    finite = torch.ones(260, dtype=torch.bool)
    finite[[7, 200]] = False
    assert (idx[~finite] == -1).all() and (idx[finite] < 100).all()
    assert_nearest(idx[finite], z[finite], e)


def test_emulated_cuda_tiling_takes_the_given_norms():
    z, e = torch.zeros(3, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert emulate(z, e).tolist() == [0, 0, 0]
    assert emulate(z, e, torch.tensor([2.0, 1.0])).tolist() == [1, 1, 1]
    with pytest.raises(RuntimeError, match=r"norm_sq must be \(K,\) = \(2,\) of dtype Float, got shape \[3\]"):
        emulate(z, e, torch.ones(3))


# ------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and vqvae_ext.build_info()["cuda"]),
                          reason="needs a GPU and vqvae_ext built with CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_float64_brute_force(dtype, assert_nearest):
    g = torch.Generator().manual_seed(7)
    z, e = torch.randn(3001, 65, generator=g).to(dtype), torch.randn(130, 65, generator=g).to(dtype)
    idx = ops.nearest_code(z.cuda(), e.cuda()).cpu()
    assert_nearest(idx, z, e, EPS32, min_clear=0.98)  # fp16/bf16 inputs accumulate in fp32


@cuda
def test_cuda_ties_and_ema_stats_match_cpu(assert_nearest):
    e = torch.randn(200, 8).repeat(2, 1)                                # code 200 + j duplicates code j
    z = torch.cat([torch.zeros(3, 8), torch.randn(997, 8)])
    codes = ops.nearest_code(z.cuda(), e.cuda()).cpu()
    assert (codes < 200).all()
    assert_nearest(codes, z, e)
    counts, sums = ops.ema_stats(z.cuda(), codes.cuda(), 400)
    expected_counts, expected_sums = ops.ema_stats(z, codes, 400)
    assert torch.equal(counts.cpu(), expected_counts)
    torch.testing.assert_close(sums.cpu(), expected_sums)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_ema_stats_deterministic_mode_and_float64(dtype):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(20000, 16, generator=g, dtype=dtype).cuda()
    codes = torch.randint(0, 7, (20000,), generator=g).cuda()       # many rows per code: atomics race
    expected = torch.zeros(7, 16, dtype=dtype, device="cuda").index_add_(0, codes, z)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs = [ops.ema_stats(z, codes, 7) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for counts, sums in runs:
        assert counts.dtype == torch.int64 and sums.dtype == dtype
        assert torch.equal(counts, torch.bincount(codes, minlength=7))
        assert torch.equal(sums, runs[0][1])
    torch.testing.assert_close(runs[0][1], expected)
