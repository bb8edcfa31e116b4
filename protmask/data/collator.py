"""Chains → the model's batch: cropping, masking (exact count per chain, 80/10/10) and padding.

`ProtMaskProcessor` is the one place this happens, for the training collator, for evaluation and design,
and for users: ``batch = processor(parse_structure(path)); model(**batch)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..metrics import IGNORE_INDEX
from ..residues import SIDE_CHAIN_ATOMS, atomic_number, has_backbone
from ..models.tokenization_protmask import ProtMaskTokenizer
from ..structure import ContextAtoms, ParsedEntry, ProteinChain

#: Training objectives: "masked" hides a share of residues; "autoregressive" scores every residue in a random
#: decoding order (ProteinMPNN's objective; needs a model with decoder_context="causal").
OBJECTIVES = ("masked", "autoregressive")
#: The 80 / 10 / 10 split of masked positions: hidden, replaced by a random residue, left unchanged.
MASK_TOKEN_FRACTION, RANDOM_TOKEN_FRACTION = 0.8, 0.1
#: A crop keeps the context atoms within this distance (Å) of a kept residue's backbone: farther atoms
#: cannot be among a kept residue's near neighbours.
CONTEXT_CROP_RADIUS = 15.0
#: The dataset columns a residue-only model reads (the context atoms are read only when asked for).
RESIDUE_COLUMNS = ("name", "sequence", "coords", "chain_ids", "chain_lengths", "residue_numbers", "length")
ATOM_COLUMNS = ("atom_coords", "atom_elements", "atom_residue_names", "atom_chain_ids", "atom_residue_numbers",
                "atom_classes")


@dataclass
class Example:
    """One model input: one chain or several chains of one entry, concatenated."""

    name: str
    sequence: str
    coords: np.ndarray  # float32 [L, 4, 3], NaN where missing
    chain_ids: list[str]
    chain_lengths: list[int]
    residue_numbers: np.ndarray  # int [L]
    atoms: ContextAtoms | None = None  # the entry's other heavy atoms, when the source carries them
    residue_labels: np.ndarray | None = None  # int [L]: a class per residue, for models with residue labels
    side_chains: np.ndarray | None = None  # float32 [L, 31, 3], NaN where absent: side-chain context atoms
    source: str = ""  # the structure file it was read from, when known (evaluate re-reads its side chains)

    def __len__(self) -> int:
        return len(self.sequence)


def to_example(item: Any) -> Example:
    """Accepts a `ProteinChain`, a list of `ProteinChain` (one complex), a `ParsedEntry` (with its atoms), a
    dataset row, or an `Example`."""
    if isinstance(item, Example):
        return item
    if isinstance(item, ParsedEntry):
        example = to_example(item.chains)
        example.atoms = item.atoms
        return example
    if isinstance(item, ProteinChain):
        item = [item]
    if isinstance(item, (list, tuple)) and item and all(isinstance(c, ProteinChain) for c in item):
        source = Path(item[0].source).name if item[0].source else ""
        return Example(
            name=source,
            sequence="".join(c.sequence for c in item),
            coords=np.concatenate([c.coords for c in item]).astype(np.float32),
            chain_ids=[c.chain_id for c in item],
            chain_lengths=[len(c) for c in item],
            residue_numbers=np.concatenate([c.residue_numbers for c in item]),
            side_chains=(np.concatenate([c.side_chains for c in item])
                         if all(c.side_chains is not None for c in item) else None),
            source=str(item[0].source or ""),
        )
    if isinstance(item, Mapping):
        sequence = str(item["sequence"])
        coords = np.asarray(item["coords"], dtype=np.float32).reshape(len(sequence), 4, 3)
        lengths = [int(x) for x in item.get("chain_lengths", [len(sequence)])]
        chain_ids = [str(x) for x in item.get("chain_ids", [chr(65 + i) for i in range(len(lengths))])]
        numbers = item.get("residue_numbers")
        numbers = np.arange(1, len(sequence) + 1) if numbers is None else np.asarray(numbers)
        return Example(str(item.get("name", "")), sequence, coords, chain_ids, lengths, numbers, row_atoms(item),
                       source=str(item.get("source") or ""))
    raise TypeError(
        f"cannot make a model input from {type(item).__name__}; give a ProteinChain, a list of ProteinChain "
        "(one complex) or a dataset row"
    )


def row_atoms(row: Mapping) -> ContextAtoms | None:
    """A dataset row's context atoms, or None when the row was read without them."""
    if "atom_coords" not in row:
        return None
    return ContextAtoms(coords=np.asarray(row["atom_coords"], dtype=np.float32).reshape(-1, 3),
                        elements=[str(e) for e in row["atom_elements"]],
                        residue_names=[str(n) for n in row["atom_residue_names"]],
                        chain_ids=[str(c) for c in row["atom_chain_ids"]],
                        residue_numbers=np.asarray(row["atom_residue_numbers"], dtype=np.int32),
                        classes=np.asarray(row["atom_classes"], dtype=np.int8))


def atoms_near(atoms: ContextAtoms, coords: np.ndarray, radius: float = CONTEXT_CROP_RADIUS) -> ContextAtoms:
    """The atoms within ``radius`` of any backbone atom in ``coords`` ([L, 4, 3], NaN where missing)."""
    backbone = coords.reshape(-1, 3)
    backbone = backbone[np.isfinite(backbone).all(-1)]
    if len(atoms) == 0 or len(backbone) == 0:
        return subset_atoms(atoms, np.zeros(len(atoms), dtype=bool))
    near = np.zeros(len(atoms), dtype=bool)
    for start in range(0, len(backbone), 256):  # bounded memory on a ribosome's worth of atoms
        block = backbone[start:start + 256]
        distance = np.linalg.norm(atoms.coords[:, None, :] - block[None, :, :], axis=-1)
        near |= (distance <= radius).any(axis=1)
    return subset_atoms(atoms, near)


def subset_atoms(atoms: ContextAtoms, keep: np.ndarray) -> ContextAtoms:
    index = np.flatnonzero(keep)
    return ContextAtoms(coords=atoms.coords[index], elements=[atoms.elements[i] for i in index],
                        residue_names=[atoms.residue_names[i] for i in index],
                        chain_ids=[atoms.chain_ids[i] for i in index],
                        residue_numbers=atoms.residue_numbers[index], classes=atoms.classes[index])


def residue_index(numbers: np.ndarray, chain_lengths: Sequence[int]) -> np.ndarray:
    """Positions along each chain that keep gaps in the numbering (missing residues) but count an
    insertion code or a numbering restart as one step, so offsets between residues stay meaningful."""
    steps = np.diff(np.asarray(numbers, dtype=np.int64), prepend=0)
    steps = np.clip(steps, 1, 1000)
    index = np.empty(len(numbers), dtype=np.int64)
    start = 0
    for length in chain_lengths:
        segment = steps[start:start + length].copy()
        if length:
            segment[0] = 0
        index[start:start + length] = np.cumsum(segment)
        start += length
    return index


def crop(example: Example, max_length: int, rng: np.random.Generator) -> tuple[Example, np.ndarray]:
    """At most ``max_length`` residues: a contiguous window of a single chain, or for a complex the residues
    nearest (by CA) to a random residue, so that interfaces survive. Returns the crop and the kept positions."""
    length = len(example)
    if length <= max_length:
        return example, np.arange(length)
    if len(example.chain_lengths) == 1:
        start = int(rng.integers(0, length - max_length + 1))
        keep = np.arange(start, start + max_length)
    else:
        ca = example.coords[:, 1]
        valid = np.isfinite(ca).all(-1)
        center = ca[rng.choice(np.flatnonzero(valid))] if valid.any() else np.zeros(3)
        distance = np.where(valid, np.linalg.norm(np.nan_to_num(ca) - center, axis=-1), np.inf)
        keep = np.sort(np.argsort(distance, kind="stable")[:max_length])
    chain_of = np.repeat(np.arange(len(example.chain_lengths)), example.chain_lengths)[keep]
    kept_chains = [i for i in range(len(example.chain_lengths)) if (chain_of == i).any()]
    cropped = Example(
        name=example.name,
        sequence="".join(example.sequence[i] for i in keep),
        coords=example.coords[keep],
        chain_ids=[example.chain_ids[i] for i in kept_chains],
        chain_lengths=[int((chain_of == i).sum()) for i in kept_chains],
        residue_numbers=example.residue_numbers[keep],
        atoms=None if example.atoms is None else atoms_near(example.atoms, example.coords[keep]),
        residue_labels=_rows(example.residue_labels, keep), side_chains=_rows(example.side_chains, keep),
        source=example.source,
    )
    return cropped, keep


def _rows(per_residue: np.ndarray | None, index: np.ndarray) -> np.ndarray | None:
    return None if per_residue is None else per_residue[index]


def permute_chains(example: Example, order: Sequence[int]) -> Example:
    """The example with its chains concatenated in ``order`` (chain numbers of the original)."""
    starts = np.concatenate([[0], np.cumsum(example.chain_lengths)]).astype(int)
    index = np.concatenate([np.arange(starts[c], starts[c + 1]) for c in order]) if len(order) else np.arange(0)
    return Example(name=example.name, sequence="".join(example.sequence[i] for i in index),
                   coords=example.coords[index], chain_ids=[example.chain_ids[c] for c in order],
                   chain_lengths=[example.chain_lengths[c] for c in order],
                   residue_numbers=example.residue_numbers[index], atoms=example.atoms,
                   residue_labels=_rows(example.residue_labels, index), side_chains=_rows(example.side_chains, index),
                   source=example.source)


def mask_chains(
    token_ids: np.ndarray,
    scorable: np.ndarray,
    chain_lengths: Sequence[int],
    ratio: float | tuple[float, float],
    rng: np.random.Generator,
    mask_token_id: int,
    residue_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Hide ``round(ratio × scorable residues)`` positions of each chain (at least one when it has any).

    Of the chosen positions 80 % become the mask token, 10 % a random one of the 20 amino acids and 10 %
    stay as they are; labels hold the true residue there and -100 elsewhere. ``ratio`` may be a
    ``(low, high)`` range, drawn uniformly per chain. Returns ``(input_ids, labels)``.
    """
    input_ids = token_ids.copy()
    labels = np.full_like(token_ids, IGNORE_INDEX)
    residue_ids = np.asarray(residue_ids)
    start = 0
    for length in chain_lengths:
        candidates = start + np.flatnonzero(scorable[start:start + length])
        start += length
        if len(candidates) == 0:
            continue
        chain_ratio = rng.uniform(*ratio) if isinstance(ratio, tuple) else ratio
        count = min(len(candidates), max(1, int(np.floor(chain_ratio * len(candidates) + 0.5))))
        chosen = rng.choice(candidates, size=count, replace=False)
        labels[chosen] = token_ids[chosen]
        draw = rng.random(count)
        input_ids[chosen[draw < MASK_TOKEN_FRACTION]] = mask_token_id
        randomised = chosen[(draw >= MASK_TOKEN_FRACTION) & (draw < MASK_TOKEN_FRACTION + RANDOM_TOKEN_FRACTION)]
        input_ids[randomised] = rng.choice(residue_ids, size=len(randomised))
    return input_ids, labels


class ProtMaskProcessor:
    """Turns chains into the model's batch: ``input_ids, coords, attention_mask, residue_index, chain_index``
    and, when masking, ``labels``.

    ``processor(chains)`` treats each `ProteinChain` as its own example; ``processor([chains])`` makes one
    multi-chain example of them. Dataset rows work too. With ``mask=True`` every chain has
    ``round(mask_ratio × residues)`` residues hidden and scored (see `mask_chains`); ``seeds`` (one per
    example) make the masks and crops reproducible whatever the batch they land in. With
    ``objective="autoregressive"`` (ProteinMPNN's, for causal-decoder models) ``mask=True`` instead scores
    every residue, with a random decoding order per example as ``decoding_rank``. ``shuffle_chains`` puts
    the chains of each masked example in a random order first (ProteinMPNN's training does).
    """

    def __init__(
        self,
        tokenizer: ProtMaskTokenizer | None = None,
        mask_ratio: float = 0.15,
        mask_ratio_max: float | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = 8,
        seed: int = 0,
        objective: str = "masked",
        shuffle_chains: bool = False,
        backbone: str = "full",
        with_context: bool = False,
        return_positions: bool = False,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if return_positions and shuffle_chains:
            raise ValueError("return_positions maps batch columns to example residues: not with shuffle_chains")
        self.return_positions = return_positions  # add "positions": each column's residue in the example given
        self.objective = objective
        self.backbone = backbone  # residues without what the model reads (its config.backbone) are never scored
        self.shuffle_chains = shuffle_chains
        self.with_context = with_context  # add each example's context atoms (models with context_atoms)
        self.tokenizer = tokenizer or ProtMaskTokenizer()
        self.mask_ratio = mask_ratio
        self.mask_ratio_max = mask_ratio_max
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self._rng = np.random.default_rng(seed)
        vocab = self.tokenizer.get_vocab()
        self._lookup = np.full(128, self.tokenizer.unknown_residue_id, dtype=np.int64)
        for token, index in vocab.items():
            if len(token) == 1:
                self._lookup[ord(token)] = index
                self._lookup[ord(token.lower())] = index
        self._scorable_ids = np.asarray(self.tokenizer.amino_acid_ids)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "ProtMaskProcessor":
        """The tokenizer of a saved model folder, masking at the ratio the model was trained at."""
        tokenizer = ProtMaskTokenizer.from_pretrained(path)
        config_path = Path(path) / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            kwargs.setdefault("mask_ratio", config.get("mask_ratio", 0.15))
        return cls(tokenizer, **kwargs)

    @property
    def mask_range(self) -> float | tuple[float, float]:
        return (self.mask_ratio, self.mask_ratio_max) if self.mask_ratio_max else self.mask_ratio

    def encode_sequence(self, sequence: str) -> np.ndarray:
        codes = np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)
        return self._lookup[np.minimum(codes, 127)]

    def _normalise(self, examples) -> list[Example]:
        if isinstance(examples, (ProteinChain, Example, Mapping)):
            examples = [examples]
        return [to_example(item) for item in examples]

    def __call__(
        self,
        examples: Iterable[Any],
        mask: bool = False,
        seeds: Sequence[Any] | None = None,
        return_tensors: str = "pt",
    ) -> dict[str, Any]:
        examples = self._normalise(examples)
        if seeds is not None and len(seeds) != len(examples):
            raise ValueError(f"got {len(seeds)} seeds for {len(examples)} examples")
        rows = []
        for number, example in enumerate(examples):
            rng = np.random.default_rng(seeds[number]) if seeds is not None else self._rng
            if mask and self.shuffle_chains and len(example.chain_lengths) > 1:
                example = permute_chains(example, rng.permutation(len(example.chain_lengths)))
            index = residue_index(example.residue_numbers, example.chain_lengths)
            keep = np.arange(len(example))
            if self.max_length is not None and len(example) > self.max_length:
                example, keep = crop(example, self.max_length, rng)
                index = index[keep]
            token_ids = self.encode_sequence(example.sequence)
            rows.append((example, token_ids, index, rng, keep))

        width = max((len(e) for e, *_ in rows), default=0)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids = np.full((batch_size, width), pad_id, dtype=np.int64)
        coords = np.full((batch_size, width, 4, 3), np.nan, dtype=np.float32)
        attention_mask = np.zeros((batch_size, width), dtype=np.int64)
        index_array = np.zeros((batch_size, width), dtype=np.int64)
        chain_array = np.full((batch_size, width), -1, dtype=np.int64)
        labels = np.full((batch_size, width), IGNORE_INDEX, dtype=np.int64) if mask else None
        ordered = mask and self.objective == "autoregressive"
        decoding_rank = np.full((batch_size, width), 2 * width, dtype=np.int64) if ordered else None
        positions = np.full((batch_size, width), -1, dtype=np.int64) if self.return_positions else None
        for b, (example, token_ids, index, rng, keep) in enumerate(rows):
            if positions is not None:
                positions[b, :len(keep)] = keep
            length = len(example)
            input_ids[b, :length] = token_ids
            coords[b, :length] = example.coords
            attention_mask[b, :length] = 1
            index_array[b, :length] = index
            chain_array[b, :length] = np.repeat(np.arange(len(example.chain_lengths)), example.chain_lengths)
            if ordered:
                scorable = has_backbone(example.coords, self.backbone) & np.isin(token_ids, self._scorable_ids)
                labels[b, :length] = np.where(scorable, token_ids, IGNORE_INDEX)
                decoding_rank[b, :length] = rng.permutation(length)
            elif mask:
                scorable = has_backbone(example.coords, self.backbone) & np.isin(token_ids, self._scorable_ids)
                input_ids[b, :length], labels[b, :length] = mask_chains(
                    token_ids, scorable, example.chain_lengths, self.mask_range, rng,
                    self.tokenizer.mask_token_id, self._scorable_ids)
        batch = {
            "input_ids": input_ids,
            "coords": coords,
            "attention_mask": attention_mask,
            "residue_index": index_array,
            "chain_index": chain_array,
        }
        if mask:
            batch["labels"] = labels
        if ordered:
            batch["decoding_rank"] = decoding_rank
        if self.with_context:
            batch.update(context_arrays([example.atoms for example, *_ in rows]))
            if any(example.side_chains is not None for example, *_ in rows):
                batch.update(side_chain_arrays([example.side_chains for example, *_ in rows], width))
        if positions is not None:
            batch["positions"] = positions
        if any(example.residue_labels is not None for example, *_ in rows):
            batch["residue_labels"] = np.zeros((batch_size, width), dtype=np.int64)
            for b, (example, *_) in enumerate(rows):
                if example.residue_labels is not None:
                    batch["residue_labels"][b, :len(example)] = example.residue_labels
        if return_tensors == "pt":
            batch = {key: torch.from_numpy(value) for key, value in batch.items()}
        elif return_tensors != "np":
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        return batch


def context_arrays(atoms: Sequence[ContextAtoms | None]) -> dict[str, np.ndarray]:
    """Each example's context atoms padded to one width: ``context_coords`` ``[B, M, 3]``, ``context_elements``
    ``[B, M]`` (atomic numbers), ``context_mask`` ``[B, M]`` and ``context_classes`` ``[B, M]``. An example without atoms (or without a source
    of them) is all padding; atoms of an unknown element are left out, as LigandMPNN does."""
    kept = []
    for group in atoms:
        if group is None or len(group) == 0:
            kept.append((np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        numbers = np.array([atomic_number(e) for e in group.elements], dtype=np.int64)
        known = (numbers > 0) & np.isfinite(group.coords).all(-1)
        kept.append((group.coords[known], numbers[known], group.classes[known].astype(np.int64)))
    width = max((len(n) for _, n, _ in kept), default=0)
    coords = np.zeros((len(kept), width, 3), np.float32)
    elements = np.zeros((len(kept), width), np.int64)
    classes = np.full((len(kept), width), -1, np.int64)
    mask = np.zeros((len(kept), width), bool)
    for b, (xyz, numbers, kinds) in enumerate(kept):
        n = len(numbers)
        coords[b, :n], elements[b, :n], classes[b, :n], mask[b, :n] = xyz, numbers, kinds, True
    # context_classes (index into structure.ATOM_CLASSES, -1 padding) is for site metrics; models ignore it.
    return {"context_coords": coords, "context_elements": elements, "context_mask": mask, "context_classes": classes}


def side_chain_arrays(side_chains: Sequence[np.ndarray | None], width: int) -> dict[str, np.ndarray]:
    """``side_chain_coords`` ``[B, W, 31, 3]`` (0 where absent) and ``side_chain_mask`` ``[B, W, 31]``: the
    side-chain atoms a context model may read (an example without them has none)."""
    coords = np.zeros((len(side_chains), width, len(SIDE_CHAIN_ATOMS), 3), dtype=np.float32)
    mask = np.zeros(coords.shape[:3], dtype=bool)
    for b, atoms in enumerate(side_chains):
        if atoms is not None:
            present = np.isfinite(atoms).all(-1)
            coords[b, :len(atoms)] = np.where(present[..., None], atoms, 0.0)
            mask[b, :len(atoms)] = present
    return {"side_chain_coords": coords, "side_chain_mask": mask}


class StructureDataset(torch.utils.data.Dataset):
    """A built split served as numpy rows, read in one batched call per batch.

    Keys may be plain indices or ``(index, epoch)`` pairs from the training sampler; the pair travels to
    the collator so that masks depend on (seed, epoch, example) and not on workers or batch boundaries.
    """

    def __init__(self, hf_dataset, with_atoms: bool = False):
        # Only the columns the examples use: a row's context atoms can outweigh its residues many times.
        columns = [c for c in RESIDUE_COLUMNS + (ATOM_COLUMNS if with_atoms else ()) if c in hf_dataset.column_names]
        self.data = hf_dataset.select_columns(columns).with_format("numpy")

    def __len__(self) -> int:
        return len(self.data)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.data["length"])

    def __getitems__(self, keys):
        if not keys:
            return []
        pairs = [key if isinstance(key, tuple) else (int(key), None) for key in keys]
        rows = self.data.__getitems__([index for index, _ in pairs])
        for row, (index, epoch) in zip(rows, pairs):
            row["_index"], row["_epoch"] = index, epoch
        return rows

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


class MaskingCollator:
    """The training / validation collate function: masks with seeds derived from (seed, epoch, example).

    Validation rows carry no epoch, so their masks are the same at every evaluation and on any number of
    ranks. An empty key list (padding that keeps validation batches a multiple of the ranks) gives None.
    """

    def __init__(self, processor: ProtMaskProcessor, seed: int = 0):
        self.processor = processor
        self.seed = seed

    def __call__(self, rows):
        if not rows:
            return None
        seeds = [(self.seed, int(r["_index"])) if r.get("_epoch") is None else (self.seed, int(r["_index"]), int(r["_epoch"]))
                 for r in rows]
        return self.processor(rows, mask=True, seeds=seeds)
