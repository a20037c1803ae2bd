"""Acceptance: how a verify step's K+1 logits rows accept a draft (greedy_accept, sampled_accept) and how one
row picks a token (pick). The loop that uses them is specedit.scheduler's; draft lengths and sources are
specedit.draft_policy's.

A verify step feeds `[last token] + draft` (K+1 rows) through one forward. Row i's logits decide the token
after draft[:i]; the longest prefix of the draft that matches is accepted, plus the model's own token after it
(the correction, or a bonus token when the whole draft matched). The cache rows of rejected draft tokens are
dropped by lowering the cache length. With no draft the step is plain decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Temperatures below this decode greedily. Float32 logits divided by a smaller one can overflow (1e-300 is 0 in
# float32, and logits / 0 is inf: inf - inf is NaN in the softmax); and at 1e-6 a logit gap of 1e-4 already
# makes the runner-up e^-100 times less likely than the argmax, so sampling would be argmax but for exact ties.
MIN_TEMPERATURE = 1e-6


def effective_temperature(temperature: float) -> float:
    """The temperature decoding uses: 0.0 (greedy) below MIN_TEMPERATURE, else `temperature` as a float."""
    return float(temperature) if temperature >= MIN_TEMPERATURE else 0.0


def pick(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> int:
    """Next token from float32 logits [V]: argmax when temperature < MIN_TEMPERATURE (0 = greedy; lowest index on
    ties), else a sample from softmax(logits / temperature)."""
    if temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# accept(logits [B, Q, V], draft [B, K], draft_lens [B]) -> (num_accepted [B], next_token [B], argmax [B, Q])
AcceptFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def greedy_accept(accept: AcceptFn, logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """(accepted count, next token) for logits [K+1, V] and a K-token draft: one launch, one host copy."""
    d = torch.tensor([draft], dtype=torch.int32, device=logits.device)  # [1, K]
    lens = torch.tensor([len(draft)], dtype=torch.int32, device=logits.device)
    n, nxt, _ = accept(logits[None], d, lens)
    n, nxt = torch.cat([n, nxt]).tolist()
    return n, nxt


def sampled_accept(logits: torch.Tensor, draft: list[int], temperature: float,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling against a point-mass draft over logits [K+1, V]: (accepted count, next token).
    Below MIN_TEMPERATURE it is greedy acceptance (the draft's longest prefix equal to the argmax, then the
    argmax), as plain decoding's `pick` is greedy there."""
    if temperature < MIN_TEMPERATURE:
        best = logits[: len(draft) + 1].argmax(dim=-1).tolist()  # [K+1]
        n = next((i for i, tok in enumerate(draft) if best[i] != tok), len(draft))
        return n, best[n]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [K+1, V]
    u = torch.rand(len(draft), generator=generator, device=probs.device).tolist()
    p_draft = probs[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)].tolist() if draft else []
    for i, tok in enumerate(draft):
        if u[i] >= p_draft[i]:
            residual = probs[i].clone()
            residual[tok] = 0
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generator))
