"""Install vqvae.py and, if it builds, the optional compiled extension vqvae_ext.

    pip install --no-build-isolation -e .    # torch must already be installed

vqvae_ext (csrc/) registers two PyTorch operators, torch.ops.vqvae_ext.nearest_code and
torch.ops.vqvae_ext.ema_stats (the quantizer's nearest-code search and EMA statistics), with CPU
kernels and, where torch has CUDA and nvcc is found, CUDA kernels. vqvae.py falls back to pure
PyTorch without it, so a failed build prints a warning and the install goes on. Check what was
built with `python -c "import vqvae_ext; print(vqvae_ext.build_info())"`.

--no-build-isolation lets the build see the installed torch: the extension must be compiled
against the same torch it runs with (and pip then downloads nothing).

GPU architectures: TORCH_CUDA_ARCH_LIST when set (torch's syntax, e.g. "8.0;9.0+PTX"); else
those of the GPUs visible at build time; else DEFAULT_CUDA_ARCH_LIST below, whose PTX lets the
driver compile the kernels for GPUs newer than the list.

Environment variables:
    VQVAE_NO_EXT=1      install without the extension
    VQVAE_NO_CUDA=1     build the CPU kernels only, even where CUDA is available
    VQVAE_FORCE_CUDA=1  build the CUDA kernels too, and fail the install if that fails
    CUDA_HOME=DIR       the CUDA toolkit (default: the one the nvcc on PATH belongs to)
    MAX_JOBS=N          parallel compile jobs (torch's ninja build)
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Turing (T4) through Hopper (H100) as binaries, and Hopper's PTX for anything newer.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "") == "1"


def warn(message):
    """Print a boxed message; pip shows a build's output only with -v, hence build_info() too."""
    bar = "!" * 78
    print(f"\n{bar}\nvqvae setup: {message}\n{bar}\n", file=sys.stderr, flush=True)


def cuda_toolkit():
    """(root, "major.minor") of the CUDA toolkit to build with, or (None, reason).

    torch takes CUDA_HOME as the parent of the folder of the nvcc on PATH, which is wrong when
    that nvcc is a wrapper script (/usr/local/bin/nvcc gives /usr/local). nvcc itself knows its
    root: `nvcc --dryrun` prints it as TOP.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, "nvcc_not_found"
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None, "nvcc_does_not_run"
    release = re.search(r"release (\d+\.\d+)", version)
    top = re.search(r"^#\$ TOP=(.*)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    root = os.path.normpath(top.group(1)) if top else home or os.path.dirname(os.path.dirname(nvcc))
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return None, "toolkit_without_cuda_runtime_h"
    return root, release.group(1) if release else "unknown"


def cuda_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' architectures (+PTX of the newest), else the default."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        archs = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in archs) + "+PTX"
    return DEFAULT_CUDA_ARCH_LIST


def built_archs(nvcc_flags):
    """['sm_75', ..., 'compute_90'] from torch's -gencode=arch=compute_XY,code=... flags."""
    return [m.group(1) for flag in nvcc_flags for m in [re.search(r"code=(\w+)$", flag)] if m]


def extension_setup():
    """(ext_modules, cmdclass) for vqvae_ext; both empty when it is skipped."""
    if env_flag("VQVAE_NO_EXT"):
        warn("VQVAE_NO_EXT=1: installing without vqvae_ext; vqvae.py uses its pure-PyTorch path.")
        return [], {}
    try:
        import torch
    except ImportError as error:
        warn(f"torch is not importable ({error}): installing without vqvae_ext; vqvae.py uses its "
             "pure-PyTorch path. To build it, install torch first, then run "
             "`pip install --no-build-isolation -e .`")
        return [], {}

    force_cuda = env_flag("VQVAE_FORCE_CUDA")
    # A GPU is not needed to compile, only a CUDA build of torch and the toolkit.
    skipped = ""
    if torch.version.cuda is None:
        with_cuda = False  # a CPU build of torch: nothing to ask for
    elif env_flag("VQVAE_NO_CUDA"):
        with_cuda, skipped = False, "VQVAE_NO_CUDA"
    else:
        root, release = cuda_toolkit()
        with_cuda = root is not None
        if not with_cuda:
            skipped = release
        elif release.split(".")[0] != torch.version.cuda.split(".")[0]:
            with_cuda, skipped = False, f"nvcc_{release}_torch_cuda_{torch.version.cuda}"
        else:
            os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension on import
    if skipped and force_cuda:
        raise SystemExit(f"vqvae setup: VQVAE_FORCE_CUDA=1 but the CUDA kernels cannot be built: {skipped}")
    if skipped and skipped != "VQVAE_NO_CUDA":
        warn(f"torch {torch.__version__} has CUDA but vqvae_ext is built WITHOUT its CUDA kernels ({skipped}). "
             "Set CUDA_HOME to a CUDA toolkit of torch's major version to build them; until then "
             "vqvae.py uses PyTorch on the GPU. vqvae_ext.build_info() records this.")

    from torch.utils import cpp_extension
    sources = ["csrc/bindings.cpp", "csrc/vq_cpu.cpp", "csrc/vq_emulate.cpp"]
    # -fopenmp: at::parallel_for is a header template, serial unless compiled with OpenMP.
    # -Wno-psabi: as torch's own build, silences GCC's notes on vector-type ABI changes.
    args = {"cxx": ["-O3", "-fopenmp", "-Wno-psabi"]}
    if skipped:
        args["cxx"].append(f"-DVQVAE_CUDA_SKIPPED={skipped}")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch)
        archs = built_archs(cpp_extension._get_cuda_arch_flags())  # the flags torch will pass to nvcc
        print(f"vqvae setup: CUDA kernels for {', '.join(archs)} (TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}) with the toolkit in {os.environ['CUDA_HOME']}", flush=True)
        sources.append("csrc/vq_cuda.cu")
        args["cxx"] += ["-DVQVAE_WITH_CUDA", f"-DVQVAE_CUDA_ARCHS={','.join(archs)}"]
        args["nvcc"] = ["-O3", "-DVQVAE_WITH_CUDA"]
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
