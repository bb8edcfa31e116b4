"""Using a trained model: design or fill in sequences for a backbone (iterative mask-predict decoding), and
evaluate a checkpoint on structure files in the field's own metrics."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.collator import Example, ProtMaskProcessor, to_example
from .metrics import MaskedLMStats
from .residues import AMINO_ACIDS
from .structure import ProteinChain, StructureError, parse_structure

MASK_CHARACTERS = "_?-*"
LENGTH_BUCKETS = (("<100", 0, 100), ("100-300", 100, 301), (">300", 301, 10**9))


class DesignError(ValueError):
    """A design request that cannot be met; says which option and why."""


def load_model(path, device=None):
    """A saved model folder (or hub id) → (model in eval mode, processor masking at its training ratio)."""
    import protmask  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForMaskedLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    processor = ProtMaskProcessor(tokenizer, mask_ratio=model.config.mask_ratio)
    return model, processor


@torch.no_grad()
def mask_predict(model, batch: dict, designable: torch.Tensor, processor: ProtMaskProcessor, rounds: int = 10,
                 temperature: float = 0.0, generator: torch.Generator | None = None):
    """Fill the ``designable`` positions of ``batch`` by iterative mask-predict decoding.

    All designable positions start hidden. Each round predicts every hidden position, draws a residue
    (argmax at temperature 0, else a sample from the tempered distribution over the 20 amino acids) and
    commits the most confident 1/(rounds left) of them; the rest are predicted again with more of the
    sequence visible. The structure encoder runs once. Returns ``(tokens, probability)``: the filled ids and,
    at each designed position, the model's probability of its residue when it was committed.
    """
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids, device=batch["input_ids"].device)
    mask_id = processor.tokenizer.mask_token_id
    structure = model.protmask.encode_structure(batch["coords"], batch["attention_mask"], batch["residue_index"],
                                                batch["chain_index"])
    tokens = batch["input_ids"].clone()
    tokens[designable] = mask_id
    remaining = designable.clone()
    probability = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    rounds = max(1, rounds)
    for round_number in range(rounds):
        if not bool(remaining.any()):
            break
        logits = model.logits_from_structure(tokens, structure)[..., allowed].float()
        probabilities = logits.softmax(-1)
        if temperature > 0:
            tempered = (logits / temperature).softmax(-1)
            flat = tempered.reshape(-1, len(allowed))
            choice = torch.multinomial(flat, 1, generator=generator).view(tokens.shape)
            confidence = tempered.gather(-1, choice[..., None])[..., 0]
        else:
            choice = probabilities.argmax(-1)
            confidence = probabilities.gather(-1, choice[..., None])[..., 0]
        counts = remaining.sum(-1)
        commit_counts = torch.ceil(counts.float() / (rounds - round_number)).long()
        confidence = confidence.masked_fill(~remaining, -1.0)
        ranks = confidence.argsort(-1, descending=True).argsort(-1)
        commit = remaining & (ranks < commit_counts[:, None])
        tokens[commit] = allowed[choice[commit]]
        probability[commit] = probabilities.gather(-1, choice[..., None])[..., 0][commit]
        remaining &= ~commit
    return tokens, probability


# ----------------------------------------------------------------------------------------------- design

@dataclass
class Design:
    sequence: str            # the designed chains, joined with "/"
    recovery: float          # identity to the native residues at designed positions
    mean_probability: float  # mean model probability of the chosen residues
    seed: int
    temperature: float
    positions: list = field(default_factory=list)  # (chain, residue id, native, designed, probability)


@dataclass
class DesignResult:
    name: str
    chain_ids: list[str]
    native: str              # the native sequence of the designed chains, joined with "/"
    designs: list[Design]
    designed_positions: int


def parse_fix(text: str | None, chains: Sequence[ProteinChain]) -> set[tuple[str, int]]:
    """``"A1-10,A45,B52A"`` → {(chain index, position)}: residues kept native. Numbers are the file's."""
    if not text:
        return set()
    keep = set()
    by_id = {c.chain_id: i for i, c in enumerate(chains)}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"([A-Za-z0-9]+?)(-?\d+)([A-Za-z]?)(?:-(-?\d+)([A-Za-z]?))?", item)
        if not match or match.group(1) not in by_id:
            known = ", ".join(by_id)
            raise DesignError(f"--fix {item!r}: write CHAIN+NUMBER or CHAIN+FIRST-LAST, e.g. A12 or A1-10 "
                              f"(chains in this file: {known})")
        chain_index = by_id[match.group(1)]
        chain = chains[chain_index]
        first, icode = int(match.group(2)), match.group(3)
        last = int(match.group(4)) if match.group(4) else None
        found = False
        for position, (number, code) in enumerate(zip(chain.residue_numbers.tolist(), chain.insertion_codes)):
            code = code.strip()
            hit = (first <= number <= last) if last is not None else (number == first and code == icode)
            if hit:
                keep.add((chain_index, position))
                found = True
        if not found:
            raise DesignError(f"--fix {item!r}: no such residue in chain {match.group(1)}")
    return keep


def design_sequences(
    model,
    processor: ProtMaskProcessor,
    pdb,
    chains: Sequence[str] | None = None,
    fix: str | None = None,
    fill: str | None = None,
    num_samples: int = 1,
    temperature: float = 0.1,
    seed: int = 0,
    rounds: int = 10,
) -> DesignResult:
    """Design sequences for chains of a structure file (or a list of `ProteinChain`).

    ``chains`` picks the chains to design (default all; the others stay visible as context). ``fix`` keeps
    native residues (``"A1-10,A45"``). ``fill`` is a sequence for the designed chains (joined with "/",
    or without separators) where ``_`` (or ``?``, ``-``, ``*``, ``<mask>``) marks the positions to fill:
    only those are designed, the letters given are used as written. Residues without a complete backbone
    cannot be designed and keep their native letter. Deterministic for a seed.
    """
    structure = parse_structure(pdb) if isinstance(pdb, (str, Path)) else list(pdb)
    all_ids = [c.chain_id for c in structure]
    chosen = list(chains) if chains else all_ids
    missing = [c for c in chosen if c not in all_ids]
    if missing:
        raise DesignError(f"--chains {','.join(missing)}: not in the structure (it has {', '.join(all_ids)})")
    example = to_example(structure)
    batch = processor([example])
    length = len(example)
    chain_of = np.repeat(np.arange(len(structure)), [len(c) for c in structure])
    position_in_chain = np.concatenate([np.arange(len(c)) for c in structure])
    designed_chain = np.isin(chain_of, [all_ids.index(c) for c in chosen])
    complete = np.isfinite(example.coords).all(axis=(1, 2))
    designable = designed_chain & complete
    fixed = parse_fix(fix, structure)
    for chain_index, position in fixed:
        designable[np.flatnonzero((chain_of == chain_index) & (position_in_chain == position))] = False

    input_ids = batch["input_ids"].clone()
    if fill is not None:
        text = fill.replace("<mask>", "_").replace("/", "").replace(" ", "")
        target = int(designed_chain.sum())
        if len(text) != target:
            raise DesignError(f"--fill has {len(text)} residues; the designed chains ({','.join(chosen)}) have {target}")
        hidden = np.zeros(length, dtype=bool)
        hidden[np.flatnonzero(designed_chain)] = [c in MASK_CHARACTERS for c in text]
        letters = [c for c in text]
        for offset, index in enumerate(np.flatnonzero(designed_chain)):
            if letters[offset] not in MASK_CHARACTERS:
                input_ids[0, index] = int(processor.encode_sequence(letters[offset])[0])
        designable &= hidden
        if not designable.any():
            raise DesignError("--fill masks no position that has a complete backbone; mark positions with _")

    designable_tensor = torch.zeros(input_ids.shape, dtype=torch.bool)
    designable_tensor[0, :length] = torch.from_numpy(designable)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["input_ids"] = input_ids.to(device)
    native_letters = np.array(list(example.sequence))
    designs = []
    for sample in range(num_samples):
        generator = torch.Generator(device=device).manual_seed(seed + sample)
        tokens, probability = mask_predict(model, batch, designable_tensor.to(device), processor, rounds, temperature,
                                           generator)
        letters = np.array(processor.tokenizer.convert_ids_to_tokens(tokens[0, :length].tolist()))
        scored = designable & np.isin(native_letters, list(AMINO_ACIDS))
        recovery = float((letters[scored] == native_letters[scored]).mean()) if scored.any() else float("nan")
        probs = probability[0, :length].cpu().numpy()
        positions = [(structure[chain_of[i]].chain_id, structure[chain_of[i]].residue_ids[position_in_chain[i]],
                      native_letters[i], letters[i], float(probs[i])) for i in np.flatnonzero(designable)]
        sequence = "/".join("".join(letters[chain_of == all_ids.index(c)]) for c in chosen)
        designs.append(Design(sequence, recovery, float(probs[designable].mean()), seed + sample, temperature, positions))
    native = "/".join(structure[all_ids.index(c)].sequence for c in chosen)
    name = Path(structure[0].source).name if structure[0].source else "structure"
    return DesignResult(name, chosen, native, designs, int(designable.sum()))


def write_fasta(result: DesignResult, path) -> None:
    stem = re.sub(r"\.(pdb|ent|cif|mmcif)(\.gz)?$", "", result.name)
    lines = [f">{stem}_native chains={','.join(result.chain_ids)} designed_positions={result.designed_positions}",
             result.native]
    for number, item in enumerate(result.designs, 1):
        lines.append(f">{stem}_design_{number} seed={item.seed} temperature={item.temperature:g} "
                     f"recovery={item.recovery:.4f} mean_probability={item.mean_probability:.4f}")
        lines.append(item.sequence)
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- evaluate

def examples_from(pdb_path, split: str | None = None, min_length: int = 20):
    """(examples, failed files) from a built dataset (one split or all), or from structure files."""
    from .data.build import BuildOptions, filter_chains, find_structure_files, is_built_dataset, load_built

    if isinstance(pdb_path, (str, Path)) and is_built_dataset(pdb_path):
        dataset = load_built(pdb_path).dataset
        splits = [split] if split else list(dataset)
        rows = [row for name in splits for row in dataset[name].with_format("numpy")]
        return [to_example(row) for row in rows], []
    files, _ = find_structure_files(pdb_path)
    examples, failed = [], []
    options = BuildOptions(min_length=min_length)
    for path in files:
        try:
            kept, _ = filter_chains(parse_structure(path), options)
        except StructureError as error:
            failed.append({"file": str(path), "error": error.reason})
            continue
        if kept:
            examples.append(to_example(kept))
        else:
            failed.append({"file": str(path), "error": "no chain passed the filters (see build_report.json rules)"})
    return examples, failed


@torch.no_grad()
def evaluate(model, processor: ProtMaskProcessor, examples: list[Example], max_tokens: int = 4000,
             rounds: int = 10, seed: int = 0, max_length: int | None = None, progress=None) -> dict:
    """Teacher-forced and design metrics over ``examples``, with baselines on the same chains."""
    from .data.sampler import LengthBucketBatchSampler

    device = next(model.parameters()).device
    processor = ProtMaskProcessor(processor.tokenizer, mask_ratio=model.config.mask_ratio, max_length=max_length)
    lengths = [min(len(e), max_length or 10**9) for e in examples]
    longest = max(lengths) if lengths else 0
    sampler = LengthBucketBatchSampler(lengths, max_tokens=max(max_tokens, -(-longest // 8) * 8), shuffle=False)
    stats = MaskedLMStats(device=device)
    masked_native = []
    chain_rows = []
    for batch_indices in sampler.batches():
        chunk = [examples[i] for i in batch_indices]
        teacher = processor(chunk, mask=True, seeds=[(seed, i) for i in batch_indices])
        teacher = {k: v.to(device) for k, v in teacher.items()}
        logits = model(**{k: v for k, v in teacher.items() if k != "labels"}).logits
        stats.update(logits, teacher["labels"], teacher["chain_index"])
        masked_native += teacher["labels"][teacher["labels"] != -100].tolist()

        full = processor(chunk, seeds=[(seed, i) for i in batch_indices])
        full = {k: v.to(device) for k, v in full.items()}
        scorable = torch.isin(full["input_ids"], torch.tensor(processor.tokenizer.amino_acid_ids, device=device))
        designable = scorable & torch.isfinite(full["coords"]).all(-1).all(-1) & (full["attention_mask"] > 0)
        tokens, _ = mask_predict(model, full, designable, processor, rounds=rounds, temperature=0.0)
        hits = (tokens == full["input_ids"]) & designable
        for b, index in enumerate(batch_indices):
            for chain in full["chain_index"][b].unique().tolist():
                if chain < 0:
                    continue
                where = (full["chain_index"][b] == chain) & designable[b]
                count = int(where.sum())
                if count == 0:
                    continue
                chain_rows.append({"example": examples[index].name, "chain": examples[index].chain_ids[chain]
                                   if chain < len(examples[index].chain_ids) else str(chain),
                                   "length": count, "recovery": float(hits[b][where].sum()) / count,
                                   "native": full["input_ids"][b][where].tolist()})
        if progress:
            progress(len(chain_rows))

    teacher_forced = stats.reduce()
    recoveries = np.array([row["recovery"] for row in chain_rows]) if chain_rows else np.array([np.nan])
    residues_of = processor.tokenizer.convert_ids_to_tokens
    all_native = [t for row in chain_rows for t in row["native"]]
    most_frequent_id = max(set(all_native), key=all_native.count) if all_native else None
    most_frequent_recovery = np.array([np.mean(np.array(row["native"]) == most_frequent_id) for row in chain_rows]) \
        if chain_rows else np.array([np.nan])
    masked_most_frequent = (np.mean(np.array(masked_native) == most_frequent_id) if masked_native else float("nan"))
    buckets = {}
    for label, low, high in LENGTH_BUCKETS:
        values = [row["recovery"] for row in chain_rows if low <= row["length"] < high]
        buckets[label] = {"num_chains": len(values),
                          "design_recovery_mean": float(np.mean(values)) if values else None,
                          "design_recovery_median": float(np.median(values)) if values else None}
    return {
        "num_structures": len(examples),
        "num_chains": len(chain_rows),
        "mask_ratio": model.config.mask_ratio,
        "masked_residues": teacher_forced["tokens"],
        "masked_accuracy": teacher_forced["accuracy"],
        "perplexity": teacher_forced["perplexity"],
        "masked_loss": teacher_forced["loss"],
        "masked_recovery_per_chain_mean": teacher_forced["recovery"],
        "design_rounds": rounds,
        "design_recovery_mean": float(np.nanmean(recoveries)),
        "design_recovery_median": float(np.nanmedian(recoveries)),
        "design_recovery_by_length": buckets,
        "baselines": {
            "uniform_random": {"masked_accuracy": 1 / 20, "design_recovery_mean": 1 / 20,
                               "design_recovery_median": 1 / 20, "perplexity": 20.0},
            "most_frequent_residue": {
                "residue": residues_of(most_frequent_id) if most_frequent_id is not None else None,
                "masked_accuracy": float(masked_most_frequent),
                "design_recovery_mean": float(np.nanmean(most_frequent_recovery)),
                "design_recovery_median": float(np.nanmedian(most_frequent_recovery)),
            },
        },
        "chains": [{k: v for k, v in row.items() if k != "native"} for row in chain_rows],
    }


def format_table(metrics: dict) -> str:
    most = metrics["baselines"]["most_frequent_residue"]
    rows = [
        ("structures / chains", f"{metrics['num_structures']} / {metrics['num_chains']}", "", ""),
        (f"masked accuracy (ratio {metrics['mask_ratio']:g})", f"{metrics['masked_accuracy']:.4f}", "0.0500",
         f"{most['masked_accuracy']:.4f}"),
        ("perplexity (masked)", f"{metrics['perplexity']:.3f}", "20.000", ""),
        ("design recovery, mean over chains", f"{metrics['design_recovery_mean']:.4f}", "0.0500",
         f"{most['design_recovery_mean']:.4f}"),
        ("design recovery, median over chains", f"{metrics['design_recovery_median']:.4f}", "0.0500",
         f"{most['design_recovery_median']:.4f}"),
    ]
    for label, bucket in metrics["design_recovery_by_length"].items():
        value = "-" if bucket["design_recovery_mean"] is None else f"{bucket['design_recovery_mean']:.4f}"
        rows.append((f"  chains {label} residues ({bucket['num_chains']})", value, "", ""))
    header = ("metric", "model", "random", f"most frequent ({most['residue']})")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


__all__ = ["load_model", "mask_predict", "design_sequences", "write_fasta", "evaluate", "examples_from", "format_table",
           "DesignError"]
