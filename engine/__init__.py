"""specedit: speculative edits. The original file is the draft; greedy output is exactly plain decoding's.

    import specedit
    eng = specedit.load("smollm2-135m-instruct")
    e = eng.edit(original, "Fix the integer overflow.", language="c")
    print(e.diff, e.stats.tokens_per_s)
"""

from .api import Engine, load
from .results import EditResult, GenerateResult, Stats

__all__ = ["load", "Engine", "GenerateResult", "EditResult", "Stats"]
