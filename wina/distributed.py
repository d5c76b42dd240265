"""Data-parallel evaluation through accelerate, the engine lm-eval itself supports.

``wina eval --procs N`` (or ``--gpus N``) re-launches the same command under
``accelerate launch --num_processes N``. Every process loads and sparsifies its own copy of the
model (from the same options or plan) on its own device; lm-eval gives each rank a shard of every
task's requests and gathers the per-sample results on rank 0, which alone computes the metrics and
writes the results file. What lm-eval does not know about is merged here: the sparsity counters of
every rank's gates (so the measured sparsity covers all requests) and, for the perplexity path, the
NLL and token sums of each rank's windows.

On a CPU machine the same path runs with ``accelerate launch --cpu`` over gloo, which is how the
tests check that N processes give the results of one.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

ENV_MARK = "WINA_DISTRIBUTED"       # set in the children, so that they do not re-launch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the data-parallel group (rank 0 of 1 outside ``accelerate launch``).
    In a child of the launcher the process group is started on first use."""
    if not in_child():
        return World()
    init()
    import torch.distributed as dist
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def in_child() -> bool:
    return os.environ.get(ENV_MARK) == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for_rank(device: str) -> str:
    """``cuda`` becomes ``cuda:<local rank>`` in a child process; anything else is unchanged."""
    if device == "cuda" and in_child():
        return f"cuda:{world().local_rank}"
    return device


_ACCELERATOR = []


def init() -> Optional["object"]:
    """In a child of ``accelerate launch``: start the process group (once) and return the
    Accelerator; in a plain process: None."""
    if not in_child():
        return None
    if not _ACCELERATOR:
        from accelerate import Accelerator
        _ACCELERATOR.append(Accelerator())
    return _ACCELERATOR[0]


def attach(lm, accelerator) -> None:
    """Make an lm-eval HFLM built from a model object act as one rank of the data-parallel group
    (lm-eval's "custom distributed integration": rank, world size and the accelerator)."""
    if accelerator is None or accelerator.num_processes <= 1:
        return
    lm.accelerator = accelerator
    lm._rank = accelerator.process_index
    lm._world_size = accelerator.num_processes


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    backend = dist.get_backend()
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def merge_gate_counters(sparsifier) -> None:
    """Replace every gate's (dropped, seen) counters by their sum over all ranks."""
    if sparsifier is None:
        return
    gates = list(sparsifier.gates.values())
    flat = []
    for g in gates:
        flat += [int(g.dropped), int(g.seen)]
    summed = all_reduce_sum(flat)
    import torch
    for i, g in enumerate(gates):
        g.dropped = torch.tensor(int(summed[2 * i]), dtype=torch.int64)
        g.seen = torch.tensor(int(summed[2 * i + 1]), dtype=torch.int64)


def shard(n: int, w: Optional[World] = None) -> range:
    """The items of ``range(n)`` this rank handles (strided, so shards differ by at most one)."""
    w = w or world()
    return range(w.rank, n, w.size)


def launch_command(argv: Sequence[str], n_procs: int, *, cpu: bool) -> list[str]:
    """The ``accelerate launch`` command that re-runs ``wina <argv>`` in ``n_procs`` processes."""
    exe = shutil.which("accelerate")
    head = [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
    mode = ["--cpu"] if cpu else ["--multi_gpu"]
    return [*head, "--num_processes", str(n_procs), "--num_machines", "1", *mode,
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "wina.cli", *argv]


def launch_env(**extra: str) -> dict:
    """The environment of the launched group: ours, the child mark, NVLink multicast off."""
    env = dict(os.environ, **{ENV_MARK: "1"}, **extra)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    return env


def relaunch(argv: Sequence[str], n_procs: int, *, cpu: bool) -> int:
    """Run the command data-parallel and return the exit code of the group."""
    import subprocess
    return subprocess.call(launch_command(argv, n_procs, cpu=cpu), env=launch_env())
