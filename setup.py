"""Install vqvae.py and, if it builds, the optional compiled extension vqvae_ext (csrc/).

    pip install --no-build-isolation -e .    # against the torch already installed

vqvae_ext registers the operators torch.ops.vqvae_ext.nearest_code and ema_stats (see
csrc/vqvae_ext/__init__.py). vqvae.py runs without it, in pure PyTorch. Where the CUDA kernels
cannot be built (a toolkit that cannot link: the nvcc on PATH a wrapper script, CUDA_HOME unset),
the CPU kernels are built alone; where nothing builds, vqvae is installed without the extension.
Either way the reason is recorded beside the extension (_build.json): `import vqvae_ext`, the
first line of every run and `vqvae_ext.build_info()` say it, with the command that fixes it.

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
import json
import os
import shutil
import sys

from setuptools import setup

# Turing (T4) through Hopper (H100) as binaries, and Hopper's PTX for anything newer.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def flag(name):
    return os.environ.get(name) == "1"


def first_line(error: Exception) -> str:
    """The error's type and the start of its message (a failed command's line can be long)."""
    text = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:120] + '...' if len(text) > 120 else text}"


def warn(message):
    print(f"\n{'!' * 78}\nvqvae setup: {message}\n{'!' * 78}\n", file=sys.stderr, flush=True)


def cuda_problem() -> str | None:
    """Why the CUDA kernels cannot be built here, or None: torch without CUDA, no toolkit, or one
    without the CUDA runtime library that torch links against (the case of a wrapper script nvcc)."""
    import torch
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if flag("VQVAE_NO_CUDA"):
        return "VQVAE_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if home is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if not glob.glob(os.path.join(home, "lib64", "libcudart.so*")) + glob.glob(os.path.join(home, "lib", "libcudart.so*")):
        return (f"the toolkit torch found, CUDA_HOME={home}, holds no lib64/libcudart.so to link against (is the nvcc on "
                "PATH a wrapper script?); set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda")
    return None


def get_extensions(with_cuda: bool | None = None):
    """[vqvae_ext._C] with its CPU kernels, and its CUDA kernels where torch and the toolkit allow
    (with_cuda: None asks cuda_problem)."""
    if flag("VQVAE_NO_EXT"):
        return []
    import torch
    from torch.utils import cpp_extension

    problem = cuda_problem()
    if flag("VQVAE_FORCE_CUDA") and problem:
        raise SystemExit(f"vqvae setup: VQVAE_FORCE_CUDA=1, but the CUDA kernels cannot be built: {problem}")
    with_cuda = problem is None if with_cuda is None else with_cuda
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
    """torch's BuildExtension, except that a CUDA build that fails falls back to the CPU kernels, a
    build that fails altogether leaves the pure-Python install intact, and what was built and why is
    recorded in _build.json beside the extension, for vqvae_ext to say."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildOrSkip(BuildExtension):
        def build_extensions(self):
            cuda = any(s.endswith(".cu") for e in self.extensions for s in e.sources)
            record = {"built": True, "cuda": cuda, "why": None if cuda else f"no CUDA kernels: {cuda_problem()}"}
            try:
                super().build_extensions()
            except Exception as error:  # compiler, linker or ninja failure
                if flag("VQVAE_FORCE_CUDA"):
                    raise
                record = self.fall_back(error, cuda)
            if record["why"]:
                warn(f"vqvae_ext: {record['why']}")
            os.makedirs(os.path.dirname(self.record_path()), exist_ok=True)
            with open(self.record_path(), "w") as f:
                json.dump(record, f)

        def record_path(self) -> str:
            return os.path.join(self.build_lib, "vqvae_ext", "_build.json")

        def copy_extensions_to_source(self):   # --inplace (pip's -e): the record goes beside the extension too
            super().copy_extensions_to_source()
            shutil.copyfile(self.record_path(), os.path.join(
                self.get_finalized_command("build_py").get_package_dir("vqvae_ext"), "_build.json"))

        def fall_back(self, error, cuda: bool) -> dict:
            """After a failed build: the CPU kernels alone where CUDA's failed, else no extension."""
            if cuda:
                warn(f"building the CUDA kernels FAILED ({first_line(error)}); building the CPU kernels alone "
                     "(`pip install -v` shows the compiler's output)")
                cuda_ext, (cpu_ext,) = self.extensions[0], get_extensions(with_cuda=False)
                for name in ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name"):   # setuptools' own
                    setattr(cpu_ext, name, getattr(cuda_ext, name))
                self.extensions = [cpu_ext]
                self.ext_map = {key: cpu_ext if ext is cuda_ext else ext for key, ext in self.ext_map.items()}
                try:
                    super().build_extensions()
                    return {"built": True, "cuda": False, "why": f"the CUDA kernels failed to build ({first_line(error)})"}
                except Exception as cpu_error:
                    error = cpu_error
            warn(f"building vqvae_ext FAILED ({first_line(error)}). vqvae is installed without it and uses pure PyTorch.")
            self.extensions = []  # nothing for setuptools to copy or record
            return {"built": False, "cuda": False, "why": f"its build failed ({first_line(error)})"}

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
