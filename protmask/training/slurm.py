"""One SLURM task per rank, with no launcher in between: `srun --ntasks-per-node=G python train_accelerate.py`.

srun forwards a signal to every task and waits for them, so a preempted rank always has until SLURM's kill
wait to finish its step and checkpoint; a launcher in between (`srun accelerate launch`) can exit first and
take the step down with it. The rendezvous comes from SLURM's variables, as torchrun would set them.
"""

from __future__ import annotations

import os
import re

#: Variables torchrun and accelerate launch set; when any is there a launcher owns the ranks.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07" (what `scontrol show hostnames`
    prints first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def tasks_on_this_node(environ) -> int:
    """SLURM_STEP_TASKS_PER_NODE looks like "8(x2),4"; this node's entry is found by SLURM_NODEID."""
    entries = []
    for item in environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1")).split(","):
        count, _, repeat = item.partition("(x")
        entries += [int(count)] * int(repeat.rstrip(")") or 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return entries[node] if node < len(entries) else entries[-1]


def adopt_slurm_ranks(environ=os.environ) -> str | None:
    """Under `srun` with several tasks and no launcher, set the variables torch.distributed reads from
    SLURM's. Returns a line for the log, or None when this is not such a run. MASTER_ADDR and MASTER_PORT
    may be set by the job script; by default the first node and a port derived from the job id."""
    step_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)  # set by srun, not in the batch script
    if step_tasks <= 1 or any(name in environ for name in LAUNCHER_VARIABLES):
        return None
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = str(step_tasks)
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ["LOCAL_WORLD_SIZE"] = str(tasks_on_this_node(environ))
    environ["GROUP_RANK"] = environ.get("SLURM_NODEID", "0")
    environ.setdefault("MASTER_ADDR", first_host(environ.get("SLURM_STEP_NODELIST",
                                                             environ.get("SLURM_JOB_NODELIST", "localhost"))))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    if "SLURM_CPUS_PER_TASK" in environ:  # CPU threads of each rank (torch reads OMP_NUM_THREADS, as under torchrun)
        environ.setdefault("OMP_NUM_THREADS", environ["SLURM_CPUS_PER_TASK"])
    return (f"ranks from SLURM: task {environ['RANK']} of {step_tasks}, local {environ['LOCAL_RANK']} of "
            f"{environ['LOCAL_WORLD_SIZE']}, rendezvous {environ['MASTER_ADDR']}:{environ['MASTER_PORT']}")
