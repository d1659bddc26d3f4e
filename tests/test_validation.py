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
                          r"z_e: expected a floating \(B, 4, \*spatial\) tensor.*got shape \(2, 3, 4, 4\)"),
    "z_e-rank": (lambda: quantizer()(torch.randn(2, D)), r"z_e: expected .*got shape \(2, 4\)"),
    "z_e-integer": (lambda: quantizer()(torch.ones(2, D, 3, dtype=torch.int64)),
                    r"z_e: expected a floating .*got shape \(2, 4, 3\), dtype torch.int64"),
    "z_e-empty-batch": (lambda: quantizer()(torch.randn(0, D, 3)), r"z_e: expected .*B > 0; got shape \(0, 4, 3\)"),
    "z_e-nan": (lambda: quantizer()(nan_latents), r"NaN"),
    "z_e-nan-training-kmeans": (lambda: vqvae.VectorQuantizer(K, D, kmeans_init=True).train()(nan_latents), r"NaN"),
    "nearest_code-dim-mismatch": (lambda: vqvae.nearest_code(torch.randn(5, 3), torch.randn(4, 2)),
                                  r"codebook: expected a \(K, 3\) torch.float32 tensor.*got shape \(4, 2\)"),
    "lookup-out-of-range": (lambda: quantizer().lookup(torch.tensor([[0, K]])),
                            r"indices: values must lie in \[0, 8\); got range \[0, 8\]"),
    "decode-negative-index": (lambda: model().decode(torch.full((1, 2, 2), -1)),
                              r"indices: values must lie in \[0, 8\); got range \[-1, -1\]"),
    "decode-missing-group-axis": (lambda: model(groups=2).decode(torch.zeros(1, 2, 2, dtype=torch.long)),
                                  r"indices: expected a tensor with 4 dims, shape\[1\] == 2; got shape \(1, 2, 2\)"),
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
