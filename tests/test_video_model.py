"""The models of the video experiment (Sec. 4.4) in vqvae.py: the action-conditional prior
(causality, conditioning, roll-out, argument checks) and the conditioned gated PixelCNN's sampler.
The script train_video.py is tested in test_train_video.py, lab/episodes.py and lab/video_eval.py in lab/test_video.py."""
import pytest
import torch

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def tiny_prior(K=6, A=3, F=2, **kw) -> vqvae.ActionConditionalPrior:
    sizes = {**dict(channels=8, num_layers=2, kernel_size=3, context_channels=8, context_layers=1), **kw}
    return vqvae.ActionConditionalPrior(vqvae.ActionConditionalPriorConfig(K, A, F, **sizes))


# ----------------------------------------------------------------------------- the prior
def test_new_frame_codes_depend_on_exactly_the_earlier_codes_and_on_the_whole_context():
    """Logits at (i, j) get no gradient from the new frame's codes at or after (i, j) in raster
    order, some from each earlier one (4 layers of kernel 5 cover a 5x5 map), and some from the
    context frames and the action."""
    H = W = 5
    model = tiny_prior(num_layers=4, kernel_size=5, context_layers=2)
    captured = {}
    for name, module in (("codes", model.pixelcnn.embedding), ("context", model.code_embedding),
                         ("action", model.action_embedding)):
        module.register_forward_hook(lambda m, i, out, name=name: captured.setdefault(name, out))
    logits = model(torch.randint(0, 6, (2, H, W)), torch.randint(0, 6, (2, 2, H, W)), torch.tensor([0, 2]))
    order = torch.arange(H * W).reshape(H, W)
    for i in range(H):
        for j in range(W):
            grads = torch.autograd.grad(logits[:, :, i, j].sum(), [captured[k] for k in ("codes", "context", "action")],
                                        retain_graph=True)
            influence = grads[0].abs().sum((0, 1, 4))                          # (H, W) of the new frame
            assert not influence[order >= i * W + j].any(), f"output {(i, j)} sees itself or the future"
            assert (influence[order < i * W + j] > 0).all(), f"output {(i, j)} has a blind spot"
            assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0


def test_context_and_action_change_the_prediction():
    model = tiny_prior()
    codes, context = torch.randint(0, 6, (2, 4, 4)), torch.randint(0, 6, (2, 2, 4, 4))
    base = model(codes, context, torch.tensor([0, 0]))
    assert not torch.allclose(base, model(codes, context, torch.tensor([1, 1])))
    assert not torch.allclose(base, model(codes, (context + 1) % 6, torch.tensor([0, 0])))
    log_p = model.log_prob(codes, context, torch.tensor([0, 0]))
    assert log_p.shape == (2,) and (log_p < 0).all()


def test_context_read_through_the_codebook_sees_z_q_and_not_the_code_ids():
    """With embedding_dim = D the context frames enter as their codebook vectors: two codes with one
    vector are the same to the prior, another vector changes its prediction, and the table travels
    in the state dict."""
    model = tiny_prior(embedding_dim=3).eval()
    codebook = torch.randn(6, 3)
    codebook[5] = codebook[2]
    model.set_codebook(codebook)
    codes, action = torch.randint(0, 6, (2, 4, 4)), torch.tensor([0, 1])
    context = torch.randint(0, 6, (2, 2, 4, 4))
    context[:, :, 0, 0] = 2
    base = model(codes, context, action)
    assert torch.equal(base, model(codes, torch.where(context == 2, 5, context), action))
    copy = tiny_prior(embedding_dim=3).eval()
    copy.load_state_dict(model.state_dict())
    assert torch.equal(base, copy(codes, context, action))
    copy.set_codebook(codebook + (torch.arange(6) == 2)[:, None])
    assert not torch.allclose(base, copy(codes, context, action))
    with pytest.raises(ValueError, match=r"codebook: expected a \(6, 3\) tensor"):
        model.set_codebook(torch.zeros(6, 4))
    with pytest.raises(ValueError, match=r"codebook: expected a \(6, 0\) tensor \(config.embedding_dim > 0\)"):
        tiny_prior().set_codebook(codebook)


@pytest.mark.parametrize("G", [1, 2])
def test_sampling_on_the_rows_so_far_equals_sampling_on_the_whole_map(G):
    """GatedPixelCNN.sample computes only rows <= i for the codes of row i; a reference that runs
    the whole map at every position, with the same random stream, must draw the same codes."""
    model = vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(5, num_groups=G, channels=8, num_layers=3, kernel_size=3,
                                                          cond_channels=2))
    cond, shape, B = torch.randn(3, 2, 4, 5), (4, 5), 3
    fast = model.sample(shape, batch_size=B, cond=cond, generator=torch.Generator().manual_seed(1))
    gen, ref = torch.Generator().manual_seed(1), torch.zeros(B, G, *shape, dtype=torch.long)
    with torch.no_grad():
        for i in range(shape[0]):
            for j in range(shape[1]):
                for g in range(G):
                    logits = model(ref if G > 1 else ref[:, 0], cond=cond).reshape(B, 5, G, *shape)
                    ref[:, g, i, j] = torch.multinomial(logits[:, :, g, i, j].softmax(1), 1, generator=gen)[:, 0]
    assert torch.equal(fast, ref if G > 1 else ref[:, 0])


@pytest.mark.parametrize("G, M", [(1, 3), (2, 1)])
def test_guided_sampling_draws_from_the_guided_logits_of_the_whole_map(G, M):
    """Classifier-free guidance: each code is drawn from log p_c + w (log p_c - log p_u), p_c from
    forward()'s logits over the whole map with the conditioned map and p_u the mean of the M
    unconditioned blocks' distributions; every block carries the same codes."""
    model = vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(5, num_groups=G, channels=8, num_layers=3, kernel_size=3,
                                                          cond_channels=2))
    B, shape, w = 3, (4, 5), 1.5
    cond = torch.randn((1 + M) * B, 2, 4, 5)               # B conditioned rows, then M blocks of B
    fast = model.sample(shape, batch_size=(1 + M) * B, cond=cond, generator=torch.Generator().manual_seed(1),
                        temperature=0.9, guidance=w, unconditioned=M)
    gen, ref = torch.Generator().manual_seed(1), torch.zeros(B, G, *shape, dtype=torch.long)
    with torch.no_grad():
        for i in range(shape[0]):
            for j in range(shape[1]):
                for g in range(G):
                    blocks = ref.repeat(1 + M, 1, 1, 1)
                    logits = model(blocks if G > 1 else blocks[:, 0], cond=cond).reshape(1 + M, B, 5, G, *shape)
                    p = logits[..., g, i, j].double().softmax(-1)                      # (1 + M, B, 5)
                    guided = p[0].log() + w * (p[0].log() - p[1:].mean(0).log())
                    ref[:, g, i, j] = torch.multinomial((guided / 0.9).softmax(1).float(), 1, generator=gen)[:, 0]
    assert fast.shape[0] == B and torch.equal(fast, ref if G > 1 else ref[:, 0])
    assert not torch.equal(fast, model.sample(shape, batch_size=B, cond=cond[:B], temperature=0.9,
                                              generator=torch.Generator().manual_seed(1)))


def test_guided_prior_contrasts_each_action_with_the_mean_over_all_actions():
    model = tiny_prior().eval()
    context, actions = torch.randint(0, 6, (2, 2, 4, 4)), torch.tensor([[0, 2], [1, 1]])
    video = model.sample(context, actions, generator=torch.Generator().manual_seed(0), guidance=2.0)
    gen, blocks = torch.Generator().manual_seed(0), context.repeat(4, 1, 1, 1)
    first = model.pixelcnn.sample((4, 4), batch_size=8, generator=gen, guidance=2.0, unconditioned=3,
                                  cond=model.condition(blocks, torch.tensor([0, 1, 0, 0, 1, 1, 2, 2])))
    assert torch.equal(video[:, 0], first)
    assert torch.equal(model.sample(context, actions, generator=torch.Generator().manual_seed(0)),
                       model.sample(context, actions, generator=torch.Generator().manual_seed(0), guidance=0.0))


def test_sample_feeds_each_sampled_frame_into_the_next_context():
    model = tiny_prior().eval()
    context, actions = torch.randint(0, 6, (3, 2, 4, 4)), torch.tensor([[0, 2], [1, 1], [2, 0]])
    video = model.sample(context, actions, generator=torch.Generator().manual_seed(0))
    assert video.shape == (3, 2, 4, 4) and video.dtype == torch.int64 and 0 <= video.min() and video.max() < 6
    gen = torch.Generator().manual_seed(0)
    first = model.pixelcnn.sample((4, 4), batch_size=3, cond=model.condition(context, actions[:, 0]), generator=gen)
    rolled = torch.cat([context[:, 1:], first[:, None]], 1)
    second = model.pixelcnn.sample((4, 4), batch_size=3, cond=model.condition(rolled, actions[:, 1]), generator=gen)
    assert torch.equal(video, torch.stack([first, second], 1))


def test_bad_context_or_action_names_the_argument_and_the_expected_shape():
    model = tiny_prior()
    with pytest.raises(ValueError, match=r"context: expected an integer \(B, 2, H, W\)"):
        model.condition(torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"action: expected an integer \(2,\)"):
        model.condition(torch.zeros(2, 2, 4, 4, dtype=torch.long), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"action: values must lie in \[0, 3\)"):
        model.condition(torch.zeros(2, 2, 4, 4, dtype=torch.long), torch.tensor([0, 3]))
