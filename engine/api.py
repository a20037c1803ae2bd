"""Engine: a loaded model with its tokenizer, and the public entry points (generate, stream, edit, logits)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from . import checks, prompts
from .backends import CHOICES, COMPUTES, Backend, engine_limit, select
from .cache import KVCache
from .checks import GenParams
from .config import ModelConfig
from .detokenize import Detokenizer, text_bytes
from .drafter import Drafter, NgramLookup, special_bytes, token_bytes_table
from .model import Transformer
from .results import EditResult, GenerateResult, Stats
from .prefix_cache import PrefixCache
from .scheduler import Handle, Job, Scheduler, Service, alone
from .sequence import SequenceState, Stopper
from .acceptance import effective_temperature
from .draft_policy import ChunkPolicy, CostModel, DraftSource
from .weights import load_hf_tensors, parse_dtype, to_runtime_state

K_MAX = 64  # largest draft verified in one forward


def load(path: str | Path, dtype: str = "auto", device: str = "cpu", backend: str = "auto",
         cpu_kernels: bool | None = None, compute: str = "auto", prefix_cache_mb: float = 256) -> Engine:
    """Load a model: an HF directory (config.json + safetensors), a `.gguf` file, or `smollm2-135m-instruct`.

    dtype: 'auto' | 'float32' | 'bfloat16' | 'float16' | 'int8'. 'auto' runs a GGUF file as stored on the CPU
    kernels (its quantized tensors stay in their block formats, memory-mapped and repacked once; no conversion,
    outputs equal the float32 model's on gguf's dequantized weights bit for bit); elsewhere 'auto' is float32,
    except a GGUF on CUDA, which is dequantized to float16 at load. Any other dtype converts a GGUF once into a
    cached HF directory (dequantized) and loads that in `dtype`. backend: 'auto' (Triton on CUDA; on a CPU the C++
    kernels when they can be built here, else PyTorch), 'cpu' (the C++ kernels, required), 'torch' (F.linear
    and SDPA) or 'triton' (the Triton kernels; under TRITON_INTERPRET=1 on a CPU). cpu_kernels (CPU only):
    None uses the C++ kernels when they run here, True requires them, False never uses them.
    On the CPU kernels `dtype` is the storage of the linear weights and activations stay float32 (half weights
    halve the bytes a decode step reads), and a verify row equals the 1-row forward bit for bit
    (`Engine.row_invariant`; every other backend warns at load that it does not promise this). 'int8' (CPU
    kernels only, opt-in) quantizes the linear weights to GGUF Q8_0 blocks at load (per 32 weights one float16
    scale): about a quarter of float32's bytes per decode step, at the cost of quantization error.
    Elsewhere the whole model runs in `dtype`.

    compute: how quantized weights (a GGUF as stored, or dtype='int8') multiply on the CPU kernels. 'exact':
    each block is dequantized in registers to gguf's float32 values and multiplied in float32 (logits equal the
    float32 model's on the dequantized weights). 'int8': each activation row is quantized on its own to int8
    (per 32 values one float32 scale) and multiplied with integer dot products (exact int32 sums, float steps in
    one fixed order), faster for many rows, at a small measured quality cost. Either way a verify row equals the
    1-row step bit for bit, on AVX2 and AVX-512 alike. 'auto' (the default) is backends.AUTO_COMPUTE for
    quantized weights and 'exact' for float ones; `Engine.compute` says which runs. 'int8' with float weights or
    on another backend is a ValueError.
    prefix_cache_mb: most MiB of prompt K/V rows kept for reuse by later prompts that start the same way (an
    edit after an edit of the same file prefills only what changed; `Engine.prefix_cache`); only on
    row-invariant backends, where a reused row is bit for bit the row a prefill computes; 0 turns it off.
    """
    check_load_args(path, dtype, device, backend, cpu_kernels, compute, prefix_cache_mb)
    p = Path(path)
    if not p.is_dir():
        from .gguf import gguf_file, read_native, resolve, tokenizer_dir

        file = gguf_file(path)
        if dtype == "auto":  # as stored on the CPU kernels; else dequantized (float16 on CUDA, float32 elsewhere)
            config, tensors = read_native(file)
            cfg = ModelConfig.from_hf(config, file)
            be = select(device, backend, cpu_kernels, cfg, "float32", compute, quantized=True)
            if be.name == "cpu":
                return _load_native(file, cfg, be, tensors, tokenizer_dir(file), prefix_cache_mb)
            dtype = "float16" if be.device.type == "cuda" else "float32"
            compute = "exact" if compute == "auto" else compute  # dequantized now: float weights
        p = resolve(file)  # converted once into a cache directory
    if dtype == "auto":
        dtype = "float32"
    cfg = ModelConfig.from_hf_dir(p)
    be = select(device, backend, cpu_kernels, cfg, dtype, compute)
    state = to_runtime_state(load_hf_tensors(p, cfg, be.param_dtype), cfg)
    with torch.device("meta"):
        model = Transformer(cfg, be.attend)
    model.load_state_dict({k: v.to(be.device) for k, v in state.items()}, strict=True, assign=True)
    model.setup_rope(be.device, be.param_dtype)
    model.eval().requires_grad_(False)
    be.prepare(model)
    tokenizer = None
    if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(p))
    return Engine(model, tokenizer, be, p, prefix_cache_mb)


def check_load_args(path, dtype, device, backend, cpu_kernels, compute="auto", prefix_cache_mb=0) -> None:
    """load()'s argument checks, before anything is read: TypeError / ValueError naming the argument."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (an HF directory, a .gguf file or a model name), "
                        f"got {type(path).__name__}")
    if dtype not in ("auto", "int8", torch.int8):
        parse_dtype(dtype)
    checks.device(device)
    checks.choice("backend", backend, CHOICES)
    checks.cpu_kernels(cpu_kernels)
    checks.choice("compute", compute, COMPUTES)
    if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) \
            or not 0 <= prefix_cache_mb < float("inf"):
        raise ValueError(f"prefix_cache_mb must be a number >= 0 (0 turns the prefix cache off), got "
                         f"{prefix_cache_mb!r}")


def _load_native(file: Path, cfg: ModelConfig, be: Backend, tensors, tok_dir: Path | None,
                 prefix_cache_mb: float) -> Engine:
    """A GGUF file's tensors as stored on the CPU kernels (backends.cpu.load_native)."""
    from .backends.cpu import load_native

    with torch.device("meta"):
        model = Transformer(cfg, be.attend)
    model.setup_rope(be.device, torch.float32)
    load_native(model, tensors, be.compute)
    del tensors  # the last views of the memory-mapped file: its pages leave the process
    model.eval().requires_grad_(False)
    tokenizer = None
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return Engine(model, tokenizer, be, file, prefix_cache_mb)


class Engine:
    """A model ready to decode. Build it with `specedit.load(...)`."""

    def __init__(self, model: Transformer, tokenizer, backend: Backend, path: Path, prefix_cache_mb: float = 0):
        self.model, self.tokenizer, self.backend, self.path = model, tokenizer, backend, path
        # reused rows equal recomputed ones only where rows are invariant (see load's prefix_cache_mb)
        self.prefix_cache = (PrefixCache(int(prefix_cache_mb * 2**20))
                             if prefix_cache_mb > 0 and backend.row_invariant else None)
        self.cfg = model.cfg
        self._token_bytes: list[bytes] | None = None
        self._text: list[bytes] | None = None
        self._cost: CostModel | None = None
        self._service: Service | None = None
        self._service_lock = threading.Lock()
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
    def compute(self) -> str:
        """How quantized weights multiply: 'exact' (float32 on gguf's dequantized values; also every float
        model) or 'int8' (integer dot products on int8-quantized activation rows); see load()."""
        return self.backend.compute

    @property
    def row_invariant(self) -> bool:
        """True when row i of a verify forward equals the 1-row decode step at that position bit for bit, so
        greedy speculative output is exactly plain decoding's (the CPU kernels); see backend.why."""
        return self.backend.row_invariant

    @property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every token id (special tokens map to bytes that never occur in text)."""
        if self._token_bytes is None:
            table = token_bytes_table(self.tokenizer) if self.tokenizer is not None else []
            table += [special_bytes(i) for i in range(len(table), self.cfg.vocab_size)]
            self._token_bytes = table
        return self._token_bytes

    def detokenizer(self, stop: Sequence[str] = ()) -> Detokenizer:
        """An incremental detokenizer: `.feed(ids)` returns the text those ids complete (whole UTF-8 characters,
        special tokens as no text, held back while it could start a stop string), `.finish()` the rest; text
        ends before the first of `stop`. Every answer's text is made this way."""
        if self._text is None:
            self._text = text_bytes(self.token_bytes)
        return Detokenizer(self._text, stop)

    def detokenize(self, ids: Sequence[int], stop: Sequence[str] = ()) -> str:
        """The text of token ids [T] as generate() returns it: special tokens give no text, invalid UTF-8 gives
        U+FFFD, and the text ends before the first of `stop`."""
        d = self.detokenizer(stop)
        return d.feed(ids) + d.finish()

    def _cache(self, length: int, rows: int = 1) -> KVCache:
        return KVCache(self.cfg, rows, length, self.backend.param_dtype, self.backend.device,
                       zeroed=self.backend.reads_past_lengths)

    def _prepare(self, ids_or_text, max_new_tokens: int) -> tuple[list[int], int]:
        """(prompt ids, new tokens allowed): the prompt checked against the context."""
        prompt = self.encode(ids_or_text)
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        limit = engine_limit(self.backend, self.cfg)
        if len(prompt) >= limit:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {limit} tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return prompt, min(max_new_tokens, limit - len(prompt))

    # ---- decoding -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: str | Sequence[int]) -> torch.Tensor:
        """Float32 logits [T, V] of a fresh prefill of `ids` (row t predicts token t + 1)."""
        checks.text_or_ids("ids", ids)
        prompt, _ = self._prepare(ids, 1)
        return self.model(torch.tensor([prompt], device=self.backend.device), self._cache(len(prompt)), True)[0]

    def _sequence(self, ids_or_text, params: GenParams, stats: Stats | None = None) -> SequenceState:
        """The loop state of one generation of `ids_or_text` under checked `params`."""
        prompt, max_new = self._prepare(ids_or_text, params.max_new_tokens)
        temperature = effective_temperature(params.temperature)  # too small to divide by: greedy
        prediction = params.prediction
        seq = SequenceState(
            prompt, Stopper(self.eos_ids, max_new, params.stop, self.token_bytes), temperature,
            torch.Generator(device=self.backend.device).manual_seed(params.seed) if temperature > 0 else None,
            prefix=self.prefix_cache, stats=stats if stats is not None else Stats(),
        )
        if prediction is not None:
            cost = self.cost_model()
            ids = (prompts.encode_text(self.tokenizer, prediction, "prediction")  # its text stays text
                   if isinstance(prediction, str) and self.tokenizer is not None else self.encode(prediction))
            seq.source = DraftSource(
                Drafter(ids, self.token_bytes), ChunkPolicy(cost, k_max=K_MAX),
                NgramLookup(ids), ChunkPolicy(cost, k_max=K_MAX, prior=0.5),
            )
        return seq

    def _steps(self, ids_or_text, params: GenParams, stats: Stats) -> Iterator[list[int]]:
        """One generation through the scheduler's loop with this sequence alone, in the caller's thread: the
        tokens decided at each step (stats filled as it goes)."""
        seq = self._sequence(ids_or_text, params, stats)
        limit = engine_limit(self.backend, self.cfg)
        cache = self._cache(min(limit, len(seq.prompt) + seq.stopper.max_new + K_MAX + 1))
        loop = Scheduler(self.model, self.backend.accept, None, lambda rows, length: self._cache(length, rows),
                         limit, K_MAX, max_batch=1, prefill_chunk=limit, fair=False, timed=False)
        yield from alone(loop, seq, cache)

    def stream(self, ids_or_text: str | Sequence[int], max_new_tokens: int = 256, prediction=None,
               temperature: float = 0.0, stop: Sequence[str] = (), seed: int = 0,
               stats: Stats | None = None) -> Iterator[str]:
        """Yield text deltas (whole UTF-8 characters) as tokens are decided; arguments as in `generate`.
        `stats`, when given, is filled as decoding goes (finish_reason once the iterator is exhausted).
        Arguments are checked when stream() is called, before the first delta is asked for."""
        params = checks.generation(ids_or_text, max_new_tokens, prediction, temperature, stop, seed)
        if stats is not None and not isinstance(stats, Stats):
            raise TypeError(f"stats must be a specedit.Stats or None, got {type(stats).__name__}")
        return self._stream(ids_or_text, params, stats)

    @torch.inference_mode()
    def _stream(self, ids_or_text, params: GenParams, stats: Stats | None) -> Iterator[str]:
        text = self.detokenizer(params.stop)
        stats = stats if stats is not None else Stats()
        for new in self._steps(ids_or_text, params, stats):
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
        params = checks.generation(ids_or_text, max_new_tokens, prediction, temperature, stop, seed)
        stats = Stats()
        tokens: list[int] = []
        text = self.detokenizer(params.stop)
        out = []
        for new in self._steps(ids_or_text, params, stats):
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
        prompt = prompts.chat_ids(self.tokenizer, msgs)  # the messages' text never becomes control tokens
        return self.generate(prompt, max_new_tokens, prediction, temperature, stop, seed)

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
        prompt, pred_ids = prompts.build_edit_ids(self.tokenizer, original, instruction, language)  # text stays text
        if max_new_tokens is None:
            max_new_tokens = 2 * len(pred_ids) + 256
        r = self.generate(prompt, max_new_tokens, prediction=pred_ids if speculate else None, stop=[prompts.FENCE])
        edited = prompts.extract_code(r.text, original)
        at_fence = r.stats.finish_reason == "stop" and not (r.token_ids and r.token_ids[-1] in self.eos_ids)
        return EditResult(edited, prompts.unified_diff(original, edited), r.stats, r.token_ids, at_fence)

    def cost_model(self) -> CostModel:
        """Forward time vs rows on this machine: measured once per machine, model shape and weight format
        (~1 s) and kept under $SPECEDIT_CACHE/cost, so a fresh engine's first speculative call doesn't pay
        for it (only a steady measurement is kept: see CostModel.measure)."""
        if self._cost is None:
            from . import costcache

            key = costcache.key(self.model, self.backend.name)
            self._cost = costcache.load(key)
            if self._cost is None:
                prefix = min(128, self.cfg.max_position // 2)
                rows = [r for r in (1, 2, 4, 8, 16, 32, K_MAX + 1) if prefix + r <= self.cfg.max_position]
                with torch.inference_mode():
                    self._cost = CostModel.measure(self.model, self._cache, rows, prefix)
                if self._cost.steady:  # a timing taken on a busy machine would steer chunk sizes for a week
                    costcache.save(key, self._cost)
        return self._cost

    # ---- many sequences ---------------------------------------------------------------------------------------
    def submit(self, ids_or_text: str | Sequence[int], max_new_tokens: int = 256, prediction=None,
               temperature: float = 0.0, stop: Sequence[str] = (), seed: int = 0) -> Handle:
        """Queue one generation on the engine's batched scheduler; safe from any thread, any number of callers.

        Arguments as in `generate`. Returns a Handle: `handle.tokens()` yields each step's tokens as they are
        decided, `handle.wait()` returns them all, `handle.stats` fills as it runs, `handle.cancel()` drops it at
        the next step boundary. Sequences submitted together share every forward (see specedit.scheduler);
        each one's greedy output equals its own `generate`'s token for token on the CPU kernels.
        """
        params = checks.generation(ids_or_text, max_new_tokens, prediction, temperature, stop, seed)
        with torch.inference_mode():
            seq = self._sequence(ids_or_text, params)
        return self._submit(seq)

    def _submit(self, seq: SequenceState) -> Handle:
        cache = self._cache(len(seq.prompt))  # for its prefill; the scheduler then copies it into a batch row
        return self.service().submit(lambda emit, finish: Job(seq, cache, emit, finish))

    def generate_batch(self, prompts_: Sequence[str | Sequence[int]], max_new_tokens: int = 256,
                       prediction: Sequence | None = None, temperature: float = 0.0, stop: Sequence[str] = (),
                       seed: int = 0) -> list[GenerateResult]:
        """Decode several prompts together: one forward per step for all of them (ragged rows).

        prediction: None, or one prediction (text, ids or None) per prompt. Other arguments as in `generate`,
        applied to every prompt. Returns one GenerateResult per prompt, in order; each equals that prompt's own
        `generate(...)` token for token on the CPU kernels (row-invariant backends). If one prompt's generation
        fails, its error is raised and the others are cancelled."""
        if isinstance(prompts_, (str, bytes)) or not isinstance(prompts_, Sequence):
            raise TypeError(f"prompts must be a list of prompts (text or token ids), got {type(prompts_).__name__}")
        if prediction is not None and (isinstance(prediction, (str, bytes)) or not isinstance(prediction, Sequence)):
            raise TypeError(f"prediction must be None or a list with one prediction (text, ids or None) per "
                            f"prompt, got {type(prediction).__name__}")
        preds = [None] * len(prompts_) if prediction is None else list(prediction)
        if len(preds) != len(prompts_):
            raise ValueError(f"prediction has {len(preds)} entries for {len(prompts_)} prompts")
        for i, (p, q) in enumerate(zip(prompts_, preds)):  # every prompt checked before any is queued
            checks.text_or_ids(f"prompts[{i}]", p)
            checks.text_or_ids(f"prediction[{i}]", q, optional=True)
        params = checks.generation(prompts_[0] if prompts_ else "", max_new_tokens, None, temperature, stop, seed)
        with torch.inference_mode():  # also each prompt against the context, before any is queued
            seqs = [self._sequence(p, replace(params, prediction=q)) for p, q in zip(prompts_, preds)]
        handles = [self._submit(seq) for seq in seqs]
        results = []
        try:
            for h in handles:
                tokens = h.wait()
                results.append(GenerateResult(tokens, self.detokenize(tokens, params.stop), h.stats))
        except BaseException:  # one failed (its error is raised here): the rest are not waited for, free their rows
            for h in handles:
                h.cancel()
            raise
        return results

    def service(self, max_batch: int = 8) -> Service:
        """The engine's batched scheduler thread (created on first use)."""
        with self._service_lock:
            if self._service is None:
                scheduler = Scheduler(self.model, self.backend.accept, self.cost_model(),
                                      lambda rows, length: self._cache(length, rows),
                                      engine_limit(self.backend, self.cfg), K_MAX, max_batch,
                                      fair=self.model.decoder is not None)
                self._service = Service(scheduler)
            return self._service
