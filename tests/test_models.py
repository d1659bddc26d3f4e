"""VQVAE (Sec. 3, 4.1): shapes for 1-, 2- and 3-D data and grouped codes, the categorical
likelihood, decoding from codes, bf16 autocast, and checkpoints loaded with weights_only."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def tiny(**kwargs) -> vqvae.VQVAEConfig:
    base = dict(in_channels=1, hidden_channels=8, res_channels=4, num_res_layers=1, num_downsamples=1,
                num_embeddings=16, embedding_dim=4)
    return vqvae.VQVAEConfig(**{**base, **kwargs})


def image(*shape) -> torch.Tensor:
    """Random 8-bit data scaled to [-0.5, 0.5] as the model expects."""
    return torch.randint(0, 256, shape) / 255 - 0.5


@pytest.mark.parametrize("kwargs, x_shape, latent", [
    (dict(dims=1, num_downsamples=6), (2, 1, 128), (2,)),          # audio: 64x fewer steps
    (dict(dims=2, in_channels=3, num_downsamples=2), (2, 3, 8, 12), (2, 3)),
    (dict(dims=3, num_downsamples=2), (2, 1, 4, 8, 8), (1, 2, 2)),  # video
    (dict(dims=2, num_groups=3), (2, 1, 4, 6), (2, 3)),
    (dict(dims=1, num_groups=2), (2, 1, 8), (4,))], ids=["1d", "2d", "3d", "2d-groups", "1d-groups"])
def test_vqvae_output_shapes(kwargs, x_shape, latent):
    c = tiny(**kwargs)
    out = vqvae.VQVAE(c)(image(*x_shape))
    B, G = x_shape[0], c.num_groups
    assert out.x_recon.shape == x_shape and out.logits is None
    assert out.z_e.shape == out.z_q.shape == (B, G * c.embedding_dim, *latent)
    assert out.codes.shape == ((B, *latent) if G == 1 else (B, G, *latent))
    assert out.counts.shape == (c.num_embeddings,) and out.counts.sum().item() == B * G * math.prod(latent)
    assert torch.allclose(out.loss, out.recon_loss + out.codebook_loss + out.commitment_loss)  # Eq. 3


def test_gaussian_recon_loss_is_mse_over_data_variance():
    model = vqvae.VQVAE(tiny(data_variance=0.25))
    x = image(2, 1, 4, 4)
    out = model(x)
    assert out.recon_loss.item() == pytest.approx(((out.x_recon - x) ** 2).mean().item() / 0.25, rel=1e-5)


def test_categorical_recon_loss_is_cross_entropy_in_nats_per_dim():
    model = vqvae.VQVAE(tiny(in_channels=2, likelihood="categorical"))
    levels = torch.randint(0, 256, (2, 2, 4, 4))
    out = model(levels / 255 - 0.5)
    assert out.logits.shape == (2, 2, 4, 4, 256)
    log_p = F.log_softmax(out.logits.double(), -1).gather(-1, levels[..., None])[..., 0]   # (B, C, H, W)
    assert out.recon_loss.item() == pytest.approx(-log_p.mean().item(), rel=1e-5)
    log_likelihood = model.log_likelihood(levels / 255 - 0.5, out.logits)
    assert log_likelihood.shape == (2,)
    assert torch.allclose(log_likelihood.double(), log_p.sum((1, 2, 3)), rtol=1e-5)
    mean = (out.logits.double().softmax(-1) * (torch.arange(256.0) / 255 - 0.5)).sum(-1)
    assert torch.allclose(out.x_recon.double(), mean, atol=1e-5)  # the categorical's expected value


@pytest.mark.parametrize("dims, latent", [(1, (3,)), (2, (2, 3))], ids=["1d", "2d"])
def test_categorical_logits_are_the_1x1_convolution_per_channel(dims, latent):
    model = vqvae.VQVAE(tiny(in_channels=2, likelihood="categorical", dims=dims)).double()
    z_q = torch.randn(2, 4, *latent, dtype=torch.float64)
    relu, conv = model.logits
    expected = conv(relu(model.decoder(z_q))).unflatten(1, (2, 256)).movedim(2, -1)  # (B, C, *S, 256)
    assert torch.allclose(model.decoder_output(z_q), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, dict(num_groups=2), dict(num_groups=3, dims=1),
                                    dict(likelihood="categorical")], ids=["plain", "groups", "groups-1d", "categorical"])
def test_decode_of_codes_is_the_image_of_the_decoder_output_of_forward_z_q(kwargs):
    model = vqvae.VQVAE(tiny(**kwargs)).eval()
    x = image(2, 1, 8) if kwargs.get("dims") == 1 else image(2, 1, 4, 6)
    with torch.no_grad():
        out = model(x)
        images = model.decode(out.codes)
        assert torch.allclose(images, model.to_image(model.decoder_output(out.z_q)), atol=1e-5)
        assert torch.allclose(images, out.x_recon, atol=1e-5)
        if out.logits is not None:
            assert torch.allclose(model.decoder_output(out.z_q), out.logits, atol=1e-5)


@pytest.mark.parametrize("decay", [None, 0.99])
def test_bf16_autocast_forward_is_finite_and_quantizer_runs_in_float32(decay, assert_nearest):
    model = vqvae.VQVAE(tiny(num_downsamples=2, decay=decay))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image(2, 1, 8, 8))
    assert out.z_e.dtype == torch.bfloat16  # autocast was on for the encoder
    assert out.codebook_loss.dtype == out.commitment_loss.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (out.x_recon, out.z_q, out.loss, out.perplexity))
    flat = out.z_e.float().movedim(1, -1).reshape(-1, 4)
    assert_nearest(out.codes.flatten(), flat, model.quantizer.codebook.detach())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("decay", [None, 0.9], ids=["plain", "ema"])
def test_checkpoint_loaded_with_weights_only_gives_identical_outputs(tmp_path, decay):
    config = tiny(decay=decay, kmeans_init=True, dead_code_threshold=0.01)
    model = vqvae.VQVAE(config).train()
    x = image(4, 1, 4, 4)
    for _ in range(3):  # k-means init and EMA steps move the buffers away from a fresh model's
        model(x + 0.1 * torch.randn_like(x))
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert vqvae.VQVAEConfig(**checkpoint["config"]) == config
    torch.manual_seed(1)
    loaded = vqvae.VQVAE(vqvae.VQVAEConfig(**checkpoint["config"]))
    loaded.load_state_dict(checkpoint["model"])
    for mode in ("eval", "train"):  # train: restored EMA state and `initialized` (no second k-means)
        a, b = getattr(model, mode)()(x), getattr(loaded, mode)()(x)
        for name, t in a._asdict().items():
            assert t is None and getattr(b, name) is None or torch.equal(t, getattr(b, name)), name
        assert torch.equal(model.quantizer.codebook, loaded.quantizer.codebook)


def test_sonnet_preset_is_the_sonnet_example_model_weight_for_weight():
    """Sonnet's vqvae_example: encoder convs 3->64 (4x4, /2), 64->128 (4x4, /2), 128->128 (3x3), two
    residual blocks 128->32 (3x3) ->128 (1x1); 1x1 conv to D = 64; the EMA codebook (not trained);
    decoder 64->128 (3x3), two residual blocks, transposed 128->64 (4x4, x2), 64->3 (4x4, x2)."""
    import train_cifar

    def conv(cin, cout, k):  # weights and biases
        return cin * cout * k * k + cout

    residual_stack = 2 * (conv(128, 32, 3) + conv(32, 128, 1))
    encoder = conv(3, 64, 4) + conv(64, 128, 4) + conv(128, 128, 3) + residual_stack
    decoder = conv(64, 128, 3) + residual_stack + conv(128, 64, 4) + conv(64, 3, 4)
    args = train_cifar.parse_args(["--preset", "sonnet"])
    config = vqvae.VQVAEConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(vqvae.VQVAEConfig)
                                  if hasattr(args, f.name)})
    model = vqvae.VQVAE(config)
    assert sum(p.numel() for p in model.parameters()) == encoder + conv(128, 64, 1) + decoder == 662_723
    assert [m.out_channels for m in model.encoder.net if isinstance(m, torch.nn.Conv2d)][:3] == [64, 128, 128]
    assert model.quantizer.codebook.shape == (512, 64) and not model.quantizer.codebook.requires_grad
