"""The optimizer step: one host-device synchronisation, per-rank randomness, bf16 against fp32, compile."""

import sys

import pytest
import torch

from protmask.data.collator import ProtMaskProcessor
from protmask.models import ProtMaskConfig, ProtMaskForMaskedLM
from protmask.structure import parse_structure
from protmask.training.step import OptimizerStep

SYNCING = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.fixture(scope="module")
def batches(sample_dir):
    chains = [parse_structure(sample_dir / name)[0] for name in ("1aki.cif.gz", "1a8q.pdb.gz", "1p3c.pdb.gz")]
    processor = ProtMaskProcessor(mask_ratio=0.3, max_length=96)
    return [processor([chain], mask=True, seeds=[(0, i)]) for i, chain in enumerate(chains)]


def tiny(**overrides):
    torch.manual_seed(0)
    config = dict(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_neighbors=16)
    return ProtMaskForMaskedLM(ProtMaskConfig(**{**config, **overrides}))


def prepared_step(model, mixed_precision="no"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per test, each with its precision
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return OptimizerStep(accelerator, model, optimizer, scheduler, label_smoothing=0.0, max_grad_norm=1.0)


def count_host_syncs(monkeypatch) -> list:
    """Record every conversion of a tensor to a host value (and boolean-mask indexing, which needs the
    count of selected elements) made from protmask's own code: on a GPU each one waits for the device."""
    calls = []

    def wrapped(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            boolean_index = name == "__getitem__" and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in (args[0] if isinstance(args[0], tuple)
                                                                                else args[:1]))
            if "/protmask/" in caller and (name != "__getitem__" or boolean_index):
                calls.append((name, caller.rsplit("/protmask/", 1)[1], sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)
        return method

    for name in SYNCING + ("__getitem__",):
        monkeypatch.setattr(torch.Tensor, name, wrapped(name, getattr(torch.Tensor, name)))
    return calls


def test_a_training_step_synchronises_with_the_host_once(batches, monkeypatch):
    step = prepared_step(tiny())
    step(batches[:2], stop_requested=lambda: False)  # warm: lazy initialisations may read values once
    calls = count_host_syncs(monkeypatch)
    numbers = step(batches[:2], stop_requested=lambda: False)  # two micro-batches of gradient accumulation
    assert calls == [("tolist", "training/step.py", calls[0][2])], calls
    assert numbers.tokens == sum(int((b["labels"] != -100).sum()) for b in batches[:2])
    assert numbers.residues == sum(int(b["attention_mask"].sum()) for b in batches[:2])
    assert not numbers.nonfinite and not numbers.preempted and numbers.learning_rate == 1e-3


def test_the_step_minimises_the_mean_over_the_global_batch(batches):
    # The update equals one from the mean loss over every masked residue of both micro-batches.
    model, reference = tiny(dropout=0.0, backbone_noise=0.0), tiny(dropout=0.0, backbone_noise=0.0)
    step = prepared_step(model)
    step.max_grad_norm = 0.0
    step(batches[:2], stop_requested=lambda: False)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    losses = [reference(**b).logits for b in batches[:2]]
    total = sum(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
                for logits, b in zip(losses, batches[:2]))
    (total / sum(int((b["labels"] != -100).sum()) for b in batches[:2])).backward()
    optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def _rank_draws():
    """Run on each of two ranks: the same batch, the same weights, training mode."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from protmask.data import SAMPLE_DATA
    from protmask.training.arguments import build_parser
    from protmask.training.loop import prepare_process

    model = tiny(dropout=0.3, backbone_noise=0.3)  # identical weights on both ranks, as DDP makes them
    accelerator = Accelerator(cpu=True)
    prepare_process(accelerator, build_parser().parse_args(["--seed", "0"]))  # the trainer's seeding
    chain = parse_structure(SAMPLE_DATA / "1aki.cif.gz")[0]
    batch = ProtMaskProcessor(mask_ratio=0.3)([chain], mask=True, seeds=[(0, 0)])
    model.train()
    training = model(**batch).loss.item()
    model.eval()
    evaluation = model(**batch).loss.item()
    draws = gather_object([(training, evaluation)])
    assert draws[0][1] == draws[1][1]  # the same batch and weights: deterministic evaluation agrees
    assert draws[0][0] != draws[1][0]  # each rank drew its own dropout and backbone noise


def test_each_rank_draws_its_own_dropout_and_noise():
    # Two real gloo ranks, forked from a fresh interpreter (forking this one, whose thread pools are running,
    # can deadlock the children).
    import subprocess
    from pathlib import Path

    code = "from accelerate import debug_launcher; from test_step import _rank_draws; debug_launcher(_rank_draws, num_processes=2)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bf16_training_follows_fp32(batches):
    # Eight steps on the same batches from the same weights: bf16 autocast tracks the fp32 losses closely.
    curves = {}
    for precision in ("no", "bf16"):
        step = prepared_step(tiny(dropout=0.0, backbone_noise=0.0), mixed_precision=precision)
        curves[precision] = [step(batches, stop_requested=lambda: False).loss_sum for _ in range(8)]
    fp32, bf16 = torch.tensor(curves["no"]), torch.tensor(curves["bf16"])
    assert fp32[-1] < fp32[0] * 0.9  # it learned
    assert ((bf16 - fp32).abs() / fp32).max() < 0.02
    assert not torch.equal(bf16, fp32)  # bf16 really ran


@pytest.mark.faults  # slow: compilation takes ~20 s on 2 cores
def test_torch_compile_trains_like_eager(cache, tmp_path):
    from runner import TINY, launch, records

    common = TINY + ["--cache_dir", cache, "--max_tokens_per_batch", "1024", "--max_train_steps", "3", "--dropout", "0",
                     "--backbone_noise", "0"]
    launch(common + ["--save_dir", tmp_path / "eager"])
    launch(common + ["--save_dir", tmp_path / "compiled", "--torch_compile"], timeout=600)
    eager, compiled = records(tmp_path / "eager", "train"), records(tmp_path / "compiled", "train")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_gpu_settings_follow_the_device(sample_build):
    # Fused AdamW where the parameters live on CUDA, PyTorch's default elsewhere; loader workers persist.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from protmask.models import ProtMaskTokenizer
    from protmask.training.arguments import build_parser
    from protmask.training.loop import build_optimizer, make_loaders

    args = build_parser().parse_args(["--num_workers", "2"])
    assert build_optimizer(tiny(), args, 1e-3, torch.device("cuda")).defaults["fused"] is True
    assert not build_optimizer(tiny(), args, 1e-3, torch.device("cpu")).defaults["fused"]
    AcceleratorState._reset_state(reset_partial_state=True)
    train_loader, validation_loader, _ = make_loaders(Accelerator(cpu=True), args, sample_build.dataset,
                                                      ProtMaskTokenizer())
    assert train_loader.persistent_workers and validation_loader.persistent_workers
    assert not train_loader.pin_memory  # pinned (and copied non_blocking) only when CUDA is there


@pytest.mark.parametrize("fused", [False, True])
def test_an_fp16_overflow_step_is_counted_and_does_not_advance_the_schedule(batches, fused):
    # A real GradScaler (the CPU one; accelerate makes a CUDA one for fp16) whose first scale overflows the
    # scaled loss: the update is skipped, so the schedule must not move. Fused AdamW skips inside its kernel.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = OptimizerStep(accelerator, model, optimizer, scheduler, label_smoothing=0.0, max_grad_norm=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    numbers = step(batches[:1])
    assert numbers.overflowed and not numbers.nonfinite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was updated
    assert scheduler.scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 1e-3
    for _ in range(200):  # the scale comes down until the steps go through
        if not (numbers := step(batches[:1])).overflowed:
            break
    assert not numbers.overflowed and scheduler.scheduler.last_epoch == 1
