"""Builds the one extension, ``ppo_fast._C``: every op's C++ CPU kernel, plus the CUDA kernels
when they can be compiled.

CUDA sources are compiled when a CUDA toolkit is found *and* the installed torch is a CUDA build
(no GPU needs to be visible), or when forced with ``PPO_FAST_CUDA=1``; ``PPO_FAST_CUDA=0`` builds
the CPU kernels only. ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured by torch's
cpp_extension. Build without isolation so the installed torch is the one compiled against:

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - only hit by a misconfigured install
    raise SystemExit(
        "ppo_fast: building needs torch installed first, then `pip install --no-build-isolation -e .` "
        "(an isolated build would fetch a different torch and compile against the wrong headers)"
    ) from e

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PPO_FAST_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if cpp_extension.CUDA_HOME is None:
            raise SystemExit("ppo_fast: PPO_FAST_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        if torch.version.cuda is None:
            raise SystemExit(f"ppo_fast: PPO_FAST_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        return True
    if flag:
        raise SystemExit(f"ppo_fast: PPO_FAST_CUDA must be 0 or 1, got {flag!r}")
    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def _pip_cuda_includes() -> list[str]:
    """Header folders of the pip-installed CUDA libraries (nvidia-* wheels) when the toolkit lacks
    them: torch's ATen/cuda headers include cusparse.h and cublas headers, which a bare nvcc-only
    toolkit does not ship but a CUDA build of torch brings along as wheels."""
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += glob.glob(os.path.join(root, "*", "include"))
    wanted = ("cusparse.h", "cublas_v2.h")
    return sorted(d for d in found if any(os.path.exists(os.path.join(d, h)) for h in wanted))


def _extension():
    with_cuda = _want_cuda()
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)
    csrc = os.path.join(HERE, "csrc")
    # csrc/host: each op's entry points, compiled once and shared by both backends' kernels.
    sources = rel(
        glob.glob(os.path.join(csrc, "*.cpp"))
        + glob.glob(os.path.join(csrc, "host", "*.cpp"))
        + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    cxx = ["-O3", "-fdiagnostics-color=always"]
    ldflags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is header-only and runs serially unless the extension itself is built
        # with OpenMP; libgomp resolves to the copy torch already loaded (same soname).
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    define_macros = []  # cpp_extension defines Py_LIMITED_API itself for py_limited_api=True
    kwargs = dict(
        name="ppo_fast._C",
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        py_limited_api=True,
        extra_link_args=ldflags,
    )
    if with_cuda:
        sources += rel(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        define_macros.append(("PPO_FAST_WITH_CUDA", "1"))
        kwargs["include_dirs"] += _pip_cuda_includes()
        # No --use_fast_math: exp/log must match the CPU kernels.
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            sources=sources, define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs
        )
    return cpp_extension.CppExtension(
        sources=sources, define_macros=define_macros, extra_compile_args={"cxx": cxx}, **kwargs
    )


def _check_dynamic_libstdcxx(path: str) -> None:
    """Refuse an extension that carries its own static libstdc++: its second, uninitialised copy of
    the C++ locale crashes the process on the first error message that formats a number (seen with
    a g++ wrapper on a GPU image). torch itself links libstdc++ dynamically; so must we."""
    if not sys.platform.startswith("linux") or shutil.which("readelf") is None:
        return
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    if "libstdc++" not in dynamic:
        raise SystemExit(
            f"ppo_fast: {path} links libstdc++ statically (compiler: {os.environ.get('CXX', 'c++')}); it would crash "
            "on the first formatted error message. Build with a compiler that links it dynamically, e.g. "
            "CC=/usr/bin/gcc CXX=/usr/bin/g++"
        )


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        super().build_extension(ext)
        _check_dynamic_libstdcxx(self.get_ext_fullpath(ext.name))


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
