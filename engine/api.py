"""Engine: a loaded model with its tokenizer, and the public entry points (generate, stream, edit, logits)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Iterator, Sequence

import torch

from . import checks, prompts
from .cache import KVCache
from .config import ModelConfig
from .decode import Stopper, plain_decode
from .drafter import Drafter, OutputLookup, special_bytes, token_bytes_table
from .model import Transformer, attend_cpu, attend_torch, attend_triton
from .results import EditResult, GenerateResult, Stats
from .speculate import ChunkPolicy, CostModel, speculative_decode
from .weights import load_hf_tensors, parse_dtype, to_runtime_state

BACKENDS = ("auto", "torch", "triton")
K_MAX = 64  # largest draft verified in one forward


def load(path: str | Path, dtype: str = "float32", device: str = "cpu", backend: str = "auto",
         cpu_kernels: bool | None = None) -> Engine:
    """Load a model: an HF directory (config.json + safetensors), a `.gguf` file, or `smollm2-135m-instruct`.

    dtype: 'float32' | 'bfloat16' | 'float16' | 'int8'. backend: 'torch' (PyTorch attention and accept), 'triton'
    (the Triton kernels; under TRITON_INTERPRET=1 on a CPU) or 'auto' (triton on CUDA, torch otherwise).
    cpu_kernels (CPU only): the C++ extension's packed small-M matmul (cpu_linear) for every linear layer and
    its attention (cpu_attention, with backend 'torch'); None uses them when they can be built here, True
    requires them, False uses torch's F.linear and SDPA. With them, `dtype` is the storage of the linear
    weights and activations stay float32 (half weights halve the bytes a decode step reads), and a verify row
    equals the 1-row forward bit for bit; without them, the whole model runs in `dtype`. 'int8' (CPU kernels
    only, opt-in) stores linear weights as int8 with one float32 scale per output row: a quarter of float32's
    bytes per decode step, at the cost of quantization error (outputs can differ from float32's).
    """
    check_load_args(path, dtype, device, backend, cpu_kernels)
    int8 = dtype in ("int8", torch.int8)
    torch_dtype = torch.int8 if int8 else parse_dtype(dtype)
    p = Path(path)
    if not p.is_dir():
        from .gguf import resolve  # GGUF files and named models convert once into a cache directory

        p = resolve(path)
    cfg = ModelConfig.from_hf_dir(p)
    dev = torch.device(device)
    if backend == "auto":
        backend = "triton" if dev.type == "cuda" else "torch"
    packed = dev.type == "cpu" and use_cpu_kernels(cpu_kernels)
    if int8 and not packed:
        raise ValueError("dtype 'int8' (weight-only) runs only on the CPU kernels: device 'cpu', cpu_kernels not False")
    model_dtype = torch.float32 if packed else torch_dtype
    state = to_runtime_state(load_hf_tensors(p, cfg, model_dtype), cfg)
    if backend == "triton":
        attend = attend_triton
    elif packed and cfg.head_dim % 16 == 0:  # the CPU kernel's vector tiles need D % 16 == 0
        attend = attend_cpu
    else:
        attend = attend_torch
    with torch.device("meta"):
        model = Transformer(cfg, attend)
    model.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=True, assign=True)
    model.setup_rope(dev, model_dtype)
    model.eval().requires_grad_(False)
    if packed:
        model.pack_linears(torch_dtype)
        if attend is attend_cpu:
            model.fuse_cpu()
    tokenizer = None
    if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(p))
    return Engine(model, tokenizer, backend, p)


def check_load_args(path, dtype, device, backend, cpu_kernels) -> None:
    """load()'s argument checks, before anything is read: TypeError / ValueError naming the argument."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (an HF directory, a .gguf file or a model name), "
                        f"got {type(path).__name__}")
    dtypes = ("float32", "bfloat16", "float16", "int8")
    if not (dtype in dtypes or dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8)):
        raise ValueError(f"unsupported dtype {dtype!r}: dtype must be one of {', '.join(map(repr, dtypes))} "
                         "(or the torch dtype)")
    checks.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: backend must be one of {', '.join(map(repr, BACKENDS))}")
    if cpu_kernels not in (None, True, False):
        raise TypeError(f"cpu_kernels must be None, True or False, got {cpu_kernels!r}")


def use_cpu_kernels(choice: bool | None) -> bool:
    """Resolve load()'s cpu_kernels: None -> when available (with a warning when not), True -> required."""
    if choice is False:
        return False
    from . import cpu_linear

    if cpu_linear.available():
        return True
    why = "needs x86-64 Linux with AVX2/FMA/F16C, a C++ compiler and ninja"
    if choice:
        raise ValueError(f"cpu_kernels=True but the packed CPU matmul cannot be built here: it {why}")
    warnings.warn(f"specedit: packed CPU matmul unavailable ({why}); using torch F.linear, slower", stacklevel=3)
    return False


class Engine:
    """A model ready to decode. Build it with `specedit.load(...)`."""

    def __init__(self, model: Transformer, tokenizer, backend: str, path: Path):
        self.model, self.tokenizer, self.backend, self.path = model, tokenizer, backend, path
        self.cfg = model.cfg
        self._token_bytes: list[bytes] | None = None
        self._text: list[bytes] | None = None
        self._cost: CostModel | None = None
        eos = set(self.cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)

    # ---- inputs -------------------------------------------------------------------------------------------
    def encode(self, ids_or_text: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt or prediction given as text (the model's tokenizer, no special tokens added)
        or as ids (checked against the vocabulary)."""
        checks.text_or_ids("ids_or_text", ids_or_text)
        if isinstance(ids_or_text, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.path}: no tokenizer in the model directory; pass token ids")
            return self.tokenizer.encode(ids_or_text, add_special_tokens=False)
        ids = [int(t) for t in ids_or_text]
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary 0..{self.cfg.vocab_size - 1}")
        return ids

    @property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every token id (special tokens map to bytes that never occur in text)."""
        if self._token_bytes is None:
            table = token_bytes_table(self.tokenizer) if self.tokenizer is not None else []
            table += [special_bytes(i) for i in range(len(table), self.cfg.vocab_size)]
            self._token_bytes = table
        return self._token_bytes

    def _text_bytes(self) -> list[bytes]:
        """token_bytes with text-less (special) tokens as b"": what streaming text is made of."""
        if self._text is None:
            self._text = [b"" if b.startswith(b"\xff") else b for b in self.token_bytes]
        return self._text

    def _cache(self, length: int) -> KVCache:
        dtype = self.model.embed.weight.dtype
        return KVCache(self.cfg, 1, length, dtype, self.model.embed.weight.device)

    def _prepare(self, ids_or_text, max_new_tokens: int) -> tuple[list[int], int, KVCache]:
        prompt = self.encode(ids_or_text)
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        limit = self.cfg.max_position
        if self.backend == "triton" and self.cfg.sliding_window:
            limit = min(limit, self.cfg.sliding_window)  # the kernel has no sliding-window mask
        if len(prompt) >= limit:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {limit} tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_new = min(max_new_tokens, limit - len(prompt))
        return prompt, max_new, self._cache(min(limit, len(prompt) + max_new + K_MAX + 1))

    # ---- decoding -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: str | Sequence[int]) -> torch.Tensor:
        """Float32 logits [T, V] of a fresh prefill of `ids` (row t predicts token t + 1)."""
        checks.text_or_ids("ids", ids)
        prompt, _, cache = self._prepare(ids, 1)
        return self.model(torch.tensor([prompt], device=cache.buf.device), cache, all_logits=True)[0]

    def _steps(self, ids_or_text, max_new_tokens, prediction, temperature, stop, seed, stats) -> Iterator[list[int]]:
        prompt, max_new, cache = self._prepare(ids_or_text, max_new_tokens)
        stopper = Stopper(self.eos_ids, max_new, stop, self.token_bytes)
        gen = torch.Generator(device=cache.buf.device).manual_seed(seed) if temperature > 0 else None
        if prediction is None:
            yield from plain_decode(self.model, cache, prompt, stopper, temperature, gen, stats)
        else:
            from .kernels.accept import accept, accept_ref

            drafter = Drafter(self.encode(prediction), self.token_bytes)
            policy = ChunkPolicy(self.cost_model(), k_max=K_MAX)
            lookup_policy = ChunkPolicy(self.cost_model(), k_max=K_MAX, prior=0.5)
            accept_fn = accept if self.backend == "triton" else accept_ref
            yield from speculative_decode(
                self.model, cache, prompt, drafter, stopper, policy, accept_fn, temperature, gen, stats,
                OutputLookup(), lookup_policy,
            )
        stats.finish_reason = stopper.reason

    def stream(self, ids_or_text: str | Sequence[int], max_new_tokens: int = 256, prediction=None,
               temperature: float = 0.0, stop: Sequence[str] = (), seed: int = 0,
               stats: Stats | None = None) -> Iterator[str]:
        """Yield text deltas (whole UTF-8 characters) as tokens are decided; arguments as in `generate`.
        `stats`, when given, is filled as decoding goes (finish_reason once the iterator is exhausted).
        Arguments are checked when stream() is called, before the first delta is asked for."""
        stop = self._check_gen_args(ids_or_text, max_new_tokens, prediction, temperature, stop, seed)
        if stats is not None and not isinstance(stats, Stats):
            raise TypeError(f"stats must be a specedit.Stats or None, got {type(stats).__name__}")
        return self._stream(ids_or_text, max_new_tokens, prediction, temperature, stop, seed, stats)

    @torch.inference_mode()
    def _stream(self, ids_or_text, max_new_tokens, prediction, temperature, stop, seed, stats) -> Iterator[str]:
        text = prompts.TextStream(self._text_bytes(), stop)
        stats = stats if stats is not None else Stats()
        for new in self._steps(ids_or_text, max_new_tokens, prediction, temperature, stop, seed, stats):
            delta = text.feed(new)
            if delta:
                yield delta
        rest = text.finish()
        if rest:
            yield rest

    @torch.inference_mode()
    def generate(self, ids_or_text: str | Sequence[int], max_new_tokens: int = 256, prediction=None,
                 temperature: float = 0.0, stop: Sequence[str] = (), seed: int = 0) -> GenerateResult:
        """Decode up to `max_new_tokens` after the prompt (ids, or text tokenized without special tokens).

        prediction: expected output (text or ids), e.g. the original file; verified in chunks, never changes
        greedy output. Stops at EOS (kept in token_ids), at a `stop` string (tokens kept, text cut before it),
        or at the context limit. temperature 0 is greedy; > 0 samples (seeded by `seed`).

        `stats.finish_reason` says why it ended: "stop" (EOS or a stop string) or "length" (`max_new_tokens`
        or the model's context). Raises TypeError / ValueError naming a bad argument.
        """
        stop = self._check_gen_args(ids_or_text, max_new_tokens, prediction, temperature, stop, seed)
        stats = Stats()
        tokens: list[int] = []
        text = prompts.TextStream(self._text_bytes(), stop)
        out = []
        for new in self._steps(ids_or_text, max_new_tokens, prediction, temperature, stop, seed, stats):
            tokens += new
            out.append(text.feed(new))
        out.append(text.finish())
        return GenerateResult(tokens, "".join(out), stats)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, prediction=None, temperature: float = 0.0,
             stop: Sequence[str] = (), seed: int = 0) -> GenerateResult:
        """`generate` on OpenAI-style messages ([{"role": "user", "content": "..."}, ...]; content a str or a
        list of {"type": "text", "text": ...} parts) put through the model's chat template with the assistant's
        turn opened. Other arguments as in `generate`; `prediction` is the expected answer (e.g. the file)."""
        msgs = checks.messages(messages)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.path}: the model has no chat template; use generate() with a prompt")
        prompt = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.generate(prompt, max_new_tokens, prediction, temperature, stop, seed)

    def _check_gen_args(self, ids_or_text, max_new_tokens, prediction, temperature, stop, seed) -> list[str]:
        checks.text_or_ids("ids_or_text", ids_or_text)
        checks.positive_int("max_new_tokens", max_new_tokens)
        checks.text_or_ids("prediction", prediction, optional=True)
        checks.temperature(temperature)
        checks.integer("seed", seed)
        return checks.stop_strings(stop)

    def edit(self, original: str, instruction: str, language: str | None = None, max_new_tokens: int | None = None,
             speculate: bool = True) -> EditResult:
        """Rewrite `original` following `instruction`, with the original as the prediction.

        Returns EditResult(text, diff, stats, token_ids, complete). max_new_tokens defaults to twice the
        original's token count plus 256. speculate=False decodes plainly (same output, for comparisons).
        `complete` is True only when the answer ended at its closing code fence; an answer cut by
        max_new_tokens or the context ("length"), or ended by EOS before the fence, is not complete and should
        not be written over a file.
        """
        checks.text("original", original)
        checks.text("instruction", instruction, blank_ok=False)
        if language is not None:
            checks.text("language", language)
        checks.positive_int("max_new_tokens", max_new_tokens, optional=True)
        if not isinstance(speculate, bool):
            raise TypeError(f"speculate must be True or False, got {speculate!r}")
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: edit() needs a tokenizer in the model directory")
        prompt, prediction = prompts.build_edit_prompt(self.tokenizer, original, instruction, language)
        pred_ids = self.encode(prediction)
        if max_new_tokens is None:
            max_new_tokens = 2 * len(pred_ids) + 256
        r = self.generate(prompt, max_new_tokens, prediction=pred_ids if speculate else None, stop=[prompts.FENCE])
        edited = prompts.extract_code(r.text, original)
        at_fence = r.stats.finish_reason == "stop" and not (r.token_ids and r.token_ids[-1] in self.eos_ids)
        return EditResult(edited, prompts.unified_diff(original, edited), r.stats, r.token_ids, at_fence)

    def cost_model(self) -> CostModel:
        """Forward time vs rows on this machine: measured once per machine, model shape and weight format
        (~0.1-1 s) and kept under $SPECEDIT_CACHE/cost, so a fresh engine's first speculative call doesn't pay
        for it."""
        if self._cost is None:
            from . import costcache

            key = costcache.key(self.model, self.backend)
            self._cost = costcache.load(key)
            if self._cost is None:
                prefix = min(128, self.cfg.max_position // 2)
                rows = [r for r in (1, 2, 4, 8, 16, 32, K_MAX + 1) if prefix + r <= self.cfg.max_position]
                with torch.inference_mode():
                    self._cost = CostModel.measure(self.model, self._cache, rows, prefix)
                costcache.save(key, self._cost)
        return self._cost
