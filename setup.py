"""Build script for the compiled parts of ixc-engine; all metadata lives in pyproject.toml.

Extensions:
- ``ixc_engine._core`` (required): ``csrc/*.cpp``, C++17 at -O3, pybind11 headers only (no libtorch, no torch
  import here). Compiled through a generated ``build.ninja`` when a ninja binary is found (env ``NINJA``, the
  ``ninja`` PyPI package, or PATH) and the compiler is unix-like; otherwise by setuptools' own compiler.
- ``ixc_engine._cuda`` (optional hook): ``csrc/cuda/*.cu`` (+ ``csrc/cuda/*.cpp``), compiled by nvcc for the
  archs in ``IXC_CUDA_ARCHS`` (e.g. ``"90;90a"``) or else ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0+PTX"``) and
  linked against cudart only. Considered only when such .cu files exist; built only when torch built with CUDA
  imports (used solely to detect the toolkit), nvcc is found, an arch list is set and ninja is used. Otherwise it
  is skipped with a printed note. A failed CUDA build warns instead of failing the install.

Env: ``CXX``, ``CXXFLAGS``, ``LDFLAGS`` are honoured; ``IXC_NO_NINJA=1`` forces setuptools' compiler.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from glob import glob
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
CXX_STD_FLAGS = ["-std=c++17", "-O3", "-fvisibility=hidden", "-DNDEBUG"]


def note(msg: str) -> None:
    print(f"[ixc-engine setup] {msg}", file=sys.stderr, flush=True)


def cuda_gencode_flags(spec: str) -> list[str]:
    """nvcc -gencode flags for an arch list such as "90;90a", "8.0 9.0+PTX" or "sm_90a,compute_80"."""
    flags: list[str] = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        ptx = token.upper().endswith("+PTX")
        arch = token[:-4] if ptx else token
        arch = re.sub(r"^(sm_|compute_)", "", arch).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[a-z]?", arch):
            raise ValueError(f"CUDA arch list {spec!r}: cannot parse entry {token!r} (want e.g. 90, 90a, 8.0+PTX)")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise ValueError(f"CUDA arch list {spec!r} is empty")
    return flags


def find_ninja() -> str | None:
    if os.environ.get("IXC_NO_NINJA", "0") not in ("", "0"):
        return None
    candidates = [os.environ.get("NINJA")]
    try:
        import ninja  # the PyPI package ships the binary

        candidates.append(os.path.join(ninja.BIN_DIR, "ninja"))
    except ImportError:
        pass
    candidates.append(shutil.which("ninja"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_extension() -> Extension | None:
    """The optional nvcc-built extension, or None (with a note saying why) when it must be skipped."""
    cu_sources = sorted(glob("csrc/cuda/*.cu"))
    if not cu_sources:
        return None
    try:
        import torch  # detection only: the extension itself never links libtorch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # noqa: BLE001 - any import failure means "no CUDA toolchain"
        note(f"skipping csrc/cuda: torch not importable ({exc})")
        return None
    if torch.version.cuda is None:
        note("skipping csrc/cuda: torch was built without CUDA")
        return None
    cuda_home = os.environ.get("CUDA_HOME") or CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.isfile(nvcc):
        note("skipping csrc/cuda: nvcc not found (set CUDA_HOME)")
        return None
    spec = os.environ.get("IXC_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not spec:
        note("skipping csrc/cuda: set IXC_CUDA_ARCHS (e.g. '90;90a') or TORCH_CUDA_ARCH_LIST")
        return None
    if find_ninja() is None:
        note("skipping csrc/cuda: CUDA sources are only built through ninja, which was not found")
        return None
    cuda_home = str(Path(nvcc).resolve().parent.parent)
    ext = Extension(
        "ixc_engine._cuda",
        sources=cu_sources + sorted(glob("csrc/cuda/*.cpp")),
        include_dirs=[pybind11.get_include(), os.path.join(cuda_home, "include")],
        library_dirs=[os.path.join(cuda_home, "lib64")],
        libraries=["cudart"],
        depends=sorted(glob("csrc/cuda/*.h") + glob("csrc/cuda/*.cuh")),
        language="c++",
        optional=True,
    )
    ext.nvcc = nvcc
    ext.gencode = cuda_gencode_flags(spec)
    return ext


def _ninja_path(p: str | os.PathLike) -> str:
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_cmd(args: list[str]) -> str:
    return shlex.join(args).replace("$", "$$")


class NinjaBuildExt(build_ext):
    """build_ext that writes one build.ninja per extension and runs ninja (unix compilers only)."""

    def build_extension(self, ext: Extension) -> None:
        ninja = find_ninja()
        if ninja is None or self.compiler.compiler_type != "unix":
            note(f"building {ext.name} with setuptools' compiler (ninja not used)")
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args = ["/std:c++17", "/O2", "/EHsc"]
            else:
                ext.extra_compile_args = CXX_STD_FLAGS + shlex.split(os.environ.get("CXXFLAGS", ""))
            super().build_extension(ext)
            return
        note(f"building {ext.name} with ninja ({ninja})")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        (build_dir / "build.ninja").write_text(self._ninja_file(ext, build_dir, out))
        cmd = [ninja, "-C", str(build_dir)]
        if self.parallel:
            cmd += ["-j", str(self.parallel)]
        if self.verbose:
            cmd.append("-v")
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise CompileError(f"ninja build of {ext.name} failed: {exc}") from exc

    def _ninja_file(self, ext: Extension, build_dir: Path, out: Path) -> str:
        cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
        py_inc = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
        includes = [f"-I{d}" for d in [*ext.include_dirs, *sorted(py_inc)]]
        cxxflags = CXX_STD_FLAGS + ["-fPIC", "-Wall"] + includes + shlex.split(os.environ.get("CXXFLAGS", ""))
        ldflags = ["-shared"] + (["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else [])
        ldflags += [f"-L{d}" for d in ext.library_dirs] + [f"-l{lib}" for lib in ext.libraries]
        ldflags += shlex.split(os.environ.get("LDFLAGS", ""))
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {_ninja_cmd(cxx)}",
            f"cxxflags = {_ninja_cmd(cxxflags)}",
            f"ldflags = {_ninja_cmd(ldflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = LINK $out",
        ]
        if getattr(ext, "nvcc", None):
            nvccflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", *ext.gencode, *includes]
            lines += [
                f"nvcc = {_ninja_cmd([ext.nvcc])}",
                f"nvccflags = {_ninja_cmd(nvccflags)}",
                "rule nvcc",
                "  command = $nvcc --generate-dependencies-with-compile --dependency-output $out.d $nvccflags -c $in"
                + " -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $out",
            ]
        objects = []
        for i, src in enumerate(ext.sources):
            src_path = (ROOT / src).resolve()
            obj = build_dir / f"{i}_{src_path.stem}.o"
            rule = "nvcc" if src_path.suffix == ".cu" else "cxx"
            lines.append(f"build {_ninja_path(obj)}: {rule} {_ninja_path(src_path)}")
            objects.append(_ninja_path(obj))
        lines.append(f"build {_ninja_path(out)}: link {' '.join(objects)}")
        lines.append(f"default {_ninja_path(out)}")
        return "\n".join(lines) + "\n"


def ext_modules() -> list[Extension]:
    core = Extension(
        "ixc_engine._core",
        sources=sorted(glob("csrc/*.cpp")),
        include_dirs=[pybind11.get_include()],
        depends=sorted(glob("csrc/*.h")),
        language="c++",
    )
    cuda = cuda_extension()
    return [core] if cuda is None else [core, cuda]


if __name__ == "__main__":  # setuptools' build backend also runs this file as __main__
    os.chdir(ROOT)
    setup(ext_modules=ext_modules(), cmdclass={"build_ext": NinjaBuildExt})
