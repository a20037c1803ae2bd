"""`specedit apply | convert | bench | serve`: the command-line surface."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
LANGUAGES = {
    ".py": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".java": "java",
    ".kt": "kotlin", ".js": "javascript", ".jsx": "jsx", ".ts": "typescript", ".tsx": "tsx", ".go": "go",
    ".rs": "rust", ".rb": "ruby", ".scala": "scala", ".sh": "bash", ".cs": "csharp", ".swift": "swift",
}


def read_source(path: Path) -> str:
    """The file's text; ValueError when it is not UTF-8, FileNotFoundError when absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory, so a failure never leaves it half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def speed_report(eng, original: str, instruction: str, language: str | None) -> tuple[str, bool]:
    """Run the edit plainly and speculatively; return (table, identical outputs)."""
    plain = eng.edit(original, instruction, language, speculate=False)
    spec = eng.edit(original, instruction, language)
    same = plain.token_ids == spec.token_ids
    rows = [("plain", plain.stats), ("speculative", spec.stats)]
    lines = [f"{'decoding':<13}{'tokens':>7}{'forwards':>9}{'tok/fwd':>8}{'prefill s':>10}{'decode s':>9}"
             f"{'tok/s':>8}{'decode tok/s':>13}"]
    for name, s in rows:
        lines.append(f"{name:<13}{s.new_tokens:>7}{s.forwards + 1:>9}{s.tokens_per_forward:>8.2f}"
                     f"{s.prefill_s:>10.2f}{s.decode_s:>9.2f}{s.tokens_per_s:>8.1f}{s.decode_tokens_per_s:>13.1f}")
    speedup = spec.stats.tokens_per_s / plain.stats.tokens_per_s if plain.stats.tokens_per_s else float("nan")
    dspeed = (spec.stats.decode_tokens_per_s / plain.stats.decode_tokens_per_s
              if plain.stats.decode_tokens_per_s else float("nan"))
    lines.append(f"speedup: {speedup:.2f}x end to end, {dspeed:.2f}x decode; "
                 f"draft tokens accepted {spec.stats.accepted_prediction_tokens}, "
                 f"rejected {spec.stats.rejected_prediction_tokens}; outputs identical: {same}")
    return "\n".join(lines), same


def main(argv: list[str] | None = None) -> int:
    DTYPE_HELP = "float32 | bfloat16 | float16 | int8 (weight storage on the CPU kernels; int8 is lossy)"
    ap = argparse.ArgumentParser(prog="specedit", description="Speculative edits: fast, lossless code rewriting.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("apply", help="edit a file with an instruction")
    a.add_argument("file", type=Path)
    a.add_argument("instruction")
    a.add_argument("--model", default=DEFAULT_MODEL)
    a.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    a.add_argument("--language", help="code fence language (default: from the file extension)")
    out = a.add_mutually_exclusive_group()
    out.add_argument("--in-place", action="store_true", help="overwrite FILE (atomically)")
    out.add_argument("-o", "--output", type=Path, help="write the edited file here (atomically)")
    a.add_argument("--diff", action="store_true", help="print a unified diff instead of the file")
    a.add_argument("--plain", action="store_true", help="plain decoding (no speculation)")
    a.add_argument("--max-new-tokens", type=int)

    c = sub.add_parser("convert", help="convert a GGUF file into an HF directory")
    c.add_argument("gguf", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16: storage of the safetensors")

    b = sub.add_parser("bench", help="time one edit plainly and speculatively, outputs compared")
    b.add_argument("file", type=Path)
    b.add_argument("instruction")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    b.add_argument("--language")

    v = sub.add_parser("serve", help="OpenAI-compatible server with predicted outputs")
    v.add_argument("--model", default=DEFAULT_MODEL)
    v.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")

    args = ap.parse_args(argv)
    # A warning (a fallback from the CPU kernels, a failed extension build) is one line on stderr, not two.
    warnings.formatwarning = lambda message, *_args, **_kw: f"{message}\n"
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"specedit {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.cmd == "convert":
        from .gguf import convert

        print(convert(args.gguf, args.out_dir, dtype=args.dtype))
        return 0

    import specedit

    if args.cmd == "serve":
        from .server import serve

        eng = specedit.load(args.model, dtype=args.dtype)
        print(f"specedit serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        serve(eng, args.host, args.port, args.model, api_key=args.api_key)
        return 0

    source = read_source(args.file)
    language = args.language or LANGUAGES.get(args.file.suffix.lower())
    eng = specedit.load(args.model, dtype=args.dtype)
    if args.cmd == "bench":
        table, same = speed_report(eng, source, args.instruction, language)
        print(table)
        return 0 if same else 1

    e = eng.edit(source, args.instruction, language, max_new_tokens=args.max_new_tokens, speculate=not args.plain)
    s = e.stats
    print(f"{s.new_tokens} tokens in {s.forwards + 1} forwards, {s.tokens_per_s:.1f} tok/s, "
          f"prediction tokens accepted {s.accepted_prediction_tokens}", file=sys.stderr)
    if args.in_place or args.output:
        write_atomic(args.file if args.in_place else args.output, e.text)
    if args.diff:
        sys.stdout.write(e.diff)
    elif not (args.in_place or args.output):
        sys.stdout.write(e.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
