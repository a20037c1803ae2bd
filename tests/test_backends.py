"""backends.select: the one place a backend is chosen, its loud fallbacks, and what Engine says about them."""

import warnings

import pytest
import torch

import specedit
from helpers import NEEDS_CPU_KERNELS, make_checkpoint
from specedit.backends import select
from specedit.cache import KVCache
from specedit.config import ModelConfig
from specedit.kernels.cpu import build

needs_kernels = NEEDS_CPU_KERNELS


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("be"), "llama")


@needs_kernels
def test_default_cpu_load_is_row_invariant_and_quiet(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng = specedit.load(path)
    assert eng.backend.name == "cpu" and eng.row_invariant
    assert eng.model.decoder is not None


def test_torch_backend_warns_that_rows_may_differ(path):
    with pytest.warns(UserWarning, match="verify rows may differ from 1-row decode steps"):
        eng = specedit.load(path, cpu_kernels=False)
    assert eng.backend.name == "torch" and not eng.row_invariant


def test_head_dim_the_kernels_cannot_run_falls_back_loudly(tmp_path):
    odd = make_checkpoint(tmp_path, "llama", hidden_size=96, num_attention_heads=4)  # head_dim 24
    with pytest.warns(UserWarning, match="CPU kernels not used .*head_dim 24"):
        eng = specedit.load(odd)
    assert eng.backend.name == "torch" and not eng.row_invariant
    with pytest.raises(ValueError, match="head_dim 24"):
        specedit.load(odd, cpu_kernels=True)


def test_failed_build_falls_back_with_one_line(path, monkeypatch):
    def fail():
        raise build.BuildError("building the CPU kernels failed (compiler c++): error: boom; full log: /x/build.log")

    monkeypatch.setattr(build, "load", fail)
    cfg = ModelConfig.from_hf_dir(path)
    with pytest.warns(UserWarning, match=r"CPU kernels not used \(building the CPU kernels failed .*build.log\)") as w:
        assert select("cpu", "auto", None, cfg).name == "torch"
    assert all("\n" not in str(r.message) for r in w)
    with pytest.raises(ValueError, match="full log: /x/build.log"):
        select("cpu", "cpu", None, cfg)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(backend="cuda"), "backend must be one of 'auto', 'cpu', 'torch', 'triton'; got 'cuda'"),
        (dict(backend="cpu", cpu_kernels=False), "backend 'cpu' is the C\\+\\+ kernels"),
        (dict(backend="torch", cpu_kernels=True), "cpu_kernels=True asks for the C\\+\\+ kernels"),
        (dict(device="tpu"), r"device 'tpu' is not a device name; this torch build .* can use: cpu"),
        (dict(dtype="int8", backend="torch"), "int8.*runs only on the CPU kernels"),
    ],
)
def test_bad_combinations_name_the_problem(path, kw, match):
    with pytest.raises(ValueError, match=match):
        select(**{"device": "cpu", "cfg": ModelConfig.from_hf_dir(path), **kw})
    with pytest.raises(TypeError, match="cpu_kernels must be None, True or False"):
        select("cpu", cpu_kernels="yes", cfg=ModelConfig.from_hf_dir(path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_the_devices_here(path):
    with pytest.raises(ValueError, match=r"device 'cuda' is not available with this torch build .*usable here: cpu"):
        specedit.load(path, device="cuda")


def test_cache_lengths_change_only_through_its_methods(path):
    cache = KVCache(ModelConfig.from_hf_dir(path), 2, 16, torch.float32, "cpu")
    with pytest.raises(AttributeError):
        cache.lengths = [3, 3]
    assert cache.advance(5) == [0, 0] and cache.lengths == (5, 5)
    assert cache.positions.tolist() == [[0, 1, 2, 3, 4]] * 2 and cache.lengths_dev.tolist() == [5, 5]
    cache.rollback(1, 2)
    assert cache.advance(3) == [5, 2] and cache.lengths == (8, 5)
    assert cache.positions.tolist() == [[5, 6, 7], [2, 3, 4]] and cache.lengths_dev.tolist() == [8, 5]
    with pytest.raises(ValueError, match="exceeds the KV cache capacity of 16"):
        cache.advance(9)
    with pytest.raises(ValueError, match="rollback of row 0 to 9 outside 0..8"):
        cache.rollback(0, 9)
