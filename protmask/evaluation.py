"""`evaluate`: a model's metrics on structure files (or a built split) in the field's own terms, with
baselines on the same chains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.collator import ATOM_COLUMNS, RESIDUE_COLUMNS, Example, ProtMaskProcessor, to_example
from .design.decoding import decode
from .design.scoring import CONTEXT, ranked_log_probs
from .metrics import IGNORE_INDEX, SITE_CLASSES, SITE_DEFINITIONS, MaskedLMStats, binding_sites, side_chain_sites
from .residues import has_backbone
from .structure import ATOM_CLASSES, StructureError, parse_entry

_CONTEXT_KEYS = ("context_coords", "context_elements", "context_mask")

LENGTH_BUCKETS = (("<100", 0, 100), ("100-300", 100, 301), (">300", 301, 10**9))


#: evaluate's default crop: a 100 000-residue complex would otherwise need a batch, and a distance matrix, of
#: its whole length. Longer examples are cropped as in training (--max_length 0 turns it off).
EVALUATE_MAX_LENGTH = 1024


class SplitExamples:
    """The rows of built splits as examples, read from the memory-mapped Arrow files a batch at a time: a
    split is never held in memory at once."""

    def __init__(self, splits, with_atoms: bool = True):
        columns = RESIDUE_COLUMNS + ("source",) + (ATOM_COLUMNS if with_atoms else ())
        self.atoms_and_sources = [split.select_columns([c for c in ("name", "source", "num_atoms")
                                                        if c in split.column_names]) for split in splits]
        self.splits = [split.select_columns([c for c in columns if c in split.column_names]).with_format("numpy")
                       for split in splits]
        self.offsets = np.cumsum([0] + [len(split) for split in self.splits])
        self.lengths = np.concatenate([np.asarray(split["length"]) for split in self.splits]) if self.splits else []

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Example:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return to_example(self.splits[part][int(index - self.offsets[part])])

    def sources_with_atoms(self) -> list[tuple[str, str]]:
        """(name, source file) of every example with non-protein atoms, from three columns (not the rows)."""
        found = []
        for split in self.atoms_and_sources:
            if "num_atoms" not in split.column_names:
                continue
            names, sources = split["name"], split["source"] if "source" in split.column_names else None
            for i in np.flatnonzero(np.asarray(split["num_atoms"]) > 0).tolist():
                found.append((names[i], sources[i] if sources is not None else ""))
        return found


def unreadable_sources(examples) -> list[tuple[str, str]]:
    """(name, source) of the examples with non-protein atoms whose structure file is not there: the paper's
    site rule re-reads their side chains (a built dataset keeps backbones only)."""
    pairs = (examples.sources_with_atoms() if isinstance(examples, SplitExamples) else
             [(e.name, e.source) for e in examples if e.atoms is not None and len(e.atoms)])
    return [(name, source) for name, source in pairs if not source or not Path(source).is_file()]


def side_chain_site_classes(example: Example) -> np.ndarray:
    """``[L, 3]`` bool: the LigandMPNN paper's binding sites of the example's residues among its atoms
    (`metrics.side_chain_sites`), with side chains read from its structure file (``example.source``).
    Raises `StructureError` when the file no longer holds the example's chains as they were built."""
    sites = np.zeros((len(example), len(SITE_CLASSES)), dtype=bool)
    if example.atoms is None or len(example.atoms) == 0:
        return sites
    chains = {chain.chain_id: chain for chain in parse_entry(example.source, side_chains=True).chains}
    start = 0
    for chain_id, length in zip(example.chain_ids, example.chain_lengths):
        chain, end = chains.get(chain_id), start + length
        if (chain is None or chain.sequence != example.sequence[start:end]
                or not np.array_equal(chain.residue_numbers, example.residue_numbers[start:end])):
            raise StructureError(example.source, f"chain {chain_id} is not the one in the dataset (the file changed "
                                                 "since the build): rebuild, or pass --site_definition virtual_cb")
        side_chain = np.concatenate([chain.cb[:, None], chain.side_chains], axis=1)
        sites[start:end] = side_chain_sites(side_chain, example.atoms.coords, example.atoms.classes)
        start = end
    return sites


def examples_from(pdb_path, split: str | None = None, min_length: int = 20, backbone: str = "full", context=None):
    """(examples, failed files) from a built dataset (one split or all, read lazily), or from structure files
    (parsed into memory: for large sets, build a dataset first), each with its non-protein atoms (the binding
    sites, and a context model's input). ``backbone``: what the model reads of a residue (its config.backbone);
    "ca" keeps CA traces. ``context``: a `ContextChoice` of the atoms to keep (structure files only)."""
    from .data.build import (BuildOptions, DatasetBuildError, filter_chains, find_structure_files, is_built_dataset,
                             load_built)
    from .design.context import choose_context_atoms

    if isinstance(pdb_path, (str, Path)) and is_built_dataset(pdb_path):
        dataset = load_built(pdb_path).dataset
        if split and split not in dataset:
            raise DatasetBuildError(f"--split {split}: {pdb_path} has the splits {', '.join(dataset)}")
        splits = [split] if split else list(dataset)
        return SplitExamples([dataset[name] for name in splits]), []
    if split:
        raise DatasetBuildError(f"--split {split} needs a built dataset (protmask build-dataset prints its folder); "
                                f"{pdb_path} is structure files")
    files, _ = find_structure_files(pdb_path)
    examples, failed = [], []
    options = BuildOptions(min_length=min_length, backbone=backbone)
    for path in files:
        try:
            entry = parse_entry(path)
            kept, _ = filter_chains(entry.chains, options)
        except StructureError as error:
            failed.append({"file": str(path), "error": error.reason})
            continue
        if kept:
            example = to_example(kept)
            example.atoms = entry.atoms if context is None else choose_context_atoms(entry.atoms, context, path)
            examples.append(example)
        else:
            failed.append({"file": str(path), "error": "no chain passed the filters (see build_report.json rules)"})
    return examples, failed


@torch.no_grad()
def evaluate(model, processor: ProtMaskProcessor, examples, max_tokens: int = 4000,
             rounds: int = 10, seed: int = 0, max_length: int | None = EVALUATE_MAX_LENGTH, progress=None,
             decoding: str = "mask_predict", use_context: bool = True, site_definition: str = "side_chain") -> dict:
    """Masked, autoregressive teacher-forced and design metrics over ``examples``, with baselines on the
    same chains. ``decoding`` is how the designs are made (greedy): ``mask_predict`` or ``autoregressive``.
    ``examples``: a list of examples or `SplitExamples`; longer ones are cropped to ``max_length`` (None: not).
    ``site_definition``: a key of `metrics.SITE_DEFINITIONS`; with ``side_chain`` (the paper's rule) the sites
    by ``virtual_cb`` are reported too."""
    from .data.sampler import LengthBucketBatchSampler

    if site_definition not in SITE_DEFINITIONS:
        raise ValueError(f"site_definition {site_definition!r}: one of {', '.join(SITE_DEFINITIONS)}")
    if site_definition == "side_chain" and (missing := unreadable_sources(examples)):
        raise StructureError(missing[0][1] or missing[0][0], f"the paper's site rule reads side chains from the "
                             f"structure files, and {len(missing)} are not there: restore them, or use virtual_cb")

    device = next(model.parameters()).device
    # Every batch carries the atoms (binding sites are measured for any model); a context model reads them
    # unless use_context is False.
    processor = ProtMaskProcessor(processor.tokenizer, mask_ratio=model.config.mask_ratio, max_length=max_length,
                                  backbone=model.config.backbone, with_context=True, return_positions=True)
    model_keys = lambda batch: {k: v for k, v in batch.items()  # noqa: E731
                                if k not in ("labels", "positions", "context_classes")
                                and (use_context or k not in _CONTEXT_KEYS)}
    full_lengths = examples.lengths if isinstance(examples, SplitExamples) else [len(e) for e in examples]
    lengths = [min(int(n), max_length or 10**9) for n in full_lengths]
    longest = max(lengths) if lengths else 0
    sampler = LengthBucketBatchSampler(lengths, max_tokens=max(max_tokens, -(-longest // 8) * 8), shuffle=False)
    stats = MaskedLMStats(device=device)
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids, device=device)
    masked_native = []
    chain_rows = []
    ordered = np.zeros(2)  # negative log-likelihood sum, residues predicted right: over all residues, random order
    ordered_count = 0
    generator = torch.Generator().manual_seed(seed)
    for batch_indices in sampler.batches():
        chunk = [examples[i] for i in batch_indices]  # each example is read once a batch
        teacher = processor(chunk, mask=True, seeds=[(seed, i) for i in batch_indices])
        teacher = {k: v.to(device) for k, v in teacher.items()}
        logits = model(**model_keys(teacher)).logits
        stats.update(logits, teacher["labels"], teacher["chain_index"])
        masked_native += teacher["labels"][teacher["labels"] != IGNORE_INDEX].tolist()

        full = processor(chunk, seeds=[(seed, i) for i in batch_indices])
        full = {k: v.to(device) for k, v in full.items()}
        sites = {"virtual_cb": binding_sites(full)}  # [B, L, classes], before the model's view drops the atoms
        positions = full.pop("positions")
        if site_definition == "side_chain":
            sites["side_chain"] = _at_positions([side_chain_site_classes(e) for e in chunk], positions)
        full = model_keys(full)
        scorable = torch.isin(full["input_ids"], allowed)
        designable = scorable & has_backbone(full["coords"], model.config.backbone) & (full["attention_mask"] > 0)
        unit_of = torch.full(designable.shape, -1, dtype=torch.long, device=device)
        unit_of[designable] = torch.arange(int(designable.sum()), device=device)
        tokens = decode(model, full, unit_of, designable, allowed, processor.tokenizer.mask_token_id,
                        decoding=decoding, rounds=rounds, generator=generator).tokens
        for b, index in enumerate(batch_indices):
            totals, count = _ordered_likelihood(model, {k: v[b:b + 1] for k, v in full.items()}, designable[b],
                                                allowed, processor.tokenizer.mask_token_id, (seed, index))
            ordered += totals
            ordered_count += count
        hits = (tokens == full["input_ids"]) & designable
        for b, index in enumerate(batch_indices):
            for chain in full["chain_index"][b].unique().tolist():
                if chain < 0:
                    continue
                where = (full["chain_index"][b] == chain) & designable[b]
                count = int(where.sum())
                if count == 0:
                    continue
                example = chunk[b]
                row = {"example": example.name,
                       "chain": example.chain_ids[chain] if chain < len(example.chain_ids) else str(chain),
                       "length": count, "recovery": float(hits[b][where].sum()) / count,
                       "native": full["input_ids"][b][where].tolist(),
                       **residue_detail(example, positions[b][where], full["input_ids"][b][where], tokens[b][where],
                                        sites[site_definition][b][where], processor.tokenizer)}
                if site_definition != "virtual_cb":
                    row["site_classes_virtual_cb"] = site_indices(sites["virtual_cb"][b][where])
                chain_rows.append(row)
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
        "teacher_forced_residues": ordered_count,
        "teacher_forced_accuracy": float(ordered[1] / ordered_count) if ordered_count else float("nan"),
        "teacher_forced_perplexity": float(np.exp(ordered[0] / ordered_count)) if ordered_count else float("nan"),
        "design_decoding": decoding,
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
        "design_recovery_at_sites": site_recovery(chain_rows),
        "site_definition": SITE_DEFINITIONS[site_definition],
        **({"design_recovery_at_sites_virtual_cb": site_recovery(chain_rows, "site_classes_virtual_cb"),
            "site_definition_virtual_cb": SITE_DEFINITIONS["virtual_cb"]} if site_definition != "virtual_cb" else {}),
        "chains": [{k: v for k, v in row.items() if k != "native"} for row in chain_rows],
    }


def residue_detail(example: Example, positions, native, designed, sites, tokenizer) -> dict:
    """A chain row's residues: labels (chain and number), native and designed letters, and the site classes
    of each (so that any other site definition can be computed from the row)."""
    numbers = example.residue_numbers[positions.cpu().numpy()]
    chain_of = np.repeat(np.arange(len(example.chain_lengths)), example.chain_lengths)[positions.cpu().numpy()]
    return {"residues": [f"{example.chain_ids[c]}{n}" for c, n in zip(chain_of.tolist(), numbers.tolist())],
            "native_letters": "".join(tokenizer.convert_ids_to_tokens(native.tolist())),
            "designed_letters": "".join(tokenizer.convert_ids_to_tokens(designed.tolist())),
            "site_classes": site_indices(sites)}


def site_indices(sites: torch.Tensor) -> dict:
    """A row's ``[n, classes]`` site flags as {class: the row's indices at such a site}, classes with any."""
    return {name: sites[:, i].nonzero().flatten().tolist() for i, name in enumerate(ATOM_CLASSES) if sites[:, i].any()}


def _at_positions(per_example: list, positions: torch.Tensor) -> torch.Tensor:
    """``[B, W, classes]``: each example's per-residue flags at the batch's columns (-1: padding, False)."""
    out = torch.zeros(*positions.shape, len(SITE_CLASSES), dtype=torch.bool, device=positions.device)
    for b, flags in enumerate(per_example):
        valid = positions[b] >= 0
        out[b, valid] = torch.from_numpy(flags[positions[b][valid].cpu().numpy()]).to(out.device)
    return out


def site_recovery(chain_rows, key: str = "site_classes") -> dict:
    """Per class: design recovery over its site residues (pooled), and per chain with sites (median, mean)."""
    out = {}
    for name in ATOM_CLASSES:
        per_chain, right, total = [], 0, 0
        for row in chain_rows:
            where = row[key].get(name, [])
            if not where:
                continue
            hits = sum(row["native_letters"][i] == row["designed_letters"][i] for i in where)
            per_chain.append(hits / len(where))
            right, total = right + hits, total + len(where)
        out[name] = {"num_chains": len(per_chain), "num_residues": total,
                     "recovery": right / total if total else None,
                     "recovery_per_chain_median": float(np.median(per_chain)) if per_chain else None,
                     "recovery_per_chain_mean": float(np.mean(per_chain)) if per_chain else None}
    return out


def _ordered_likelihood(model, batch: dict, scored: torch.Tensor, allowed, mask_token_id: int, seed) -> tuple:
    """ProteinMPNN's teacher-forced numbers for one example: every residue predicted in a random order from
    the structure and the residues before it. Returns ([NLL sum, residues right], residues)."""
    positions = torch.nonzero(scored).flatten()
    if len(positions) == 0:
        return np.zeros(2), 0
    rank = torch.full((scored.shape[0],), CONTEXT, dtype=torch.long)
    rank[positions.cpu()] = torch.from_numpy(np.random.default_rng(seed).permutation(len(positions)))
    log_probs = ranked_log_probs(model, batch, rank, mask_token_id, allowed)[positions]
    native = torch.searchsorted(allowed, batch["input_ids"][0, positions])  # allowed ids are sorted
    nll = -log_probs.gather(-1, native[:, None])[:, 0]
    return np.array([float(nll.sum()), float((log_probs.argmax(-1) == native).sum())]), len(positions)


def format_table(metrics: dict) -> str:
    most = metrics["baselines"]["most_frequent_residue"]
    rows = [
        ("structures / chains", f"{metrics['num_structures']} / {metrics['num_chains']}", "", ""),
        (f"masked accuracy (ratio {metrics['mask_ratio']:g})", f"{metrics['masked_accuracy']:.4f}", "0.0500",
         f"{most['masked_accuracy']:.4f}"),
        ("perplexity (masked)", f"{metrics['perplexity']:.3f}", "20.000", ""),
        ("accuracy, all residues in a random order (teacher-forced)", f"{metrics['teacher_forced_accuracy']:.4f}",
         "0.0500", ""),
        ("perplexity, all residues in a random order (teacher-forced)",
         f"{metrics['teacher_forced_perplexity']:.3f}", "20.000", ""),
        (f"design recovery ({metrics['design_decoding']}), mean over chains", f"{metrics['design_recovery_mean']:.4f}", "0.0500",
         f"{most['design_recovery_mean']:.4f}"),
        (f"design recovery ({metrics['design_decoding']}), median over chains", f"{metrics['design_recovery_median']:.4f}", "0.0500",
         f"{most['design_recovery_median']:.4f}"),
    ]
    for label, bucket in metrics["design_recovery_by_length"].items():
        value = "-" if bucket["design_recovery_mean"] is None else f"{bucket['design_recovery_mean']:.4f}"
        rows.append((f"  chains {label} residues ({bucket['num_chains']})", value, "", ""))
    for name, site in metrics.get("design_recovery_at_sites", {}).items():
        if site["num_residues"]:
            rows.append((f"design recovery at {name.replace('_', ' ')} sites ({site['num_residues']} residues, "
                         f"{site['num_chains']} chains; per-chain median)",
                         f"{site['recovery']:.4f} ({site['recovery_per_chain_median']:.4f})", "0.0500", ""))
    header = ("metric", "model", "random", f"most frequent ({most['residue']})")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    if any(site["num_residues"] for site in metrics.get("design_recovery_at_sites", {}).values()):
        lines.append(f"sites: {metrics['site_definition']}")
    return "\n".join(lines)


__all__ = ["evaluate", "examples_from", "format_table", "side_chain_site_classes", "unreadable_sources"]
