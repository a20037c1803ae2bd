"""specedit: speculative edits. The original file is the draft; greedy output is exactly plain decoding's.

    import specedit
    eng = specedit.load("smollm2-135m-instruct")
    e = eng.edit(original, "Fix the integer overflow.", language="c")
    print(e.diff, e.stats.tokens_per_s)
"""

from importlib.metadata import PackageNotFoundError, version

from .api import Engine, load
from .results import EditResult, GenerateResult, Stats

try:
    __version__ = version("specedit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["load", "Engine", "GenerateResult", "EditResult", "Stats", "__version__"]
