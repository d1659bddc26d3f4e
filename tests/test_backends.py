"""Which code runs the quantizer (the compiled extension or PyTorch), the fallback where the
extension cannot run, and torch.compile of the quantizer on both paths."""
import warnings

import pytest
import torch

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

BUILT = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]  # setup.py's default list


@pytest.mark.parametrize("archs, capability, runs", [
    (BUILT, (7, 5), True), (BUILT, (8, 7), True), (BUILT, (9, 0), True),
    (BUILT, (10, 0), True), (BUILT, (12, 0), True),    # Blackwell: the driver compiles compute_90 PTX
    (BUILT, (7, 0), False), (BUILT, (6, 1), False),     # V100, P100: older than every entry
    (["sm_80", "sm_90"], (8, 6), True),                 # binary code runs on a newer minor version
    (["sm_80", "sm_90"], (7, 5), False),                # T4
    (["sm_80", "sm_90"], (12, 0), False),               # no PTX: nothing for a newer major version
    (["sm_90a"], (9, 0), True), (["sm_90a"], (10, 0), False),
    (["compute_80"], (8, 0), True), (["compute_80"], (7, 5), False),
    ([], (9, 0), False),
])
def test_cuda_code_runs_on_the_architectures_cuda_can_run_it_on(archs, capability, runs):
    assert vqvae.cuda_code_runs_on(archs, capability) is runs


class FakeExtension:
    """Stands in for vqvae_ext on a machine without a GPU: only build_info is consulted."""

    def __init__(self, cuda, archs, skipped=""):
        self.info = {"cuda": cuda, "cuda_archs": archs, "cuda_skipped": skipped}

    def build_info(self):
        return self.info


@pytest.fixture
def fake_gpu(monkeypatch):
    """A cuda:0 of the given capability, and an extension built as given."""
    def make(capability, extension):
        monkeypatch.setattr(vqvae, "vqvae_ext", extension)
        monkeypatch.setattr(vqvae, "_backends", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return make


def test_gpu_the_extension_was_built_for_uses_its_kernels(fake_gpu):
    fake_gpu((9, 0), FakeExtension(True, ["sm_80", "sm_90"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vqvae.quantizer_backend("cuda:0") == "extension: CUDA sm_90"
    assert vqvae.quantizer_backend("cpu") == "extension: CPU"


def test_gpu_of_another_architecture_falls_back_to_pytorch_with_one_warning(fake_gpu):
    fake_gpu((7, 5), FakeExtension(True, ["sm_80", "sm_90"]))
    with pytest.warns(UserWarning, match=r"cannot run on cuda:0 \(sm_75\): it holds CUDA code for sm_80, sm_90"):
        assert vqvae.quantizer_backend("cuda:0") == "PyTorch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per device
        assert vqvae.quantizer_backend(torch.device("cuda", 0)) == "PyTorch"


def test_extension_built_without_cuda_says_why_on_a_gpu(fake_gpu):
    fake_gpu((9, 0), FakeExtension(False, [], "nvcc_not_found"))
    with pytest.warns(UserWarning, match=r"built without CUDA kernels \(nvcc_not_found\)"):
        assert vqvae.quantizer_backend("cuda:0") == "PyTorch"


def test_no_extension_means_pytorch_everywhere(fake_gpu):
    fake_gpu((9, 0), None)
    assert vqvae.quantizer_backend("cpu") == vqvae.quantizer_backend("cuda:0") == "PyTorch"
    with pytest.raises(RuntimeError, match="does not run on cpu"):
        vqvae.nearest_code(torch.randn(4, 2), torch.randn(3, 2), backend="extension")


# ------------------------------------------------------------------------ torch.compile

BACKENDS = ["torch", pytest.param("extension", marks=pytest.mark.skipif(
    vqvae.vqvae_ext is None, reason="the compiled vqvae_ext extension is not built"))]


@pytest.fixture
def backend_path(request, monkeypatch):
    """Run the quantizer through the extension or, with it hidden, through pure PyTorch."""
    if request.param == "torch":
        monkeypatch.setattr(vqvae, "vqvae_ext", None)
    monkeypatch.setattr(vqvae, "_backends", {})
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def run_steps(q, inputs):
    """Training steps of a quantizer alone: forward, loss, backward, SGD on the codebook when it is a
    parameter (the EMA codebook updates itself). Returns the outputs and gradients at each step."""
    results = []
    for z_e in inputs:
        z_e = z_e.clone().requires_grad_()
        out = q(z_e)
        loss = out.codebook_loss + out.commitment_loss + (out.z_q ** 2).mean()
        loss.backward()
        results.append((out, z_e.grad))
        if isinstance(q.codebook, torch.nn.Parameter):
            with torch.no_grad():
                q.codebook -= 0.5 * q.codebook.grad
            q.codebook.grad = None
    return results


@pytest.mark.parametrize("backend_path", BACKENDS, indirect=True)
@pytest.mark.parametrize("decay", [None, 0.99], ids=["codebook_loss", "ema"])
def test_compiled_quantizer_has_no_graph_break_and_matches_eager(backend_path, decay):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 8, 5, 5, generator=g) for _ in range(3)]
    eager = vqvae.VectorQuantizer(32, 8, decay=decay)
    compiled_module = vqvae.VectorQuantizer(32, 8, decay=decay)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)  # a graph break raises
    for mode in ("train", "eval"):
        eager.train(mode == "train")
        compiled.train(mode == "train")
        for (want, want_grad), (got, got_grad) in zip(run_steps(eager, inputs), run_steps(compiled, inputs)):
            assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)
            for field in ("z_q", "codebook_loss", "commitment_loss", "perplexity"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
        for name, buffer in eager.state_dict().items():
            torch.testing.assert_close(compiled_module.state_dict()[name], buffer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_path", BACKENDS, indirect=True)
def test_compiled_nearest_code_refuses_nan_without_a_host_check(backend_path):
    search = torch.compile(vqvae.nearest_code, fullgraph=True)
    z, codebook = torch.randn(10, 4), torch.randn(5, 4)
    assert torch.equal(search(z, codebook), vqvae.nearest_code(z, codebook, backend="torch"))
    z[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="z or codebook contains NaN or Inf"):
        search(z, codebook)
