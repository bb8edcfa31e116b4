"""Length-bucketed batches: every example once per epoch, budgets kept, seeded, equal counts per rank."""

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard

from protmask.data.sampler import LengthBucketBatchSampler, padded


@pytest.fixture(scope="module")
def lengths(sample_build):
    return np.minimum(np.asarray(sample_build.dataset["train"]["length"]), 300)


def test_every_example_once_and_budget_kept(lengths):
    sampler = LengthBucketBatchSampler(lengths, max_tokens=1200, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = [[i for i, _ in batch] for batch in sampler]
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) * padded(int(lengths[batch].max()), 8) <= 1200
    counted = LengthBucketBatchSampler(lengths, max_examples=5, seed=0)
    assert all(len(b) <= 5 for b in counted) and sum(len(b) for b in counted) == len(lengths)


def test_seeded_per_epoch_and_tagged(lengths):
    a, b = LengthBucketBatchSampler(lengths, max_tokens=1200, seed=1), LengthBucketBatchSampler(lengths, max_tokens=1200, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    epoch_one = list(a)
    assert epoch_one != list(b) and all(epoch == 1 for batch in epoch_one for _, epoch in batch)
    assert list(LengthBucketBatchSampler(lengths, max_tokens=1200, seed=2)) != list(b)


def test_token_budget_smaller_than_longest_example_is_refused(lengths):
    with pytest.raises(ValueError, match="smaller than the longest example"):
        LengthBucketBatchSampler(lengths, max_tokens=100)


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_get_equal_batch_counts_and_lose_no_example(lengths, ranks):
    sampler = LengthBucketBatchSampler(lengths, max_tokens=1500, seed=0, group_size=ranks)
    shards = [list(BatchSamplerShard(sampler, num_processes=ranks, process_index=r, even_batches=True))
              for r in range(ranks)]
    assert len({len(s) for s in shards}) == 1
    seen = {i for shard in shards for batch in shard for i, _ in batch}
    assert seen == set(range(len(lengths)))
    # Evaluation: padded with empty batches instead of repeated examples, so each is seen exactly once.
    evaluation = LengthBucketBatchSampler(lengths, max_tokens=1500, shuffle=False, num_replicas=ranks)
    assert len(evaluation) % ranks == 0
    shards = [list(BatchSamplerShard(evaluation, num_processes=ranks, process_index=r, even_batches=True))
              for r in range(ranks)]
    indices = [i for shard in shards for batch in shard for i in batch]
    assert sorted(indices) == list(range(len(lengths)))


def test_groups_keep_one_steps_batches_together(lengths):
    """Grouped by ranks × accumulation, one step's batches are the same spread over ranks or accumulated."""
    grouped = LengthBucketBatchSampler(lengths, max_tokens=900, seed=3, group_size=2)
    batches = list(grouped)
    rank_zero = list(BatchSamplerShard(grouped, num_processes=2, process_index=0))
    rank_one = list(BatchSamplerShard(grouped, num_processes=2, process_index=1))
    for step in range(len(batches) // 2):
        assert [rank_zero[step], rank_one[step]] == batches[2 * step:2 * step + 2]
    widths = [max(lengths[i] for i, _ in b) for b in batches]
    spread_in_steps = np.mean([abs(widths[2 * s] - widths[2 * s + 1]) for s in range(len(batches) // 2)])
    ungrouped = [max(lengths[i] for i, _ in b) for b in LengthBucketBatchSampler(lengths, max_tokens=900, seed=3)]
    spread_ungrouped = np.mean([abs(ungrouped[2 * s] - ungrouped[2 * s + 1]) for s in range(len(ungrouped) // 2)])
    assert spread_in_steps < spread_ungrouped  # the ranks of a step get similar lengths
