"""Splits: entries linked by a shared chain sequence or cluster stay in one split; date rules, fractions by a
seeded hash, a cap on a component's size; and the cluster files that name clusters."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .options import BuildOptions, DatasetBuildError

def read_cluster_file(path) -> dict[str, str]:
    """Chain → cluster id, from a two-column TSV (``1abc_A<TAB>cluster``) or ProteinMPNN's ``list.csv``."""
    text = Path(path).read_text()
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.reader(text.splitlines(), dialect=dialect))
    if not rows:
        raise DatasetBuildError(f"--cluster_file {path} is empty")
    header = [h.strip().upper() for h in rows[0]]
    if "CHAINID" in header and "CLUSTER" in header:
        key_col, cluster_col, rows = header.index("CHAINID"), header.index("CLUSTER"), rows[1:]
    else:
        key_col, cluster_col = 0, 1
    mapping = {}
    for number, row in enumerate(rows, 1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) <= max(key_col, cluster_col):
            raise DatasetBuildError(f"--cluster_file {path}, line {number}: expected 'entry_chain<TAB>cluster', got {row}")
        key = row[key_col].strip().replace(":", "_")
        entry, _, chain = key.rpartition("_")
        mapping[f"{entry.lower()}_{chain}"] = row[cluster_col].strip()
    return mapping


@dataclass
class SplitPlan:
    """Where every entry goes, and what the split looks like: one split name per entry, the linked groups
    (components) largest first as (entries, split, first member), and a warning per oversized group."""

    assignment: list[str]
    components: list[tuple[int, str, int]]
    oversized: list[tuple[int, int]]  # (entries, first member) of groups sent to train for their size


def linked_components(groups: list[list[str]]) -> list[list[int]]:
    """Entries linked by a shared key (a chain sequence or a cluster id), directly or through others."""
    parent = list(range(len(groups)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for i, keys in enumerate(groups):
        for key in keys:
            ri, rj = find(i), find(owner.setdefault(key, i))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    components: dict[int, list[int]] = {}
    for i in range(len(groups)):
        components.setdefault(find(i), []).append(i)
    return list(components.values())


def split_position(key: str, seed: int) -> float:
    """A component's place in [0, 1): its smallest key hashed with --split_seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") / 2**64


def describe_split_rule(options: BuildOptions) -> str:
    linked = ("cluster file and identical chain sequence" if options.cluster_file else
              f"MMseqs2 clusters ({options.cluster_identity:.0%} identity, {options.cluster_coverage:.0%} coverage) and "
              "identical chain sequence" if options.cluster_identity is not None else "identical chain sequence")
    dated = [f"{split} after {date}" for split, date in (("test", options.test_release_after),
                                                          ("validation", options.validation_release_after)) if date]
    return linked + (f"; by release date: {', '.join(dated)}" if dated else "") + f"; split seed {options.split_seed}"


def assign_splits(groups: list[list[str]], options: BuildOptions, dates: list[str | None] | None = None) -> SplitPlan:
    """Split entries so that entries sharing a chain sequence or a cluster land in the same split, and an
    entry's split depends only on its own component (the entries linked to it): adding or changing files
    moves no entry whose component is unchanged.

    ``groups[i]`` lists the keys of entry ``i``; ``dates[i]`` its release date (ISO) or None. A component
    goes to test when one of its entries is released after --test_release_after, else to validation when
    one is after --validation_release_after; the splits without a date rule take the rest by the component's
    `split_position` and the fractions. A component larger than --max_component_share of the target size of
    the held-out split it falls in (its fraction of the entries, or for a date split what the dates give) goes
    to train instead. On a handful of entries a fraction split asked for may
    come out empty: it then takes the train component whose position lies nearest above its range.
    """
    dates = dates or [None] * len(groups)
    components = linked_components(groups)
    by_date = {"test": options.test_release_after, "validation": options.validation_release_after}
    fractions = {"test": 0.0 if by_date["test"] else options.test_fraction,
                 "validation": 0.0 if by_date["validation"] else options.validation_fraction}
    bounds = {"test": fractions["test"], "validation": fractions["test"] + fractions["validation"]}

    def date_split(members):
        for split in ("test", "validation"):
            if by_date[split] and any(dates[i] and dates[i] > by_date[split] for i in members):
                return split
        return None

    chosen, positions = {}, {}
    for number, members in enumerate(components):
        positions[number] = split_position(min(k for i in members for k in groups[i]), options.split_seed)
        position = positions[number]
        chosen[number] = date_split(members) or ("test" if position < bounds["test"] else
                                                 "validation" if position < bounds["validation"] else "train")
    targets = {split: (fractions[split] * len(groups) if not by_date[split] else
                       sum(len(m) for n, m in enumerate(components) if chosen[n] == split)) for split in by_date}
    caps = {split: max(1.0, options.max_component_share * target) for split, target in targets.items()}
    oversized = []
    for number, members in enumerate(components):
        if chosen[number] != "train" and len(members) > caps[chosen[number]]:
            chosen[number] = "train"
            oversized.append((len(members), members[0]))
    if len(groups) >= 3:
        for split in ("test", "validation"):
            if fractions[split] > 0 and split not in chosen.values():
                candidates = [n for n in chosen if chosen[n] == "train" and len(components[n]) <= caps[split]]
                if len(candidates) > 1:
                    chosen[min(candidates, key=lambda n: (positions[n] - bounds[split]) % 1.0)] = split
    assignment = ["train"] * len(groups)
    for number, members in enumerate(components):
        for i in members:
            assignment[i] = chosen[number]
    largest = sorted(((len(m), chosen[n], m[0]) for n, m in enumerate(components)), key=lambda c: (-c[0], c[2]))
    return SplitPlan(assignment, largest, oversized)
