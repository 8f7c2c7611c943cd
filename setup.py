"""Builds the pybind11 extension ``fasthash._C``; all metadata lives in pyproject.toml.

Baseline flags only: the AVX2 / AVX-512 variants are compiled through per-function target
attributes and chosen at run time from CPUID, so the same binary runs on any x86-64 machine.
"""

import os
from glob import glob

from pybind11.setup_helpers import (
    ParallelCompile,
    Pybind11Extension,
    build_ext,
)
from setuptools import setup

sources = sorted(glob("csrc/src/*.cpp")) + ["csrc/bindings.cpp"]
headers = sorted(glob("csrc/include/fasthash/*.h"))


def _stale(obj: str, src: str) -> bool:
    """An object is rebuilt when it is older than its source or any project header."""
    if not os.path.exists(obj):
        return True
    t = os.path.getmtime(obj)
    return any(os.path.getmtime(p) > t for p in [src, *headers])


# Compile the per-ISA files in parallel (all cores by default) and skip up-to-date objects.
ParallelCompile("FASTHASH_BUILD_JOBS", default=0, needs_recompile=_stale).install()

ext = Pybind11Extension(
    "fasthash._C",
    sources,
    include_dirs=["csrc/include"],
    depends=headers,
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-math-errno", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
