"""Builds fastmerge's optional compiled kernels.

- ``fastmerge._C`` and ``fastmerge._core``: the multithreaded C++ CPU kernels (csrc/cpu +
  csrc/common, torch-free, compiled once into a static library) bound for torch ops (_C) and
  over Python buffers without torch (_core) by the thin bindings of csrc/bindings; built
  whenever torch is importable at build time. Set FASTMERGE_SKIP_CPU_BUILD=1 to skip them (the
  plain-torch backend then serves CPU tensors).
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


# -ffp-contract=off: no FMA where float32 roundings decide masks; -fno-trapping-math lets the
# element loops (selects on float compares) vectorise; -g0 halves the compile time.
CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-g0",
             "-Wall"]
CPU_KERNELS = "fastmerge_cpu"  # the static library of csrc/cpu, linked into _C and _core


def cpu_kernel_sources():
    return sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))


def cpu_extensions(cpp_extension):
    """_C (torch ops) and _core (pybind11 over buffers, no torch): two thin bindings
    (csrc/bindings) over the torch-free kernels of csrc/cpu, compiled once into a static library
    by build_cpu_kernels below and linked into both."""
    if os.environ.get("FASTMERGE_SKIP_CPU_BUILD") == "1":
        _log("FASTMERGE_SKIP_CPU_BUILD=1: not building the C++ CPU kernels")
        return []
    if not cpu_kernel_sources():
        return []
    bindings = os.path.join("csrc", "bindings")
    include = [COMMON, os.path.join(HERE, "csrc", "cpu"), os.path.join(HERE, bindings)]
    exts = [cpp_extension.CppExtension(
        "fastmerge._C", [os.path.join(bindings, "torch_cpu.cpp")], include_dirs=include,
        extra_compile_args={"cxx": CPU_FLAGS}, extra_link_args=["-fopenmp"])]
    # pybind11's headers: torch ships them (torch/include/pybind11), so the build needs no
    # pybind11 package (pip --no-build-isolation builds before installing the dependencies);
    # nothing of libtorch is linked (tests/test_native.py::test_core_links_no_libtorch)
    torch_include = cpp_extension.include_paths()[0]
    exts.append(Extension(
        "fastmerge._core", [os.path.join(bindings, "core.cpp")],
        include_dirs=include + [torch_include], extra_compile_args={"cxx": CPU_FLAGS},
        extra_link_args=["-fopenmp"], language="c++"))
    return exts


def build_cpu_kernels(build_ext, exts):
    """Compiles csrc/cpu/*.cpp once (in parallel, MAX_JOBS at a time) into
    build/temp*/lib<CPU_KERNELS>.a and adds it to the link of _C and _core. A source is
    recompiled when it or any header under csrc/cpu or csrc/common is newer than its object."""
    exts = [e for e in exts if e.name in ("fastmerge._C", "fastmerge._core")]
    if not exts:
        return
    from concurrent.futures import ThreadPoolExecutor

    compiler = build_ext.compiler
    out_dir = os.path.join(build_ext.build_temp, "cpu_kernels")
    headers = [h for d in ("cpu", "common")
               for h in glob.glob(os.path.join(HERE, "csrc", d, "*.h"))]
    newest_header = max((os.path.getmtime(h) for h in headers), default=0.0)

    def obj_of(src):
        stem = os.path.splitext(os.path.basename(src))[0]
        return os.path.join(out_dir, stem + compiler.obj_extension)

    def compile_one(src):
        obj = obj_of(src)
        if os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src),
                                                                 newest_header):
            return
        # output_dir="" + an absolute object path: compile() names the object after the source
        # path, so compile into a private folder and move the object where it belongs
        tmp = os.path.join(out_dir, "tmp-" + os.path.basename(src))
        objs = compiler.compile([src], output_dir=tmp, include_dirs=[COMMON],
                                extra_postargs=CPU_FLAGS)
        os.replace(objs[0], obj)
        shutil.rmtree(tmp, ignore_errors=True)

    sources = cpu_kernel_sources()
    os.makedirs(out_dir, exist_ok=True)
    with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", "4"))) as pool:
        list(pool.map(compile_one, sources))
    compiler.create_static_lib([obj_of(s) for s in sources], CPU_KERNELS, output_dir=out_dir)
    lib = compiler.library_filename(CPU_KERNELS, output_dir=out_dir)
    for ext in exts:
        if lib not in ext.extra_objects:
            ext.extra_objects.append(lib)
        ext.depends = list(ext.depends) + [lib]  # relink when the library changed


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
            base = cpp_extension.BuildExtension.with_options(use_ninja=True)

            class BuildExt(base):
                def build_extensions(self):
                    build_cpu_kernels(self, self.extensions)  # plain compiler, before ninja's
                    super().build_extensions()

            cmdclass = {"build_ext": BuildExt}
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
