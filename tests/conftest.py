"""Shared fixtures: the repository root on sys.path, a seeded single-threaded torch for the tiny
models of these tests, the float64 nearest-code reference of the quantizer tests, and the real
CIFAR-10 decoded once per session."""
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = pathlib.Path(os.environ.get("VQVAE_CIFAR10", ROOT.parent / "shared/data/cifar10/cifar10-jpeg.tar.gz"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A --data-dir holding the decoded cache of the real CIFAR-10 ($VQVAE_CIFAR10 or ../shared)."""
    if not CIFAR.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real CIFAR-10 not found at {CIFAR}")
        pytest.skip(f"real CIFAR-10 not found at {CIFAR} (set VQVAE_CIFAR10)")
    from lab import images
    path = tmp_path_factory.mktemp("data")
    images.load_cifar10(CIFAR, path)  # decode once, cache as .npz
    return path


@pytest.fixture
def seeded_single_thread():
    """Seed 0 and one intra-op thread: tiny ops gain nothing from threads, and on a loaded 2-core
    machine two spinning threads per op slow convolution backward passes by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _assert_nearest(codes: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor,
                    eps: float = torch.finfo(torch.float32).eps, min_clear: float = 0.0) -> None:
    """codes == argmin_k ||z - e_k||^2 computed in float64 by brute force (Eq. 1), lowest index on ties.

    Where the float64 gap between the best and second-best distance is below the rounding bound of
    ||e_k||^2 - 2 <z, e_k> at precision eps (a sum of D + 2 products each: error <= (D + 2) eps
    (||e||^2 + 2 ||z|| ||e||) per distance, twice that between two), the chosen code may be either:
    there its distance must be within the bound of the best. min_clear: the fraction of rows that
    must be decided exactly (so that a bound that admits everything cannot pass).
    """
    z64, e64 = z.double(), codebook.double()
    distances = ((z64[:, None, :] - e64[None]) ** 2).sum(-1)                       # (N, K)
    assert codes.dtype == torch.int64 and codes.shape == (len(z),)
    if len(codebook) == 1:
        assert (codes == 0).all()
        return
    zn, en = z64.norm(dim=1), e64.norm(dim=1)
    bound = 2 * (z.shape[1] + 2) * eps * (en[None] ** 2 + 2 * zn[:, None] * en[None]).max(1).values
    top2 = distances.topk(2, dim=1, largest=False).values
    chosen = distances.gather(1, codes[:, None])[:, 0]
    assert (chosen <= top2[:, 0] + bound).all(), "chose a code farther than the rounding bound"
    clear = top2[:, 1] - top2[:, 0] > bound
    assert torch.equal(codes[clear], distances.argmin(1)[clear])
    assert clear.double().mean() >= min_clear


@pytest.fixture
def assert_nearest():
    return _assert_nearest


def require_extension():
    """vqvae_ext, or a skip that says why it does not import (in CI, which builds it, a failure)."""
    try:
        import vqvae_ext
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"vqvae_ext does not import: {e}")
        pytest.skip(f"vqvae_ext does not import: {e}", allow_module_level=True)
    return vqvae_ext


def require_vizdoom():
    """ViZDoom is optional for users; under CI (which installs it) a missing engine is a failure."""
    try:
        import vizdoom
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("vizdoom not installed: pip install vizdoom==1.3.2")
    return vizdoom


@pytest.fixture
def vizdoom():
    return require_vizdoom()


@pytest.fixture(params=["torch", "extension"])
def backend(request, monkeypatch):
    """The quantizer's nearest-code search and statistics through PyTorch (vqvae_ext hidden from
    vqvae.py) or through the compiled extension (skipped where it is not built, except in CI)."""
    import vqvae
    if request.param == "torch":
        monkeypatch.setattr(vqvae, "vqvae_ext", None)
    elif vqvae.vqvae_ext is None:
        require_extension()
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()
