"""Install vqvae.py and, if it builds, the optional compiled extension vqvae_ext.

    pip install --no-build-isolation -e .    # torch must already be installed

vqvae_ext (csrc/) holds the nearest-code search and the EMA statistics of the
quantizer. vqvae.py falls back to pure PyTorch without it, so a failed build
prints a warning (shown with pip -v) and the install goes on. Check with
`python -c "import vqvae_ext"`.

--no-build-isolation lets the build see the installed torch: the extension must
be compiled against the same torch it runs with (and pip then downloads nothing).

Environment variables:
    VQVAE_NO_EXT=1      install without the extension
    VQVAE_NO_CUDA=1     build the CPU kernels only, even where CUDA is available
    VQVAE_FORCE_CUDA=1  build the CUDA kernels too, and fail the install if that fails
    MAX_JOBS=N          parallel compile jobs (torch's ninja build)
"""
import os
import sys

from setuptools import setup


def env_flag(name):
    return os.environ.get(name, "") == "1"


def warn(message):
    bar = "!" * 78
    print(f"\n{bar}\nvqvae setup: {message}\n{bar}\n", file=sys.stderr, flush=True)


def extension_setup():
    """(ext_modules, cmdclass) for vqvae_ext; both empty when it is skipped."""
    if env_flag("VQVAE_NO_EXT"):
        warn("VQVAE_NO_EXT=1: installing without vqvae_ext; vqvae.py uses its pure-PyTorch path.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        warn(f"torch is not importable ({error}): installing without vqvae_ext; vqvae.py uses its "
             "pure-PyTorch path. To build it, install torch first, then run "
             "`pip install --no-build-isolation -e .`")
        return [], {}

    force_cuda = env_flag("VQVAE_FORCE_CUDA")
    # A GPU is not needed to compile, only a CUDA build of torch and the toolkit.
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there can
    # fool it, so check for the runtime header before relying on it.
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = torch.version.cuda is not None and cuda_home is not None and not env_flag("VQVAE_NO_CUDA")
    if with_cuda and not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        warn(f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h: building vqvae_ext without its CUDA "
             "kernels. Set CUDA_HOME to the CUDA toolkit (e.g. /usr/local/cuda) to build them.")
        with_cuda = False
    with_cuda = with_cuda or force_cuda
    sources = ["csrc/bindings.cpp", "csrc/vq_cpu.cpp"]
    # -fopenmp: at::parallel_for is a header template, serial unless compiled with OpenMP.
    # -Wno-psabi: as torch's own build, silences GCC's notes on vector-type ABI changes.
    args = {"cxx": ["-O3", "-fopenmp", "-Wno-psabi"]}
    if with_cuda:
        sources.append("csrc/vq_cuda.cu")
        args["cxx"].append("-DVQVAE_WITH_CUDA")
        args["nvcc"] = ["-O3", "-DVQVAE_WITH_CUDA",
                        "-gencode=arch=compute_80,code=sm_80",   # A100
                        "-gencode=arch=compute_90,code=sm_90"]   # H100
    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    # rpath: `import vqvae_ext` finds torch's libraries (and its libgomp) even before `import torch`.
    link_args = ["-fopenmp", f"-Wl,-rpath,{cpp_extension.TORCH_LIB_PATH}"]
    extension = extension_class("vqvae_ext", sources, extra_compile_args=args, extra_link_args=link_args)

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's build_ext, except that a failed build leaves the pure-Python install intact."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # compiler, linker or ninja failure
                if force_cuda:
                    raise
                hint = "\nVQVAE_NO_CUDA=1 builds its CPU kernels alone." if with_cuda else ""
                warn(f"building vqvae_ext FAILED ({type(error).__name__}: {error}).\n"
                     f"vqvae is installed without it and uses the slower pure-PyTorch path.{hint}")
                self.extensions = []  # nothing for setuptools to copy or record

    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_setup()

setup(
    name="vqvae",
    version="0.1.0",
    description="Reference implementation of VQ-VAE (van den Oord et al. 2017)",
    py_modules=["vqvae"],
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
