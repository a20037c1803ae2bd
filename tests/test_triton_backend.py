"""backend="triton" end to end: the model's attention and the loop's accept go through the Triton kernels
(under TRITON_INTERPRET=1 on a CPU) and give the same greedy tokens as backend="torch"."""

import random

import pytest

import specedit
from helpers import make_checkpoint
from specedit.draft_policy import CostModel


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("tri"), "qwen2", num_attention_heads=6, num_key_value_heads=2)
    tri = specedit.load(path, backend="triton")
    tri._cost = CostModel([1, 65], [1.0, 1.5])  # skip timing forwards under the (slow) interpreter
    return specedit.load(path, backend="torch"), tri


def test_triton_backend_is_selected(engines):
    torch_eng, tri = engines
    assert tri.backend.name == "triton" and torch_eng.backend.name == "torch"
    assert tri.model.attend.__name__ == "attend_triton"


def test_triton_logits_match_torch(engines):
    torch_eng, tri = engines
    ids = random.Random(0).choices(range(128), k=37)
    assert (tri.logits(ids) - torch_eng.logits(ids)).abs().max().item() < 1e-4


def test_triton_greedy_plain_and_speculative_match_torch(engines):
    torch_eng, tri = engines
    prompt = random.Random(1).choices(range(128), k=30)
    plain = torch_eng.generate(prompt, max_new_tokens=24).token_ids
    assert tri.generate(prompt, max_new_tokens=24).token_ids == plain
    mutated = plain[:9] + [(plain[9] + 1) % 128] + plain[10:]
    r = tri.generate(prompt, max_new_tokens=24, prediction=mutated)
    assert r.token_ids == plain
    assert r.stats.draft_accepted > 0


@pytest.mark.parametrize("which", ["torch", "triton"])
def test_padded_batches_equal_each_prompts_own_generate(engines, which):
    """Backends without a decoder that takes ragged rows (the GPU path) pad every row of a batched step to the
    longest and roll the padding back: sequences of different lengths, drafts accepted, rejected and absent."""
    eng = dict(zip(("torch", "triton"), engines))[which]
    rng = random.Random(2)
    prompts = [rng.choices(range(128), k=k) for k in (5, 23, 12)]
    plain = [eng.generate(p, max_new_tokens=16).token_ids for p in prompts]
    preds = [plain[0], plain[1][:6] + [(plain[1][6] + 1) % 128] + plain[1][7:], None]
    rs = eng.generate_batch(prompts, max_new_tokens=16, prediction=preds)
    assert [r.token_ids for r in rs] == plain
    assert rs[0].stats.draft_accepted > 0 and rs[1].stats.draft_rejected > 0
