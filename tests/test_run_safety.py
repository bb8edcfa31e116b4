"""Runs that meet the real world: a resume that knows its run, save folders that are locked and fail cleanly,
a model swap that can be killed, a stalled rank, and a launcher that started fewer processes than asked."""

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protmask.training.checkpointing import SaveDirLock, list_checkpoints
from runner import BIN, ROOT, SCRIPT, TINY, descendants, free_port, launch, records, wait_for_training

# Real processes, signals, mounts and file-size limits: `make test-faults`.
pytestmark = pytest.mark.faults

RUN = TINY + ["--max_tokens_per_batch", "1024", "--checkpointing_steps", "1"]


def epoch_residues(save_dir, epoch=0):
    return sum(r["residues"] for r in records(save_dir, "train") if r["epoch"] == epoch)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(cache, uninterrupted, tmp_path, before, after):
    launcher = {1: None, 2: "accelerate"}
    common = RUN + ["--cache_dir", cache, "--save_dir", tmp_path, "--lr_scheduler_type", "linear",
                    "--learning_rate", "1e-3", "--warmup_steps", "0"]
    # Stop where the rest of the epoch divides among the new ranks: then no batch is repeated to fill a round.
    batches = len([r for r in records(uninterrupted, "train") if r["epoch"] == 0])
    stop = 1 if before == 2 or batches % 2 == 1 else 2
    launch(common + ["--max_train_steps", stop], launcher=launcher[before])
    continued = common + ["--epochs", "2", "--resume_from_checkpoint", "latest"]
    refused = launch(continued, launcher=launcher[after], check=False)
    assert refused.returncode != 0
    assert f"number of processes: {before} in the checkpoint, {after} now" in refused.stderr
    assert "--allow_world_size_change" in refused.stderr

    resumed = launch(continued + ["--allow_world_size_change"], launcher=launcher[after])
    assert f"continuing a {before}-process run on {after}" in resumed.stdout
    # The schedule continues at this run's rate and position: linear decay over the steps this run will take.
    total = int(re.search(r"(\d+) steps in all", resumed.stdout).group(1))
    later = [r for r in records(tmp_path, "train") if r["step"] > stop]
    assert later and later[0]["learning_rate"] > 0
    for record in later:  # the rate step k's update used, after k - 1 steps
        assert record["learning_rate"] == pytest.approx(1e-3 * after * (total - record["step"] + 1) / total, rel=1e-6)
    # The first epoch, split over two process counts, trained on exactly the residues of an uninterrupted one.
    assert epoch_residues(tmp_path, 0) == epoch_residues(uninterrupted, 0)
    assert max(r["epoch"] for r in records(tmp_path, "train")) == 1


def test_resume_refuses_a_run_defined_differently_and_a_folder_holding_another_run(cache, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    changed = launch(TINY + ["--cache_dir", cache, "--save_dir", run, "--resume_from_checkpoint", "latest",
                             "--max_tokens_per_batch", "2048", "--gradient_accumulation_steps", "2", "--seed", "1",
                             "--split_seed", "1", "--hidden_dim", "48", "--max_train_steps", "9"], check=False, timeout=120)
    assert changed.returncode == 2, changed.stderr
    for difference in ("--max_tokens_per_batch: 1024 in the checkpoint, 2048 now",
                       "--gradient_accumulation_steps: 1 in the checkpoint, 2 now",
                       "--seed: 0 in the checkpoint, 1 now", "model hidden_dim (--hidden_dim): 32 in the checkpoint, 48 now",
                       "dataset (--pdb_path and the build options)"):
        assert difference in changed.stderr
    assert "world size" not in changed.stdout  # refused before the data and the model were set up

    fresh = launch(RUN + ["--cache_dir", cache, "--save_dir", run, "--max_train_steps", "1"], check=False, timeout=120)
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr and "--overwrite_save_dir" in fresh.stderr
    assert len(list_checkpoints(run)) == len(list_checkpoints(uninterrupted))

    over = launch(RUN + ["--cache_dir", cache, "--save_dir", run, "--max_train_steps", "1", "--overwrite_save_dir"])
    assert "removed the previous run" in over.stdout
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000001"]
    assert [r["step"] for r in records(run, "train")] == [1]
    owner = json.loads((run / "run.json").read_text())["run_id"]
    assert json.loads((run / "checkpoint-00000001" / "trainer_state.json").read_text())["run_id"] == owner


def test_a_save_dir_in_use_is_refused(cache, tmp_path):
    lock = SaveDirLock(tmp_path).acquire()  # this test process is the other run
    try:
        done = launch(RUN + ["--cache_dir", cache, "--save_dir", tmp_path, "--max_train_steps", "1"], check=False,
                      timeout=120)
    finally:
        lock.handle.close()
    assert done.returncode == 2
    assert f"--save_dir {tmp_path} is in use by another run (pid {os.getpid()}" in done.stderr
    assert not list(tmp_path.glob("checkpoint-*"))


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only for the trainer: a read-only bind mount as root (permissions do not stop root),
    mode 555 otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_folders_are_named_before_any_work(cache, tmp_path):
    with read_only(tmp_path / "save"):
        done = launch(RUN + ["--cache_dir", cache, "--save_dir", tmp_path / "save", "--max_train_steps", "1"],
                      check=False, timeout=120)
    assert done.returncode == 2
    assert f"cannot write to {tmp_path / 'save'}" in done.stderr and "--save_dir" in done.stderr
    assert "Traceback" not in done.stderr
    with read_only(tmp_path / "cache"):  # empty: the dataset must be built there
        done = launch(RUN + ["--cache_dir", tmp_path / "cache", "--save_dir", tmp_path / "run2",
                             "--max_train_steps", "1"], check=False, timeout=120)
    assert done.returncode == 2
    assert f"--cache_dir {tmp_path / 'cache'}" in done.stderr and "Traceback" not in done.stderr


def small_file_limit():
    """In the child: files may not grow past 150 kB (writes then fail as on a full disk, EFBIG instead of
    ENOSPC) and the SIGXFSZ that would kill the process is ignored, as the write error is what we test."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_a_full_disk_while_saving_gives_one_message_and_no_partial_folder(cache, tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, *map(str, RUN), "--cache_dir", cache, "--save_dir", tmp_path,
                           "--max_train_steps", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          preexec_fn=small_file_limit)
    assert done.returncode == 2, done.stderr[-3000:]
    (message,) = [line for line in done.stderr.splitlines() if "error:" in line]
    assert message.startswith(f"train_accelerate.py: error: cannot write to {tmp_path}") and "--save_dir" in message
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.tmp")) and not list_checkpoints(tmp_path)  # no folder that looks complete


KILL_INSIDE_SWAP = """
import os, signal, sys
from pathlib import Path
from protmask.training import checkpointing
replace = os.replace
def replace_then_die(source, target):
    replace(source, target)
    if Path(target).name == "best.old":  # the old copy moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
checkpointing.os.replace = replace_then_die
checkpointing.replace_folder(Path(sys.argv[1]) / "best.tmp", Path(sys.argv[1]) / "best")
"""


def test_a_kill_while_replacing_best_leaves_a_model_and_the_next_run_restores_it(cache, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shutil.copytree(run / "final", run / "best.tmp")
    done = subprocess.run([sys.executable, "-c", KILL_INSIDE_SWAP, str(run)], capture_output=True, timeout=60, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL
    assert not (run / "best").exists() and (run / "best.old" / "model.safetensors").is_file()
    resumed = launch(RUN + ["--cache_dir", cache, "--save_dir", run, "--resume_from_checkpoint", "latest",
                            "--checkpointing_steps", "2", "--max_train_steps", "7"])
    assert f"restored {run / 'best'} from best.old" in resumed.stdout
    assert (run / "best" / "model.safetensors").is_file() and not (run / "best.old").exists()


def launcher_config(tmp_path, distributed_type):
    path = tmp_path / "accelerate.yaml"
    path.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {distributed_type}\nnum_machines: 1\n"
                    "machine_rank: 0\nnum_processes: 2\nmixed_precision: 'no'\nuse_cpu: true\n")
    return path


@pytest.mark.parametrize("form", ["--cpu --num_processes 2", "MULTI_CPU config"])
def test_a_launcher_that_starts_fewer_processes_than_asked_is_detected(cache, tmp_path, form):
    if form.startswith("--cpu"):
        prefix = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
    else:
        prefix = [str(BIN / "accelerate"), "launch", "--config_file", str(launcher_config(tmp_path, "MULTI_CPU"))]
    done = subprocess.run(prefix + ["--main_process_port", str(free_port()), SCRIPT, *map(str, RUN),
                                    "--cache_dir", cache, "--save_dir", tmp_path / "run", "--max_train_steps", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "asked for 2 processes but this run has 1" in done.stderr
    assert "accelerate_configs/cpu.yaml" in done.stderr and "torchrun --nproc_per_node 2" in done.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_a_stalled_rank_ends_the_job_within_the_collective_timeout(sample_dir, tmp_path):
    # Four hard-linked copies of the sample, parsed by one process: a first build that takes longer than the
    # 4 s collective timeout, which the other rank waits out in its own group. Then one rank is stopped.
    data = tmp_path / "data"
    for copy in range(4):
        (data / str(copy)).mkdir(parents=True)
        for file in sample_dir.iterdir():
            os.link(file, data / str(copy) / file.name)
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
               "--main_process_port", str(free_port()), SCRIPT, *map(str, TINY), "--pdb_path", data, "--num_proc", "1",
               "--cache_dir", tmp_path / "cache", "--save_dir", tmp_path / "run", "--max_tokens_per_batch", "1024",
               "--max_train_steps", "100000", "--process_group_timeout", "4"]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    workers = []
    try:
        wait_for_training(tmp_path / "run", process)
        build = json.loads(next((tmp_path / "cache").glob("protmask-dataset-*/build_report.json")).read_text())
        assert build["seconds"] > 4  # the build outlasted the collective timeout and nobody gave up
        workers = [pid for pid in descendants(process.pid) if SCRIPT in Path(f"/proc/{pid}/cmdline").read_text()]
        stopped = max(workers)
        os.kill(stopped, signal.SIGSTOP)
        started = time.time()
        stdout, stderr = process.communicate(timeout=120)
        ended_after = time.time() - started
    finally:
        if process.poll() is None:
            process.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode != 0
    assert ended_after < 90
    assert "stopped answering for --process_group_timeout 4 s" in stderr, stderr[-6000:]
    # Before the timeout, the waiting rank's own watch said so (on NCCL the watchdog ends the rank in C++,
    # where the message above never prints).
    spoken = re.search(r"rank [01] of 2 on \S+: no progress for \d+ s since step (\d+) \(--process_group_timeout 4 s\): "
                       r"another process stopped answering", stderr)
    assert spoken, stderr[-6000:]
    assert stderr.index(spoken.group(0)) < stderr.index("stopped answering for --process_group_timeout")


def test_the_trainer_rebuilds_a_damaged_cache_and_on_request(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (built,) = [p for p in copy.glob("protmask-dataset-*") if p.is_dir()]
    arrow = next((built / "validation").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    damaged = launch(RUN + ["--cache_dir", copy, "--save_dir", tmp_path / "a", "--max_train_steps", "1"])
    assert f"the cached dataset {built} is damaged" in damaged.stdout and "files: 45 seen" in damaged.stdout
    again = launch(RUN + ["--cache_dir", copy, "--save_dir", tmp_path / "b", "--max_train_steps", "1"])
    assert "reusing the dataset" in again.stdout
    forced = launch(RUN + ["--cache_dir", copy, "--save_dir", tmp_path / "c", "--max_train_steps", "1",
                           "--rebuild_dataset"])
    assert "reusing" not in forced.stdout and "files: 45 seen" in forced.stdout


def test_a_default_warm_up_when_scaling_raises_the_rate(cache, tmp_path):
    done = launch(RUN + ["--cache_dir", cache, "--save_dir", tmp_path, "--learning_rate", "1e-3",
                         "--max_train_steps", "40"], launcher="accelerate")
    assert "constant, 2 warm-up steps (the default when scaling raises the rate)" in done.stdout
    used = [r["learning_rate"] for r in records(tmp_path, "train")]
    assert used[:3] == pytest.approx([0.0, 1e-3, 2e-3]) and used[2:] == pytest.approx([2e-3] * (len(used) - 2))


def test_the_built_wheel_installs_and_trains_from_another_folder(tmp_path):
    # Build the wheel, install it into a clean environment that reuses this one's torch and libraries (a .pth
    # line; their protmask checkout stays invisible), and train from an unrelated folder on the sample inside it.
    import sysconfig
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("protmask-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sum(n.startswith("protmask/sample_data/") and n.endswith(".gz") for n in names) == 45
    assert "protmask/train.py" in names

    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "host_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import protmask; print(protmask.__file__)"], capture_output=True,
                           text=True, cwd=work, check=True).stdout
    assert where.startswith(site)
    common = [*map(str, TINY), "--max_tokens_per_batch", "1024", "--max_train_steps", "2", "--cache_dir", "cache"]
    one = subprocess.run([str(python), "-m", "protmask.train", *common, "--save_dir", "one"], capture_output=True,
                         text=True, cwd=work, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    report = json.loads(next((work / "cache").glob("protmask-dataset-*/build_report.json")).read_text())
    assert report["inputs"] == [str(Path(site) / "protmask" / "sample_data")]  # the sample inside the wheel
    assert (work / "one" / "final" / "model.safetensors").is_file()
    two = subprocess.run([str(python), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "protmask.train", *common, "--save_dir", "two"],
                         capture_output=True, text=True, cwd=work, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size: 2 process(es)" in two.stdout
    three = subprocess.run([str(python), "-m", "accelerate.commands.launch", "--config_file",
                            str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(free_port()),
                            "-m", "protmask.train", *common, "--save_dir", "three"],
                           capture_output=True, text=True, cwd=work, timeout=300)
    assert three.returncode == 0, three.stderr[-3000:]
    assert "world size: 2 process(es)" in three.stdout


def test_a_20000_residue_entry_trains_with_the_default_flags(tmp_path):
    # bench/memory.py: 9 sample entries and a 20 000-residue complex of real chains; one step and the
    # validation of the default model (hidden 256, 3 + 3 layers, 48 neighbours) with every default flag.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--variants", "default", "--output",
                           str(tmp_path / "memory.json")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "memory.json").read_text())["default_flags"]
    assert run["returncode"] == 0, run.get("error")
    assert run["giant_residues"] >= 20000
    assert any("batch per device: 8 examples" in line for line in run["run"])
    assert run["training_peak_rss_mb"] < 8000  # the stated bound: fits an 8 GB-class device


def test_a_worker_forked_before_it_ignores_signals_leaves_them_to_its_rank():
    """A launcher's SIGTERM to the process group can reach a parse or loader worker between its fork and its
    initializer, while it still has the rank's handler: it must neither print the rank's notice nor exit."""
    from protmask.training.preemption import PreemptionWatch

    watch = PreemptionWatch().install()
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker, before any initializer
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a different signal would make the rank stop at once
            os.write(write, b"requested" if watch.requested else b"alive")
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        assert os.read(read, 16) == b"alive" and os.waitstatus_to_exitcode(status) == 0
        assert not watch.requested
    finally:
        watch.uninstall()
