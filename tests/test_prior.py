"""GatedPixelCNN prior (Sec. 3.2, 4.2): causality in raster order without a blind spot, grouped
codes, conditioning, sampling, log_prob; and bits_per_dim (Sec. 4.1)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def prior(K=5, G=1, **kwargs) -> vqvae.GatedPixelCNN:
    config = {**dict(channels=8, num_layers=2, kernel_size=3), **kwargs}
    return vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(K, num_groups=G, **config))


def codes(B, G, H, W, K=5) -> torch.Tensor:
    return torch.randint(0, K, (B, H, W) if G == 1 else (B, G, H, W))


@pytest.mark.parametrize("G", [1, 2], ids=["one-code", "two-groups"])
def test_pixelcnn_output_depends_on_exactly_the_earlier_codes(G):
    """Order: positions in raster order, then groups within a position. The logits of each code get
    zero gradient from the embeddings of that code and every later one, and a non-zero gradient
    from every earlier one. 4 layers of kernel 5 (k//2 = 2 rows/cols per layer) cover a 6x6 map."""
    H = W = 6
    model = prior(G=G, channels=16, num_layers=4, kernel_size=5)
    captured = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, out, name=name: captured.setdefault(name, out))
             for name in ("embedding", "group_embedding")]
    logits = model(codes(2, G, H, W)).reshape(2, 5, G, H, W)
    for hook in hooks:
        hook.remove()
    inputs = [captured["embedding"], captured["group_embedding"]]               # (B, G, H, W, c) each
    order = (torch.arange(H * W)[:, None] * G + torch.arange(G)).reshape(H, W, G).permute(2, 0, 1)  # (G, H, W)
    weights = torch.randn(2, 5)
    for g in range(G):
        for i in range(H):
            for j in range(W):
                grads = torch.autograd.grad((logits[:, :, g, i, j] * weights).sum(), inputs, retain_graph=True)
                influence = sum(grad.abs().sum((0, 4)) for grad in grads)           # (G, H, W)
                current = (i * W + j) * G + g
                assert not influence[order >= current].any(), f"output {(g, i, j)} sees itself or the future"
                assert (influence[order < current] > 0).all(), f"output {(g, i, j)} has a blind spot"


def test_class_label_and_conditioning_map_change_the_logits():
    x = codes(2, 1, 4, 4)
    model = prior(num_classes=3)
    assert not torch.allclose(model(x, label=torch.tensor([0, 0])), model(x, label=torch.tensor([1, 1])))
    model = prior(cond_channels=2)
    cond = torch.randn(2, 2, 4, 4)
    assert not torch.allclose(model(x, cond=cond), model(x, cond=-cond))


@pytest.mark.parametrize("G", [1, 2])
def test_sample_is_repeatable_with_a_seeded_generator_and_returns_codes_in_range(G):
    model = prior(K=6, G=G, num_classes=2)
    label = torch.tensor([0, 1, 1])
    draw = lambda seed: model.sample((3, 4), label=label, generator=torch.Generator().manual_seed(seed))
    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == ((3, 3, 4) if G == 1 else (3, G, 3, 4)) and first.dtype == torch.int64
    assert 0 <= first.min() and first.max() < 6
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("G, classes, cond_channels", [(1, 3, 0), (3, 4, 0), (2, 0, 2), (1, 2, 3)])
def test_fast_sampler_draws_the_codes_of_sampling_the_full_forward_pass_at_each_position(G, classes, cond_channels):
    """sample() computes the vertical stack once per row and the horizontal stack on the current row
    only; drawing from forward()'s logits over the whole map at every position, with the same
    random stream, must give the same codes."""
    torch.manual_seed(G + classes)
    model = vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(7, num_groups=G, channels=8, num_layers=3, kernel_size=5,
                                                          num_classes=classes or None, cond_channels=cond_channels))
    with torch.no_grad():  # non-zero biases and group queries, so that every term is exercised
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    B, shape = 4, (5, 6)
    label = torch.randint(0, classes, (B,)) if classes else None
    cond = torch.randn(B, cond_channels, *shape) if cond_channels else None
    fast = model.sample(shape, label, batch_size=B, cond=cond, generator=torch.Generator().manual_seed(3),
                        temperature=0.8)
    gen, ref = torch.Generator().manual_seed(3), torch.zeros(B, G, *shape, dtype=torch.long)
    with torch.no_grad():
        for i in range(shape[0]):
            for j in range(shape[1]):
                for g in range(G):
                    logits = model(ref if G > 1 else ref[:, 0], label, cond).reshape(B, 7, G, *shape)
                    probs = (logits[:, :, g, i, j] / 0.8).softmax(1)
                    ref[:, g, i, j] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    assert torch.equal(fast, ref if G > 1 else ref[:, 0])
    assert len(fast.unique()) > 3  # a real draw, not a constant map


def test_sample_draws_from_the_model_distribution():
    model = prior(K=6)
    with torch.no_grad():  # the head puts (almost) all mass on code 2 whatever the context
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0, 0.0]))
    assert (model.sample((3, 3), batch_size=2, generator=torch.Generator().manual_seed(0)) == 2).all()


@pytest.mark.parametrize("G", [1, 2])
def test_log_prob_is_the_sum_of_log_softmax_of_the_logits_at_the_codes(G):
    model = prior(G=G, num_classes=2)
    x, label = codes(3, G, 4, 5), torch.tensor([0, 1, 0])
    log_softmax = F.log_softmax(model(x, label=label).double(), 1)              # (B, K, [G,] H, W)
    expected = log_softmax.gather(1, x[:, None])[:, 0].flatten(1).sum(1)
    assert torch.allclose(model.log_prob(x, label=label).double(), expected, rtol=1e-5)


def test_bits_per_dim_with_a_prior_is_negative_log_likelihood_over_dims_ln2():
    bpd = vqvae.bits_per_dim(torch.tensor([-100.0, -50.0]), 3072, log_pz=torch.tensor([-20.0, -10.0]))
    assert torch.allclose(bpd, torch.tensor([120.0, 60.0]) / (3072 * math.log(2)))


def test_bits_per_dim_with_the_uniform_prior_charges_log2_K_bits_per_latent():
    bpd = vqvae.bits_per_dim(torch.tensor([-100.0]), 3072, num_latents=64, num_embeddings=512)
    # -(log p(x|z) - 64 ln 512) / (3072 ln 2): 100 nats of p(x|z), plus 64 latents x 9 bits / 3072 dims
    assert bpd.item() == pytest.approx(100 / (3072 * math.log(2)) + 64 * 9 / 3072, rel=1e-6)
