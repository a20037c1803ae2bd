"""`specedit apply | convert | bench | serve`: the command-line surface.

Exit codes: 0 done (for `apply`: the file was written, or printed); 1 nothing written (an incomplete or empty
answer) or a runtime error; 2 a usage error (bad arguments, a missing, empty, binary or too-long file, an
unwritable output, a missing model), always found before the model's weights load; 130 interrupted (Ctrl-C),
nothing written.

`apply` never writes a cut-off answer over a file: it writes only when the model's answer ended at its closing
code fence (finish_reason "stop") and is non-empty (unless the instruction asks to delete everything, or
--allow-empty), atomically, keeping the file's mode, line endings (CRLF stays CRLF) and UTF-8 BOM, and writing
through a symlink to its target. The write is a temp file and a rename, so the name gets a new inode: other
hard links to the old file keep the old text. Only a regular file is read (never a FIFO or a device), at most
MAX_FILE_BYTES of it.
"""

from __future__ import annotations

import _signal  # the C module: `signal` builds enums first, a window of milliseconds
import os
import sys


def _interrupted_early(signum, frame):  # Ctrl-C before main() is running: the same one line, exit 130
    sys.stderr.write("specedit: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


# only in the `specedit` command itself, never in a program that imports this module
if os.path.basename((getattr(sys, "argv", None) or [""])[0]) == "specedit" and \
        _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_early)

import argparse  # noqa: E402
import signal  # noqa: E402
import re  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
LANGUAGES = {
    ".py": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".java": "java",
    ".kt": "kotlin", ".js": "javascript", ".jsx": "jsx", ".ts": "typescript", ".tsx": "tsx", ".go": "go",
    ".rs": "rust", ".rb": "ruby", ".scala": "scala", ".sh": "bash", ".cs": "csharp", ".swift": "swift",
}
# an instruction that asks for an empty result: "Delete everything.", "Empty the file", "remove all the code",
# "delete the whole file"; not "Remove all comments" or "Delete the file header"
_END = r"\s*[.!]?\s*$"
DELETE_ALL = re.compile(
    r"\b(delete|remove|erase|clear|empty|wipe|truncate|blank)\s+(out\s+)?("
    rf"everything(\s+in\s+(it|the\s+file|this\s+file))?{_END}"
    rf"|all(\s+of\s+it|\s+(the\s+)?(code|contents?|lines|text))?{_END}"
    r"|(the\s+)?(whole|entire)\s+(file|code|contents?|thing)\b"
    rf"|(the|this)\s+file('s)?(\s+contents?)?{_END}|(the|its)\s+(code|contents?){_END})",
    re.IGNORECASE,
)


class UsageError(Exception):
    """A problem with what the user asked for, found before any work is done: exit 2."""


class NotWritten(Exception):
    """The answer is not safe to write (cut off, empty): exit 1, nothing written."""


MAX_FILE_BYTES = 16 * 2**20  # far beyond any context; a bigger file is refused before it is read
BOM = "\ufeff"
_KINDS = [(stat.S_ISDIR, "is a directory, not a file"), (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
          (stat.S_ISCHR, "is a character device, not a regular file"),
          (stat.S_ISBLK, "is a block device, not a regular file"), (stat.S_ISSOCK, "is a socket, not a regular file")]


@dataclass(frozen=True)
class Source:
    """A file's text as the model sees it (LF line endings, no BOM), and how to write an answer back."""

    text: str
    crlf: bool = False  # every line ended with CRLF
    bom: bool = False  # the file started with a UTF-8 BOM

    def restore(self, edited: str) -> str:
        """`edited` (model text) with the file's line endings and BOM."""
        if self.crlf:
            edited = edited.replace("\r\n", "\n").replace("\n", "\r\n")
        return BOM + edited if self.bom else edited


def _not_regular(path: Path, mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((f"{path}: {why}" for test, why in _KINDS if test(mode)), f"{path}: not a regular file")


def read_failure(what: str, e: OSError) -> UsageError:
    """One line naming `what` for an OSError met opening or reading it."""
    if isinstance(e, FileNotFoundError):
        return UsageError(f"{what}: no such file")
    if isinstance(e, PermissionError):
        return UsageError(f"{what}: permission denied (cannot read it)")
    return UsageError(f"{what}: cannot read it ({e.strerror})")


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`, checked before anything is read: UsageError naming the file when it
    is missing, unreadable, not a regular file (a FIFO would block, /dev/zero never ends) or over `limit`
    (default MAX_FILE_BYTES)."""
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        st = os.stat(path)
        why = _not_regular(path, st.st_mode)
        if why:
            raise UsageError(why)
        # O_NONBLOCK: were it swapped for a FIFO since the stat, open() must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise read_failure(str(path), e) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        why = _not_regular(path, st.st_mode)
        if why:
            raise UsageError(why)
        if st.st_size > limit:
            raise UsageError(f"{path}: {st.st_size:,} bytes is larger than any file apply edits "
                             f"({limit:,} bytes at most)")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise read_failure(str(path), e) from None
    if len(data) > limit:  # it grew while being read
        raise UsageError(f"{path}: larger than any file apply edits ({limit:,} bytes at most)")
    return data


def read_source(path: Path, limit: int | None = None) -> Source:
    """The file's text. UsageError (one line naming the file) when it is missing, not a regular file, over
    `limit` bytes, empty or blank, binary (a NUL byte) or not UTF-8. CRLF line endings (every line) become LF
    for the model and a UTF-8 BOM is set aside; `Source.restore` puts both back on the answer."""
    data = read_bytes(path, limit)
    if not data.strip():
        raise UsageError(f"{path}: the file is {'empty' if not data else 'blank'}; there is nothing to edit")
    nul = data.find(b"\0")
    if nul >= 0:
        raise UsageError(f"{path}: not a text file (a NUL byte at offset {nul}: binary data)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    bom = text.startswith(BOM)
    text = text[len(BOM):] if bom else text
    if not text.strip():
        raise UsageError(f"{path}: the file is blank; there is nothing to edit")
    lf = text.count("\n")
    crlf = lf > 0 and text.count("\r\n") == lf
    return Source(text.replace("\r\n", "\n") if crlf else text, crlf, bom)


def check_instruction(instruction: str) -> str:
    if not instruction.strip():
        raise UsageError('the instruction is empty; say what to change, e.g. "Add type hints."')
    return instruction


def check_writable(path: Path, what: str) -> Path:
    """The real file `path` names (through symlinks), checked writable before any work: UsageError otherwise."""
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise UsageError(f"{what} {path}: is a directory")
    if real.exists():
        if not real.is_file():
            raise UsageError(f"{what} {path}: not a regular file")
        if not os.access(real, os.W_OK):
            raise UsageError(f"{what} {path}: permission denied (not writable)")
    parent = real.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot create files in {parent} (permission denied)")
    return real


def same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) or (a.exists() and b.exists() and os.path.samefile(a, b))


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to the file `path` names, through a temp file in the same directory and a rename, so a
    failure or Ctrl-C never leaves it half-written. A symlink stays a link (its target is written); an existing
    file keeps its mode; a new file gets 0o666 minus the umask."""
    real = Path(os.path.realpath(path))
    mode = real.stat().st_mode & 0o7777 if real.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def diff_name(path: Path) -> str:
    """The path a diff names (after a/ and b/) so `patch -p1` and `git apply` run from the current directory
    find the file: relative to it, or the absolute path without its leading '/' (`patch -p1 -d /`)."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else os.path.abspath(path).lstrip("/")


def resolve_model(model: str) -> Path:
    """What `specedit.load` takes for `model`: its GGUF file (a path, or the GGUF a registered name such as
    smollm2-135m-instruct stands for), run as stored unless --dtype says otherwise, or an HF directory.
    UsageError when it is absent or neither."""
    from .gguf import gguf_file

    try:
        path = gguf_file(model)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        raise UsageError(f"model {model!r}: {e}") from None
    if path is None and not (Path(model).expanduser() / "config.json").is_file():
        raise UsageError(f"model {model!r}: no config.json in that directory (an HF model directory or a .gguf "
                         "file is needed)")
    return path or Path(model).expanduser()


def model_meta(model: Path):
    """(ModelConfig, tokenizer directory or None) of a resolved model, without loading its weights."""
    from .config import ModelConfig
    from .gguf import read_native, tokenizer_dir

    try:
        if model.is_dir():
            return ModelConfig.from_hf_dir(model), model
        config, _ = read_native(model)
        return ModelConfig.from_hf(config, model), tokenizer_dir(model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def check_fits(model: Path, path: Path, source: str, instruction: str, language: str | None) -> tuple[int, int]:
    """Count the edit's tokens with the model's tokenizer alone (no weights) and check that the prompt plus an
    answer as long as the file fit the context. Returns (prompt tokens, file tokens incl. the closing fence)."""
    from . import prompts

    cfg, tok_dir = model_meta(model)
    if tok_dir is None or not ((tok_dir / "tokenizer.json").is_file() or (tok_dir / "tokenizer.model").is_file()):
        raise UsageError(f"model {model}: no tokenizer in the model; apply needs one")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.model_max_length = 2**62  # counting only: no "sequence longer than the model" warning
    # A cheap bound first (a 5 MB file would take many seconds to tokenize): no token stands for more characters
    # than its vocabulary entry has (byte-level pieces: one character per byte), and the file is counted twice
    # (in the prompt and as the answer). Half of it, for normalizers that merge characters.
    longest = max(map(len, tok.get_vocab()), default=1) or 1
    at_least = 2 * (len(source) // (2 * longest))
    if at_least > cfg.max_position:
        raise UsageError(
            f"{path}: too long for the model: {len(source):,} characters need at least {at_least:,} tokens (the "
            f"file in the prompt and again as the answer; no token here covers more than {longest} characters); "
            f"the context is {cfg.max_position:,}"
        )
    prompt_ids, prediction_ids = prompts.build_edit_ids(tok, source, instruction, language)
    n_prompt, n_file = len(prompt_ids), len(prediction_ids)
    if n_prompt + n_file > cfg.max_position:
        raise UsageError(
            f"{path}: too long for the model: the prompt ({n_prompt:,} tokens, the file included) plus an answer "
            f"as long as the file ({n_file:,}) need {n_prompt + n_file:,} tokens; the context is "
            f"{cfg.max_position:,}"
        )
    return n_prompt, n_file


def why_not_complete(e, max_new: int, context: int, n_prompt: int, instruction: str, allow_empty: bool) -> str | None:
    """None when the edit may be written; otherwise one line saying why not."""
    s = e.stats
    if s.finish_reason == "length":
        if s.new_tokens >= max_new:
            return f"stopped at the {max_new}-token limit; nothing written; raise --max-new-tokens"
        return (f"stopped at the model's context of {context} tokens ({n_prompt} of prompt + {s.new_tokens} "
                "generated); nothing written; the file is too long for this model")
    if not e.complete:
        return ("the model ended its answer (end of sequence) before closing the code block; nothing written; "
                "the answer may be cut short (see it with --partial-output)")
    if not e.text.strip() and not (allow_empty or DELETE_ALL.search(instruction)):
        return ("the model's answer is empty; nothing written (if the instruction is to delete everything, "
                "pass --allow-empty)")
    return None


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after every option that has a meaningful default."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    DTYPES = ["float32", "bfloat16", "float16", "int8", "auto"]
    DTYPE_HELP = "weight storage (auto: a GGUF as stored, else float32; int8: Q8_0 blocks, CPU kernels only, lossy)"
    COMPUTES = ["auto", "exact", "int8"]
    COMPUTE_HELP = ("how quantized weights multiply on the CPU kernels (exact: float32 on the dequantized weights; "
                    "int8: integer dot products on int8 activation rows, lossy; auto: see the README)")
    MODEL_HELP = "an HF model directory, a .gguf file, or smollm2-135m-instruct"
    ap = argparse.ArgumentParser(prog="specedit", description="Speculative edits: fast, lossless code rewriting.",
                                 formatter_class=Help,
                                 epilog="exit codes: 0 done, 1 nothing written or runtime error, 2 usage error, "
                                        "130 interrupted")
    ap.add_argument("--version", action="version", version=f"specedit {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{apply,convert,bench,serve}")

    a = sub.add_parser("apply", formatter_class=Help, help="edit a file with an instruction",
                       description="Edit FILE following INSTRUCTION. Prints the edited file (or its diff), or writes "
                                   "it with --in-place / -o only when the answer is complete: ended at its closing "
                                   "code fence, and not empty unless asked. Otherwise nothing is written, one line "
                                   "says why, and the exit code is 1.")
    a.add_argument("file", type=Path, help="the UTF-8 text file to edit")
    a.add_argument("instruction", help='what to change, e.g. "Add type hints."')
    a.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    a.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    a.add_argument("--compute", default="auto", choices=COMPUTES, help=COMPUTE_HELP)
    a.add_argument("--language", help="code fence language (default: from the file extension)")
    out = a.add_mutually_exclusive_group()
    out.add_argument("--in-place", action="store_true",
                     help="overwrite FILE atomically, keeping its mode (a symlink's target is written)")
    out.add_argument("-o", "--output", type=Path,
                     help="write the edited file here atomically (default: print it to stdout)")
    a.add_argument("--diff", action="store_true",
                   help="print a unified diff (a/PATH b/PATH, for patch -p1 / git apply) instead of the file")
    a.add_argument("--plain", action="store_true", help="plain decoding, no speculation (same output, slower)")
    a.add_argument("--max-new-tokens", type=int,
                   help="stop generating after this many tokens (default: 2 x the file's tokens + 256)")
    a.add_argument("--allow-empty", action="store_true",
                   help="accept an empty answer (the file is emptied); also implied by an instruction such as "
                        '"delete everything"')
    a.add_argument("--partial-output", type=Path, metavar="PATH",
                   help="when the answer is incomplete, write what came back here (never over FILE); exit 1")

    c = sub.add_parser("convert", formatter_class=Help, help="convert a GGUF file into an HF directory")
    c.add_argument("gguf", type=Path, help="the .gguf file (llama, mistral, qwen2, qwen3)")
    c.add_argument("out_dir", type=Path, help="the directory to create (must not exist or be empty)")
    c.add_argument("--dtype", default="float32", choices=DTYPES[:3], help="storage of the written safetensors")

    b = sub.add_parser("bench", formatter_class=Help, help="time one edit plainly and speculatively, outputs compared")
    b.add_argument("file", type=Path, help="the UTF-8 text file to edit (it is not written)")
    b.add_argument("instruction", help="what to change")
    b.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    b.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    b.add_argument("--compute", default="auto", choices=COMPUTES, help=COMPUTE_HELP)
    b.add_argument("--language", help="code fence language (default: from the file extension)")

    v = sub.add_parser("serve", formatter_class=Help, help="OpenAI-compatible server with predicted outputs")
    v.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    v.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    v.add_argument("--compute", default="auto", choices=COMPUTES, help=COMPUTE_HELP)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=int, default=8000, help="port to listen on")
    v.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="serve N engine replicas behind Ray Serve (the `ray` extra), edits of one file on one "
                        "replica; 0: one engine in this process")
    v.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="CPUs Ray reserves per replica")
    v.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (`auto`: the one `ray start` began here); default: start a local one")
    keys = v.add_mutually_exclusive_group()
    keys.add_argument("--api-key-file", type=Path, metavar="PATH",
                      help="require 'Authorization: Bearer KEY' on every request but /health, KEY being this "
                           "file's first line; a pipe works too, e.g. <(pass show key) (better than --api-key: "
                           "other users see a command line in ps)")
    keys.add_argument("--api-key", help="the same with KEY on the command line, where other local users can read "
                                        "it (ps); prefer --api-key-file or $SPECEDIT_API_KEY")
    v.epilog = "the key can also come from the environment variable SPECEDIT_API_KEY"
    return ap


def read_key_file(path: Path, limit: int = 64 * 1024) -> bytes:
    """The first `limit` bytes of a key file: a regular file, or a pipe (`--api-key-file <(pass show key)`)."""
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise UsageError(_not_regular(path, mode) or f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise read_failure(f"--api-key-file {path}", e) from None
    if len(data) > limit:
        raise UsageError(f"--api-key-file {path}: over {limit:,} bytes; it should hold one key")
    return data


def api_key(args) -> str | None:
    """The serve key: --api-key-file, --api-key, or $SPECEDIT_API_KEY (in that order); None for no key."""
    if args.api_key_file is not None:
        data = read_key_file(args.api_key_file)
        try:
            key = data.decode("utf-8").strip().splitlines()[0].strip() if data.strip() else ""
        except UnicodeDecodeError:
            raise UsageError(f"--api-key-file {args.api_key_file}: not UTF-8 text") from None
        if not key:
            raise UsageError(f"--api-key-file {args.api_key_file}: the file holds no key")
        return key
    key = args.api_key if args.api_key is not None else os.environ.get("SPECEDIT_API_KEY")
    if key is not None and not key.strip():
        where = "--api-key" if args.api_key is not None else "SPECEDIT_API_KEY"
        raise UsageError(f"{where} is empty; give a key or leave it unset to serve without one")
    return None if key is None else key.strip()


def main(argv: list[str] | None = None) -> int:
    cmd = "apply"
    if signal.getsignal(signal.SIGINT) is _interrupted_early:  # from here on a KeyboardInterrupt is caught
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = build_parser().parse_args(argv)
        cmd = args.cmd
        # A warning (a fallback from the CPU kernels, a failed extension build) is one line on stderr, not two.
        warnings.formatwarning = lambda message, *_args, **_kw: f"{message}\n"
        return run(args)
    except UsageError as e:
        print(f"specedit {cmd}: error: {e}", file=sys.stderr)
        return 2
    except NotWritten as e:
        print(f"specedit {cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # at any moment, torch's import included: one line, nothing written
        print(f"specedit {cmd}: interrupted" + ("; nothing written" if cmd == "apply" else ""), file=sys.stderr)
        return 130
    except Exception as e:  # a runtime failure: one line, not a trace
        print(f"specedit {cmd}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def console() -> None:
    """The `specedit` command: main(), then exit. After an interrupt the process ends at once (os._exit):
    a second Ctrl-C while the interpreter tears torch down would print a trace. Nothing is left to clean up:
    an interrupted write removed its temp file on the way out. Once main() has returned, its exit code stands:
    a Ctrl-C during the teardown is ignored (Python's finalization would otherwise let it kill the process)."""
    try:
        code = main()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # between main's handlers and here
        print("specedit: interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
                pass
        os._exit(130)
    sys.exit(code)


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


def run(args) -> int:
    if args.cmd == "convert":
        from .gguf import convert

        try:
            print(convert(args.gguf, args.out_dir, dtype=args.dtype))
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            raise UsageError(str(e)) from None
        return 0

    import specedit

    if args.cmd == "serve":
        from .server import serve

        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be 0..65535, got {args.port}")
        if args.replicas < 0 or not args.cpus_per_replica > 0:
            raise UsageError(f"--replicas must be >= 0 and --cpus-per-replica > 0, got {args.replicas} and "
                             f"{args.cpus_per_replica}")
        key = api_key(args)
        load_kwargs = {"dtype": args.dtype, "compute": args.compute}
        if args.replicas:
            from .ray_serve import run as run_replicas

            print(f"specedit serving {args.model} on http://{args.host}:{args.port}/v1 with {args.replicas} Ray "
                  f"Serve replicas" + (" (API key required)" if key else ""), file=sys.stderr)
            run_replicas(args.model, args.model, args.host, args.port, args.replicas, args.cpus_per_replica, key,
                         load_kwargs, args.ray_address)
            return 0
        try:
            eng = specedit.load(resolve_model(args.model), **load_kwargs)
        except ValueError as e:  # a dtype / compute this machine or checkpoint cannot run
            raise UsageError(str(e)) from None
        print(f"specedit serving {args.model} on http://{args.host}:{args.port}/v1"
              + (" (API key required)" if key else ""), file=sys.stderr)
        serve(eng, args.host, args.port, args.model, api_key=key)
        return 0

    # apply / bench: every check that needs no weights comes first
    check_instruction(args.instruction)
    file = read_source(args.file)
    source = file.text
    language = args.language or LANGUAGES.get(args.file.suffix.lower())
    if args.cmd == "apply":
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.in_place:
            check_writable(args.file, "FILE")
        if args.output:
            check_writable(args.output, "-o")
        if args.partial_output:
            check_writable(args.partial_output, "--partial-output")
            if same_file(args.partial_output, args.file):
                raise UsageError(f"--partial-output {args.partial_output}: is FILE itself; a partial answer is "
                                 "never written over the input")
    model = resolve_model(args.model)
    n_prompt, n_file = check_fits(model, args.file, source, args.instruction, language)
    try:
        eng = specedit.load(model, dtype=args.dtype, compute=args.compute)
    except ValueError as e:  # a bad dtype or compute for this machine, a bad checkpoint
        raise UsageError(str(e)) from None
    if args.cmd == "bench":
        table, same = speed_report(eng, source, args.instruction, language)
        print(table)
        return 0 if same else 1

    max_new = args.max_new_tokens or 2 * n_file + 256
    e = eng.edit(source, args.instruction, language, max_new_tokens=max_new, speculate=not args.plain)
    s = e.stats
    ending = "closing fence" if e.complete else ("EOS" if s.finish_reason == "stop" else "token limit")
    print(f"{s.new_tokens} tokens in {s.forwards + 1} forwards, {s.tokens_per_s:.1f} tok/s, prediction tokens "
          f"accepted {s.accepted_prediction_tokens}, finish_reason {s.finish_reason} ({ending})", file=sys.stderr)
    problem = why_not_complete(e, max_new, eng.cfg.max_position, n_prompt, args.instruction, args.allow_empty)
    if problem:
        if args.partial_output:
            write_atomic(args.partial_output, file.restore(e.text))
            problem += f"; the partial answer is in {args.partial_output}"
        raise NotWritten(f"{args.file}: {problem}")
    edited = file.restore(e.text)  # the file's own line endings and BOM
    if args.in_place or args.output:
        write_atomic(args.file if args.in_place else args.output, edited)
    if args.diff:
        from .prompts import unified_diff

        sys.stdout.write(unified_diff(file.restore(source), edited, diff_name(args.file)))
    elif not (args.in_place or args.output):
        sys.stdout.write(edited)
    return 0


if __name__ == "__main__":
    console()
