"""specedit: speculative edits. The original file is the draft; greedy output is exactly plain decoding's.

    import specedit
    eng = specedit.load("smollm2-135m-instruct")
    e = eng.edit(original, "Fix the integer overflow.", language="c")
    print(e.diff, e.stats.tokens_per_s)

The public names are imported on first use (PEP 562), so `import specedit.cli` does not import torch: the
command line answers --help at once, and a Ctrl-C while torch loads is the CLI's to handle (one line, exit 130).
"""

from importlib import import_module

TYPE_CHECKING = False  # typing is not imported either: the CLI starts with as little as possible
__all__ = ["load", "Engine", "GenerateResult", "EditResult", "Stats", "__version__"]
_LAZY = {"load": ".api", "Engine": ".api", "GenerateResult": ".results", "EditResult": ".results", "Stats": ".results"}

if TYPE_CHECKING:
    from .api import Engine, load
    from .results import EditResult, GenerateResult, Stats


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specedit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'specedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
