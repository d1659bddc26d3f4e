"""vqvae_ext: the VQ-VAE quantizer's nearest-code search and EMA statistics, compiled (csrc/).

Importing it registers two PyTorch operators (TORCH_LIBRARY in csrc/bindings.cpp), with CPU
kernels, CUDA kernels where setup.py could build them, and Meta kernels for torch.compile:

    torch.ops.vqvae_ext.nearest_code(z (N, D), codebook (K, D)) -> codes (N,) int64      (Eq. 1)
        (-1 for a row with no finite distance: NaN/Inf in it, or an overflow)
    torch.ops.vqvae_ext.ema_stats(z (N, D), codes (N,) int64, K) -> (counts (K,) int64, sums (K, D))

vqvae.py uses them where supports(z) is true, and pure PyTorch elsewhere, with the same results.
describe(device) says which runs there.
"""
import json
import pathlib
import warnings

import torch

FIX = "pip install --no-build-isolation -e ."   # in the checkout, against the torch installed


def _recorded() -> dict:
    """What setup.py recorded of its build (_build.json beside the extension): built, cuda, why."""
    try:
        return json.loads(pathlib.Path(__file__).with_name("_build.json").read_text())
    except (OSError, ValueError):
        return {}


try:
    from . import _C
except ImportError as error:   # not built, or its build failed: vqvae.py then uses PyTorch
    why = _recorded().get("why") or "it was never built here"
    raise ImportError(f"vqvae_ext is not built ({why}); to build it: {FIX}") from error
from ._C import emulate_cuda_nearest_code  # noqa: E402

__all__ = ["supports", "describe", "build_info", "emulate_cuda_nearest_code"]


def build_info() -> dict:
    """{"cuda": whether the CUDA kernels are compiled in, "why": why not (setup.py's record), or None}."""
    return {**_C.build_info(), "why": _recorded().get("why")}

_runs_on: dict[int, bool] = {}  # GPU index -> whether the CUDA kernels run there (asked once)


@torch.compiler.assume_constant_result  # asked while torch.compile traces: a constant, no graph break
def _cuda_kernels_run_on(index: int) -> bool:
    """Whether the compiled CUDA kernels run on GPU `index`; warns the first time they do not."""
    if index not in _runs_on:
        built = build_info()["cuda"]
        _runs_on[index] = built and _C.cuda_kernels_run_on(index)
        if not _runs_on[index]:
            why = ("it holds no CUDA code that runs on this GPU" if built
                   else f"it was built without CUDA kernels ({build_info()['why'] or 'no CUDA toolkit'})")
            major, minor = torch.cuda.get_device_capability(index)
            warnings.warn(f"vqvae_ext cannot run on cuda:{index} (sm_{major}{minor}): {why}. The quantizer uses "
                          f"PyTorch there; rebuild it on this machine with `{FIX}` "
                          f"(or elsewhere with TORCH_CUDA_ARCH_LIST={major}.{minor}).", stacklevel=3)
    return _runs_on[index]


def supports(tensor: torch.Tensor) -> bool:
    """Whether the operators run for `tensor`: float32/float64 on the CPU; any floating dtype on a
    GPU that the compiled CUDA kernels run on."""
    if tensor.device.type == "cpu":
        return tensor.dtype in (torch.float32, torch.float64)
    return tensor.device.type == "cuda" and tensor.is_floating_point() and _cuda_kernels_run_on(tensor.device.index)


def describe(device: torch.device | str) -> str:
    """What runs the quantizer's search and statistics on `device`: "extension: CPU",
    "extension: CUDA sm_XY" or "PyTorch" (warning once per GPU, saying why and how to rebuild). Raises
    ValueError for a device that is not one, or a GPU where none is visible."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if device.type == "cpu":
        return "extension: CPU"
    if device.type != "cuda":
        return "PyTorch"
    if not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA GPU is visible to torch {torch.__version__}")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not _cuda_kernels_run_on(index):
        return "PyTorch"
    return "extension: CUDA sm_%d%d" % torch.cuda.get_device_capability(index)
