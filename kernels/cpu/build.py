"""The CPU kernels' C++ extension (csrc/): where it is cached, when it can be built, building and loading it.

`specedit_cpu_kernels` holds the packed small-M matmul (linear.py), the row-invariant attention
(attention.py) and every decoder layer in one call (decoder.py). It is compiled on first use by
torch.utils.cpp_extension in a child process, which finds ninja on its own PATH (this process's environment
is never changed), into `cache_root()/ext/<name>-torch<v>-py<v>-<hash of the sources and flags>`, and later
processes load the built library from there directly. The codes for weight dtypes and instruction sets are
defined once, in csrc/codes.h, and read from the extension (`codes()`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

NAME = "specedit_cpu_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    "bindings.cpp",
    "dispatch.cpp",
    "decoder.cpp",
    "linear_avx2.cpp",
    "linear_avx512.cpp",
    "quant.cpp",
    "attention.cpp",
    "attention_avx2.cpp",
    "attention_avx512.cpp",
    "pool.cpp",
)
# -fopenmp: at::parallel_for (the main thread's loops, see csrc/pool.h) is inline and only spawns threads when
# compiled with it; at run time libgomp.so.1 resolves to the copy torch already loaded (one thread pool).
# -ffp-contract=off: GCC would otherwise fuse a written a * b + c into an FMA where it sees fit, maybe differently
# in the AVX2 and AVX-512 copies; every FMA is explicit.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
REQUIRED_FLAGS = {"avx2", "fma", "f16c"}

_ext = None
_error: RuntimeError | None = None  # a failed build is reported again without rebuilding
_lock = threading.Lock()


class BuildError(RuntimeError):
    """The extension could not be built or loaded here; the message is one line naming the log file."""


def cache_root() -> Path:
    """Root of specedit's on-disk cache: $SPECEDIT_CACHE, default ~/.cache/specedit (converted models, the
    compiled extension, measured cost models)."""
    return Path(os.environ.get("SPECEDIT_CACHE") or Path.home() / ".cache" / "specedit").expanduser()


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _ninja_dir() -> str | None:
    """Directory holding a ninja executable, or None. The pip `ninja` package counts too."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    try:
        import ninja  # type: ignore[import-not-found]

        return ninja.BIN_DIR
    except Exception:  # noqa: BLE001 - any failure means "no ninja"
        return None


def unavailable_reason() -> str | None:
    """None when the extension can be built and run here, else why not (one phrase). Compiles nothing,
    never raises."""
    try:
        if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
            return f"needs x86-64 Linux, this is {platform.machine()} {sys.platform}"
        missing = REQUIRED_FLAGS - _cpu_flags()
        if missing:
            return f"the CPU lacks {', '.join(sorted(missing))}"
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return f"no C++ compiler ({cxx}) on PATH"
        if _ninja_dir() is None:
            return "no ninja (pip install ninja)"
        return None
    except Exception as e:  # noqa: BLE001 - documented never to raise
        return f"cannot inspect this machine ({e})"


def available() -> bool:
    """True when the extension can be built and run here: x86-64 Linux with avx2, fma and f16c, a C++
    compiler and ninja. Compiles nothing, never raises."""
    return unavailable_reason() is None


def build_dir() -> Path:
    """Where this version of the sources is compiled: a name that changes with any source, flag or version."""
    digest = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".cpp", ".h"):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    tag = f"{NAME}-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / "ext" / f"{tag}-{digest.hexdigest()[:12]}"


_BUILD_SCRIPT = """
import sys
from torch.utils.cpp_extension import load
name, out, src, cflags, ldflags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5].split()
load(name=name, sources=[src + "/" + f for f in sys.argv[6:]], extra_cflags=cflags, extra_ldflags=ldflags,
     extra_include_paths=[src], build_directory=out, verbose=True)
"""


def _build(out: Path) -> None:
    """Compile the extension into `out` in a child process (ninja on the child's PATH only)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = _ninja_dir() + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-c", _BUILD_SCRIPT, NAME, str(out), str(CSRC), " ".join(CFLAGS), " ".join(LDFLAGS),
           *SOURCES]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "build.log"
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        errors = [line for line in proc.stdout.splitlines() if "error" in line.lower()]
        first = errors[0].strip() if errors else f"exit code {proc.returncode}"
        raise BuildError(
            f"building the CPU kernels failed (compiler {os.environ.get('CXX', 'c++')}): {first[:200]}; "
            f"full log: {log}"
        )


def load():
    """The compiled extension module; built on first use (tens of seconds), then loaded from the cache.

    Raises BuildError (one line, naming the build log) when it cannot be built or loaded here, ValueError when
    $SPECEDIT_ISA asks for what it cannot run (`avx2` runs the AVX2 kernels on an AVX-512 CPU, as an AVX2-only
    machine would; `avx512` requires AVX-512; unset or `auto`: the best this CPU has)."""
    global _ext, _error
    if _ext is not None:
        return _ext
    want = os.environ.get("SPECEDIT_ISA", "auto")
    if want not in ("auto", "avx2", "avx512"):
        raise ValueError(f"SPECEDIT_ISA={want!r}: use avx2, avx512 or auto")
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:
            raise _error
        why = unavailable_reason()
        if why is not None:
            _error = BuildError(f"the CPU kernels cannot be built here: {why}")
            raise _error
        out = build_dir()
        library = out / f"{NAME}.so"
        try:
            if not library.is_file():
                _build(out)
            spec = importlib.util.spec_from_file_location(NAME, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except BuildError as e:
            _error = e
            raise
        except (OSError, ImportError) as e:
            _error = BuildError(f"loading the CPU kernels from {library} failed: {e}")
            raise _error from e
        if want == "avx512" and module.best_isa() != "avx512":
            raise ValueError("SPECEDIT_ISA=avx512, but this CPU has no AVX-512")
        _ext = module
        return _ext


def codes() -> tuple[dict[str, int], dict[str, int]]:
    """(weight dtype name -> code, instruction set name -> code), as csrc/codes.h defines them."""
    ext = load()
    return ext.DTYPE_CODES, ext.ISA_CODES


def isa_code(isa: str | None) -> int:
    """The code of an instruction-set choice: None or 'auto' (the best this CPU runs), 'avx2' or 'avx512'.
    ValueError names the accepted values."""
    table = codes()[1]
    key = "auto" if isa is None else isa
    if not isinstance(key, str) or key not in table:
        raise ValueError(f"isa must be None or one of {sorted(table)}, got {isa!r}")
    return table[key]


def best_isa() -> str:
    """'avx512' or 'avx2': the instruction set the kernels use on this CPU (builds the extension)."""
    return load().best_isa()
