"""Named recipes: sets of flag defaults that reproduce a peer's training. A recipe only moves defaults: every
flag given on the command line still wins, and the expansion is printed at start."""

from __future__ import annotations

import argparse

#: ProteinMPNN's Noam schedule (training/model_utils.py `get_std_opt`): rate = factor × hidden^-0.5 ×
#: min(step^-0.5, step × warmup^-1.5), which peaks at step = warmup.
NOAM_FACTOR, NOAM_WARMUP = 2.0, 4000

#: ProteinMPNN's label smoothing (`loss_smoothed`, weight 0.1): one-hot + 0.1 / 21, renormalised. That is
#: (1 - e) one-hot + e / 21 with e = 0.1 / 1.1, protmask's --label_smoothing over the 21 letters.
PROTEINMPNN_LABEL_SMOOTHING = 0.1 / 1.1


def proteinmpnn_peak_rate(hidden_dim: int) -> float:
    """The peak of ProteinMPNN's schedule for a model this wide: 2 / sqrt(hidden × 4000)."""
    return NOAM_FACTOR * hidden_dim ** -0.5 * NOAM_WARMUP ** -0.5


#: ProteinMPNN's training/training.py, flag by flag (its argparse defaults and get_std_opt). Not in it and so
#: not here: its loss divided by a fixed 2000 instead of the batch's residues (Adam makes the scale moot) and
#: its training on the chains homologous to one drawn chain only (protmask scores every chain).
RECIPES = {
    "proteinmpnn": {
        # the model: ProteinMPNN's sizes, causal decoder, per-neighbour message bias
        "hidden_dim": 128, "num_neighbors": 48, "num_encoder_layers": 3, "num_decoder_layers": 3,
        "decoder_context": "causal", "objective": "autoregressive", "message_bias_per_neighbor": True,
        "dropout": 0.1, "backbone_noise": 0.2, "label_smoothing": PROTEINMPNN_LABEL_SMOOTHING,
        # the optimiser and schedule: Adam(0.9, 0.98, eps 1e-9), Noam with warm-up 4000. ProteinMPNN does not
        # clip; protmask's clipping at 1.0 stays: without it this model lost 3 points of design recovery at
        # the Noam peak (bench/proteinmpnn_recipe.py, recipe_unclipped); --max_grad_norm 0 is ProteinMPNN's.
        "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-9, "weight_decay": 0.0,
        "lr_scheduler_type": "noam", "warmup_steps": NOAM_WARMUP, "learning_rate": None,  # None: the peak
        # several ranks: the square root of their number times the rate (ProteinMPNN trained on one GPU)
        "lr_scaling": "sqrt",
        # the data: 10000-residue batches of whole entries up to 10000 residues, chains in a random order,
        # one entry per cluster and epoch
        "max_tokens_per_batch": 10000, "max_length": 10000, "shuffle_chains": True, "sampling": "cluster",
    },
    # protmask's masked model (its sizes and data defaults) with ProteinMPNN's Adam, Noam peak and label
    # smoothing, and each chain's mask ratio drawn from 50 % to 100 %: whole-sequence design is trained as well
    # as fill-in, and every step scores at least half the residues. bench/proteinmpnn_recipe.py, 3 seeds at
    # equal data and steps: 0.285 median design recovery, ProteinMPNN's own code 0.284; from 15 % instead
    # (masked_recipe) 0.270, with a four times larger seed spread.
    "masked": {
        "objective": "masked", "decoder_context": "masked",
        "mask_ratio": 0.5, "mask_ratio_max": 1.0, "label_smoothing": PROTEINMPNN_LABEL_SMOOTHING,
        "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-9, "weight_decay": 0.0,
        "lr_scheduler_type": "noam", "warmup_steps": NOAM_WARMUP, "learning_rate": None,  # None: the peak
        "lr_scaling": "sqrt",
    },
}


def apply_recipe(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; with --recipe, parse again over the recipe's defaults. ``args.recipe_lines`` holds the
    expansion to print. A --learning_rate not given becomes the recipe's peak for the model's width."""
    args = parser.parse_args(argv)
    if args.recipe is None:
        args.recipe_lines = []
        return args
    recipe = RECIPES[args.recipe]
    own_defaults = {flag: parser.get_default(flag) for flag in recipe}
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    parser.set_defaults(**own_defaults)  # the parser stays reusable
    peak = args.learning_rate is None
    if peak:
        args.learning_rate = proteinmpnn_peak_rate(args.hidden_dim)
    args.recipe_lines = describe_recipe(args, recipe, peak)
    return args


def describe_recipe(args, recipe: dict, peak: bool) -> list[str]:
    settings, overridden = [], []
    for flag, value in recipe.items():
        now = getattr(args, flag)
        shown = (f"--{flag}" if now is True else f"--no-{flag}" if now is False else f"--{flag} {now:.6g}"
                 if isinstance(now, float) else f"--{flag} {now}")
        (settings if value is None or now == value else overridden).append(shown)
    lines = [f"recipe {args.recipe}: " + " ".join(settings)]
    if peak:
        lines.append(f"  --learning_rate {args.learning_rate:.6g} is ProteinMPNN's Noam peak for hidden {args.hidden_dim} "
                     f"(2 / sqrt(hidden x {NOAM_WARMUP})), reached after --warmup_steps {args.warmup_steps}")
    if overridden:
        lines.append("  given on the command line instead: " + " ".join(overridden))
    return lines
