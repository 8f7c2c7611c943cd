"""Build fasthash._C with chosen compiler flags into a SEPARATE folder and assemble an importable
copy of the package around it; the in-place ``fasthash/_C*.so`` is never touched.

    python fuzz/build_ext.py OUT --cxx g++ --flags "-fsanitize=address,undefined -O1 -g"

writes ``OUT/obj/*.o`` (rebuilt only when a source, a header or the flags change),
``OUT/tree/fasthash/`` (a copy of the Python package with the new ``_C``) and prints the tree's
path. ``PYTHONPATH=OUT/tree`` (or running from inside OUT/tree) then imports the copy: the
editable install's finder comes after ``sys.path`` in ``sys.meta_path``.

The sources and flags mirror setup.py (C++17, hidden visibility, -fno-math-errno; the per-ISA
kernels use function target attributes, so no -m flags), except the optimisation level, which
the caller chooses.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "src").glob("*.cpp")) + [ROOT / "csrc" / "bindings.cpp"]


def _headers() -> list[Path]:
    return sorted((ROOT / "csrc" / "include").rglob("*.h"))


def build(out: Path, cxx: str, flags: list[str], jobs: int = 2, quiet: bool = False,
          alt_cxx: str | None = None, alt_flags: list[str] | None = None,
          alt_files: tuple[str, ...] = ()) -> Path:
    """Compile and link ``_C`` under ``out``; return the package tree (``out / "tree"``).

    ``alt_files`` (source stems, e.g. ``search_avx2``) are compiled with ``alt_cxx`` and
    ``alt_flags`` instead: the per-ISA kernels build with g++ only (clang 14 rejects AVX
    intrinsics inlined into their helpers), so a clang coverage build compiles them with g++.
    """
    import pybind11

    out = Path(out).resolve()
    obj_dir = out / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    includes = [pybind11.get_include(), sysconfig.get_paths()["include"],
                str(ROOT / "csrc" / "include")]
    common = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-math-errno"]
    common += [f"-I{p}" for p in includes]
    newest_header = max((h.stat().st_mtime for h in _headers()), default=0.0)

    def compile_one(src: Path) -> Path:
        if src.stem in alt_files:
            base = [alt_cxx or "g++", *common, *(alt_flags if alt_flags is not None else flags)]
        else:
            base = [cxx, *common, *flags]
        tag = hashlib.sha1(" ".join(base).encode()).hexdigest()[:12]  # flags change -> rebuild
        obj = obj_dir / f"{src.stem}.{tag}.o"
        if obj.exists() and obj.stat().st_mtime > max(src.stat().st_mtime, newest_header):
            return obj
        cmd = [*base, "-c", str(src), "-o", str(obj)]
        if not quiet:
            print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        return obj

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        objs = list(pool.map(compile_one, _sources()))
    lib_dir = out / "lib"
    lib_dir.mkdir(exist_ok=True)
    so = lib_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    link = [cxx, "-shared", *flags, *map(str, objs), "-pthread", "-o", str(so)]
    if not quiet:
        print(" ".join(link), flush=True)
    subprocess.run(link, check=True, cwd=ROOT)

    tree = out / "tree"
    pkg = tree / "fasthash"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(ROOT / "fasthash", pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyc"))
    shutil.copy2(so, pkg / so.name)
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="build folder (e.g. build/sanitize)")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--flags", default="-O1 -g", help="compile and link flags (one string)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("FASTHASH_BUILD_JOBS", "2")))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--alt-cxx", help="compiler for --alt-files (default g++)")
    ap.add_argument("--alt-flags", help="flags for --alt-files (default: --flags)")
    ap.add_argument("--alt-files", default="", help="comma-separated source stems")
    args = ap.parse_args(argv)
    alt = tuple(f for f in args.alt_files.split(",") if f)
    tree = build(Path(args.out), args.cxx, args.flags.split(), args.jobs, args.quiet,
                 args.alt_cxx, args.alt_flags.split() if args.alt_flags else None, alt)
    print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
