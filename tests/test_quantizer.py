"""nearest_code (Eq. 1) and VectorQuantizer (Eq. 2-3, the EMA codebook of App. A.1, restarts,
k-means init, perplexity) against float64 references and hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

def quantizer(K=8, D=4, **kwargs) -> vqvae.VectorQuantizer:
    """A quantizer with a unit-scale codebook, so latents spread over several codes."""
    q = vqvae.VectorQuantizer(K, D, **kwargs)
    with torch.no_grad():
        q.codebook.normal_()
        if q.decay is not None:
            q.ema_embed_sum.copy_(q.codebook)
    return q


def channel_last(z_e: torch.Tensor) -> torch.Tensor:
    """(B, D, *S) -> (N, D), the latents in the order the quantizer's codes are flattened."""
    return z_e.movedim(1, -1).reshape(-1, z_e.shape[1])


def set_codebook(q: vqvae.VectorQuantizer, rows) -> None:
    with torch.no_grad():
        q.codebook.copy_(torch.as_tensor(rows, dtype=torch.float32))
        if q.decay is not None:
            q.ema_embed_sum.copy_(q.codebook)


# ---------------------------------------------------------------- nearest neighbours (Eq. 1)
@pytest.mark.parametrize("n, k, d, low, high", [
    (500, 64, 8, -1.0, 1.0), (300, 512, 64, -0.1, 0.1), (200, 16, 4, -1e4, 1e4), (200, 16, 4, 1e3, 1e4)])
def test_nearest_code_matches_float64_brute_force(backend, n, k, d, low, high, assert_nearest):
    g = torch.Generator().manual_seed(n + k + d)
    z = torch.empty(n, d).uniform_(low, high, generator=g)
    codebook = torch.empty(k, d).uniform_(low, high, generator=g)
    assert_nearest(vqvae.nearest_code(z, codebook), z, codebook)


def test_nearest_code_exact_tie_goes_to_lowest_index(backend):
    z = torch.zeros(3, 2)
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # all at distance 1
    assert vqvae.nearest_code(z, codebook).tolist() == [0, 0, 0]
    assert vqvae.nearest_code(z, codebook.flip(0)).tolist() == [0, 0, 0]


def test_nearest_code_duplicate_codes_go_to_lowest_index(backend):
    codebook = torch.randn(6, 3)
    codebook[4] = codebook[1]
    z = torch.stack([codebook[1], codebook[1] + 0.01, codebook[4]])
    assert vqvae.nearest_code(z, codebook).tolist() == [1, 1, 1]


def test_nearest_code_single_code_picks_it_everywhere(backend):
    codes = vqvae.nearest_code(torch.randn(10, 5) * 1e3, torch.randn(1, 5))
    assert codes.dtype == torch.int64 and codes.tolist() == [0] * 10


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (2, 4, 7), (2, 4, 3, 2, 5)], ids=["BDHW", "BDT", "BDTHW"])
def test_quantizer_codes_equal_brute_force_on_channel_last_latents(shape, assert_nearest):
    q = quantizer(16, 4).eval()
    z_e = torch.randn(shape)
    out = q(z_e)
    assert out.codes.shape == (shape[0], *shape[2:]) and out.z_q.shape == shape
    assert_nearest(out.codes.flatten(), channel_last(z_e), q.codebook.detach())
    assert torch.allclose(channel_last(out.z_q), q.codebook.detach()[out.codes.flatten()], atol=1e-6)  # z_q = e_k


# ---------------------------------------------------------------- straight-through and Eq. 3
def test_straight_through_gradient_at_z_e_equals_gradient_at_z_q():
    q = quantizer()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z_e)
    out.z_q.retain_grad()
    w = torch.randn_like(z_e)
    (out.z_q ** 3 * w).sum().backward()  # nonlinear: the gradient depends on z_q's value e_k
    assert torch.allclose(out.z_q.grad, 3 * out.z_q.detach() ** 2 * w)
    assert torch.equal(z_e.grad, out.z_q.grad)


def test_commitment_loss_sends_no_gradient_to_codebook():
    q = quantizer(commitment_cost=0.25)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z_e)
    out.commitment_loss.backward()
    assert q.codebook.grad is None or not q.codebook.grad.any()
    # d/dz_e of beta * mean((z_e - sg[e])^2) = 2 beta (z_e - e) / (N D)
    expected = 2 * 0.25 * (z_e - out.z_q).detach() / z_e.numel()
    assert torch.allclose(z_e.grad, expected, atol=1e-7)


def test_codebook_loss_sends_no_gradient_to_encoder_output():
    q = quantizer(K=5, D=3)
    z_e = torch.randn(2, 3, 4, requires_grad=True)
    out = q(z_e)
    out.codebook_loss.backward()
    assert z_e.grad is None or not z_e.grad.any()
    # d/de_k of mean((sg[z] - e)^2) = sum over latents i assigned to k of 2 (e_k - z_i) / (N D)
    z, e, idx = channel_last(z_e).detach().double().numpy(), q.codebook.detach().double().numpy(), out.codes.flatten().numpy()
    expected = np.zeros_like(e)
    for i, k in enumerate(idx):
        expected[k] += 2 * (e[k] - z[i]) / z.size
    np.testing.assert_allclose(q.codebook.grad.numpy(), expected, atol=1e-7)


def test_beta_scales_the_commitment_term_only():
    low, high = quantizer(commitment_cost=0.25), vqvae.VectorQuantizer(8, 4, commitment_cost=1.0)
    high.load_state_dict(low.state_dict())
    z_e = torch.randn(2, 4, 5)
    a, b = low(z_e), high(z_e)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.codebook_loss, b.codebook_loss)  # beta is NOT on the codebook term
    assert torch.allclose(b.commitment_loss, 4 * a.commitment_loss)


@pytest.mark.parametrize("decay", [None, 0.9])
def test_losses_are_the_mean_squared_distance_to_the_chosen_code(decay):
    q = quantizer(commitment_cost=0.3, decay=decay).eval()
    z_e = torch.randn(3, 4, 2, 5)
    out = q(z_e)
    z, e = channel_last(z_e).double().numpy(), q.codebook.detach().double().numpy()
    k = ((z[:, None] - e[None]) ** 2).sum(-1).argmin(1)
    mse = ((z - e[k]) ** 2).mean()  # over latents and their D components
    assert out.commitment_loss.item() == pytest.approx(0.3 * mse, rel=1e-5)
    assert out.codebook_loss.item() == (0.0 if decay else pytest.approx(mse, rel=1e-5))


# ---------------------------------------------------------------- EMA codebook (App. A.1)
@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_ema_update_equals_eq_6_to_8_with_laplace_smoothing_by_hand(epsilon):
    gamma, K = 0.9, 3
    e0 = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = np.array([[0.1, 0.1], [0.9, 0.2], [1.2, -0.1], [0.2, 0.3]], dtype=np.float32).astype(np.float64)
    q = vqvae.VectorQuantizer(K, 2, decay=gamma, epsilon=epsilon).train()
    set_codebook(q, e0)  # initial state: N_i = 1, m_i = e_i
    out = q(torch.tensor(z.T[None], dtype=torch.float32))  # (B=1, D=2, T=4)
    assert out.codes.tolist() == [[0, 1, 1, 0]]  # code 2 is not chosen
    n_i = np.array([2.0, 2.0, 0.0])
    sums = np.stack([z[0] + z[3], z[1] + z[2], np.zeros(2)])
    N = gamma * 1.0 + (1 - gamma) * n_i                      # Eq. 6: [1.1, 1.1, 0.9]
    m = gamma * e0 + (1 - gamma) * sums                       # Eq. 7
    n = N.sum()
    N_smoothed = (N + epsilon) / (n + K * epsilon) * n        # Laplace smoothing
    np.testing.assert_allclose(q.ema_cluster_size.numpy(), N, atol=1e-6)
    np.testing.assert_allclose(q.ema_embed_sum.numpy(), m, atol=1e-6)
    np.testing.assert_allclose(q.codebook.numpy(), m / N_smoothed[:, None], atol=1e-6)  # Eq. 8


def test_ema_codebook_is_not_updated_in_eval_mode():
    q = quantizer(decay=0.9, dead_code_threshold=0.5).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, 4, 6))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_ema_codebook_is_a_buffer_not_a_parameter():
    q = vqvae.VectorQuantizer(8, 4, decay=0.99)
    assert list(q.parameters()) == []
    assert {"codebook", "ema_embed_sum", "ema_cluster_size"} <= dict(q.named_buffers()).keys()
    assert isinstance(vqvae.VectorQuantizer(8, 4).codebook, nn.Parameter)  # plain mode: learnt


def test_ema_mode_codebook_loss_is_zero():
    out = quantizer(decay=0.9).train()(torch.randn(2, 4, 6, requires_grad=True))
    assert out.codebook_loss.item() == 0.0 and out.commitment_loss.item() > 0.0


# ---------------------------------------------------------------- restarts and k-means init
@pytest.mark.parametrize("decay, threshold, steps_alive", [(0.5, 0.1, 3), (None, 0.95, 5)])
def test_unused_code_is_restarted_from_a_batch_encoder_output_once_its_usage_decays(decay, threshold, steps_alive):
    # Usage of the never-chosen code 1 decays as gamma^t (gamma = 0.99 without EMA):
    # 0.5^3 = 0.125 >= 0.1 > 0.5^4 and 0.99^5 = 0.951 >= 0.95 > 0.99^6.
    q = vqvae.VectorQuantizer(2, 2, decay=decay, dead_code_threshold=threshold).train()
    set_codebook(q, [[0.0, 0.0], [100.0, 100.0]])
    for _ in range(steps_alive):
        q(torch.randn(1, 2, 16))
        assert q.codebook[1].min() > 50  # not restarted yet
    z_e = torch.randn(1, 2, 16)
    q(z_e)
    assert (channel_last(z_e) == q.codebook[1].detach()).all(1).any()  # one of this batch's rows
    assert q.ema_cluster_size[1].item() == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_init_puts_one_codebook_row_on_each_well_separated_cluster(seed):
    torch.manual_seed(seed)
    # Clusters 100 apart, of spread 0.1: k-means++ draws a latent of a cluster it already holds with
    # probability below 1e-5 at each seed.
    means = torch.tensor([[50.0, 50.0], [-50.0, 50.0], [50.0, -50.0], [-50.0, -50.0]])
    z = means.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2)
    q = vqvae.VectorQuantizer(4, 2, kmeans_init=True, dead_code_threshold=None).train()
    assert not q.initialized
    q(z.T[None])
    codebook = q.codebook.detach().clone()
    blob = torch.cdist(codebook, means).argmin(1)
    assert sorted(blob.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(codebook, z.view(4, 50, 2).mean(1)[blob], atol=1e-5)  # the cluster means
    q(z.T[None] + 1.0)  # initialised once: a second batch does not re-run k-means
    assert q.initialized and torch.equal(q.codebook.detach(), codebook)


def test_kmeans_init_with_fewer_distinct_latents_than_codes_uses_only_those_latents():
    z = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [1.0, 2.0]])  # 2 distinct latents, K = 5
    q = vqvae.VectorQuantizer(5, 2, kmeans_init=True).train()
    q(z.T[None])
    assert all((z == row).all(1).any() for row in q.codebook.detach())


# ---------------------------------------------------------------- perplexity and counts
@pytest.mark.parametrize("codes, expected", [
    ([3] * 8, 1.0),                                   # one code
    ([0, 1, 2] * 4, 3.0),                             # uniform over 3 codes
    ([0, 0, 1, 2], 2 ** 1.5),                         # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    ([4, 4, 4, 1], 0.75 ** -0.75 * 0.25 ** -0.25)])   # p = (3/4, 1/4)
def test_perplexity_is_exp_entropy_of_code_usage_and_counts_are_bincount(codes, expected):
    K = 5
    q = vqvae.VectorQuantizer(K, K).eval()
    set_codebook(q, 10 * torch.eye(K))
    out = q(q.codebook.detach()[codes].T[None])  # latents placed exactly on the given codes
    assert out.codes.flatten().tolist() == codes
    assert out.perplexity.item() == pytest.approx(expected, rel=1e-6)
    assert out.counts.tolist() == torch.bincount(torch.tensor(codes), minlength=K).tolist()


# ---------------------------------------------------------------- precision
def test_float16_input_with_large_values_quantizes_in_float32_without_overflow(assert_nearest):
    q = quantizer(8, 16).train()
    with torch.no_grad():
        q.codebook.mul_(300)
    z_e = (300 * torch.randn(2, 16, 3, 3)).half()  # ||z||^2 ~ 1.4e6 and the loss ~ 1e5 overflow float16
    out = q(z_e)
    assert out.z_q.dtype == torch.float16 and torch.isfinite(out.z_q).all()
    assert out.commitment_loss.dtype == out.codebook_loss.dtype == torch.float32
    assert math.isfinite(out.commitment_loss.item()) and out.codebook_loss.item() > 6e4
    assert_nearest(out.codes.flatten(), channel_last(z_e.float()), q.codebook.detach())


def test_a_code_never_chosen_shrinks_towards_the_origin_as_laplace_smoothing_predicts():
    """App. A.1 with Laplace smoothing: for a code never chosen, N_i = g^t and m_i = g^t e_0, so
    e_i(t) = g^t e_0 / ((g^t + eps) n / (n + K eps)) with n the summed usage: it holds e_0 while
    g^t >> eps, then falls towards the origin (float64 reference, step by step)."""
    K, D, g, eps = 4, 2, 0.99, 1e-5
    q = vqvae.VectorQuantizer(K, D, decay=g, epsilon=eps, dead_code_threshold=None)   # the paper's quantizer
    set_codebook(q, [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [20.0, 0.0]])     # code 3: far from every z
    z_e = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 0.8], [0.2, 0.1]]).t()[None]   # (1, D, 4)
    usage, unused = torch.ones(K, dtype=torch.float64), []
    for _ in range(1500):
        out = q.train()(z_e)
        assert out.counts[3] == 0
        usage = g * usage + (1 - g) * out.counts.double()
        n = usage.sum()
        expected = g ** (len(unused) + 1) * 20.0 / ((usage[3] + eps) * n / (n + K * eps))
        unused.append((q.codebook[3, 0].item(), expected.item()))
    for got, expected in unused:
        assert got == pytest.approx(expected, rel=1e-3)
    assert unused[500][0] > 19 and unused[999][0] > 10 and unused[-1][0] < 1   # held, then collapsed


# ---------------------------------------------------------------- a copier's model: layouts and precision
def test_channel_last_quantizes_the_last_axis_even_where_n_equals_d(assert_nearest):
    """A token sequence (B, N, D), the layout of transformers: with N == D the channel-first default
    would quantize the wrong axis, and nothing in the shapes says so."""
    q = quantizer(16, 4, channel_last=True).eval()
    tokens = torch.randn(3, 4, 4)                                        # (B, N, D), N == D == 4
    out = q(tokens)
    assert out.z_q.shape == tokens.shape and out.codes.shape == (3, 4)
    assert_nearest(out.codes.flatten(), tokens.reshape(-1, 4), q.codebook.detach())
    torch.testing.assert_close(out.z_q, q.codebook.detach()[out.codes])   # straight-through: z_e + (e - z_e)
    assert torch.equal(q.lookup(out.codes), q.codebook.detach()[out.codes])
    first = quantizer(16, 4).eval()
    first.load_state_dict(q.state_dict())
    assert torch.equal(first(tokens.transpose(1, 2)).codes, out.codes)   # the same codes, channel-first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [None, 0.99], ids=["codebook_loss", "ema"])
def test_a_half_precision_model_keeps_the_codebook_and_its_statistics_in_float32(dtype, decay):
    full = quantizer(16, 4, decay=decay)
    half = quantizer(16, 4, decay=decay)
    half.load_state_dict(full.state_dict())
    half.to(dtype)
    assert all(t.dtype == torch.float32 for t in half.state_dict().values() if t.is_floating_point())
    z_e = torch.randn(2, 4, 5, 5).to(dtype)                              # the same input to both
    for step in range(3):
        torch.manual_seed(step)
        want = full.train()(z_e.float())
        torch.manual_seed(step)
        got = half.train()(z_e)
        assert torch.equal(got.codes, want.codes) and got.z_q.dtype == dtype
    for name, t in full.state_dict().items():   # the moving averages moved exactly as in float32
        assert torch.equal(half.state_dict()[name], t), name
