"""Argument checks for the public API: a TypeError or ValueError that names the argument and what it accepts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from .prompts import check_encodable as encodable


def _kind(value) -> str:
    return type(value).__name__


def is_ids(value) -> bool:
    """A sequence of ints (list, tuple, range, 1-D integer tensor), not text or bytes."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point() and not value.is_complex()
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        return False
    return all(isinstance(t, Integral) and not isinstance(t, bool) for t in value)


def text_or_ids(name: str, value, optional: bool = False) -> None:
    """`value` is text (str, encodable as UTF-8) or token ids (a sequence of int); None too when `optional`."""
    if value is None and optional:
        return
    if not (isinstance(value, str) or is_ids(value)):
        also = " or None" if optional else ""
        raise TypeError(f"{name} must be text (str) or token ids (a sequence of int){also}, got {_kind(value)}")
    if isinstance(value, str):
        encodable(name, value)


def text(name: str, value, blank_ok: bool = True) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {_kind(value)}")
    encodable(name, value)
    if not blank_ok and not value.strip():
        raise ValueError(f"{name} must not be empty or blank")


def positive_int(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Integral) or isinstance(value, bool):
        also = " or None" if optional else ""
        raise TypeError(f"{name} must be an int >= 1{also}, got {_kind(value)}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")


def integer(name: str, value) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {_kind(value)}")


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def seed(value) -> None:
    """An int torch can seed a generator with: -2**63 .. 2**64 - 1."""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"seed must be an int, got {_kind(value)}")
    if not SEED_MIN <= value <= SEED_MAX:
        raise ValueError(f"seed must be an int in -2**63 .. 2**64 - 1, got {value}")


def temperature(value) -> None:
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"temperature must be a number >= 0 (0 = greedy), got {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {value}")


def stop_strings(value) -> list[str]:
    """`stop` as a list: a str or a sequence of str (each encodable as UTF-8)."""
    if isinstance(value, str):
        out = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)) and all(
            isinstance(s, str) for s in value):
        out = list(value)
    else:
        raise TypeError(f"stop must be a str or a sequence of str, got {_kind(value)}")
    for i, s in enumerate(out):
        encodable("stop" if isinstance(value, str) else f"stop[{i}]", s)
    return out


@dataclass(frozen=True)
class GenParams:
    """How one prompt is decoded, checked once by `generation` and passed down whole."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or below acceptance.MIN_TEMPERATURE): greedy
    seed: int = 0
    stop: tuple[str, ...] = ()
    prediction: str | Sequence[int] | None = None  # the expected output (text or ids): the draft


def generation(ids_or_text, max_new_tokens, prediction, temperature_, stop, seed_) -> GenParams:
    """The checks of every generation entry point (generate, stream, chat, submit, generate_batch): TypeError /
    ValueError naming the argument. Returns the arguments as one GenParams."""
    text_or_ids("ids_or_text", ids_or_text)
    positive_int("max_new_tokens", max_new_tokens)
    text_or_ids("prediction", prediction, optional=True)
    temperature(temperature_)
    seed(seed_)
    return GenParams(max_new_tokens, temperature_, seed_, tuple(stop_strings(stop)), prediction)


def choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def messages(value) -> list[dict]:
    """OpenAI-style chat messages: a non-empty list of {'role': str, 'content': str or list of text parts}.
    Returns them as {'role', 'content': str} dicts (text parts joined)."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        raise TypeError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                        f"got {_kind(value)}{' (empty)' if isinstance(value, Sequence) and not value else ''}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TypeError(f"messages[{i}] must be a dict with a str 'role' and a 'content', got {m!r:.80}")
        c = m["content"]
        if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
            c = "".join(str(p.get("text", "")) for p in c)
        if not isinstance(c, str):
            raise TypeError(f"messages[{i}]['content'] must be a str or a list of {{'type': 'text', 'text': ...}} "
                            f"parts, got {_kind(c)}")
        encodable(f"messages[{i}]['role']", m["role"])
        encodable(f"messages[{i}]['content']", c)
        out.append({**m, "content": c})
    return out


def cpu_kernels(value) -> None:
    if value not in (None, True, False):
        raise TypeError(f"cpu_kernels must be None, True or False, got {value!r}")


def available_devices() -> list[str]:
    """Device types specedit can run on with this torch build on this machine (cpu; cuda when available)."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def device(value) -> torch.device:
    """A torch.device that exists here; ValueError naming the usable devices otherwise."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device such as 'cpu' or 'cuda:0', got {_kind(value)}")
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise ValueError(f"device {value!r} is not a device name; this torch build ({torch.__version__}) can use: "
                         f"{', '.join(available_devices())}") from None
    usable = available_devices()
    if dev.type not in usable:
        raise ValueError(f"device {value!r} is not available with this torch build ({torch.__version__}); "
                         f"usable here: {', '.join(usable)}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
