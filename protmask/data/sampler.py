"""Length-bucketed batches under a padded-token budget (or a fixed count), seeded, with `set_epoch`, over
every example or over one draw per cluster (ProteinMPNN's scheme).

The sampler yields the same global list of batches on every rank; Accelerate's `BatchSamplerShard` deals
them out, so each rank gets the same number (the first batches are repeated to fill the last round).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


def padded(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


def sampling_clusters(keys_per_example) -> list[np.ndarray]:
    """Examples grouped for cluster sampling: for each key (a chain's cluster), the examples that hold a chain
    of it, keys in sorted order. An example of several clusters is in each of them, as ProteinMPNN draws per
    chain cluster."""
    members: dict[str, list[int]] = {}
    for index, keys in enumerate(keys_per_example):
        for key in dict.fromkeys(keys):
            members.setdefault(key, []).append(index)
    return [np.asarray(members[key], dtype=np.int64) for key in sorted(members)]


class EpochOrder(Sampler[int]):
    """Example order for one epoch: a seeded permutation, or 0..n-1 when not shuffling.

    With ``clusters`` (from `sampling_clusters`) an epoch is one pass over clusters: cluster c contributes
    its member ``floor(u_c × size)``, where u is drawn from (seed, epoch), so the draw is a function of
    (seed, epoch, cluster) and every rank and every resumed run makes the same one. It is the batch
    sampler's ``.sampler`` so that Accelerate's ``set_epoch`` finds it.
    """

    def __init__(self, num_examples: int, shuffle: bool, seed: int, clusters: list[np.ndarray] | None = None):
        self.num_examples, self.shuffle, self.seed, self.epoch = num_examples, shuffle, seed, 0
        self.clusters = clusters

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def drawn(self, epoch: int) -> np.ndarray:
        """The examples of this epoch before shuffling: all of them, or one per cluster."""
        if self.clusters is None:
            return np.arange(self.num_examples)
        u = np.random.default_rng((self.seed, epoch, 2)).random(len(self.clusters))
        return np.asarray([members[int(x * len(members))] for x, members in zip(u, self.clusters)], dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        drawn = self.drawn(epoch)
        if not self.shuffle:
            return drawn
        return drawn[np.random.default_rng((self.seed, epoch)).permutation(len(drawn))]

    def __iter__(self):
        return iter(self.order(self.epoch).tolist())

    def __len__(self) -> int:
        return self.num_examples if self.clusters is None else len(self.clusters)


class LengthBucketBatchSampler(Sampler[list]):
    """Batches of similar-length examples under ``max_tokens`` padded tokens and/or ``max_examples`` each.

    With shuffling, each epoch permutes the examples, sorts them by length within buckets of about
    ``bucket_batches`` batches (little padding, still random), cuts batches and shuffles the batch order.
    Every example appears exactly once per epoch (with ``clusters``, one drawn member of each cluster; see
    `EpochOrder`). ``group_size`` is the number of batches one optimizer step
    takes over all ranks (ranks × accumulation): shuffled batches move in groups of that many neighbours in
    length, so the ranks of one step carry similar work and none waits long at the gradient all-reduce, and
    a step's global batch is the same whether it is spread over ranks or accumulated on one. Without
    shuffling (evaluation) examples go in length order and ``num_replicas`` pads the list with empty batches
    to a multiple of the ranks, so that Accelerate need not repeat examples; with shuffling it repeats the
    epoch's first batches to fill the last round, as Accelerate would, but from the whole epoch's plan, so that
    a resumed epoch ends exactly like an uninterrupted one. ``tag_epoch`` yields ``(index, epoch)`` keys for
    epoch-seeded masks.
    """

    batch_size = None  # variable-size batches: Accelerate shards them whole, never splits them

    def __init__(
        self,
        lengths,
        max_tokens: int | None = None,
        max_examples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pad_to_multiple_of: int | None = 8,
        bucket_batches: int = 50,
        group_size: int = 1,
        num_replicas: int = 1,
        tag_epoch: bool | None = None,
        clusters: list[np.ndarray] | None = None,
    ):
        if max_tokens is None and max_examples is None:
            raise ValueError("give max_tokens (a padded-token budget) or max_examples (a batch size), or both")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_tokens, self.max_examples = max_tokens, max_examples
        self.pad_to_multiple_of = pad_to_multiple_of
        self.bucket_batches = bucket_batches
        self.group_size = group_size
        self.num_replicas = num_replicas
        self.shuffle, self.seed = shuffle, seed
        self.tag_epoch = shuffle if tag_epoch is None else tag_epoch
        self.sampler = EpochOrder(len(self.lengths), shuffle, seed, clusters)
        self.drop_last = False
        if max_tokens is not None and len(self.lengths):
            longest = padded(int(self.lengths.max()), pad_to_multiple_of)
            if longest > max_tokens:
                raise ValueError(
                    f"the token budget {max_tokens} is smaller than the longest example ({longest} padded tokens); "
                    "raise --max_tokens_per_batch or crop with --max_length"
                )
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None
        self._resume: tuple[int, int, int] | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume_epoch(self, epoch: int, offset: int, group_size: int) -> None:
        """Continue ``epoch`` after its first ``offset`` batches, planned with the ``group_size`` the epoch began
        with: a run resumed on another number of ranks sees every remaining example of the epoch once."""
        self._resume = (int(epoch), int(offset), int(group_size))

    def _cut(self, order) -> list[list[int]]:
        batches, current, longest = [], [], 0
        for index in order:
            width = padded(max(longest, int(self.lengths[index])), self.pad_to_multiple_of)
            full = (self.max_examples is not None and len(current) >= self.max_examples) or (
                self.max_tokens is not None and (len(current) + 1) * width > self.max_tokens)
            if current and full:
                batches.append(current)
                current, longest = [], 0
            current.append(int(index))
            longest = max(longest, int(self.lengths[index]))
        if current:
            batches.append(current)
        return batches

    def plan(self, epoch: int | None = None, group_size: int | None = None) -> list[list[int]]:
        """All of an epoch's batches in order, before any resume offset or padding (computed once)."""
        epoch = self.epoch if epoch is None else epoch
        group_size = group_size or self.group_size
        key = (epoch, group_size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        order = self.sampler.order(epoch)
        if not self.shuffle:
            batches = self._cut(order[np.argsort(-self.lengths[order], kind="stable")])
            if self.num_replicas > 1 and len(batches) % self.num_replicas:
                batches += [[] for _ in range(self.num_replicas - len(batches) % self.num_replicas)]
        else:
            per_batch = self.max_examples or max(1, self.max_tokens // max(1, int(np.median(self.lengths))))
            bucket = max(1, per_batch * self.bucket_batches)
            batches = []
            for start in range(0, len(order), bucket):
                chunk = order[start:start + bucket]
                batches += self._cut(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
            groups = [batches[i:i + group_size] for i in range(0, len(batches), group_size)]
            # A short last group stays last: shuffled into the middle it would shift every later step's
            # batches off the step boundaries, and the ranks of a step would get unrelated lengths.
            short = groups.pop() if groups and len(groups[-1]) < group_size else []
            rng = np.random.default_rng((self.seed, epoch, 1))
            batches = [batch for i in rng.permutation(len(groups)) for batch in groups[i]] + short
        self._cache = (key, batches)
        return batches

    def batches(self) -> list[list[int]]:
        """What this epoch yields: its plan from the resume offset, padded to a multiple of the ranks."""
        epoch, offset, group_size = self._resume if self._resume and self._resume[0] == self.epoch \
            else (self.epoch, 0, self.group_size)
        plan = self.plan(epoch, group_size)
        batches = plan[offset:]
        if self.shuffle and self.num_replicas > 1 and batches:
            while len(batches) % self.num_replicas:
                batches = batches + plan[:self.num_replicas - len(batches) % self.num_replicas]
        return batches

    def __iter__(self):
        epoch = self.epoch
        for batch in self.batches():
            yield [(index, epoch) for index in batch] if self.tag_epoch else list(batch)

    def __len__(self) -> int:
        return len(self.batches())
