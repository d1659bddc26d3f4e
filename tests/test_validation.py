"""Bad input raises ValueError naming the argument and the expected and received shape."""
import pytest
import torch

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

K, D = 8, 4
quantizer = lambda: vqvae.VectorQuantizer(K, D)
model = lambda groups=1: vqvae.VQVAE(vqvae.VQVAEConfig(
    in_channels=1, hidden_channels=8, res_channels=4, num_res_layers=1, num_downsamples=2,
    num_embeddings=K, embedding_dim=D, num_groups=groups))
prior = lambda **kwargs: vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(K, channels=4, num_layers=1, kernel_size=3, **kwargs))
nan_latents = torch.zeros(2, D, 3).index_fill_(2, torch.tensor([1]), float("nan"))

CASES = {
    "z_e-channel-count": (lambda: quantizer()(torch.randn(2, 3, 4, 4)),
                          r"z_e: expected a floating \(B, 4, \*S\) tensor.*got shape \(2, 3, 4, 4\)"),
    "z_e-rank": (lambda: quantizer()(torch.randn(2, D)), r"z_e: expected .*got shape \(2, 4\)"),
    "z_e-integer": (lambda: quantizer()(torch.ones(2, D, 3, dtype=torch.int64)),
                    r"z_e: expected a floating .*got shape \(2, 4, 3\), dtype torch.int64"),
    "z_e-empty-batch": (lambda: quantizer()(torch.randn(0, D, 3)), r"z_e: expected .*B > 0; got shape \(0, 4, 3\)"),
    "z_e-nan": (lambda: quantizer()(nan_latents), r"NaN"),
    "z_e-nan-training-kmeans": (lambda: vqvae.VectorQuantizer(K, D, kmeans_init=True).train()(nan_latents), r"NaN"),
    "nearest_code-dim-mismatch": (lambda: vqvae.nearest_code(torch.randn(5, 3), torch.randn(4, 2)),
                                  r"codebook: expected a \(K, 3\) torch.float32 tensor.*got shape \(4, 2\)"),
    "lookup-out-of-range": (lambda: quantizer().lookup(torch.tensor([[0, K]])),
                            r"codes: values must lie in \[0, 8\); got range \[0, 8\]"),
    "decode-negative-index": (lambda: model().decode(torch.full((1, 2, 2), -1)),
                              r"codes: values must lie in \[0, 8\); got range \[-1, -1\]"),
    "decode-missing-group-axis": (lambda: model(groups=2).decode(torch.zeros(1, 2, 2, dtype=torch.long)),
                                  r"codes: expected a tensor with 4 dims, shape\[1\] == 2; got shape \(1, 2, 2\)"),
    "x-not-multiple-of-4": (lambda: model()(torch.randn(1, 1, 6, 8)),
                            r"x: expected .*multiple of 4; got shape \(1, 1, 6, 8\)"),
    "x-channel-count": (lambda: model()(torch.randn(1, 3, 8, 8)),
                        r"x: expected a \(B, 1, \*S\) tensor of the model.s dtype.*got shape \(1, 3, 8, 8\)"),
    "x-rank": (lambda: model()(torch.randn(1, 8, 8)), r"x: expected .*2 spatial dims.*got shape \(1, 8, 8\)"),
    "x-empty-batch": (lambda: model()(torch.randn(0, 1, 8, 8)), r"x: expected .*B > 0.*got shape \(0, 1, 8, 8\)"),
    "codes-out-of-range": (lambda: prior()(torch.full((1, 3, 3), K)), r"codes: values must lie in \[0, 8\)"),
    "codes-float": (lambda: prior()(torch.zeros(1, 3, 3)),
                    r"codes: expected an integer \(B, H, W\) tensor; got shape \(1, 3, 3\), dtype torch.float32"),
    "codes-rank": (lambda: prior()(torch.zeros(3, 3, dtype=torch.long)),
                   r"codes: expected an integer \(B, H, W\) tensor; got shape \(3, 3\)"),
    "codes-missing-group-axis": (lambda: prior(num_groups=2)(torch.zeros(1, 3, 3, dtype=torch.long)),
                                 r"codes: expected an integer \(B, 2, H, W\) tensor; got shape \(1, 3, 3\)"),
    "label-missing": (lambda: prior(num_classes=3)(torch.zeros(1, 3, 3, dtype=torch.long)), r"label: pass class labels"),
    "label-unexpected": (lambda: prior()(torch.zeros(1, 3, 3, dtype=torch.long), label=torch.tensor([0])),
                         r"label: pass class labels"),
    "bits_per_dim-no-prior": (lambda: vqvae.bits_per_dim(torch.zeros(2), 3072), r"num_latents and num_embeddings"),
}


@pytest.mark.parametrize("call, message", CASES.values(), ids=CASES.keys())
def test_bad_input_raises_value_error_naming_the_argument_and_shape(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------ configs check their fields
CONFIG_CASES = {
    "data_variance": (vqvae.VQVAEConfig, dict(data_variance=0.0), r"VQVAEConfig.data_variance: expected > 0"),
    "data_variance-nan": (vqvae.VQVAEConfig, dict(data_variance=float("nan")), r"VQVAEConfig.data_variance"),
    "commitment_cost": (vqvae.VQVAEConfig, dict(commitment_cost=-0.1), r"VQVAEConfig.commitment_cost: expected >= 0"),
    "decay": (vqvae.VQVAEConfig, dict(decay=1.0), r"VQVAEConfig.decay: expected in \(0, 1\), or None for the codebook "
                                                  r"loss of Eq. 3 .*; got 1.0"),
    "decay-0": (vqvae.VQVAEConfig, dict(decay=0.0), r"VQVAEConfig.decay: .* \(decay=0 would replace the codebook by "
                                                    r"each batch's means\); got 0.0"),
    "likelihood": (vqvae.VQVAEConfig, dict(likelihood="laplace"),
                   r"VQVAEConfig.likelihood: expected 'gaussian' or 'categorical'; got 'laplace'"),
    "size": (vqvae.VQVAEConfig, dict(num_embeddings=0), r"VQVAEConfig.num_embeddings: expected an integer >= 1; got 0"),
    "dims": (vqvae.VQVAEConfig, dict(dims=4), r"VQVAEConfig.dims: expected 1, 2 or 3; got 4"),
    "dead_code_threshold": (vqvae.VQVAEConfig, dict(dead_code_threshold=0.0), r"VQVAEConfig.dead_code_threshold"),
    "epsilon": (vqvae.VQVAEConfig, dict(epsilon=0.0), r"VQVAEConfig.epsilon: expected > 0"),
    "pixelcnn-kernel": (vqvae.GatedPixelCNNConfig, dict(kernel_size=4),
                        r"GatedPixelCNNConfig.kernel_size: expected odd"),
    "pixelcnn-classes": (vqvae.GatedPixelCNNConfig, dict(num_classes=0), r"GatedPixelCNNConfig.num_classes"),
    "pixelcnn-cond": (vqvae.GatedPixelCNNConfig, dict(cond_channels=-1),
                      r"GatedPixelCNNConfig.cond_channels: expected >= 0"),
    "wavenet": (vqvae.WaveNetConfig, dict(num_categories=0), r"WaveNetConfig.num_categories: expected an integer >= 1"),
    "audio-decay": (vqvae.AudioVQVAEConfig, dict(decay=-0.5), r"AudioVQVAEConfig.decay"),
    "video": (vqvae.ActionConditionalPriorConfig, dict(num_actions=0), r"ActionConditionalPriorConfig.num_actions"),
    "quantizer": (lambda **kw: vqvae.VectorQuantizer(8, 4, **kw), dict(commitment_cost=-1.0),
                  r"VectorQuantizer.commitment_cost: expected >= 0"),
}


@pytest.mark.parametrize("make, fields, message", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config_with_a_field_out_of_range_raises_value_error_naming_the_field(make, fields, message):
    with pytest.raises(ValueError, match=message):
        make(**fields)


def test_default_configs_are_valid():
    for config in (vqvae.VQVAEConfig, vqvae.GatedPixelCNNConfig, vqvae.WaveNetConfig, vqvae.AudioVQVAEConfig,
                   vqvae.ActionConditionalPriorConfig):
        config()
    vqvae.VQVAEConfig(num_res_layers=0, num_downsamples=0, decay=0.5, dims=3, likelihood="categorical")


# ------------------------------------------------------------------ GatedPixelCNN.sample arguments
SAMPLE_CASES = {
    "negative-size": (dict(shape=(-1, 4), batch_size=2), r"shape: expected \(H, W\), two integers > 0; got \(-1, 4\)"),
    "one-size": (dict(shape=(4,), batch_size=2), r"shape: expected \(H, W\).*got \(4,\)"),
    "float-size": (dict(shape=(2.5, 4), batch_size=2), r"shape: expected \(H, W\).*got \(2.5, 4\)"),
    "no-batch-size": (dict(shape=(2, 2)), r"batch_size: expected a batch of B > 0.*got None"),
    "zero-batch-size": (dict(shape=(2, 2), batch_size=0), r"batch_size: expected a batch of B > 0"),
    "temperature": (dict(shape=(2, 2), batch_size=1, temperature=0.0), r"temperature: expected a finite number > 0"),
    "guidance": (dict(shape=(2, 2), batch_size=2, guidance=-1.0), r"guidance: expected a finite number >= 0"),
    "guidance-blocks": (dict(shape=(2, 2), batch_size=3, guidance=1.0), r"batch_size: expected a batch of 2 blocks"),
}


@pytest.mark.parametrize("kwargs, message", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_with_bad_arguments_raises_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prior().sample(**kwargs)


def test_class_model_sampled_without_labels_names_the_label():
    with pytest.raises(ValueError, match=r"label: pass class labels"):
        prior(num_classes=3).sample((2, 2), batch_size=2)
    with pytest.raises(ValueError, match=r"label: pass class labels"):
        prior(num_classes=3).sample((2, 2))
    with pytest.raises(ValueError, match=r"label: values must lie in \[0, 3\)"):
        prior(num_classes=3).sample((2, 2), label=torch.tensor([0, 3]))


# ------------------------------------------------------------------ no silent non-finite codebook
def test_codebook_whose_squared_norm_overflows_raises_the_same_on_both_paths(backend):
    codebook = torch.randn(3, 4)
    codebook[1] = 1e20  # finite, but ||e||^2 = 4e40 overflows float32: no distance to it is right
    with pytest.raises(ValueError, match="z or codebook contains NaN or Inf"):
        vqvae.nearest_code(torch.randn(5, 4), codebook)


def test_training_step_on_huge_finite_input_refuses_a_non_finite_codebook(backend):
    q = vqvae.VectorQuantizer(K, D, decay=0.5).train()
    before = {name: t.clone() for name, t in q.state_dict().items()}
    with pytest.raises(ValueError, match="EMA codebook update would leave non-finite codes"):
        q(1e20 * torch.ones(2, D, 16))  # e = ~1e20: its squared norm overflows float32
    assert all(torch.equal(before[name], t) for name, t in q.state_dict().items())  # nothing half-updated
    model = vqvae.VQVAE(vqvae.VQVAEConfig(in_channels=1, hidden_channels=8, res_channels=4, num_res_layers=1,
                                          num_embeddings=K, embedding_dim=D, decay=0.5)).train()
    try:
        model(torch.full((2, 1, 8, 8), 1e20))
    except ValueError as error:
        assert "non-finite" in str(error)
    assert torch.isfinite((model.quantizer.codebook ** 2).sum(1)).all()
