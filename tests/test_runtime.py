"""Runtime core vs transformers: logits and greedy tokens on tiny random checkpoints of each architecture."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import specedit
from helpers import hf_model, make_checkpoint

VARIANTS = {
    "llama": dict(),
    "llama-tied-llama3rope": dict(
        arch="llama", tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama-bias": dict(arch="llama", attention_bias=True),
    "mistral": dict(),
    "qwen2": dict(),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen3": dict(),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    kw = dict(VARIANTS[request.param])
    arch = kw.pop("arch", request.param)
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kw)
    return specedit.load(path), hf_model(path)


def test_logits_match_transformers(pair):
    eng, ref = pair
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = eng.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape == (150, 128)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_tokens_match_transformers(pair):
    eng, ref = pair
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    r = eng.generate(ids, max_new_tokens=32)
    assert r.token_ids == out[0, len(ids):].tolist()
    assert len(r.token_ids) == 32
    assert r.stats.new_tokens == 32 and r.stats.forwards == 31


def test_sharded_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    ref = specedit.load(path).logits([1, 2, 3])
    sharded = tmp_path / "sharded"
    hf_model(path).save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(specedit.load(sharded).logits([1, 2, 3]), ref)


def test_eos_stops_and_is_kept(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    eng = specedit.load(path)
    ids = [5, 6, 7, 8]
    free = eng.generate(ids, max_new_tokens=20).token_ids
    eos = free[7]
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(cfg))
    r = specedit.load(path).generate(ids, max_new_tokens=20)
    assert r.token_ids == free[: free.index(eos) + 1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_match_transformers(tmp_path, dtype):
    """Without the packed CPU kernels the whole model runs in `dtype`, exactly like transformers."""
    path = make_checkpoint(tmp_path, "qwen2")
    ids = list(range(1, 40))
    ours = specedit.load(path, dtype=dtype, cpu_kernels=False).logits(ids)
    with torch.no_grad():
        ref = hf_model(path, getattr(torch, dtype))(torch.tensor([ids])).logits[0].float()
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 1e-3 * ref.abs().max().item()  # same math, same rounding steps


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_packed_half_weights_are_float32_math_on_rounded_weights(tmp_path, dtype):
    """With the packed CPU kernels, `dtype` is the storage of linear weights; activations stay float32."""
    path = make_checkpoint(tmp_path, "qwen2")
    ids = list(range(1, 40))
    ours = specedit.load(path, dtype=dtype, cpu_kernels=True).logits(ids)
    ref_model = hf_model(path)
    with torch.no_grad():
        for m in ref_model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.to(getattr(torch, dtype)).float())
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("compute", ["exact", "int8"])
def test_int8_weights_are_q8_0_blocks(tmp_path, compute):
    """dtype='int8': each linear weight becomes gguf's Q8_0 blocks of it. compute='exact' is float32 math on
    their dequantized values; compute='int8' multiplies them with int8 activation rows (close, not equal)."""
    import gguf

    from specedit.kernels.cpu.linear import quantize_q8_0

    path = make_checkpoint(tmp_path, "qwen2")
    ids = list(range(1, 40))
    eng = specedit.load(path, dtype="int8", compute=compute)
    assert eng.compute == compute
    ours = eng.logits(ids)
    ref_model = hf_model(path)
    with torch.no_grad():
        for m in ref_model.modules():
            if isinstance(m, torch.nn.Linear):
                raw = quantize_q8_0(m.weight).numpy()
                m.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)))
        ref = ref_model(torch.tensor([ids])).logits[0]
        fp32 = hf_model(path)(torch.tensor([ids])).logits[0]
    err = (ours - ref).abs().max().item()
    # int8: ~0.5% per linear on this random model's activations, ~8% of the logits' range after 2 layers + head
    assert err < 1e-4 if compute == "exact" else 1e-4 < err < 0.15 * ref.abs().max().item()
    assert (ours - fp32).abs().max().item() > 1e-3  # it is quantized: not the float32 model


def test_int8_needs_the_cpu_kernels(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="int8"):
        specedit.load(path, dtype="int8", cpu_kernels=False)
    with pytest.raises(ValueError, match="compute='int8' runs only on the CPU kernels.*backend 'torch'"):
        specedit.load(path, compute="int8", cpu_kernels=False)
    with pytest.raises(ValueError, match="compute='int8' multiplies quantized weights, but these are float32"):
        specedit.load(path, compute="int8")
    with pytest.raises(ValueError, match="compute must be one of 'auto', 'exact', 'int8'; got 'fast'"):
        specedit.load(path, compute="fast")
    assert specedit.load(path).compute == "exact"  # float weights


def test_packed_and_torch_linears_agree(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    ids = list(range(1, 60))
    a = specedit.load(path, cpu_kernels=True).logits(ids)
    b = specedit.load(path, cpu_kernels=False).logits(ids)
    assert (a - b).abs().max().item() < 1e-4


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "m", "llama")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        specedit.load(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        specedit.load(ckpt)


def test_missing_tensor(ckpt):
    f = ckpt / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, f)
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        specedit.load(ckpt)


def test_wrong_shape(ckpt):
    f = ckpt / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(t, f)
    with pytest.raises(ValueError, match=r"k_proj\.weight: \(16, 64\), expected \(32, 64\)"):
        specedit.load(ckpt)


def test_unexpected_tensor(ckpt):
    f = ckpt / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(t, f)
    with pytest.raises(ValueError, match=r"unexpected: model\.layers\.0\.extra\.weight"):
        specedit.load(ckpt)


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        specedit.load(ckpt)


@pytest.mark.parametrize("dtype", ["int4", "float64", "fp8"])
def test_non_float_dtype(ckpt, dtype):
    with pytest.raises(ValueError, match=f"unsupported dtype '{dtype}'"):
        specedit.load(ckpt, dtype=dtype)


def test_unknown_backend(ckpt):
    with pytest.raises(ValueError, match="backend must be one of .*; got 'cuda'"):
        specedit.load(ckpt, backend="cuda")


def test_prompt_longer_than_context(ckpt):
    eng = specedit.load(ckpt)
    with pytest.raises(ValueError, match="prompt of 600 tokens does not fit the context of 512"):
        eng.generate([1] * 600)


def test_token_out_of_vocab(ckpt):
    with pytest.raises(ValueError, match=r"token ids \[128\] outside the vocabulary 0\.\.127"):
        specedit.load(ckpt).generate([1, 128])


def test_text_without_tokenizer(ckpt):
    with pytest.raises(ValueError, match="no tokenizer"):
        specedit.load(ckpt).generate("hello")


def test_generation_stops_at_context_limit(ckpt):
    r = specedit.load(ckpt).generate([1] * 500, max_new_tokens=100)
    assert len(r.token_ids) == 12
