"""Malformed model files (issue 24, section 6): a GGUF or an HF config.json that is wrong in one field gives a
ValueError naming the file and the field, within seconds; never a ZeroDivisionError, a RecursionError, an
IndexError from transformers or minutes of allocating. Mutated GGUF headers and metadata (hypothesis) give a
ValueError or load (40 cases each by default; SPECEDIT_FUZZ=1 runs 1000, see conftest.py)."""

import json
import math
import struct
import tempfile
import time
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import specedit
from helpers import make_checkpoint
from specedit.config import ModelConfig
from specedit.gguf import convert, read_native
from test_gguf import tiny_model, write_gguf

V = gguf.GGUFValueType


def tiny_gguf(path, meta=(), **kw):
    """A tiny llama GGUF (no tokenizer) with metadata entries (key, value, type[, sub_type]) put over the
    writer's own just before the header is written."""
    real = gguf.GGUFWriter.write_header_to_file

    def header(self, *a, **k):
        for key, value, vtype, *sub in meta:
            self.kv_data[0][key] = gguf.GGUFValue(value=value, type=vtype, sub_type=sub[0] if sub else None)
        return real(self, *a, **k)

    with mock.patch.object(gguf.GGUFWriter, "write_header_to_file", header):
        return write_gguf(Path(path), tiny_model(), "llama", tokenizer=False, **kw)


def front(path):
    """What load() reads before it builds anything: the header, the metadata and the config."""
    config, _ = read_native(Path(path))
    return ModelConfig.from_hf(config, path)


# ---- GGUF: each bad field named ---------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, field", [
    ([("general.alignment", 0, V.UINT32)], "general.alignment"),
    ([("general.alignment", 3, V.UINT32)], "general.alignment"),
    ([("general.alignment", "x", V.STRING)], "general.alignment"),
    ([("general.alignment", 32.0, V.FLOAT32)], "general.alignment"),
    ([("llama.attention.head_count", 0, V.UINT32)], "llama.attention.head_count"),
    ([("llama.attention.head_count_kv", 0, V.UINT32)], "llama.attention.head_count_kv"),
    ([("llama.attention.head_count_kv", 3, V.UINT32)], "head_count_kv 3"),
    ([("llama.attention.head_count", "4", V.STRING)], "llama.attention.head_count"),
    ([("llama.attention.layer_norm_rms_epsilon", math.inf, V.FLOAT32)], "layer_norm_rms_epsilon"),
    ([("llama.attention.layer_norm_rms_epsilon", math.nan, V.FLOAT32)], "layer_norm_rms_epsilon"),
    ([("llama.rope.freq_base", math.nan, V.FLOAT32)], "llama.rope.freq_base"),
    ([("llama.rope.freq_base", -1.0, V.FLOAT32)], "llama.rope.freq_base"),
    ([("tokenizer.ggml.eos_token_id", 10**6, V.UINT32)], "tokenizer.ggml.eos_token_id"),
    ([("llama.block_count", 2**31, V.UINT32)], "llama.block_count"),
    ([("llama.context_length", 2**31, V.UINT32)], "max_position_embeddings"),
    ([("deep", [[[[[[[[[[1]]]]]]]]]], V.ARRAY)], "metadata deep: arrays nested deeper"),
])
def test_bad_gguf_field_is_a_value_error_naming_it(tmp_path, meta, field):
    path = tiny_gguf(tmp_path / "bad.gguf", meta)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        front(path)
    assert "bad.gguf" in str(e.value) and field in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 5
    if "max_position" not in field:  # the converter (gguf's own reader) gives the same message, writes nothing
        with pytest.raises(ValueError) as e:
            convert(path, tmp_path / "out")
        assert field in str(e.value) and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_context_too_long_for_memory_is_refused_by_load_with_the_bytes(tmp_path):
    path = tiny_gguf(tmp_path / "long.gguf", [("llama.context_length", 2**31, V.UINT32)])
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"long\.gguf: max_position_embeddings 2,147,483,648 needs .* GiB"):
        specedit.load(path)
    assert time.perf_counter() - t0 < 10


def test_integer_weight_tensor_is_refused_with_its_name(tmp_path):
    path = tiny_gguf(tmp_path / "int.gguf", extra=[("blk.1.attn_q.bias", np.zeros(64, np.int32))])
    with pytest.raises(ValueError, match=r"int\.gguf: tensor blk\.1\.attn_q\.bias has type I32"):
        read_native(path)
    with pytest.raises(ValueError, match=r"tensor blk\.1\.attn_q\.bias has type I32"):
        convert(path, tmp_path / "out")


# ---- config.json and safetensors ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cfg"), "llama")


def with_config(hf_dir, tmp_path, change):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change, field", [
    (lambda c: [c], "must hold a JSON object"),
    (lambda c: {**c, "max_position_embeddings": "8192"}, "'max_position_embeddings' must be an integer"),
    (lambda c: {**c, "hidden_size": "x"}, "'hidden_size' must be an integer"),
    (lambda c: {**c, "num_attention_heads": 0}, "'num_attention_heads' must be an integer >= 1"),
    (lambda c: {**c, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    (lambda c: {**c, "tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    (lambda c: {**c, "rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number"),
    (lambda c: {**c, "rope_theta": float("inf")}, "'rope_theta' must be a finite number"),
    (lambda c: {**c, "eos_token_id": 128}, "'eos_token_id': 128 is not a token of the vocabulary"),
    (lambda c: {**c, "eos_token_id": [1, "2"]}, "'eos_token_id'"),
    (lambda c: {**c, "architectures": "LlamaForCausalLM", "rope_scaling": [1]}, "'rope_scaling' must be an object"),
    (lambda c: {**c, "num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000, the checkpoint has layers 0..1"),
    (lambda c: {**c, "max_position_embeddings": 2**40}, "needs"),
])
def test_bad_config_json_is_a_value_error_naming_file_and_field(hf_dir, tmp_path, change, field):
    d = with_config(hf_dir, tmp_path, change)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        specedit.load(d)
    assert "config.json" in str(e.value) or str(d) in str(e.value), str(e.value)
    assert field in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weight_is_refused_with_its_name(hf_dir, tmp_path, dtype):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor {name} has dtype (I64|BOOL); weights must be floating point"):
        specedit.load(d)


# ---- hypothesis: mutated GGUF headers and metadata ----------------------------------------------------------
_BASE: dict = {}


def base_gguf() -> bytes:
    if "data" not in _BASE:
        with tempfile.TemporaryDirectory() as d:
            path = tiny_gguf(Path(d) / "base.gguf")
            _BASE["data"] = path.read_bytes()
            r = gguf.GGUFReader(path)
            _BASE["header"] = len(_BASE["data"]) - sum(int(t.n_bytes) for t in r.tensors)
            _BASE["keys"] = [k for k in r.fields if not k.startswith("GGUF.")]
    return _BASE["data"]


def load_or_value_error(path: Path) -> None:
    """load() on the file must succeed or raise ValueError; anything else fails the test."""
    try:
        front(path)
    except ValueError:
        return
    try:
        with pytest.warns(UserWarning, match="no tokenizer"):
            specedit.load(path)
    except ValueError:
        return


@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), min_size=1, max_size=3))
def test_mutated_gguf_header_gives_value_error_or_loads(edits):
    data = bytearray(base_gguf())
    for at, new in edits:  # overwrite bytes of the header in place: the tensors stay where they were
        at %= _BASE["header"] - len(new) + 1
        data[at : at + len(new)] = new
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        path.write_bytes(bytes(data))
        load_or_value_error(path)


_VALUES = st.one_of(
    st.integers(-(2**63), 2**64 - 1).map(lambda v: (v, V.UINT64 if v >= 2**63 else V.INT64 if v < 0 else
                                                     V.UINT32 if v < 2**32 else V.UINT64)),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: (v, V.FLOAT32)),
    st.booleans().map(lambda v: (v, V.BOOL)),
    st.text(max_size=8).map(lambda v: (v, V.STRING)),
    st.lists(st.integers(0, 2**31), min_size=1, max_size=4).map(lambda v: (v, V.ARRAY, V.UINT32)),
)


@given(key=st.integers(0, 1000), value=_VALUES)
def test_mutated_gguf_metadata_value_gives_value_error_or_loads(key, value):
    base_gguf()
    keys = _BASE["keys"] + ["general.alignment"]
    name = keys[key % len(keys)]
    if isinstance(value[0], str):
        try:
            value[0].encode("utf-8")
        except UnicodeEncodeError:
            return  # the writer cannot write it
    with tempfile.TemporaryDirectory() as d:
        path = tiny_gguf(Path(d) / "m.gguf", [(name, *value)])
        load_or_value_error(path)


def test_struct_layout_of_the_base_file():
    """The mutation tests edit the header: it must be there (magic, version, counts) and end before the data."""
    data = base_gguf()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF" and version == 3 and n_tensors > 10 and n_kv > 5
    assert 24 < _BASE["header"] < len(data)
