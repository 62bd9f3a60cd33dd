"""Build of pyloader: the pybind11 extension pyloader._C compiled by nvcc through ninja.

Switches (environment):
  PYLOADER_BUILD_CUDA   auto (default: build when nvcc is found) | 1 (must build) | 0 (pure Python)
  PYLOADER_CUDA_ARCHS   e.g. "80;89;90;100+PTX" (default; sm_100 only where nvcc knows it)
  MAX_JOBS              parallel compile jobs for ninja
  CUDA_HOME             where to look for bin/nvcc before PATH

Whether to build never depends on torch.cuda.is_available(): build machines often have no GPU.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["multi_tensor_transform.cu", "multi_tensor_quantize.cu", "host_reader.cpp", "bindings.cpp"]
DEFAULT_ARCHS = "80;89;90;100+PTX"


def _log(msg: str) -> None:
    print(f"[pyloader build] {msg}", file=sys.stderr)


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build_mode() -> str:
    mode = os.environ.get("PYLOADER_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PYLOADER_BUILD_CUDA must be auto, 0 or 1, not {mode!r}")
    return mode


def _gencode_flags(nvcc: str) -> list:
    """-gencode flags for PYLOADER_CUDA_ARCHS; archs this nvcc does not know are dropped (logged)."""
    spec = os.environ.get("PYLOADER_CUDA_ARCHS", DEFAULT_ARCHS)
    known = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    flags = []
    for item in filter(None, (s.strip() for s in spec.replace(",", ";").split(";"))):
        arch, ptx = (item[:-4], True) if item.upper().endswith("+PTX") else (item, False)
        arch = arch.replace(".", "")
        if known and f"sm_{arch}" not in known:
            _log(f"nvcc does not support sm_{arch}; skipping it")
            continue
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise SystemExit(f"PYLOADER_CUDA_ARCHS={spec!r} leaves no architecture this nvcc supports")
    return flags


class NinjaNvccBuild(build_ext):
    """Writes a build.ninja for nvcc and runs it; the result is the extension's file."""

    def build_extension(self, ext):
        import pybind11

        nvcc = _find_nvcc()
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "pyloader_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = [str(CSRC), str(CSRC / "include"), pybind11.get_include(), sysconfig.get_paths()["include"]]
        inc = " ".join(f"-I{p}" for p in includes)
        gencode = " ".join(_gencode_flags(nvcc))
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"cu_flags = -O3 -std=c++17 -Xcompiler=-fPIC -Xcompiler=-fvisibility=hidden {gencode} {inc}",
            f"cpp_flags = -O3 -std=c++17 -Xcompiler=-fPIC -Xcompiler=-fvisibility=hidden {inc}",
            "rule cu",
            "  command = $nvcc $cu_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cpp",
            "  command = $nvcc $cpp_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $nvcc -shared -cudart=static $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for src in SOURCES:
            obj = build_dir / (src + ".o")
            rule = "cu" if src.endswith(".cu") else "cpp"
            lines.append(f"build {obj}: {rule} {CSRC / src}")
            objects.append(str(obj))
        lines.append(f"build {out_path}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [_ninja(), "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        _log(" ".join(cmd))
        subprocess.run(cmd, check=True)


def _ninja() -> str:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise SystemExit("building the CUDA extension needs ninja (pip install ninja)")
        return found


def _ext_modules():
    mode = _build_mode()
    if mode == "0":
        _log("PYLOADER_BUILD_CUDA=0: pure-Python install (the cuda backend will be unavailable)")
        return []
    if _find_nvcc() is None:
        if mode == "1":
            raise SystemExit("PYLOADER_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        _log("nvcc not found: pure-Python install (the cuda backend will be unavailable)")
        return []
    return [Extension("pyloader._C", sources=[f"csrc/{s}" for s in SOURCES])]


setup(
    packages=find_packages(include=["pyloader", "pyloader.*"]),
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": NinjaNvccBuild},
)
