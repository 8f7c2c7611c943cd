"""Builds the pybind11 extension ``fasthash._C``; all metadata lives in pyproject.toml.

Baseline flags only: the AVX2 / AVX-512 variants are compiled through per-function target
attributes and chosen at run time from CPUID, so the same binary runs on any x86-64 machine.
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

sources = sorted(glob("csrc/src/*.cpp")) + ["csrc/bindings.cpp"]

ext = Pybind11Extension(
    "fasthash._C",
    sources,
    include_dirs=["csrc/include"],
    depends=sorted(glob("csrc/include/fasthash/*.h")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-math-errno", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
