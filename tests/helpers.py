"""What several test files share: tiny random checkpoints written by transformers itself (so transformers is the
reference), a server starter, and the CPU kernels' skip mark and instruction sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specedit.kernels.cpu import build

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def make_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random-weight `arch` model with transformers' save_pretrained (safetensors) into `path`."""
    import transformers as tf

    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[arch]
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None,
        eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "qwen3":
        kw["head_dim"] = 32  # explicit head_dim != hidden / heads
    kw.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # random init is near-uniform; widen it so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
            else:  # norm weights and biases: away from their 1 / 0 init so a mix-up shows
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab_size: int = 300):
    """A small byte-level BPE tokenizer (transformers fast tokenizer) trained on code, with a chat template.

    Its vocabulary is ASCII only, so whatever a random model emits decodes to valid text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # hello\n```python\n" * 20
    ascii_chars = [bytes_to_unicode()[b] for b in range(128)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=ascii_chars)
    tk.train_from_iterator([text], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_text_checkpoint(path: Path, arch: str = "qwen2", **overrides) -> Path:
    """A random checkpoint with a tokenizer (and chat template) saved beside it; `overrides` as in make_checkpoint."""
    tok = make_tokenizer()
    make_checkpoint(path, arch, vocab_size=len(tok), **overrides)
    tok.save_pretrained(path)
    return Path(path)


def verify_and_steps(eng, prompt: list[int], follow: list[int]):
    """Logits of `follow` after `prompt` two ways: one len(follow)-row verify forward, and one 1-row decode
    step per token. Returns (batched [T, V], single [T, V])."""
    m, dev = eng.model, eng.backend.device
    with torch.inference_mode():
        c = eng._cache(len(prompt) + len(follow) + 1)
        m(torch.tensor([prompt], device=dev), c)
        batched = m(torch.tensor([follow], device=dev), c, all_logits=True)[0]
        c.rollback(0, len(prompt))
        single = torch.stack([m(torch.tensor([[t]], device=dev), c)[0] for t in follow])
    return batched, single


def start_server(app):
    """Serve `app` with uvicorn on 127.0.0.1 in a daemon thread; returns (server, port). Stop it with
    `server.should_exit = True`."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(1000):
        if server.started:
            break
        time.sleep(0.01)
    return server, server.servers[0].sockets[0].getsockname()[1]


NEEDS_CPU_KERNELS = pytest.mark.skipif(
    not build.available(), reason="the CPU kernels need x86-64 Linux with avx2/fma/f16c, a C++ compiler and ninja"
)


def isas() -> list[str]:
    """The instruction sets the CPU kernels can run here: ["avx2"], and "avx512" where the CPU has it."""
    return ["avx2", "avx512"] if build.best_isa() == "avx512" else ["avx2"]
