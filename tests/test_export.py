"""The inference paths of vqvae.py exported: image -> codes, codes -> image and the prior's log_prob
through torch.export give the codes, images and nats of the eager model, on the PyTorch path (an
exported program needs no extension); ONNX through torch.onnx where the onnx package is installed."""
import pytest
import torch
import torch.nn as nn

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


class ImageToCodes(nn.Module):
    def __init__(self, model: vqvae.VQVAE):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.quantize(self.model.encode(x)).codes


class CodesToImage(ImageToCodes):
    def forward(self, codes):
        return self.model.decode(codes)


class LogProb(ImageToCodes):
    def forward(self, codes, label):
        return self.model.log_prob(codes, label)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = vqvae.VQVAE(vqvae.VQVAEConfig(hidden_channels=16, res_channels=8, num_embeddings=32, embedding_dim=8,
                                          decay=0.99)).eval()
    prior = vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(32, channels=8, num_layers=2, num_classes=10)).eval()
    x = torch.rand(2, 3, 32, 32) - 0.5
    return model, prior, x, model.quantize(model.encode(x)).codes, torch.tensor([3, 5])


def test_exported_programs_give_the_eager_codes_images_and_log_prob(models):
    model, prior, x, codes, label = models
    to_codes = torch.export.export(ImageToCodes(model), (x,))
    assert "vqvae_ext" not in to_codes.graph_module.print_readable(print_output=False)   # runs without it
    assert torch.equal(to_codes.module()(x), codes)
    to_image = torch.export.export(CodesToImage(model), (codes,))
    assert torch.equal(to_image.module()(codes), model.decode(codes))
    log_prob = torch.export.export(LogProb(prior), (codes, label))
    assert torch.equal(log_prob.module()(codes, label), prior.log_prob(codes, label))


def test_onnx_programs_give_the_eager_codes_and_images(models, tmp_path):
    pytest.importorskip("onnx", reason="optional: pip install onnx onnxscript (onnxruntime to run them)")
    pytest.importorskip("onnxscript", reason="optional: pip install onnx onnxscript (onnxruntime to run them)")
    model, _, x, codes, _ = models
    for module, example, path in ((ImageToCodes(model), x, tmp_path / "codes.onnx"),
                                  (CodesToImage(model), codes, tmp_path / "image.onnx")):
        torch.onnx.export(module.eval(), (example,), dynamo=True).save(str(path))
    import onnx
    for path in (tmp_path / "codes.onnx", tmp_path / "image.onnx"):
        onnx.checker.check_model(onnx.load(path))
    ort = pytest.importorskip("onnxruntime", reason="optional: pip install onnxruntime, to run the ONNX programs")
    session = ort.InferenceSession(str(tmp_path / "codes.onnx"))
    assert (session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] == codes.numpy()).all()
    session = ort.InferenceSession(str(tmp_path / "image.onnx"))
    image = session.run(None, {session.get_inputs()[0].name: codes.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(image), model.decode(codes), rtol=1e-4, atol=1e-5)
