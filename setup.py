"""Optional native extension: lowbit's C GGUF quantizers (metadata lives in pyproject.toml).

No Python C API: the shared library is loaded with ctypes by ``lowbit.gguf.native``. When
no C compiler is available the build is skipped and the torch quantizers are used.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lowbit.gguf._native",
            sources=["src/lowbit/gguf/native/lowbit_quants.c"],
            # no FMA contraction, no fast-math, no -march=native: the bytes must equal the torch code's
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi"],
            libraries=["m"],
            optional=True,
        )
    ]
)
