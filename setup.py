"""Builds fastmerge's optional compiled kernels.

- ``fastmerge._C``: the multithreaded C++ CPU kernels (csrc/cpu + csrc/common), built whenever
  torch is importable at build time. Set FASTMERGE_SKIP_CPU_BUILD=1 to skip it (the plain-torch
  backend then serves CPU tensors).
- ``fastmerge._cuda``: the CUDA kernels (csrc/cuda + csrc/common), built only when asked for
  (FASTMERGE_BUILD_CUDA=1), nvcc is found and torch is a CUDA build. Architectures come from
  TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": newer GPUs JIT the sm_90 PTX); MAX_JOBS bounds
  parallel compiles (default 4).
  Anywhere else it is skipped with a message, never faked.

Install without build isolation so the extension compiles against the torch you have
(never pulling a CUDA torch on a CPU machine):
    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"
"""
import glob
import os
import shutil
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = os.path.join(HERE, "csrc", "common")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"[fastmerge setup] {msg}", file=sys.stderr)


def _torch():
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
        return cpp_extension
    except ImportError:
        return None


def cpu_extensions(cpp_extension):
    if os.environ.get("FASTMERGE_SKIP_CPU_BUILD") == "1":
        _log("FASTMERGE_SKIP_CPU_BUILD=1: not building the C++ CPU kernels")
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return []
    # -ffp-contract=off: no FMA where float32 roundings decide masks; -fno-trapping-math lets
    # the element loops (selects on float compares) vectorise; -g0 halves the compile time.
    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
             "-g0", "-Wall"]
    exts = [cpp_extension.CppExtension(
        "fastmerge._C", sources, include_dirs=[COMMON],
        extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"])]
    # the same kernels bound without torch (fastmerge/pipeline/native.py: `fastmerge merge`
    # starts without importing torch for the methods that need no selection pass)
    # pybind11's headers: torch ships them (torch/include/pybind11), so the build needs no
    # pybind11 package (pip --no-build-isolation builds before installing the dependencies)
    torch_include = cpp_extension.include_paths()[0]
    kernels = [s for s in sources if os.path.basename(s) != "binding.cpp"]
    exts.append(Extension(
        "fastmerge._core", kernels + [os.path.join("csrc", "core", "core_binding.cpp")],
        include_dirs=[COMMON, os.path.join(HERE, "csrc", "cpu"), torch_include],
        extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"], language="c++"))
    return exts


def cuda_extensions(cpp_extension):
    if os.environ.get("FASTMERGE_BUILD_CUDA") != "1":
        _log("CUDA kernels not requested (set FASTMERGE_BUILD_CUDA=1 to build them)")
        return []
    import torch
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        _log("FASTMERGE_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing: skipping "
             "the CUDA kernels")
        return []
    # +PTX: the sm_90 PTX rides along, so GPUs newer than the list JIT-compile the kernels
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))
                     + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not sources:
        return []
    return [cpp_extension.CUDAExtension(
        "fastmerge._cuda", sources, include_dirs=[COMMON, os.path.join(HERE, "csrc", "cuda")],
        # torch 2.13's headers need C++20 (the binding includes them; the .cu files need only
        # C++17, which tests/test_cuda_compile.py checks, and build as C++20 too).
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                                     "-lineinfo"]})]


def main():
    cpp_extension = _torch()
    ext_modules, cmdclass = [], {}
    if cpp_extension is None:
        _log("torch is not installed at build time: building no compiled kernels "
             "(install torch first, then pip install --no-build-isolation)")
    else:
        os.environ.setdefault("MAX_JOBS", "4")
        ext_modules = cpu_extensions(cpp_extension) + cuda_extensions(cpp_extension)
        if ext_modules:
            cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
