"""How fast a DataLoader serves training batches from a built dataset, and what reading it costs in memory.

Prints JSON: proteins/s and residues/s through the training collator (crop, mask 80/10/10, pad) with
token-budget batches at 0 and 2 workers, each without and with the entries' context atoms (what a model with
--context_atoms reads: the atom columns, their crop to the kept residues and their padding); and the peak RSS of one pass over the dataset read once and
concatenated 20 times (memory-mapped Arrow: the two should be within about 10 %). Compare proteins/s with
the model's training residues/s (bench/model_throughput.py) to see that data never starves the model.

    python bench/dataloader.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import current_rss_mb, default_pdb_path, emit, machine, peak_rss_mb, spawn


def dataset_path(args) -> str:
    from protmask.data.build import build_dataset

    return str(build_dataset(args.pdb_path, args.cache_dir, log=lambda *a: None).path)


def worker_throughput(path: str, num_workers: int, max_tokens: int, epochs: int, context: bool) -> dict:
    import torch
    from datasets import load_from_disk

    from protmask.data.collator import MaskingCollator, ProtMaskProcessor, StructureDataset
    from protmask.data.sampler import LengthBucketBatchSampler

    split = load_from_disk(path)["train"]
    dataset = StructureDataset(split, with_atoms=context)
    sampler = LengthBucketBatchSampler(dataset.lengths.clip(max=500), max_tokens=max_tokens, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=MaskingCollator(
        ProtMaskProcessor(max_length=500, with_context=context)))
    proteins = residues = atoms = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            proteins += batch["input_ids"].shape[0]
            residues += int(batch["attention_mask"].sum())
            atoms += int(batch["context_mask"].sum()) if context else 0
    seconds = time.perf_counter() - started
    return {"num_workers": num_workers, "context_atoms": context, "epochs": epochs, "proteins": proteins,
            "context_atoms_served": atoms, "seconds": round(seconds, 2),
            "proteins_per_s": round(proteins / seconds, 1), "residues_per_s": round(residues / seconds, 1)}


def worker_memory(path: str, copies: int) -> dict:
    from datasets import concatenate_datasets, load_from_disk

    split = load_from_disk(path)["train"]
    data = concatenate_datasets([split] * copies).with_format("numpy") if copies > 1 else split.with_format("numpy")
    before = current_rss_mb()
    residues = 0
    for start in range(0, len(data), 256):
        rows = data.__getitems__(list(range(start, min(start + 256, len(data)))))
        residues += sum(len(r["coords"]) // 12 for r in rows)
    return {"copies": copies, "rows": len(data), "residues": residues, "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "protmask-bench-cache"))
    parser.add_argument("--max_tokens", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.worker:
        kind, path, *rest = args.worker
        if kind == "throughput":
            result = worker_throughput(path, int(rest[0]), int(rest[1]), int(rest[2]), rest[3] == "context")
        else:
            result = worker_memory(path, int(rest[0]))
        print(json.dumps(result))
        return
    path = dataset_path(args)
    throughput = [spawn(__file__, "throughput", path, workers, args.max_tokens, args.epochs, context)
                  for workers in (0, 2) for context in ("residues", "context")]
    once, twenty = spawn(__file__, "memory", path, 1), spawn(__file__, "memory", path, 20)
    emit({
        "benchmark": "dataloader",
        "machine": machine(),
        "dataset": path,
        "max_tokens_per_batch": args.max_tokens,
        "throughput": throughput,
        "memory_read_once": once,
        "memory_read_20x_concatenated": twenty,
        "peak_rss_ratio_20x_vs_1x": round(twenty["peak_rss_mb"] / once["peak_rss_mb"], 3),
        "context_cost": {f"{workers}_workers": round(1 - with_atoms["proteins_per_s"] / without["proteins_per_s"], 3)
                         for workers, (without, with_atoms) in zip((0, 2), (throughput[0:2], throughput[2:4]))},
    }, args.output)


if __name__ == "__main__":
    main()
