"""Install vqvae.py and, if it builds, the optional compiled extension vqvae_ext (csrc/).

    pip install --no-build-isolation -e .    # against the torch already installed

vqvae_ext registers the operators torch.ops.vqvae_ext.nearest_code and ema_stats (see
csrc/vqvae_ext/__init__.py). vqvae.py runs without it, in pure PyTorch, so a failed build prints
one warning and the install goes on. `python -c "import vqvae_ext; print(vqvae_ext.describe('cuda'))"`
says what runs on a GPU.

GPU architectures: TORCH_CUDA_ARCH_LIST when set; else those of the GPUs visible at build time
(torch's default); else DEFAULT_CUDA_ARCH_LIST, whose PTX the driver compiles for newer GPUs.

Environment variables:
    VQVAE_NO_EXT=1      install without the extension
    VQVAE_NO_CUDA=1     build the CPU kernels only
    VQVAE_FORCE_CUDA=1  build the CUDA kernels too, and fail the install if that fails
    CUDA_HOME=DIR       the CUDA toolkit (needed where the nvcc on PATH is a wrapper script)
    MAX_JOBS=N          parallel compile jobs
"""
import glob
import os
import sys

from setuptools import setup

# Turing (T4) through Hopper (H100) as binaries, and Hopper's PTX for anything newer.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def flag(name):
    return os.environ.get(name) == "1"


def warn(message):
    print(f"\n{'!' * 78}\nvqvae setup: {message}\n{'!' * 78}\n", file=sys.stderr, flush=True)


def get_extensions():
    """[vqvae_ext._C] with its CPU kernels, and its CUDA kernels where torch and the toolkit allow."""
    if flag("VQVAE_NO_EXT"):
        return []
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not flag("VQVAE_NO_CUDA")
    if flag("VQVAE_FORCE_CUDA") and not with_cuda:
        raise SystemExit("vqvae setup: VQVAE_FORCE_CUDA=1, but torch has no CUDA, no CUDA_HOME was found, "
                         "or VQVAE_NO_CUDA=1")
    # -fopenmp: at::parallel_for is a header template, serial unless compiled with OpenMP.
    args = {"cxx": ["-O3", "-fopenmp", "-Wno-psabi"]}
    sources = glob.glob("csrc/*.cpp")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST  # no GPU to take them from
        sources += glob.glob("csrc/*.cu")
        args["cxx"].append("-DVQVAE_WITH_CUDA")
        args["nvcc"] = ["-O3", "-DVQVAE_WITH_CUDA"]
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    # rpath: `import vqvae_ext` finds torch's libraries (and its libgomp) even before `import torch`.
    return [extension("vqvae_ext._C", sorted(sources), extra_compile_args=args,
                      extra_link_args=["-fopenmp", f"-Wl,-rpath,{cpp_extension.TORCH_LIB_PATH}"])]


def build_ext_class():
    """torch's BuildExtension, except that a failed build leaves the pure-Python install intact."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildOrSkip(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # compiler, linker or ninja failure
                if flag("VQVAE_FORCE_CUDA"):
                    raise
                cuda = any(s.endswith(".cu") for e in self.extensions for s in e.sources)
                warn(f"building vqvae_ext FAILED ({type(error).__name__}: {error}). vqvae is installed without "
                     "it and uses pure PyTorch." + (" VQVAE_NO_CUDA=1 builds the CPU kernels alone." if cuda else ""))
                self.extensions = []  # nothing for setuptools to copy or record

    return BuildOrSkip


if __name__ == "__main__":  # (pip runs it so; tests import get_extensions)
    try:
        ext_modules, cmdclass = get_extensions(), {"build_ext": build_ext_class()}
    except ImportError as error:  # no torch: the model alone
        warn(f"torch is not importable ({error}): installing without vqvae_ext.")
        ext_modules, cmdclass = [], {}
    setup(
        name="vqvae",
        version="0.1.0",
        description="Reference implementation of VQ-VAE (van den Oord et al. 2017)",
        py_modules=["vqvae"],
        packages=["vqvae_ext"],
        package_dir={"vqvae_ext": "csrc/vqvae_ext"},
        python_requires=">=3.10",
        install_requires=["torch>=2.1", "numpy"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
