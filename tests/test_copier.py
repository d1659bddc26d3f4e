"""vqvae.py copied alone into someone else's model: only its file, no extension, and a small conv
autoencoder of the copier's own around VectorQuantizer with the paper's settings (K 512, D 64, beta
0.25, EMA decay 0.99), trained on real CIFAR-10 images. The full measurement, in the shape of the
most-copied notebook, is benchmarks/copier_check.py."""
import importlib.util
import shutil
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import CIFAR, ROOT
from lab import images

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


@pytest.fixture
def copied_vqvae(tmp_path, monkeypatch):
    """vqvae.py alone in an empty folder, imported as a copier has it: without vqvae_ext."""
    shutil.copy(ROOT / "vqvae.py", tmp_path / "vqvae.py")
    monkeypatch.setitem(sys.modules, "vqvae_ext", None)   # `import vqvae_ext` raises ImportError
    spec = importlib.util.spec_from_file_location("copied_vqvae", tmp_path / "vqvae.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "copied_vqvae", module)
    spec.loader.exec_module(module)
    assert module.vqvae_ext is None
    return module


def test_the_papers_settings_keep_most_codes_in_use_in_a_copiers_autoencoder(copied_vqvae, data_dir):
    data = images.load_images(CIFAR, data_dir, max_train=2000, max_test=500, seed=0)
    train, test = (images.to_float(data[f"{split}_x"], "cpu") for split in ("train", "test"))
    encoder = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
                            nn.Conv2d(32, 64, 1))
    quantizer = copied_vqvae.VectorQuantizer(512, 64, 0.25, decay=0.99)
    decoder = nn.Sequential(nn.Conv2d(64, 32, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
                            nn.ConvTranspose2d(32, 3, 4, 2, 1))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = train[torch.randint(len(train), (32,), generator=generator)]
        out = quantizer(encoder(x))
        loss = F.mse_loss(decoder(out.z_q), x) / data["variance"] + out.codebook_loss + out.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = quantizer.eval()(encoder(test))
        nmse = F.mse_loss(decoder(out.z_q), test).item() / data["variance"]
    used = out.codes.unique().numel()
    # With N(0, 1) codes and no restarts, 5 of 512 codes were in use here and the NMSE was 0.24.
    assert used >= 0.8 * 512 and nmse < 0.2, (used, nmse)
