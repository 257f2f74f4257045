"""SD at temperature > 0 samples from the target's distribution: a chi-square test on a 4-token vocabulary.

Hand-made models (random one-block GPT-2s over 4 tokens, sharp and different from each other) so the
exact target distribution is cheap to compute and many generations take a few seconds.
"""

import pytest
import torch

from sprinter.decode.decoder import Decoder
from sprinter.pairs.load import Pair

VOCAB = 4
CHI2_DF3_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


pytestmark = pytest.mark.usefixtures("single_thread")


class IdTokenizer:
    """Token ids in, token ids out: all a Decoder needs from a tokenizer when prompts are ids."""

    eos_token_id = None

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def random_lm(seed: int, scale: float):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale / model.lm_head.weight.std())
    return model


def random_decoder() -> tuple[Decoder, torch.nn.Module, torch.nn.Module]:
    """(decoder, target, draft): two random models over VOCAB ids, far enough apart that drafts are often
    rejected, with an id tokenizer."""
    target, draft = random_lm(0, 0.6), random_lm(1, 0.6)
    pair = Pair(draft=draft, target=target, tokenizer=IdTokenizer(), draft_name="d", target_name="t",
                device=torch.device("cpu"), dtype=torch.float32)
    return Decoder(pair), target, draft


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def target_marginals(target: torch.nn.Module, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(p1, p2): the target's distributions of the first and of the second generated token, both (V,)."""
    with torch.inference_mode():
        p1 = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # (V,) first token
        p2_given = torch.stack([target(torch.tensor([prompt + [x]])).logits[0, -1].softmax(-1) for x in range(VOCAB)])
    return p1, p1 @ p2_given  # (V,) marginal of the second token


def sample_two_tokens(decoder: Decoder, prompt: list[int], n: int, **options) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(first, second, rejected): counts of each id as the first and as the second of two generated tokens over
    seeds 0 .. n - 1 at temperature 1, and the drafted tokens rejected in all."""
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    rejected = 0
    for seed in range(n):
        out = decoder.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed, **options)
        first[out.token_ids[0]] += 1
        second[out.token_ids[1]] += 1
        rejected += out.stats.rejected
    return first, second, rejected


def test_sd_samples_from_the_target_distribution():
    decoder, target, draft = random_decoder()
    prompt = [1, 2]
    p1, p2 = target_marginals(target, prompt)
    with torch.inference_mode():
        q1 = draft(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    assert (p1 - q1).abs().sum() > 0.3  # the draft is clearly wrong, so the test has power

    n = 1000
    first, second, rejected = sample_two_tokens(decoder, prompt, n, mode="sd", k=2)
    assert rejected > n // 10  # residual sampling was exercised
    assert chi_square(first, p1) < CHI2_DF3_P001, (first / n, p1)
    assert chi_square(second, p2) < CHI2_DF3_P001, (second / n, p2)
    assert chi_square(first, q1) > CHI2_DF3_P001  # the draft's own distribution is told apart
