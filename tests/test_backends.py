"""Which code runs the quantizer (the compiled extension or PyTorch): setup.py's architecture
list, vqvae_ext.supports/describe and the fallback where the extension cannot run, and
torch.compile of the quantizer on both paths."""
import importlib.util
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import vqvae
from conftest import ROOT, require_extension

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

@pytest.fixture
def extension():
    return require_extension()


needs_ext = pytest.mark.usefixtures("extension")


# ------------------------------------------------------------------ setup.py's extensions
@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    """setup.py's module (setup() runs only as __main__) in a build environment: a CUDA build of torch,
    a toolkit found (one with its CUDA runtime library), no GPU visible, none of the VQVAE_* switches set."""
    from torch.utils import cpp_extension
    (tmp_path / "cuda" / "lib64").mkdir(parents=True)
    (tmp_path / "cuda" / "lib64" / "libcudart.so").touch()
    spec = importlib.util.spec_from_file_location("vqvae_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(ROOT)  # sources are globbed relative to the project, as pip runs setup.py
    for name in ("TORCH_CUDA_ARCH_LIST", "VQVAE_NO_EXT", "VQVAE_NO_CUDA", "VQVAE_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return module


def test_without_a_visible_gpu_the_default_architectures_with_ptx_reach_torchs_build(setup_py):
    [extension] = setup_py.get_extensions()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == setup_py.DEFAULT_CUDA_ARCH_LIST == "7.5;8.0;8.6;8.9;9.0+PTX"
    assert extension.name == "vqvae_ext._C"
    assert sorted(os.path.basename(s) for s in extension.sources) == [
        "bindings.cpp", "vq_cpu.cpp", "vq_cuda.cu", "vq_emulate.cpp"]
    assert "-DVQVAE_WITH_CUDA" in extension.extra_compile_args["nvcc"]
    assert "-fopenmp" in extension.extra_compile_args["cxx"] and "-fopenmp" in extension.extra_link_args


def test_an_arch_list_given_is_honoured_and_a_visible_gpu_is_left_to_torch(setup_py, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    setup_py.get_extensions()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    setup_py.get_extensions()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # torch's default: the visible GPUs' architectures


def test_env_switches_leave_out_cuda_or_the_extension_or_fail_without_cuda(setup_py, monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setenv("VQVAE_NO_CUDA", "1")
    [extension] = setup_py.get_extensions()
    assert not any(s.endswith(".cu") for s in extension.sources) and "nvcc" not in extension.extra_compile_args
    monkeypatch.setenv("VQVAE_FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="VQVAE_FORCE_CUDA=1"):
        setup_py.get_extensions()
    monkeypatch.delenv("VQVAE_NO_CUDA")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(SystemExit, match=r"VQVAE_FORCE_CUDA=1, but the CUDA kernels cannot be built: no CUDA toolkit "
                                         r"found \(set CUDA_HOME\)"):
        setup_py.get_extensions()
    monkeypatch.setenv("VQVAE_NO_EXT", "1")
    assert setup_py.get_extensions() == []


def test_a_toolkit_that_cannot_link_leaves_the_cuda_kernels_out_and_says_why(setup_py, monkeypatch, tmp_path):
    """The stranger's machine: torch takes the parent of a wrapper script nvcc as CUDA_HOME, a folder
    without the CUDA runtime library; the CPU kernels are built, with the reason and the remedy."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert "CUDA_HOME=" in setup_py.cuda_problem() and "holds no lib64/libcudart.so" in setup_py.cuda_problem()
    [extension] = setup_py.get_extensions()
    assert not any(s.endswith(".cu") for s in extension.sources) and "nvcc" not in extension.extra_compile_args


# --------------------------------------------------------- vqvae_ext.supports and describe
@needs_ext
@pytest.mark.parametrize("dtype, supported", [(torch.float32, True), (torch.float64, True), (torch.float16, False),
                                              (torch.bfloat16, False), (torch.int64, False)])
def test_supports_float32_and_float64_on_the_cpu(dtype, supported):
    assert vqvae.vqvae_ext.supports(torch.zeros(2, 3, dtype=dtype)) is supported
    assert vqvae.vqvae_ext.describe("cpu") == vqvae.vqvae_ext.describe(torch.device("cpu")) == "extension: CPU"
    assert vqvae.vqvae_ext.describe("meta") == "PyTorch"


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where no GPU is")
def test_describe_refuses_what_is_not_a_device_or_a_gpu_where_none_is_visible(monkeypatch):
    ext = require_extension()
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N'; got 'foo'$"):
        ext.describe("foo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device cuda: no CUDA GPU is visible to torch"):
        ext.describe("cuda")


def test_the_compiled_query_says_no_gpu_runs_the_kernels_where_there_is_none():
    assert vqvae.vqvae_ext._C.cuda_kernels_run_on(0) is False


@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda:0 of compute capability 7.0 and an extension whose compiled query answers `runs`."""
    ext = require_extension()

    def make(cuda_built, runs):
        monkeypatch.setattr(ext, "_runs_on", {})
        monkeypatch.setattr(ext, "build_info", lambda: {"cuda": cuda_built, "why": None})
        def query(index):  # like the compiled query, nothing torch.compile can trace
            torch._dynamo.graph_break()
            return runs
        monkeypatch.setattr(ext, "_C", SimpleNamespace(cuda_kernels_run_on=query))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return ext
    return make


def gpu_tensor(dtype=torch.float32):
    """What supports() reads of a tensor on cuda:0."""
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype,
                           is_floating_point=lambda: dtype.is_floating_point)


def test_gpu_the_kernels_run_on_uses_them(fake_gpu, monkeypatch):
    ext = fake_gpu(True, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.describe("cuda") == ext.describe("cuda:0") == "extension: CUDA sm_70"
        assert ext.supports(gpu_tensor()) and ext.supports(gpu_tensor(torch.bfloat16))
        assert not ext.supports(gpu_tensor(torch.int64))


@pytest.mark.parametrize("cuda_built, why", [(True, "it holds no CUDA code that runs on this GPU"),
                                             (False, "it was built without CUDA kernels")])
def test_gpu_the_build_cannot_run_falls_back_to_pytorch_with_exactly_one_warning(fake_gpu, cuda_built, why,
                                                                                  monkeypatch):
    ext = fake_gpu(cuda_built, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ext.describe("cuda:0") == "PyTorch"
        assert ext.describe(torch.device("cuda", 0)) == "PyTorch" and not ext.supports(gpu_tensor())
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    message = str(caught[0].message)
    assert f"vqvae_ext cannot run on cuda:0 (sm_70): {why}" in message
    assert "pip install --no-build-isolation -e ." in message and "TORCH_CUDA_ARCH_LIST=7.0" in message


def test_the_gpu_query_is_a_constant_to_torch_compile_not_a_graph_break(fake_gpu):
    ext = fake_gpu(True, True)
    torch._dynamo.reset()
    step = torch.compile(lambda x: x + 1 if ext._cuda_kernels_run_on(0) else x - 1, fullgraph=True)
    assert step(torch.zeros(2)).tolist() == [1.0, 1.0]
    torch._dynamo.reset()


def test_no_extension_means_pytorch_everywhere(monkeypatch, assert_nearest):
    monkeypatch.setattr(vqvae, "vqvae_ext", None)
    monkeypatch.setattr(torch.ops.vqvae_ext, "nearest_code", lambda *a: pytest.fail("the extension ran"), raising=False)
    z, codebook = torch.randn(40, 2), torch.randn(3, 2)
    assert_nearest(vqvae.nearest_code(z, codebook), z, codebook)


# ------------------------------------------------------------------------ torch.compile

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


# Not in the paper, both data-dependent: k-means on the first batch and dead-code restarts (a threshold
# just under the EMA's starting count of 1, so that codes unused in a step restart at the next).
REMEDIES = {"paper": dict(dead_code_threshold=None), "remedies": dict(kmeans_init=True, dead_code_threshold=0.995)}


@pytest.mark.parametrize("remedies", REMEDIES)
@pytest.mark.parametrize("decay", [None, 0.99], ids=["codebook_loss", "ema"])
@torch._inductor.config.patch(fallback_random=True)   # not monkeypatch: pytest 9.2 would delete the option after
def test_compiled_quantizer_has_no_graph_break_and_matches_eager(backend, decay, remedies):
    # Compiled random ops draw from PyTorch's generator as eager ones do (the k-means seeding, the restarts).
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 8, 5, 5, generator=g) for _ in range(3)]
    eager = vqvae.VectorQuantizer(32, 8, decay=decay, **REMEDIES[remedies])
    compiled_module = vqvae.VectorQuantizer(32, 8, decay=decay, **REMEDIES[remedies])
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)  # a graph break raises
    for mode in ("train", "eval"):
        eager.train(mode == "train")
        compiled.train(mode == "train")
        torch.manual_seed(1)
        want_steps = run_steps(eager, inputs)
        torch.manual_seed(1)
        got_steps = run_steps(compiled, inputs)
        if mode == "train" and remedies == "remedies":   # the remedies ran: k-means, then restarts
            assert compiled_module._initialized and bool(compiled_module.initialized)
            assert (want_steps[1][0].counts == 0).any() and (want_steps[2][0].counts == 0).any()
        for (want, want_grad), (got, got_grad) in zip(want_steps, got_steps):
            assert torch.equal(got.codes, want.codes) and torch.equal(got.counts, want.counts)
            for field in ("z_q", "codebook_loss", "commitment_loss", "perplexity"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
        for name, buffer in eager.state_dict().items():
            torch.testing.assert_close(compiled_module.state_dict()[name], buffer, rtol=1e-5, atol=1e-6)


def test_compiled_nearest_code_refuses_nan_without_a_host_check(backend):
    search = torch.compile(vqvae.nearest_code, fullgraph=True)
    z, codebook = torch.randn(10, 4), torch.randn(5, 4)
    assert torch.equal(search(z, codebook), vqvae.nearest_code(z, codebook))
    z[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="z or codebook contains NaN or Inf"):
        search(z, codebook)
