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


def steps_out_of_length_order(sampler, lengths, ranks: int) -> int:
    """Steps (one batch per rank, dealt by Accelerate) whose batches are not neighbours in length: every
    example of the second batch should be no longer than every example of the first, as when one sorted
    bucket is cut. Only steps that straddle two buckets may break this."""
    shards = [list(BatchSamplerShard(sampler, num_processes=ranks, process_index=r)) for r in range(ranks)]
    broken = 0
    for step in zip(*shards):
        widths = [[lengths[i] for i, _ in batch] for batch in step]
        broken += any(min(a) < max(b) for a, b in zip(widths, widths[1:]))
    return broken


def test_groups_keep_one_steps_batches_together(lengths):
    """Grouped by ranks × accumulation, the batches of one step are neighbours in length, whichever rank
    takes them; a sampler that only shuffles batches fails the same check."""
    lengths = np.tile(lengths, 10)  # the sample's real lengths, ten times: enough steps to tell them apart
    grouped = LengthBucketBatchSampler(lengths, max_tokens=900, seed=3, group_size=2, bucket_batches=10)
    buckets = -(-len(lengths) // (grouped.max_tokens // int(np.median(lengths)) * 10))
    assert steps_out_of_length_order(grouped, lengths, 2) <= buckets
    ungrouped = LengthBucketBatchSampler(lengths, max_tokens=900, seed=3, group_size=1, bucket_batches=10)
    steps = len(ungrouped) // 2
    assert steps_out_of_length_order(ungrouped, lengths, 2) > max(2 * buckets, steps // 4)


def test_cluster_sampling_draws_one_member_per_cluster_per_epoch_as_a_function_of_seed_and_epoch():
    from protmask.data.sampler import sampling_clusters

    # 40 copies of one family (cluster "big"), 20 singletons; entry 0 also holds a chain of cluster "x".
    keys = [["big"]] * 40 + [[f"s{i}"] for i in range(20)]
    keys[0] = ["big", "x"]
    clusters = sampling_clusters(keys)
    assert len(clusters) == 22 and sorted(clusters[0].tolist()) == list(range(40))
    lengths = np.full(len(keys), 50)
    sampler = LengthBucketBatchSampler(lengths, max_tokens=400, seed=3, clusters=clusters)
    drawn = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        seen = [i for batch in sampler.plan(epoch) for i in batch]
        assert len(seen) == 22 and set(range(40, 60)) <= set(seen)  # every singleton, one draw per cluster
        assert sum(i < 40 for i in seen) in (1, 2)  # the family once (twice when "x" drew entry 0 too)
        drawn.append(sorted(seen))
    assert len({tuple(d) for d in drawn}) > 1  # another member of the family each epoch
    again = LengthBucketBatchSampler(lengths, max_tokens=400, seed=3, clusters=clusters)
    assert again.plan(4) == sampler.plan(4)  # any rank, any resumed run: the same epoch
    other = LengthBucketBatchSampler(lengths, max_tokens=400, seed=4, clusters=clusters)
    assert any(other.plan(e) != sampler.plan(e) for e in range(6))
