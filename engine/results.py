"""What generation returns: GenerateResult, EditResult and their Stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counters and timings of one generation (seconds; token counts exclude the prompt)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those whose K/V rows came from the prefix cache
    new_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward, up to the first new token's logits
    decode_s: float = 0.0  # everything after the first new token
    forwards: int = 0  # model forwards after prefill
    draft_proposed: int = 0  # prediction tokens sent for verification
    draft_accepted: int = 0
    draft_rejected: int = 0
    lookup_proposed: int = 0  # drafts from the n-gram lookup (output and prediction) while the drafter had none
    lookup_accepted: int = 0
    finish_reason: str = ""  # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context)

    @property
    def ttft_s(self) -> float:
        """Time to first token (= prefill: the first token comes from the prompt forward)."""
        return self.prefill_s

    @property
    def tokens_per_forward(self) -> float:
        """New tokens decided per decode forward (1.0 for plain decoding)."""
        return (self.new_tokens - 1) / self.forwards if self.forwards else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second end to end (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    # OpenAI's usage names for predicted outputs
    @property
    def accepted_prediction_tokens(self) -> int:
        return self.draft_accepted

    @property
    def rejected_prediction_tokens(self) -> int:
        return self.draft_rejected

    def as_dict(self) -> dict:
        keys = ["ttft_s", "tokens_per_forward", "decode_tokens_per_s", "tokens_per_s"]
        keys += ["accepted_prediction_tokens", "rejected_prediction_tokens"]
        return {**self.__dict__, **{k: getattr(self, k) for k in keys}}


@dataclass
class GenerateResult:
    token_ids: list[int]  # new tokens only; EOS included when it ended the output
    text: str  # decoded new tokens (special tokens skipped, cut before a stop string)
    stats: Stats = field(default_factory=Stats)


@dataclass
class EditResult:
    text: str  # the edited file
    diff: str  # unified diff original -> edited
    stats: Stats = field(default_factory=Stats)
    token_ids: list[int] = field(default_factory=list)
    complete: bool = False  # the answer ended at its closing code fence: safe to write over the file

    @property
    def finish_reason(self) -> str:
        """"stop" (the closing fence, or EOS) or "length" (max_new_tokens or the context: the text is cut)."""
        return self.stats.finish_reason
