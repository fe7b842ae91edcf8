"""The verification rule of speculative decoding: greedy exactness and the sampled output distribution."""

import pytest
import torch

from gpt2serve.engine.spec_decode.rejection import rejection_sample

# Chi-square critical values at significance 0.001, by degrees of freedom (a true rule fails 1 run in 1,000).
CHI2_CRIT_001 = {3: 16.27, 4: 18.47}


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def draw(probs: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs, n, replacement=True, generator=gen)


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_emitted_tokens_are_distributed_as_the_target(with_draft_probs):
    gen = torch.Generator().manual_seed(1234)
    n, k, vocab = 200_000, 2, 5
    p = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.05], [0.05, 0.05, 0.30, 0.30, 0.30], [0.2] * 5])
    q = torch.tensor([[0.10, 0.10, 0.20, 0.30, 0.30], [0.50, 0.20, 0.10, 0.10, 0.10]])
    if with_draft_probs:
        drafts = torch.stack([draw(q[i], n, gen) for i in range(k)], dim=1)
        draft_probs = q[None].expand(n, k, vocab)
    else:  # a deterministic proposer (n-gram): always proposes token 3, then token 0
        drafts = torch.tensor([3, 0]).expand(n, k).clone()
        draft_probs = None
    tokens, emitted = rejection_sample(
        drafts, torch.full((n,), k), p[None].expand(n, k + 1, vocab), draft_probs, torch.zeros(n, dtype=torch.bool),
        torch.rand(n, k, generator=gen), torch.empty(n, k + 1, vocab).exponential_(generator=gen))
    assert bool(((emitted >= 1) & (emitted <= k + 1)).all())
    # Each output position, wherever it was emitted in this step, follows the target's distribution there.
    for pos in range(k + 1):
        got = tokens[emitted > pos, pos]
        assert got.numel() > 500  # enough for every expected bin count to be large
        assert chi_square(got, p[pos]) < CHI2_CRIT_001[vocab - 1], (pos, torch.bincount(got) / got.numel())
    # And the proposals were not simply ignored: some were accepted, some rejected.
    assert 0 < float((emitted > 1).float().mean()) < 1


def test_a_draft_equal_to_the_target_is_always_accepted():
    gen = torch.Generator().manual_seed(0)
    n, k, vocab = 1000, 3, 6
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen), dim=-1)
    drafts = torch.stack([draw(p[i], n, gen) for i in range(k)], dim=1)
    _, emitted = rejection_sample(drafts, torch.full((n,), k), p[None].expand(n, k + 1, vocab),
                                  p[None, :k].expand(n, k, vocab), torch.zeros(n, dtype=torch.bool),
                                  torch.rand(n, k, generator=gen), torch.empty(n, k + 1, vocab).exponential_())
    assert bool((emitted == k + 1).all())


def test_greedy_accepts_the_longest_matching_run_then_the_targets_argmax():
    vocab, k = 8, 4
    # Target argmax per position: 1, 2, 3, 4, 5.
    target = torch.full((3, k + 1, vocab), 0.01)
    for i in range(k + 1):
        target[:, i, i + 1] = 0.9
    drafts = torch.tensor([[1, 2, 7, 4], [1, 2, 3, 4], [6, 2, 3, 4]])
    num = torch.tensor([4, 4, 4])
    tokens, emitted = rejection_sample(drafts, num, target, None, torch.ones(3, dtype=torch.bool),
                                       torch.rand(3, k), torch.empty(3, k + 1, vocab).exponential_())
    assert emitted.tolist() == [3, 5, 1]
    assert [tokens[b, :e].tolist() for b, e in enumerate(emitted.tolist())] == [[1, 2, 3], [1, 2, 3, 4, 5], [1]]


def test_fewer_proposals_than_k_end_in_a_bonus_token():
    vocab, k = 8, 4
    target = torch.full((2, k + 1, vocab), 0.01)
    for i in range(k + 1):
        target[:, i, i + 1] = 0.9
    drafts = torch.tensor([[1, 2, 0, 0], [9 % vocab, 0, 0, 0]])
    tokens, emitted = rejection_sample(drafts, torch.tensor([2, 0]), target, None, torch.ones(2, dtype=torch.bool),
                                       torch.rand(2, k), torch.empty(2, k + 1, vocab).exponential_())
    assert emitted.tolist() == [3, 1] and tokens[0, :3].tolist() == [1, 2, 3] and tokens[1, 0].item() == 1
