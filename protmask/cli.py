"""The ``protmask`` command: build-dataset, train, design, score, evaluate, plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_dataset_command(argv) -> int:
    from .data.build import DatasetBuildError, build_dataset
    from .data.arguments import add_data_arguments, build_options

    parser = argparse.ArgumentParser(
        prog="protmask build-dataset",
        description="Parse structure files into an Arrow dataset (train / validation / test) cached on disk, "
                    "with build_report.json accounting for every file.",
    )
    add_data_arguments(parser, seed_is_split_seed=True)
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build matches")
    parser.add_argument("--prune", action="store_true",
                        help="afterwards remove the other dataset builds in --cache_dir and parse results of files "
                             "no longer in --pdb_path")
    args = parser.parse_args(argv)
    try:
        result = build_dataset(args.pdb_path, args.cache_dir, build_options(args), num_proc=args.num_proc,
                               force=args.force or args.rebuild_dataset, prune=args.prune)
    except DatasetBuildError as error:
        print(f"protmask build-dataset: error: {error}", file=sys.stderr)
        return 2
    print(result.path)
    return 0


def train_command(argv) -> int:
    from .training.loop import main

    return main(argv)


def load_model_for(command: str, args):
    """(model, processor) on --device (default: CUDA when there is one), or None after saying why not."""
    import torch

    from .design import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"protmask {command}: error: --device {device}: this machine has no CUDA GPU; use --device cpu",
              file=sys.stderr)
        return None
    try:
        return load_model(args.model, device, say=lambda text: print(text, file=sys.stderr))
    except (OSError, ValueError) as error:
        print(f"protmask {command}: error: cannot load the model {args.model}: {error}", file=sys.stderr)
        return None


def add_context_arguments(parser, side_chains: bool = False) -> None:
    """Atomic context: what a model with context_atoms (LigandMPNN's) reads of a structure's other atoms."""
    group = parser.add_argument_group("atomic context (models with context atoms, e.g. convert-ligandmpnn's)")
    group.add_argument("--context", choices=("on", "off"), default="on",
                       help="on: the model reads the structure's non-protein heavy atoms (small molecules, metals, "
                            "nucleic acids; waters and hydrogens never); off: none, to compare with and without")
    group.add_argument("--context_chains", default=None,
                       help="only atoms of these chains count as context, e.g. C,D for a DNA duplex")
    group.add_argument("--context_residues", default=None,
                       help="only these groups count as context, by residue name or chain and number, e.g. "
                            "HEM,ZN or A301 (leaves out crystallisation additives such as GOL or SO4)")
    if side_chains:
        group.add_argument("--side_chain_context", action="store_true",
                           help="the side chains of the residues not designed (fixed residues, context chains) join "
                                "each residue's context atoms, as LigandMPNN's --ligand_mpnn_use_side_chain_context 1; "
                                "the designed residues' own stay hidden")


def side_chain_options(args) -> dict:
    """--side_chain_context as a DesignOptions field; refused for a model without atomic context."""
    from .design import DesignError

    if getattr(args, "side_chain_context", False) and not model_setting(args.model, "context_atoms", 0):
        raise DesignError("--side_chain_context adds side-chain atoms to a model's atomic context; this model has "
                          "none (convert one with `protmask convert-ligandmpnn --checkpoint ligandmpnn_v_32_010_25`)")
    return {"side_chain_context": getattr(args, "side_chain_context", False)}


def add_membrane_arguments(parser) -> None:
    group = parser.add_argument_group("membrane labels (convert-ligandmpnn's membrane models)")
    group.add_argument("--transmembrane_buried", default=None,
                       help="residues buried in the membrane, e.g. 'A12,A13,B2' (per-residue label model)")
    group.add_argument("--transmembrane_interface", default=None,
                       help="residues at the membrane interface (per-residue label model)")
    group.add_argument("--global_transmembrane_label", type=int, choices=(0, 1), default=None,
                       help="global label model: 1 a transmembrane protein, 0 a soluble one (default 0)")


def membrane_options(args) -> dict:
    """The membrane flags as DesignOptions fields; refused for a model without residue labels."""
    from .design import DesignError

    given = {k: getattr(args, k, None) for k in ("transmembrane_buried", "transmembrane_interface",
                                                 "global_transmembrane_label")}
    if any(v is not None for v in given.values()) and not model_setting(args.model, "residue_label_classes", 0):
        raise DesignError("--transmembrane_buried, --transmembrane_interface and --global_transmembrane_label set "
                          "a membrane model's residue labels; this model has none (convert one with `protmask "
                          "convert-ligandmpnn --checkpoint per_residue_label_membrane_mpnn_v_48_020`)")
    return given


def read_structure(source, args, model_has_context: bool):
    """A structure file's chains, or with a context model its `ParsedEntry` with the atoms --context,
    --context_chains and --context_residues choose."""
    from .design.context import ContextChoice, choose_context_atoms
    from .structure import ParsedEntry, parse_entry, parse_structure

    choice = ContextChoice.from_args(args)
    if not (model_has_context or choice.filtered):
        return parse_structure(source)
    entry = parse_entry(source, side_chains=getattr(args, "side_chain_context", False))
    return ParsedEntry(chains=entry.chains, atoms=choose_context_atoms(entry.atoms, choice, source),
                       entry_id=entry.entry_id)


def structure_chains(structure):
    """The chains of what `read_structure` returned."""
    return getattr(structure, "chains", structure)


def add_design_control_arguments(parser) -> None:
    """The constraints shared by design and score: chains, fixed, tied, bias and omit."""
    parser.add_argument("--chains", default=None, help="chains to design, e.g. A,B (default: all; others stay as context)")
    parser.add_argument("--fix", default=None, help="native residues to keep, e.g. 'A1-10,A45' (file numbering)")
    parser.add_argument("--tie", default=None,
                        help="groups of residues that receive one residue, ';' between groups: 'A12,B12;A13,B13'. "
                             "Ranges of equal length tie element by element: 'A1-50,B1-50'. The residue is drawn "
                             "from the group's averaged log-probabilities; a fixed member fixes the group")
    parser.add_argument("--homo_oligomer", action="store_true",
                        help="tie every position of designed chains that have the same native sequence (chains of "
                             "different length are aligned by residue number)")
    parser.add_argument("--omit_aa", default="", help="amino acids never designed, e.g. CW")
    parser.add_argument("--bias_aa", default=None,
                        help="added to the log-probabilities of these amino acids everywhere, e.g. 'A:-1.0,K:0.5'")
    parser.add_argument("--bias_file", default=None,
                        help='JSON of per-residue biases: {"A12": {"K": 2.0}, "B1-10": {"P": -3}}')
    parser.add_argument("--omit_file", default=None, help='JSON of per-residue omitted letters: {"A12": "CW"}')


def add_proteinmpnn_input_arguments(parser) -> None:
    """protein_mpnn_run.py's input files, with its meaning (see design/proteinmpnn_inputs.py)."""
    group = parser.add_argument_group(
        "ProteinMPNN's input files", "the JSONL files of ProteinMPNN's helper scripts; positions are 1-based "
        "indices along each chain's sequence as ProteinMPNN parses it (--dry_run shows them as residue labels)")
    group.add_argument("--jsonl_path", default=None,
                       help="structures as parse_multiple_chains.py writes them (instead of --pdb)")
    group.add_argument("--chain_id_jsonl", default=None, help="{NAME: [[designed chains], [fixed chains]]}")
    group.add_argument("--fixed_positions_jsonl", default=None, help="{NAME: {CHAIN: [positions kept native]}}")
    group.add_argument("--tied_positions_jsonl", default=None,
                       help="{NAME: [{CHAIN: [positions]}, …]}, or the weighted form {CHAIN: [[positions], "
                            "[weights]]} of make_pos_neg_tied_positions_dict.py")
    group.add_argument("--bias_by_res_jsonl", default=None, help="{NAME: {CHAIN: [[21 biases] per residue]}}")
    group.add_argument("--omit_AA_jsonl", default=None, help="{NAME: {CHAIN: [[[positions], 'LETTERS'], …]}}")
    group.add_argument("--bias_AA_jsonl", default=None, help="{LETTER: bias} for every designed position")
    group.add_argument("--pssm_jsonl", default=None,
                       help="{NAME: {CHAIN: {pssm_coef: [L], pssm_bias: [L x 21], pssm_log_odds: [L x 21]}}} "
                            "(make_pssm_input_dict.py)")
    pssm = parser.add_argument_group(
        "PSSM", "a profile mixed into each designed residue's distribution, with ProteinMPNN's semantics: "
        "p <- (1 - multi x coef) p + multi x coef x profile (--pssm_bias_flag); letters with log-odds at or "
        "below --pssm_threshold keep 0.1%% of their probability (--pssm_log_odds_flag)")
    pssm.add_argument("--pssm", default=None,
                      help="build the profile from an alignment (a3m or aligned FASTA, the query first; matched to "
                           "each designed chain by a global alignment): Laplace pseudocounts (1 per amino acid and "
                           "column), log-odds against a uniform background, coef 1")
    pssm.add_argument("--pssm_multi", type=float, default=0.0,
                      help="0: the model alone, 1: the profile alone where coef is 1 (ProteinMPNN's default 0)")
    pssm.add_argument("--pssm_threshold", type=float, default=0.0, help="the log-odds below which a letter is damped")
    flag = dict(type=int, choices=(0, 1), nargs="?", const=1, default=0)
    pssm.add_argument("--pssm_bias_flag", **flag, help="mix the profile in (ProteinMPNN's 0 / 1; alone: 1)")
    pssm.add_argument("--pssm_log_odds_flag", **flag, help="damp letters under --pssm_threshold (0 / 1; alone: 1)")


def design_inputs(args, command: str):
    """[(name, chains or path)] of the structures to design, the control files, and the failures; or None
    after saying why not."""
    from .design import DesignError
    from .design.proteinmpnn_inputs import ProteinMPNNControls, read_parsed_chains

    if bool(args.pdb) == bool(args.jsonl_path):
        print(f"protmask {command}: error: give --pdb FILES or --jsonl_path FILE (one of them)", file=sys.stderr)
        return None
    try:
        controls = ProteinMPNNControls.read(args)
        if args.jsonl_path:
            return read_parsed_chains(args.jsonl_path), controls
    except DesignError as error:
        print(f"protmask {command}: error: {error}", file=sys.stderr)
        return None
    files = structure_files(args.pdb, command)
    return None if files is None else ([(None, path) for path in files], controls)


def design_options(args):
    """The parsed flags → `DesignOptions` (reading --bias_file and --omit_file)."""
    from .design.constraints import DesignOptions, read_json_option

    return DesignOptions(
        chains=args.chains.split(",") if args.chains else None, fix=getattr(args, "fix", None),
        fill=getattr(args, "fill", None), tie=args.tie, homo_oligomer=args.homo_oligomer, omit_aa=args.omit_aa,
        bias_aa=args.bias_aa,
        bias=read_json_option(args.bias_file, "--bias_file") if args.bias_file else None,
        omit=read_json_option(args.omit_file, "--omit_file") if args.omit_file else None,
        backbone=model_backbone(args.model), **pssm_options(args), **membrane_options(args),
        **side_chain_options(args))


def pssm_options(args) -> dict:
    """The PSSM flags → DesignOptions fields; an alignment without a way to use it is an error."""
    from .design import DesignError

    if not hasattr(args, "pssm_multi"):
        return {}
    if not 0.0 <= args.pssm_multi <= 1.0:
        raise DesignError(f"--pssm_multi {args.pssm_multi}: give a value from 0 (the model) to 1 (the profile)")
    if args.pssm and not (args.pssm_bias_flag and args.pssm_multi > 0 or args.pssm_log_odds_flag):
        raise DesignError("--pssm: say how to use the profile: --pssm_bias_flag with --pssm_multi above 0, and/or "
                          "--pssm_log_odds_flag with --pssm_threshold")
    return dict(pssm_alignment=args.pssm, pssm_multi=args.pssm_multi, pssm_threshold=args.pssm_threshold,
                pssm_bias_flag=bool(args.pssm_bias_flag), pssm_log_odds_flag=bool(args.pssm_log_odds_flag))


def structure_files(paths, command: str):
    """The structure files named by --pdb (files, folders, list files), or None after saying why not."""
    from .data.build import DatasetBuildError, find_structure_files

    try:
        return find_structure_files(paths, flag="--pdb")[0]
    except DatasetBuildError as error:
        print(f"protmask {command}: error: {error}", file=sys.stderr)
        return None


def design_parser():
    from .design import DECODINGS

    parser = argparse.ArgumentParser(
        prog="protmask design",
        description="Design sequences for backbones, or fill in masked positions, with a trained model. Writes "
                    "FASTA: the native sequence, then each design with score (mean negative log-likelihood of the "
                    "designed residues), global score (of every residue), recovery against native, temperature, "
                    "seed, decoding and model. Exit status: 0 all structures designed, 1 some failed (listed), "
                    "2 bad options or none designed.")
    parser.add_argument("--model", required=True, help="a save_pretrained folder (final/ or best/ of a run), or a hub id")
    parser.add_argument("--pdb", nargs="+",
                        help="structure files (.pdb, .cif, .ent, optionally .gz), folders of them, or list files")
    add_design_control_arguments(parser)
    add_context_arguments(parser, side_chains=True)
    add_membrane_arguments(parser)
    add_proteinmpnn_input_arguments(parser)
    parser.add_argument("--states", nargs="+", default=None,
                        help="multi-state design: one sequence for these structure files (instead of --pdb), each "
                             "planned with the same options; tie residues across them with --tie "
                             "'a.pdb:A12,b.pdb:A12;…' or --tie_by_number")
    parser.add_argument("--state_weights", type=float, nargs="+", default=None,
                        help="one weight per --states file (default 1 each): a tied unit's residue is drawn from the "
                             "weighted mean of its members' log-probabilities; negative designs against a state")
    parser.add_argument("--tie_by_number", action="store_true",
                        help="with --states: tie every designed residue that has the same chain and number in "
                             "several states")
    parser.add_argument("--fill", default=None,
                        help="the designed chains' sequence with positions to fill written as _ (chains may be "
                             "separated by /); only those are designed")
    parser.add_argument("--decoding", choices=DECODINGS, default="mask_predict",
                        help="mask_predict: all positions hidden, the most confident committed over --rounds rounds "
                             "(suits models trained with the masked objective, best with --mask_ratio_max 1.0); "
                             "autoregressive: one residue (or tie group) at a time in a seeded random order, each "
                             "seeing those before it (ProteinMPNN's decoding; one decoder pass per residue)")
    parser.add_argument("--num_samples", type=int, default=1, help="designs per structure")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="0 takes the most likely residue; higher samples more diverse sequences")
    parser.add_argument("--rounds", type=int, default=10, help="mask-predict rounds")
    parser.add_argument("--seed", type=int, default=0, help="design i of every structure uses seed + i")
    parser.add_argument("--output", default=None, help="one FASTA file for all structures")
    parser.add_argument("--output_dir", default=None,
                        help="a folder for one FASTA per structure (STEM.fasta; with --output_format proteinmpnn "
                             "ProteinMPNN's seqs/NAME.fa)")
    parser.add_argument("--output_format", choices=("protmask", "proteinmpnn"), default="protmask",
                        help="proteinmpnn: protein_mpnn_run.py's layout and FASTA headers in --output_dir (the "
                             "native first: 'NAME, score=, global_score=, fixed_chains=, designed_chains=, "
                             "model_name=, git_hash=, seed='; then per sample 'T=, sample=, score=, "
                             "global_score=, seq_recovery='), designed chains in chain-letter order")
    parser.add_argument("--save_score", action="store_true",
                        help="with --output_format proteinmpnn: also OUT/scores/NAME.npz (score, global_score)")
    parser.add_argument("--save_probs", action="store_true",
                        help="with --output_format proteinmpnn: also OUT/probs/NAME.npz (probs, log_probs, S, "
                             "mask, chain_order; 21 letters ACDEFGHIKLMNPQRSTVWYX)")
    parser.add_argument("--probabilities", default=None,
                        help="also write a TSV of each designed position: structure, sample, chain, residue, native, "
                             "designed, the model's probability of it, and the distribution it was drawn from "
                             "(after ties, bias, omit and temperature) as p_A ... p_Y")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the designed, fixed, tied, biased and omitted positions of each structure, and stop")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return parser


def design_command(argv) -> int:
    import math

    from .design import DesignError, design_plan, format_plan, plan_design
    from .design.designer import fasta_records, probability_rows, structure_stem
    from .design.proteinmpnn_outputs import write_proteinmpnn_outputs
    from .structure import StructureError

    parser = design_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.rounds < 1 or not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error("--num_samples and --rounds must be positive and --temperature a finite number, zero or more")
    if not args.dry_run and not (args.output or args.output_dir):
        parser.error("give --output FILE (one FASTA) or --output_dir DIR (one FASTA per structure)")
    proteinmpnn_format = args.output_format == "proteinmpnn"
    if proteinmpnn_format and not args.dry_run and not args.output_dir:
        parser.error("--output_format proteinmpnn writes ProteinMPNN's folders: give --output_dir DIR")
    if (args.save_score or args.save_probs) and not proteinmpnn_format:
        parser.error("--save_score and --save_probs write ProteinMPNN's .npz files: add --output_format proteinmpnn")
    if args.states:
        return design_states_command(args, parser)
    inputs = design_inputs(args, "design")
    if inputs is None:
        return 2
    structures, controls = inputs
    try:
        options = design_options(args)
    except DesignError as error:
        print(f"protmask design: error: {error}", file=sys.stderr)
        return 2

    plans, failed = [], []
    with_context = model_setting(args.model, "context_atoms", 0) > 0
    for name, source in structures:
        try:
            structure = read_structure(source, args, with_context) if name is None else source
            chains = structure_chains(structure)
            name = structure_stem(str(source)) if name is None else name
            plans.append(plan_design(structure, controls.options_for(name, chains, options) if controls else options))
        except (DesignError, StructureError) as error:
            failed.append((source if isinstance(source, (str, Path)) else name, str(error)))
    if args.dry_run:
        for plan in plans:
            print(format_plan(plan))
        return report_failures("design", failed, len(plans))
    if not plans:
        return report_failures("design", failed, 0)
    loaded = load_model_for("design", args)
    if loaded is None:
        return 2
    model, processor = loaded
    for folder in filter(None, [args.output_dir, args.output and Path(args.output).parent,
                                args.probabilities and Path(args.probabilities).parent]):
        Path(folder).mkdir(parents=True, exist_ok=True)
    fasta, tsv = [], []
    for plan in plans:
        result = design_plan(model, processor, plan, args.num_samples, args.temperature, args.seed, args.rounds,
                             args.decoding)
        if proteinmpnn_format:
            write_proteinmpnn_outputs(model, processor, plan, result, args.output_dir, args.seed, args.save_score,
                                      args.save_probs)
        elif args.output_dir:
            path = Path(args.output_dir) / f"{structure_stem(result.name)}.fasta"
            path.write_text("\n".join(fasta_records(result)) + "\n")
        fasta += fasta_records(result)
        tsv += probability_rows(result, header=not tsv)
        for number, item in enumerate(result.designs, 1):
            print(f"{result.name} design {number}: score {item.score:.3f}, recovery {item.recovery:.3f}, "
                  f"{result.designed_positions} positions designed")
    if args.output:
        Path(args.output).write_text("\n".join(fasta) + "\n")
    if args.probabilities:
        Path(args.probabilities).write_text("\n".join(tsv) + "\n")
    print(f"wrote {args.output or args.output_dir}")
    return report_failures("design", failed, len(plans))


def design_states_command(args, parser) -> int:
    """--states: one sequence for several structures (see design/multistate.py)."""
    from .design import DesignError, plan_design
    from .design.multistate import design_states, format_states, plan_states, state_fasta
    from .structure import StructureError

    if args.pdb or args.jsonl_path or args.output_format != "protmask" or args.output_dir or args.probabilities:
        parser.error("--states writes one FASTA (--output) and takes its structures from --states only")
    if args.tie_by_number is False and not args.tie:
        parser.error("--states: tie residues across the states with --tie 'a.pdb:A12,b.pdb:A12' or --tie_by_number")
    weights = args.state_weights or [1.0] * len(args.states)
    tie, args.tie = args.tie, None  # the cross-state ties are read by plan_states, not by each state's plan
    try:
        options = design_options(args)
        with_context = model_setting(args.model, "context_atoms", 0) > 0
        plans = [plan_design(read_structure(path, args, with_context), options) for path in args.states]
        states = plan_states(args.states, plans, weights, tie, args.tie_by_number)
    except (DesignError, StructureError) as error:
        print(f"protmask design: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(format_states(states))
        return 0
    if not args.output:
        parser.error("--states: give --output FILE")
    loaded = load_model_for("design", args)
    if loaded is None:
        return 2
    model, processor = loaded
    samples = design_states(model, processor, states, args.num_samples, args.temperature, args.seed, args.rounds,
                            args.decoding)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(state_fasta(states, samples, str(args.model))) + "\n")
    for number, designs in enumerate(samples, 1):
        print(f"design {number}: " + ", ".join(f"{Path(n).name} score {d.score:.3f} recovery {d.recovery:.3f}"
                                                for n, d in zip(args.states, designs)))
    print(f"wrote {args.output}")
    return 0


def read_fasta_records(path) -> list[tuple[str, str]]:
    """[(name, sequence)] of a FASTA file; raises DesignError naming the flag when it cannot be read."""
    from .design import DesignError

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise DesignError(f"--sequences {path}: cannot read it ({error.strerror or error})") from None
    records = []
    for line in text.splitlines():
        if line.startswith(">"):
            records.append([line[1:].split()[0] if line[1:].split() else f"sequence_{len(records) + 1}", ""])
        elif line.strip() and records:
            records[-1][1] += line.strip()
    if not records:
        raise DesignError(f"--sequences {path}: no FASTA records (lines starting with >)")
    return [tuple(r) for r in records]


def report_failures(command: str, failed, succeeded: int) -> int:
    """List the structures that could not be used; 0 if none failed, 1 if some did, 2 if all did."""
    for path, reason in failed:
        print(f"protmask {command}: skipped {path}: {reason}", file=sys.stderr)
    if failed:
        print(f"protmask {command}: {len(failed)} of {len(failed) + succeeded} structures failed", file=sys.stderr)
    return 0 if not failed else (1 if succeeded else 2)


def score_parser():
    parser = argparse.ArgumentParser(
        prog="protmask score",
        description="Score sequences on a backbone. By default (ProteinMPNN's --score_only): the log-likelihood of "
                    "the native sequence, or of each sequence in --sequences, per residue and in total, each residue "
                    "predicted from the structure and the residues before it in a random order, averaged over "
                    "--num_orders seeded orders; a TSV with a '# NAME: mean_log_likelihood=...' summary line per "
                    "sequence and structure. --mutation_scan: every single mutant of the chosen chains as log "
                    "p(mutant) - log p(native) with that position hidden and the rest of the native sequence "
                    "visible (masked marginal), one CSV row per position with the 20 values, and a heat map PNG "
                    "beside it when matplotlib is installed.")
    parser.add_argument("--model", required=True, help="a save_pretrained folder or hub id")
    parser.add_argument("--pdb", nargs="+", default=None,
                        help="structure files, folders of them or list files (one table for all)")
    parser.add_argument("--sequences", default=None,
                        help="FASTA of sequences to score for the chosen chains (chains separated by /, as design "
                             "writes them); default: the native sequence")
    parser.add_argument("--states", nargs="+", default=None, metavar="FILE",
                        help="score each sequence of --sequences on every one of these structures (the states of a "
                             "multi-state design): a row block and summary line per state, and a '# NAME: states' "
                             "line with the --state_weights-weighted sum of the states' mean log-likelihoods")
    parser.add_argument("--state_weights", type=float, nargs="+", default=None,
                        help="one weight per --states file (default 1 each), as protmask design --states takes them")
    parser.add_argument("--num_orders", type=int, default=1, help="decoding orders to average over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decoding orders")
    parser.add_argument("--mutation_scan", action="store_true", help="score every single mutant (see above)")
    parser.add_argument("--conditional", action="store_true",
                        help="ProteinMPNN's --conditional_probs_only: per residue of the chosen chains, log p over its "
                             "21 letters given every other residue and the structure (the residue decoded last); "
                             "a TSV row per residue")
    parser.add_argument("--unconditional", action="store_true",
                        help="ProteinMPNN's --unconditional_probs_only: the same given the structure alone")
    parser.add_argument("--out_folder", default=None,
                        help="with --conditional / --unconditional: also ProteinMPNN's "
                             "OUT/conditional_probs_only/NAME.npz (or unconditional_probs_only/): log_p, S, mask, "
                             "design_mask")
    parser.add_argument("--chains", default=None, help="chains to score or scan, e.g. A (default: all)")
    parser.add_argument("--homo_oligomer", action="store_true",
                        help="tie chains with the same sequence: a row scores the mutation applied to every copy")
    parser.add_argument("--tie", default=None, help="tie groups as in protmask design: each scores as one mutation")
    group = parser.add_argument_group(
        "ProteinMPNN's input files", "as protmask design takes them; the designed chains are the scored ones and "
        "fixed positions are given, not scored (ProteinMPNN's --score_only)")
    group.add_argument("--jsonl_path", default=None,
                       help="structures as parse_multiple_chains.py writes them (instead of --pdb)")
    group.add_argument("--chain_id_jsonl", default=None, help="{NAME: [[scored chains], [given chains]]}")
    group.add_argument("--fixed_positions_jsonl", default=None, help="{NAME: {CHAIN: [positions given, not scored]}}")
    group.add_argument("--tied_positions_jsonl", default=None,
                       help="{NAME: [{CHAIN: [positions]}, …]}: tie groups as --tie (in --mutation_scan each scores "
                            "as one mutation)")
    parser.add_argument("--output", required=True, help="TSV (scores) or CSV (--mutation_scan) to write")
    parser.add_argument("--device", default=None)
    add_context_arguments(parser, side_chains=True)
    add_membrane_arguments(parser)
    return parser


def score_command(argv) -> int:
    from .design import DesignError, DesignOptions, plan_design
    from .design.designer import structure_stem
    from .design.scoring import score_sequences, summary_line, write_score_tsv
    from .structure import StructureError

    parser = score_parser()
    args = parser.parse_args(argv)
    if args.num_orders < 1:
        parser.error("--num_orders must be positive")
    if args.mutation_scan + args.conditional + args.unconditional > 1:
        parser.error("--mutation_scan, --conditional and --unconditional are different tables: give one")
    if args.out_folder and not (args.conditional or args.unconditional):
        parser.error("--out_folder writes ProteinMPNN's probability files: add --conditional or --unconditional")
    if args.states:
        if args.pdb or args.jsonl_path or args.mutation_scan or args.conditional or args.unconditional:
            parser.error("--states scores sequences on its own structures: leave out --pdb, --jsonl_path and the "
                         "--mutation_scan / --conditional / --unconditional tables")
        if args.state_weights and len(args.state_weights) != len(args.states):
            parser.error(f"--state_weights: {len(args.state_weights)} weights for {len(args.states)} --states files")
        args.pdb = args.states
    elif args.state_weights:
        parser.error("--state_weights goes with --states")
    inputs = design_inputs(args, "score")
    if inputs is None:
        return 2
    structures, controls = inputs
    items = []  # (name, chains, options), checked before the model is loaded
    try:
        base = DesignOptions(chains=args.chains.split(",") if args.chains else None, tie=args.tie,
                             homo_oligomer=args.homo_oligomer, backbone=model_backbone(args.model),
                             **membrane_options(args), **side_chain_options(args))
        sequences = read_fasta_records(args.sequences) if args.sequences else None
        with_context = model_setting(args.model, "context_atoms", 0) > 0
        for name, source in structures:
            structure = read_structure(source, args, with_context) if name is None else source
            name = structure_stem(str(source)) if name is None else name
            options = controls.options_for(name, structure_chains(structure), base) if controls else base
            plan_design(structure, options)
            items.append((name, structure, options))
    except (DesignError, StructureError) as error:
        print(f"protmask score: error: {error}", file=sys.stderr)
        return 2
    if args.mutation_scan and len(items) > 1:
        parser.error(f"--mutation_scan writes one structure's table; {len(items)} structures given")
    loaded = load_model_for("score", args)
    if loaded is None:
        return 2
    model, processor = loaded
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.conditional or args.unconditional:
        return write_probability_tables(model, processor, items, args)
    if args.mutation_scan:
        return write_mutation_scan(model, processor, *items[0][1:], args.output)
    scores = []
    try:
        for name, chains, options in items:
            found = score_sequences(model, processor, chains, sequences, num_orders=args.num_orders, seed=args.seed,
                                    options=options)
            if len(items) > 1:  # one table for several structures: say which each row is on
                for score in found:
                    score.name = f"{score.name}@{name}" if sequences else score.name
            scores += found
    except DesignError as error:
        print(f"protmask score: error: {error}", file=sys.stderr)
        return 2
    lines = [summary_line(score) for score in scores]
    if args.states:
        lines += state_summary_lines(scores, [name for name, _, _ in items], args.state_weights, sequences)
    write_score_tsv(scores, args.output, extra=lines[len(scores):])
    print("\n".join(lines))
    print(f"wrote {args.output}")
    return 0


def model_backbone(model) -> str:
    """What ``model`` reads of a residue (its config's ``backbone``), read before any structure is planned so
    that CA traces are checked against a CA-only model."""
    return model_setting(model, "backbone", "full")


def model_setting(model, name: str, default):
    """A field of ``model``'s configuration, read before any structure is planned (whether it reads a residue's
    CA only, whether it reads context atoms); ``default`` when the configuration cannot be read here (loading
    the model then says why)."""
    try:
        from transformers import AutoConfig

        from .design.designer import resolve_model_folder

        return getattr(AutoConfig.from_pretrained(resolve_model_folder(model)[0]), name, default)
    except Exception:  # noqa: BLE001: any failure is reported by the model loading that follows
        return default


def state_summary_lines(scores, names, weights, sequences) -> list[str]:
    """Per sequence: its mean log-likelihood on each state and their weighted sum (design --states' rule)."""
    weights = weights or [1.0] * len(names)
    per_state = len(scores) // len(names)
    lines = []
    for number in range(per_state):
        row = [scores[state * per_state + number] for state in range(len(names))]
        label = sequences[number][0] if sequences else "native"
        total = sum(w * score.mean for w, score in zip(weights, row))
        lines.append(f"# {label}: states " + " ".join(f"{n}={s.mean:.5f}" for n, s in zip(names, row)) +
                     f" weights={','.join(f'{w:g}' for w in weights)} weighted_mean_log_likelihood={total:.5f}")
    return lines


def write_mutation_scan(model, processor, chains, options, output) -> int:
    from .design import mutation_scan
    from .design.scoring import write_scan_csv

    scan = mutation_scan(model, processor, chains, options)
    write_scan_csv(scan, output)
    print(f"wrote {output}: {len(scan.labels)} positions x 20 amino acids")
    try:
        from .plotting import plot_mutation_scan

        print(f"wrote {plot_mutation_scan(scan, Path(output).with_suffix('.png'))}")
    except ImportError:
        print("no heat map: install matplotlib (pip install 'protmask[plot]')")
    return 0


def write_probability_tables(model, processor, items, args) -> int:
    """--conditional / --unconditional: one TSV over the structures, and with --out_folder one .npz each."""
    from .design.scoring import letter_probabilities, write_letter_probabilities, write_letter_probabilities_npz

    tables = []
    for name, chains, options in items:
        plan, log_probs = letter_probabilities(model, processor, chains, conditional=args.conditional, options=options)
        tables.append((name, plan, log_probs))
        if args.out_folder:
            kind = "conditional_probs_only" if args.conditional else "unconditional_probs_only"
            path = Path(args.out_folder) / kind / f"{name}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_letter_probabilities_npz(plan, log_probs, path)
            print(f"wrote {path}")
    write_letter_probabilities(tables, args.output)
    print(f"wrote {args.output}: {sum(int(plan.scoring.sum()) for _, plan, _ in tables)} residues x 21 letters")
    return 0


def evaluate_command(argv) -> int:
    import json

    from .data.build import DatasetBuildError
    from .evaluation import EVALUATE_MAX_LENGTH, evaluate, examples_from, format_table, unreadable_sources
    from .metrics import SIDE_CHAIN_SITE_CUTOFF, SITE_CUTOFF
    from .structure import StructureError
    from .training.arguments import non_negative_int, positive_int

    parser = argparse.ArgumentParser(
        prog="protmask evaluate",
        description="Evaluate a trained model on structures: masked accuracy and perplexity at the model's "
                    "training mask ratio (fixed seeded masks); ProteinMPNN's teacher-forced accuracy and perplexity "
                    "(every residue, in a seeded random order); recovery of full designs from structure alone "
                    "(--decoding), by chain length and at binding sites of small molecules, metals and nucleotides "
                    "(--site_definition); random and most-frequent-residue baselines.")
    parser.add_argument("--model", required=True, help="a save_pretrained folder or hub id")
    parser.add_argument("--pdb_path", required=True,
                        help="structure folder, file or list file, or a built dataset (see --split)")
    parser.add_argument("--split", default=None, help="with a built dataset: train, validation or test (default: all)")
    parser.add_argument("--min_length", type=positive_int, default=20,
                        help="skip chains shorter than this (as the build does)")
    parser.add_argument("--max_length", type=non_negative_int, default=EVALUATE_MAX_LENGTH,
                        help=f"crop longer examples to this many residues, as training does (default "
                             f"{EVALUATE_MAX_LENGTH}; 0: no crop, which a very large complex may not fit in memory)")
    parser.add_argument("--max_tokens", type=positive_int, default=4000,
                        help="padded residues per batch (a batch holds at least one example of up to --max_length)")
    parser.add_argument("--decoding", choices=("mask_predict", "autoregressive"), default="mask_predict",
                        help="how the designs are made (greedy): mask_predict suits models trained with the masked "
                             "objective, autoregressive is ProteinMPNN's decoding (use it for converted weights)")
    parser.add_argument("--rounds", type=positive_int, default=10, help="mask-predict rounds for the designs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed masks and decoding orders")
    parser.add_argument("--site_definition", choices=("side_chain", "virtual_cb"), default="side_chain",
                        help="when a residue is at a binding site of a class: side_chain, the LigandMPNN paper's rule "
                             f"(a side-chain heavy atom, CB included, within {SIDE_CHAIN_SITE_CUTOFF:g} Å of a "
                             "non-protein heavy atom of the class; glycine never; read from the structure files, also "
                             "for a built dataset, whose sources must be in place), reported with virtual_cb beside it; "
                             f"or virtual_cb alone, LigandMPNN run.py's (virtual CB within {SITE_CUTOFF:g} Å; the "
                             "dataset suffices)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument("--device", default=None)
    add_context_arguments(parser)
    args = parser.parse_args(argv)
    from .design import DesignError
    from .design.context import ContextChoice

    choice = ContextChoice.from_args(args)
    try:
        examples, failed = examples_from(args.pdb_path, args.split, args.min_length, model_backbone(args.model),
                                         context=choice if choice.filtered else None)
    except (DatasetBuildError, DesignError) as error:
        print(f"protmask evaluate: error: {error}", file=sys.stderr)
        return 2
    if not examples:
        print(f"protmask evaluate: error: no usable structure in {args.pdb_path}", file=sys.stderr)
        return 2
    if args.site_definition == "side_chain" and (missing := unreadable_sources(examples)):
        listed = "; ".join(f"{name} ({source or 'no source recorded'})" for name, source in missing[:3])
        print(f"protmask evaluate: error: --site_definition side_chain reads side chains from the structure files "
              f"{args.pdb_path} was built from, and {len(missing)} of those with non-protein atoms are not there: "
              f"{listed}{' ...' if len(missing) > 3 else ''}. Put them back where the build read them, or pass "
              "--site_definition virtual_cb (needs the dataset only)", file=sys.stderr)
        return 2
    loaded = load_model_for("evaluate", args)
    if loaded is None:
        return 2
    model, processor = loaded
    try:
        metrics = evaluate(model, processor, examples, max_tokens=args.max_tokens, rounds=args.rounds,
                           seed=args.seed, max_length=args.max_length or None, decoding=args.decoding,
                           use_context=choice.enabled, site_definition=args.site_definition)
    except StructureError as error:  # a source changed since the build, seen when its side chains are read
        print(f"protmask evaluate: error: {error}", file=sys.stderr)
        return 2
    metrics["files_failed"] = failed
    metrics["model"] = str(args.model)
    metrics["pdb_path"] = str(args.pdb_path)
    print(format_table(metrics))
    for item in failed:
        print(f"  not evaluated: {item['file']}: {item['error']}")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1))
        print(f"wrote {args.output}")
    return 0


def plot_command(argv) -> int:
    parser = argparse.ArgumentParser(prog="protmask plot",
                                     description="Draw a run's training and validation curves from metrics.jsonl.")
    parser.add_argument("--run", required=True, help="the --save_dir of a training run")
    parser.add_argument("--output", default=None, help="PNG to write (default: RUN/training_curves.png)")
    args = parser.parse_args(argv)
    try:
        from .plotting import plot_run

        path = plot_run(args.run, args.output)
    except ImportError:
        print("protmask plot: error: needs matplotlib: pip install 'protmask[plot]'", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"protmask plot: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


def convert_command(argv) -> int:
    from .models.convert_proteinmpnn import convert_proteinmpnn

    return _convert(argv, "convert-proteinmpnn", convert_proteinmpnn,
                    "Convert published ProteinMPNN weights (or a checkpoint of ProteinMPNN's training/training.py) "
                    "into a protmask model folder that AutoModelForMaskedLM loads and that computes the same "
                    "log-probabilities. CA-only weights (ca/v_48_0XX) give a CA-only model that designs from "
                    "CA traces.",
                    "a .pt file, or a published name from the installed proteinmpnn package: vanilla/v_48_002, "
                    "vanilla/v_48_010, vanilla/v_48_020, vanilla/v_48_030, soluble/v_48_0XX, ca/v_48_002, "
                    "ca/v_48_010, ca/v_48_020")


def convert_ligandmpnn_command(argv) -> int:
    from .models.convert_ligandmpnn import convert_ligandmpnn

    return _convert(argv, "convert-ligandmpnn", convert_ligandmpnn,
                    "Convert published LigandMPNN weights into a protmask model folder that AutoModelForMaskedLM "
                    "loads and that computes the same log-probabilities: the atomic-context models (each residue "
                    "reads its 25 nearest non-protein atoms), the soluble and ProteinMPNN weights the package "
                    "ships, and the two membrane-label models.",
                    "a .pt file, or a published name from the installed ligandmpnn package: "
                    "ligandmpnn_v_32_005_25, ligandmpnn_v_32_010_25, ligandmpnn_v_32_020_25, ligandmpnn_v_32_030_25, "
                    "solublempnn_v_48_0XX, proteinmpnn_v_48_0XX, per_residue_label_membrane_mpnn_v_48_020, "
                    "global_label_membrane_mpnn_v_48_020")


def _convert(argv, name: str, convert, description: str, checkpoint_help: str) -> int:
    from .models.convert_proteinmpnn import ConversionError

    parser = argparse.ArgumentParser(prog=f"protmask {name}", description=description)
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--output", required=True, help="the folder to write (config.json, model.safetensors, "
                                                         "tokenizer, README.md model card)")
    args = parser.parse_args(argv)
    try:
        model = convert(args.checkpoint, args.output)
    except ConversionError as error:
        print(f"protmask {name}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"protmask {name}: error: cannot write --output {args.output}: {error}", file=sys.stderr)
        return 2
    config = model.config
    kind = ("CA-only, " if config.backbone == "ca" else "") + (
        f"{config.context_atoms} context atoms per residue, " if config.context_atoms else "") + (
        f"{config.residue_label_classes} residue label classes, " if config.residue_label_classes else "")
    print(f"wrote {args.output}: {kind}hidden {config.hidden_dim}, {config.num_neighbors} neighbours, "
          f"backbone noise {config.backbone_noise} Å")
    return 0


COMMANDS = {
    "build-dataset": (build_dataset_command, "parse structure files into a cached Arrow dataset"),
    "train": (train_command, "train a model (the same flags as train_accelerate.py)"),
    "design": (design_command, "design or fill in sequences for backbones, with ties, bias and omit"),
    "score": (score_command, "score sequences on a backbone (log-likelihood) or every single mutant"),
    "evaluate": (evaluate_command, "evaluate a trained model on structure files"),
    "plot": (plot_command, "draw a training run's curves"),
    "convert-proteinmpnn": (convert_command, "convert published ProteinMPNN weights into a protmask model"),
    "convert-ligandmpnn": (convert_ligandmpnn_command, "convert published LigandMPNN weights (atomic context, "
                                                       "soluble, membrane) into a protmask model"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: protmask COMMAND [options]   (protmask COMMAND --help for its options)", "", "commands:"]
        lines += [f"  {name:19s} {text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
