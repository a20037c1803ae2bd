"""accept (fused argmax + first mismatch) vs known answers and vs accept_ref; integers compare exactly.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py).
"""

import pytest
import torch
from specedit.kernels.accept import accept, accept_ref


def known_logits(targets, V, dtype=torch.float32):
    """[B, Q, V] logits with +100 at targets[b][i] and -100 elsewhere."""
    t = torch.tensor(targets, dtype=torch.long)
    logits = torch.full((*t.shape, V), -100.0, dtype=dtype)
    logits.scatter_(2, t[..., None], 100.0)
    return logits


def run(logits, draft, draft_lens, **kw):
    draft = torch.as_tensor(draft, dtype=torch.long).reshape(logits.shape[0], -1)
    draft_lens = torch.as_tensor(draft_lens, dtype=torch.int32)
    got = accept(logits, draft, draft_lens, **kw)
    want = accept_ref(logits, draft, draft_lens)
    for g, w in zip(got, want):
        assert g.dtype == torch.int32
        assert torch.equal(g, w), (got, want)
    n, nxt, am = got
    return n.tolist(), nxt.tolist(), am.tolist()


def test_perfect_match_with_bonus_token():
    targets = [[5, 17, 3, 99, 42, 7]]  # K = 5 draft tokens, then the bonus row
    n, nxt, am = run(known_logits(targets, 128), targets[0][:5], [5])
    assert (n, nxt, am) == ([5], [7], targets)


def test_mismatch_at_first_position():
    targets = [[5, 17, 3, 99, 42, 7]]
    n, nxt, _ = run(known_logits(targets, 128), [6, 17, 3, 99, 42], [5])
    assert (n, nxt) == ([0], [5])  # the correction is the model's token at row 0


def test_mismatch_at_last_draft_position():
    targets = [[5, 17, 3, 99, 42, 7]]
    n, nxt, _ = run(known_logits(targets, 128), [5, 17, 3, 99, 41], [5])
    assert (n, nxt) == ([4], [42])


def test_empty_draft():
    # K = 0: plain decoding through the same path; the only row gives the next token.
    n, nxt, am = run(known_logits([[77], [3]], 111), torch.zeros(2, 0, dtype=torch.long), [0, 0])
    assert (n, nxt, am) == ([0, 0], [77, 3], [[77], [3]])


@pytest.mark.parametrize("block_v,num_splits,positions", [
    (128, 1, (200, 100)),  # same program, different blocks (different lanes)
    (128, 1, (133, 5)),  # same lane (5 and 5 + 128) in consecutive blocks
    (128, 3, (299, 100, 260)),  # across vocab chunks of different programs
    (1024, 1, (17, 16)),  # same block, neighbouring lanes
])
def test_tie_lowest_index_wins(block_v, num_splits, positions):
    logits = torch.full((1, 1, 300), -1.0)
    logits[0, 0, list(positions)] = 3.5
    _, nxt, am = run(logits, torch.zeros(1, 0, dtype=torch.long), [0], block_v=block_v, num_splits=num_splits)
    assert am == [[min(positions)]] and nxt == [min(positions)]


@pytest.mark.parametrize("positions", [(100, 4196), (4095, 4096), (151935, 70000)])
def test_tie_across_default_blocks(positions):
    # Default block size and split plan for a Qwen-sized vocabulary.
    logits = torch.full((1, 2, 151936), -100.0, dtype=torch.float16)
    logits[0, :, list(positions)] = 100.0
    n, nxt, am = run(logits, [min(positions)], [1])
    assert am == [[min(positions)] * 2] and (n, nxt) == ([1], [min(positions)])


def test_ragged_draft_lengths():
    targets = [[1, 2, 3, 4, 9], [5, 6, 7, 8, 9], [10, 11, 12, 13, 9], [14, 15, 16, 17, 9]]
    draft = [t[:4] for t in targets]  # every draft token matches ...
    draft[3] = [14, 15, 0, 17]  # ... except one inside the valid part of the last sequence
    n, nxt, _ = run(known_logits(targets, 64), draft, [4, 2, 0, 3])
    assert n == [4, 2, 0, 2]  # tokens past draft_lens are never accepted, even when they match
    assert nxt == [9, 7, 10, 16]


def test_int32_draft_and_strided_logits():
    B, Q, V = 2, 4, 1000
    big = torch.randn(B, Q + 3, V + 24)
    logits = big[:, 2:2 + Q, :V]  # strided over B and Q, stride 1 over V
    am = logits.argmax(-1)
    draft = am[:, :3].clone().to(torch.int32)
    draft[1, 1] += 1
    lens = torch.tensor([3, 3], dtype=torch.int32)
    n, nxt, _ = accept(logits, draft, lens)
    assert n.tolist() == [3, 1]
    assert nxt.tolist() == [am[0, 3].item(), am[1, 1].item()]


def test_special_values_like_torch_argmax():
    V = 700
    rows = torch.randn(6, V)
    rows[0, [10, 400]] = float("nan")  # NaN counts as the maximum; first NaN wins
    rows[1, :] = float("-inf")  # all -inf -> 0
    rows[2, :] = -5.0
    rows[2, [300, 650]] = float("inf")
    rows[3, :] = -1.0
    rows[3, 20], rows[3, 5] = 0.0, -0.0  # -0.0 == +0.0: the lower index wins
    rows[4, 650] = float("nan")
    rows[5, :] = 0.0
    logits = rows[None]  # [1, 6, V]: 5 draft tokens
    want = rows.argmax(-1)
    assert want.tolist() == [10, 0, 300, 5, 650, 0]
    for block_v, ns in ((128, 3), (1024, 1)):
        _, _, am = run(logits, want[:5], [5], block_v=block_v, num_splits=ns)
        assert am == [want.tolist()]


def test_workspace_is_left_clean_between_calls():
    # The kernel resets its cached workspace itself; alternate shapes and make sure no state leaks.
    g = torch.Generator().manual_seed(1)
    for B, K, V in [(3, 5, 500), (1, 1, 500), (4, 16, 300), (3, 5, 500), (2, 0, 50)]:
        logits = torch.randn(B, K + 1, V, generator=g)
        draft = logits.argmax(-1)[:, :K]
        run(logits, draft, torch.full((B,), K, dtype=torch.int32))


def random_case(B, K, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
    am = logits.argmax(-1)
    draft = am[:, :K].clone()
    # Break each draft at a random position (or not at all), and use ragged lengths.
    for b in range(B):
        j = int(torch.randint(0, K + 2, (1,), generator=g))
        if j < K:
            draft[b, j] = (draft[b, j] + 1 + int(torch.randint(0, V - 1, (1,), generator=g))) % V
    lens = torch.randint(0, K + 1, (B,), generator=g, dtype=torch.int32)
    if B > 0:
        lens[0] = K
    return logits, draft, lens


SWEEP = [(V, K, dt) for V in (111, 32000, 49152, 151936) for K in (0, 1, 5, 16)
         for dt in (torch.float32, torch.float16)]


@pytest.mark.parametrize("V,K,dtype", SWEEP, ids=[f"V{v}-K{k}-{str(d)[6:]}" for v, k, d in SWEEP])
def test_sweep_matches_ref(V, K, dtype):
    logits, draft, lens = random_case(3, K, V, dtype, seed=V + K)
    got = accept(logits, draft, lens)
    want = accept_ref(logits, draft, lens)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_bfloat16_logits():
    logits, draft, lens = random_case(2, 5, 32000, torch.bfloat16, seed=3)
    for g, w in zip(accept(logits, draft, lens), accept_ref(logits, draft, lens)):
        assert torch.equal(g, w)


BAD = [
    ("rank", lambda L, d, n: (L[0], d, n), r"logits must be \[B, Q, V\], got shape \(3, 100\)"),
    ("Q != K+1", lambda L, d, n: (L, d[:, :1], n), r"draft has K=1, logits has Q=3"),
    ("batch", lambda L, d, n: (L, d[:1], n), r"batch mismatch: logits has B=2, draft has B=1"),
    ("lens dtype", lambda L, d, n: (L, d, n.long()), r"draft_lens must be int32, got torch.int64"),
    ("lens shape", lambda L, d, n: (L, d, n[:1]), r"draft_lens must have shape \[B\]=\(2,\), got \(1,\)"),
    ("lens > K", lambda L, d, n: (L, d, torch.tensor([2, 3], dtype=torch.int32)),
     r"draft_lens must be in \[0, K=2\], got \[2, 3\]"),
    ("negative len", lambda L, d, n: (L, d, torch.tensor([-1, 0], dtype=torch.int32)), r"got \[-1, 0\]"),
    ("float64", lambda L, d, n: (L.double(), d, n), r"logits dtype torch.float64 not supported"),
    ("draft dtype", lambda L, d, n: (L, d.float(), n), r"draft dtype torch.float32 not supported"),
    ("vocab stride", lambda L, d, n: (L.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :3], d, n),
     r"stride 1\), got strides"),
    ("not a tensor", lambda L, d, n: (L.tolist(), d, n), r"logits must be a torch.Tensor, got list"),
    ("lens not a tensor", lambda L, d, n: (L, d, [2, 1]), r"draft_lens must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("make,match", [(m, r) for _, m, r in BAD], ids=[n for n, _, _ in BAD])
@pytest.mark.parametrize("fn", [accept, accept_ref], ids=["kernel", "ref"])
def test_bad_inputs_raise(fn, make, match):
    logits = torch.randn(2, 3, 100)
    draft = torch.zeros(2, 2, dtype=torch.long)
    lens = torch.tensor([2, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        fn(*make(logits, draft, lens))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_ref(dtype):
    for B, K, V in [(1, 16, 151936), (8, 5, 49152), (2, 64, 32000), (3, 0, 111)]:
        logits, draft, lens = (t.cuda() for t in random_case(B, K, V, dtype, seed=B * K + V))
        for _ in range(3):  # repeated launches reuse the self-resetting workspace
            for g, w in zip(accept(logits, draft, lens), accept_ref(logits, draft, lens)):
                assert torch.equal(g, w)
