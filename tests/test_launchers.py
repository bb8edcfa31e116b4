"""Runs as launchers and schedulers deliver signals: to a process group, to every process of a job, twice;
with loader workers on. SLURM tasks as ranks, compiled runs, ranks whose datasets differ."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from protmask.training.loop import list_checkpoints
from protmask.training.preemption import PREEMPTED_EXIT_CODE
from runner import (RESUME, descendants, launch, max_difference, rank_processes, slurm_step, start, wait_for_training,
                    wait_gone, weights)
from test_training import checkpoint_step

pytestmark = pytest.mark.faults

# Loader workers on, as users run; a warm-up of fixed length (the default one depends on --max_train_steps).
WORKERS = RESUME + ["--num_workers", "2", "--warmup_steps", "0"]
TARGET = 12  # the preempted runs resume to this step; each is compared with an uninterrupted run to it


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """Uninterrupted runs to TARGET, per launcher, with the same loader workers."""
    made = {}

    def run(launcher):
        if launcher not in made:
            save_dir = tmp_path_factory.mktemp(f"reference-{launcher}")
            args = WORKERS + ["--cache_dir", cache, "--max_train_steps", TARGET, "--save_dir", save_dir]
            if launcher == "slurm":
                finish_slurm_step(slurm_step(args))
            else:
                launch(args, launcher=launcher, timeout=400)
            made[launcher] = save_dir
        return made[launcher]
    return run


def preempt_and_resume(cache, tmp_path, reference, launcher, deliver):
    """Start a run that would go on for ever, ``deliver`` the signals once it trains, and check what the
    issue of a preemption must leave: status 75 from every rank, a checkpoint of the step reached with every
    rank's random state, and a resumed run that ends bit-identical to an uninterrupted one."""
    save_dir = tmp_path / "run"
    job = start(WORKERS + ["--cache_dir", cache, "--max_train_steps", "100000", "--save_dir", save_dir], launcher)
    wait_for_training(save_dir, job)
    ranks = rank_processes(job.pid)
    assert len(ranks) == (1 if launcher is None else 2), ranks
    deliver(job, ranks)
    stdout, stderr = job.communicate(timeout=180)
    wait_gone(ranks)  # a launcher signalled twice may leave before its ranks; they still finish
    check_checkpoint(save_dir, stdout, len(ranks))
    assert "DataLoader worker" not in stderr and "stopping now" not in stderr, stderr[-3000:]
    launch(WORKERS + ["--cache_dir", cache, "--max_train_steps", TARGET, "--save_dir", save_dir,
                      "--resume_from_checkpoint", "latest"], launcher=launcher, timeout=400)
    assert max_difference(weights(save_dir), weights(reference(launcher))) == 0.0
    return job.returncode, stderr


def finish_slurm_step(tasks, timeout=400):
    outputs = [task.communicate(timeout=timeout) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    return outputs


def check_checkpoint(save_dir, stdout, ranks: int) -> int:
    """The preemption checkpoint: of the step reached, every rank's random state in it, nothing final."""
    step = checkpoint_step(stdout)
    assert step < TARGET, step
    checkpoint = save_dir / f"checkpoint-{step:08d}"
    assert list_checkpoints(save_dir)[-1] == checkpoint and not (save_dir / "final").exists()
    for rank in range(ranks):
        assert (checkpoint / f"random_states_{rank}.pkl").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    return step


def to_the_process_group(job, ranks):
    os.killpg(job.pid, signal.SIGTERM)  # what torchrun's agent, `kill -- -PGID` and a terminal's Ctrl-C do


def to_every_process(times):
    def deliver(job, ranks):
        signal_every_process([job], times)  # SLURM signals every process of the step; a launcher forwards it again
    return deliver


def signal_every_process(tasks, times: int) -> None:
    """SIGTERM to every process of the tasks and their descendants, ``times`` times 0.3 s apart."""
    for attempt in range(times):
        for pid in [p for task in tasks for p in [task.pid] + descendants(task.pid)]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if attempt + 1 < times:
            time.sleep(0.3)


def test_sigterm_to_a_single_process_runs_group_with_loader_workers(cache, tmp_path, reference):
    status, stderr = preempt_and_resume(cache, tmp_path, reference, None, to_the_process_group)
    assert status == PREEMPTED_EXIT_CODE, stderr[-3000:]


def test_sigterm_to_an_accelerate_launch_jobs_process_group_with_loader_workers(cache, tmp_path, reference):
    # The launcher alone is in the group (its ranks have sessions of their own); it forwards the signal to
    # each rank's group, loader workers included, and waits for them.
    status, stderr = preempt_and_resume(cache, tmp_path, reference, "accelerate", to_the_process_group)
    # The launcher reports the signal it got after its ranks left with 75: SignalException (status 1), or
    # 128 + 15 where torch's elastic agent exits with the signal's shell status.
    assert launcher_reported_sigterm(status, stderr), stderr[-3000:]


@pytest.mark.parametrize("times", [1, 2])
def test_sigterm_to_every_process_of_a_two_rank_job(cache, tmp_path, reference, times):
    status, stderr = preempt_and_resume(cache, tmp_path, reference, "accelerate", to_every_process(times))
    # Once: as above. Twice: the launcher, already shutting down, dies of the second signal (-15, 143 in a
    # shell) without waiting for its ranks; they finish their step and checkpoint all the same.
    assert launcher_reported_sigterm(status, stderr) if times == 1 else status in (1, 143, -signal.SIGTERM), stderr[-3000:]


def launcher_reported_sigterm(status: int, stderr: str) -> bool:
    return (status == 1 and "got signal: 15" in stderr) or status == 128 + signal.SIGTERM


def test_slurm_tasks_as_ranks_preempted_twice_finish_the_step_and_resume_identically(cache, tmp_path, reference):
    # The cluster launch the docs give: srun starts every rank itself, forwards signals and waits for the
    # ranks. Here SIGTERM reaches every process of the step twice, 0.3 s apart (scancel, then srun's forward).
    save_dir = tmp_path / "run"
    tasks = slurm_step(WORKERS + ["--cache_dir", cache, "--max_train_steps", "100000", "--save_dir", save_dir])
    wait_for_training(save_dir, tasks[0])
    signal_every_process(tasks, 2)
    outputs = [task.communicate(timeout=180) for task in tasks]
    assert [task.returncode for task in tasks] == [PREEMPTED_EXIT_CODE] * 2, outputs[0][1][-3000:]
    assert "ranks from SLURM: task 0 of 2" in outputs[0][0]
    check_checkpoint(save_dir, outputs[0][0], ranks=2)
    finish_slurm_step(slurm_step(WORKERS + ["--cache_dir", cache, "--max_train_steps", TARGET, "--save_dir", save_dir,
                                            "--resume_from_checkpoint", "latest"]))
    assert max_difference(weights(save_dir), weights(reference("slurm"))) == 0.0


def test_a_compiled_run_is_an_ordinary_run(cache, sample_dir, tmp_path):
    # Compiled after prepare and in place: checkpoints hold plain keys, so a compiled run resumes eagerly
    # and an eager one compiled, and design loads a compiled run's checkpoint.
    from safetensors.torch import load_file

    common = RESUME + ["--cache_dir", cache, "--dropout", "0", "--backbone_noise", "0"]
    for first, then in (("compiled", "eager"), ("eager", "compiled")):
        save_dir = tmp_path / f"{first}-then-{then}"
        flag = lambda mode: ["--torch_compile"] if mode == "compiled" else []  # noqa: E731
        launch(common + ["--max_train_steps", "2", "--save_dir", save_dir] + flag(first), timeout=600)
        keys = load_file(str(save_dir / "checkpoint-00000002" / "model.safetensors"))
        assert not any("_orig_mod" in key for key in keys), sorted(keys)[:3]
        launch(common + ["--max_train_steps", "4", "--save_dir", save_dir, "--resume_from_checkpoint", "latest"]
               + flag(then), timeout=600)
    launch(common + ["--max_train_steps", "4", "--save_dir", tmp_path / "eager"])
    for run in ("compiled-then-eager", "eager-then-compiled"):  # compiled kernels round differently
        assert max_difference(weights(tmp_path / run), weights(tmp_path / "eager")) < 1e-4
    done = subprocess.run([sys.executable, "-m", "protmask.cli", "design", "--model",
                           tmp_path / "compiled-then-eager" / "checkpoint-00000002", "--pdb", sample_dir / "5emb.pdb.gz",
                           "--num_samples", "1", "--output", tmp_path / "designed.fasta"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (tmp_path / "designed.fasta").read_text().count(">") == 2, done.stderr[-2000:]


def test_a_machine_whose_dataset_differs_is_refused_by_name(sample_dir, tmp_path):
    # Two machines on one host, node-local caches; the second machine's copy of the inputs lacks a file
    # (an incomplete sync). Both stop before training, naming the ranks, machines and datasets.
    from runner import BIN, ROOT, SCRIPT, TINY, free_port

    incomplete = tmp_path / "node1-pdb"
    shutil.copytree(sample_dir, incomplete)
    next(incomplete.glob("*.gz")).unlink()
    port, processes = free_port(), []
    for rank, data in ((0, sample_dir), (1, incomplete)):
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   SCRIPT] + TINY + ["--pdb_path", str(data), "--cache_dir", str(tmp_path / f"node{rank}"),
                                     "--max_train_steps", "3", "--save_dir", str(tmp_path / "run")]
        processes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode != 0 for p in processes)
    for output in outputs:
        assert "the processes of this job hold different datasets" in output, output[-3000:]
        assert "rank(s) 0 on" in output and "rank(s) 1 on" in output and str(tmp_path / "node1") in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


WALK_COUNTER = """
import os, sys
_root, _log = os.path.realpath(os.environ["WALK_ROOT"]), os.environ["WALK_LOG"]
def _count_walks(event, args):
    path = args[0] if args and isinstance(args[0], (str, bytes, os.PathLike)) else None  # not a descriptor
    if event == "os.scandir" and path is not None and os.path.realpath(os.fsdecode(path)) == _root:
        with open(_log, "a") as log:
            log.write(f"{os.environ.get('RANK')} {os.environ.get('GROUP_RANK')}\\n")
sys.addaudithook(_count_walks)
"""


def test_starting_two_machines_of_two_ranks_walks_the_inputs_once_per_machine(sample_dir, tmp_path):
    # Python's audit hook sees every os.scandir of the input folder in every process of the job: a first
    # build and a later start that reuses it each cost one walk on each machine, by its first process.
    from runner import BIN, ROOT, SCRIPT, TINY, free_port

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(WALK_COUNTER)
    for attempt in ("build", "reuse"):
        log = tmp_path / f"walks-{attempt}.txt"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "hook"),
                                                                          os.environ.get("PYTHONPATH")])),
                   WALK_ROOT=str(sample_dir), WALK_LOG=str(log))
        port, processes = free_port(), []
        for machine in (0, 1):
            command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes",
                       "4", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port",
                       str(port), SCRIPT] + TINY + [
                "--pdb_path", str(sample_dir), "--cache_dir", str(tmp_path / f"node{machine}"),  # node-local
                "--max_train_steps", "1", "--torch_threads", "1", "--save_dir", str(tmp_path / attempt)]
            processes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, env=env))
        outputs = [p.communicate(timeout=400)[0] for p in processes]
        assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
        walks = sorted(log.read_text().split("\n")[:-1])
        assert walks == ["0 0", "2 1"], (attempt, walks)  # rank 0 on machine 0, rank 2 on machine 1
        assert (tmp_path / attempt / "final" / "model.safetensors").is_file()


def test_parse_workers_leave_a_signal_to_their_process(sample_dir, tmp_path):
    # SIGTERM to the process group while two parse workers build: the workers neither die nor answer it;
    # the build completes, and the run stops after its first step with a checkpoint, status 75.
    data = tmp_path / "data"
    for copy in range(3):  # a build that lasts long enough to be signalled in the middle
        (data / str(copy)).mkdir(parents=True)
        for file in sample_dir.iterdir():
            os.link(file, data / str(copy) / file.name)
    cache, save_dir = tmp_path / "cache", tmp_path / "run"
    job = start(WORKERS + ["--pdb_path", data, "--num_proc", "2", "--cache_dir", cache, "--max_train_steps", "100000",
                           "--save_dir", save_dir])
    deadline = time.time() + 120
    while not (cache.is_dir() and any(".tmp-" in p.name for p in cache.iterdir()) and len(descendants(job.pid)) >= 2):
        assert time.time() < deadline and job.poll() is None, "the build and its parse pool did not start"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=240)
    assert job.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert stderr.count("received SIGTERM") == 1  # the rank alone; the workers ignored it
    (report,) = cache.glob("protmask-dataset-*/build_report.json")
    built = json.loads(report.read_text())
    assert built["files_parsed"] == 3 * len(list(sample_dir.glob("*.gz"))) and not built["files_failed"]
    assert checkpoint_step(stdout) == 1
