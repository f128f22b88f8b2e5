"""Build of lmpress's native kernels (everything else is in pyproject.toml).

One C++ extension, lmpress.kernels._native, compiled with -O3 for the baseline instruction set: the AVX2 and
AVX512-VNNI kernels carry their own target pragmas (src/lmpress/kernels/csrc/avx2.cpp, vnni.cpp) and are chosen
at run time, so the library runs on any CPU. The extension is optional: when it cannot be built, the install
goes on and lmpress warns once and uses its torch reference path.
"""

import sys

from setuptools import Extension, setup

CSRC = "src/lmpress/kernels/csrc"
unix = sys.platform != "win32"

setup(ext_modules=[Extension(
    "lmpress.kernels._native",
    sources=[f"{CSRC}/{f}" for f in ("module.cpp", "pool.cpp", "scalar.cpp", "avx2.cpp", "vnni.cpp", "dequant.cpp",
                                     "decode.cpp", "lowbit.cpp")],
    depends=[f"{CSRC}/kernels.h", f"{CSRC}/simd_body.h", f"{CSRC}/avx2_util.h"],
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno"] if unix else ["/O2"],
    extra_link_args=["-pthread"] if unix else [],
    optional=True,
)])
