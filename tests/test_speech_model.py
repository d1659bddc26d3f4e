"""The models of the speech experiment (Sec. 4.3) in vqvae.py: mu-law, the WaveNet (decoder and
prior over codes: shapes, argument checks, causality, log_prob, incremental sampling against the
teacher-forced pass) and AudioVQVAE. The script train_vctk.py is tested in test_vctk.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def tiny_wavenet(local: bool = True) -> vqvae.WaveNet:
    """The decoder (256 levels, conditioned on z_q with 6 channels, hop 4), or else a prior over 32 codes."""
    return vqvae.WaveNet(vqvae.WaveNetConfig(num_categories=256 if local else 32, cond_channels=6 if local else 0,
                                             num_speakers=3, hop=4, channels=8, skip_channels=16, num_layers=5,
                                             cycle=3))


def conditioning(net, batch: int, steps: int):
    """(z_q or None, sample() keywords) for `steps` output steps of tiny_wavenet."""
    if net.cond is None:
        return None, {"length": steps}
    return torch.randn(batch, 6, steps // 4, dtype=net.embed.weight.dtype), {}


def test_mu_law_round_trip_is_exact_on_levels_and_close_on_waveforms():
    levels = torch.arange(256)
    assert torch.equal(vqvae.mu_law_encode(vqvae.mu_law_decode(levels)), levels)
    x = torch.linspace(-1, 1, 10001)
    y = vqvae.mu_law_decode(vqvae.mu_law_encode(x))
    # within half a level: F^-1 grows by (1 + mu |x|) ln(1 + mu) / mu per unit of y, a level is 2 / mu
    # (slightly more than half of it at |x|, as the slope grows within the level)
    step = (1 + 255 * x.abs()) * math.log1p(255) / 255 * (2 / 255)
    assert ((y - x).abs() <= 0.51 * step).all()
    assert vqvae.mu_law_encode(torch.zeros(())) == 128 and vqvae.mu_law_encode(torch.tensor([-1.0, 1.0])).tolist() == [0, 255]


def test_wavenet_gives_256_logits_per_sample_and_checks_lengths():
    net = tiny_wavenet()
    logits = net(torch.randint(0, 256, (2, 24)), torch.randn(2, 6, 6), torch.tensor([0, 2]))
    assert logits.shape == (2, 256, 24)
    with pytest.raises(ValueError, match="T = 4 x"):
        net(torch.randint(0, 256, (2, 23)), torch.randn(2, 6, 6), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="z_q: pass it exactly"):
        net(torch.randint(0, 256, (2, 24)), None, torch.tensor([0, 2]))


def test_wavenet_prior_over_codes_gives_k_logits_per_code_without_z_q():
    prior = tiny_wavenet(local=False)
    assert prior(torch.randint(0, 32, (2, 23)), None, torch.tensor([0, 2])).shape == (2, 32, 23)
    with pytest.raises(ValueError, match="z_q: pass it exactly"):
        prior(torch.randint(0, 32, (2, 24)), torch.randn(2, 6, 6), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="length"):
        prior.sample(None, torch.tensor([0, 2]))


@pytest.mark.parametrize("local", [True, False], ids=["decoder", "prior"])
def test_wavenet_output_at_t_gets_no_gradient_from_inputs_at_or_after_t(local):
    net = tiny_wavenet(local)
    captured = []

    def keep(module, inputs, output):  # the embedded inputs x_{t-1}, (B, T, C)
        output.retain_grad()
        captured.append(output)
    net.embed.register_forward_hook(keep)
    levels = torch.randint(0, net.num_categories, (1, 40))
    z_q = conditioning(net, 1, 40)[0]
    for t in [0, 7, 21, 39]:
        captured.clear()
        net(levels, z_q, torch.tensor([1]))[0, :, t].logsumexp(0).backward()
        # embedded position s holds x_{s-1}: x_<t is positions <= t, x_>=t is positions > t
        grad = captured[0].grad[0].abs().sum(1)
        assert grad[t + 1:].eq(0).all(), t
        assert grad[t] > 0, t  # x_{t-1} matters (receptive field 1 + 1 + 2 + 4 + 1 + 2 samples)


@pytest.mark.parametrize("local", [True, False], ids=["decoder", "prior"])
def test_wavenet_log_prob_is_the_sum_over_steps_of_log_softmax_at_x(local):
    net = tiny_wavenet(local).double()
    x = torch.randint(0, net.num_categories, (3, 24))
    z_q, speaker = conditioning(net, 3, 24)[0], torch.tensor([0, 2, 1])
    log_p = net.log_prob(x, z_q, speaker)
    assert log_p.shape == (3,)
    logits = net(x, z_q, speaker)
    expected = F.log_softmax(logits, 1).gather(1, x[:, None])[:, 0].sum(1)
    torch.testing.assert_close(log_p.double(), expected, rtol=1e-6, atol=1e-6)
    # the batch's total is the summed cross-entropy that train_vctk reported before log_prob existed
    total = F.cross_entropy(logits, x, reduction="sum")
    torch.testing.assert_close(-log_p.sum().double(), total, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("local", [True, False], ids=["decoder", "prior"])
def test_incremental_generation_equals_the_teacher_forced_forward_pass(local):
    net = tiny_wavenet(local).double()
    (z_q, kw), speaker = conditioning(net, 2, 36), torch.tensor([2, 0])
    levels, logits = net.sample(z_q, speaker, generator=torch.Generator().manual_seed(5), return_logits=True, **kw)
    assert levels.shape == (2, 36) and levels.dtype == torch.int64
    torch.testing.assert_close(logits, net(levels, z_q, speaker), rtol=1e-12, atol=1e-12)  # step by step
    again = net.sample(z_q, speaker, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(again, levels)  # a seeded generator repeats the samples
    greedy, logits = net.sample(z_q, speaker, greedy=True, return_logits=True, **kw)
    full = net(greedy, z_q, speaker)
    torch.testing.assert_close(logits, full, rtol=1e-12, atol=1e-12)
    assert torch.equal(full.argmax(1), greedy)


def test_audio_vqvae_trains_encoder_codebook_and_decoder_from_one_loss():
    model = vqvae.AudioVQVAE(vqvae.AudioVQVAEConfig(num_speakers=3, hidden_channels=16, res_channels=8, num_res_layers=1,
                                                    num_embeddings=16, embedding_dim=4, decay=None, wavenet_channels=8,
                                                    skip_channels=8, wavenet_layers=3))
    levels = torch.randint(0, 256, (2, 256))
    out = model(levels, torch.tensor([0, 2]))
    assert out.logits.shape == (2, 256, 256) and out.codes.shape == (2, 4)
    assert out.loss.item() == pytest.approx((out.recon_loss + out.codebook_loss + out.commitment_loss).item())
    out.loss.backward()
    for name in ["encoder.net.0.weight", "quantizer.codebook", "decoder.cond.weight", "decoder.speaker.weight"]:
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    wave = model.decode(out.codes, torch.tensor([1, 1]), generator=torch.Generator().manual_seed(0))
    assert wave.shape == (2, 256) and wave.dtype == torch.float32 and wave.abs().max() <= 1  # mu-law decoded
    levels = model.decoder.sample(model.quantizer.lookup(out.codes), torch.tensor([1, 1]),
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(wave, vqvae.mu_law_decode(levels))
    with pytest.raises(ValueError, match="multiple of 64"):
        model(torch.randint(0, 256, (2, 100)), torch.tensor([0, 1]))
