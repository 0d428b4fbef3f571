"""Process-group setup from every launcher, and the collective helpers everything else calls.

Launchers (:func:`detect` reads them from the environment, in this order):

- ``torchrun`` (``python -m torch.distributed.run``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``.
- ``python -m torch.distributed.launch``: the same variables, plus ``--local_rank``/``--local-rank``
  on the command line (passed in as ``local_rank_arg``; it is used when ``LOCAL_RANK`` is unset,
  as with old launchers). Any run whose ``local_rank_arg`` is not None is labelled ``"launch"``.
- Slurm (``srun``, or a submitit job from ``--submit``): ``SLURM_JOB_ID``, ``SLURM_PROCID`` and
  ``SLURM_NTASKS`` set and ``RANK`` unset. With one task per node (``SLURM_NTASKS_PER_NODE``,
  else ``SLURM_NTASKS / nodes``) ``rank = SLURM_NODEID``, ``local_rank = 0`` and
  ``world_size = nodes`` (OCP multiplied by ``gpus_per_node`` and expected per-GPU processes
  that nothing starts, so one task per node with several GPUs is an error naming the fix);
  otherwise ``rank = SLURM_PROCID``,
  ``local_rank = SLURM_LOCALID`` and ``world_size = SLURM_NTASKS``. ``nodes`` is
  ``SLURM_STEP_NUM_NODES``, ``SLURM_JOB_NUM_NODES`` or ``SLURM_NNODES`` (first one set). The
  rendezvous host is the first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``),
  expanded from Slurm's compressed form (``node[01-03,07]``) by
  :mod:`catforge.runtime.hostlist`; the port is ``--distributed-port``.
- Nothing of the above: one process (rank 0 of 1, ``"single"``).

Backend rule (:func:`choose_backend`): ``auto`` (the default) is ``nccl`` when CUDA is available,
else ``gloo``; ``nccl`` without CUDA is a :class:`~catforge.errors.ConfigError`.

Every collective in catforge goes through this module, and every helper is the identity (rank 0,
world size 1) when no process group is initialised, so single-process code calls them
unconditionally. Only rank 0 (:func:`is_main`) makes run folders and writes files (checkpoints,
logs, metrics, predictions); the other ranks send their results to it with :func:`gather_objects`.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from catforge.errors import CatforgeError, ConfigError
from catforge.registry import unknown_name
from catforge.runtime.hostlist import expand_hostlist

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl", "mpi")
_LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits among the processes of one run.

    ``launcher`` is ``"torchrun"``, ``"launch"``, ``"slurm"`` or ``"single"``; ``master_addr`` and
    ``master_port`` are the TCP rendezvous of rank 0.
    """

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str


def detect(
    local_rank_arg: int | None = None,
    port: int = 13356,
    gpus_per_node: int = 1,
    env: Mapping[str, str] | None = None,
) -> DistributedEnv:
    """Where this process sits, from the launcher's environment (``os.environ`` by default).

    Args:
        local_rank_arg: ``--local_rank`` from the command line (``torch.distributed.launch``);
            None when not given.
        port: ``--distributed-port``, the rendezvous port for Slurm jobs (and the fallback when a
            launcher sets ``RANK`` but not ``MASTER_PORT``).
        gpus_per_node: ``--num-gpus``; used for Slurm jobs with one task per node.
        env: the environment to read; ``os.environ`` when None.

    Raises:
        ConfigError: a variable is not an integer, or the ranks do not fit the world size.
    """
    env = os.environ if env is None else env
    if "RANK" in env:
        found = _from_launcher(env, local_rank_arg, port)
    elif "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        found = _from_slurm(env, port, gpus_per_node)
    else:
        local_rank = 0 if local_rank_arg is None else local_rank_arg
        found = DistributedEnv(0, local_rank, 1, _LOCALHOST, port, "single")
    if not 0 <= found.rank < found.world_size or found.local_rank < 0:
        raise ConfigError(
            f"{found.launcher} environment gives rank {found.rank} and local rank "
            f"{found.local_rank} with world size {found.world_size}; check the launcher's variables"
        )
    return found


def _from_launcher(env: Mapping[str, str], local_rank_arg: int | None, port: int) -> DistributedEnv:
    """torchrun / torch.distributed.launch: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT."""
    if "WORLD_SIZE" not in env:
        raise ConfigError("RANK is set but WORLD_SIZE is not; start the run with torchrun")
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK")
    else:
        local_rank = 0 if local_rank_arg is None else local_rank_arg
    launcher = "torchrun" if local_rank_arg is None else "launch"
    master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port
    return DistributedEnv(
        rank=_int(env, "RANK"),
        local_rank=local_rank,
        world_size=_int(env, "WORLD_SIZE"),
        master_addr=env.get("MASTER_ADDR") or _LOCALHOST,
        master_port=master_port,
        launcher=launcher,
    )


def _from_slurm(env: Mapping[str, str], port: int, gpus_per_node: int) -> DistributedEnv:
    """Ranks from the Slurm task variables, as OCP's ``distutils.setup`` under ``--submit``."""
    ntasks = _int(env, "SLURM_NTASKS")
    nodes = _slurm_nodes(env)
    if "SLURM_NTASKS_PER_NODE" in env:
        # "2" with --ntasks-per-node; may also read "2(x3)" on some versions: the first count.
        match = re.match(r"\d+", env["SLURM_NTASKS_PER_NODE"])
        if match is None:
            raise ConfigError(
                f"SLURM_NTASKS_PER_NODE={env['SLURM_NTASKS_PER_NODE']!r} is not a task count"
            )
        tasks_per_node = int(match.group())
    else:
        tasks_per_node = ntasks // max(nodes, 1)
    if tasks_per_node == 1 and gpus_per_node > 1:
        raise ConfigError(
            f"one Slurm task per node but --num-gpus {gpus_per_node}: catforge runs one process "
            f"per GPU; start {gpus_per_node} tasks per node (srun --ntasks-per-node="
            f"{gpus_per_node}) or submit with --submit --distributed"
        )
    if tasks_per_node == 1:
        rank = _int(env, "SLURM_NODEID") * gpus_per_node
        local_rank, world_size = 0, nodes * gpus_per_node
    else:
        rank, local_rank, world_size = (
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_LOCALID"),
            ntasks,
        )
    name = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    if not env.get(name):
        raise ConfigError("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    try:
        master_addr = expand_hostlist(env[name])[0]
    except ValueError as e:
        raise ConfigError(f"{name}={env[name]!r}: {e}") from e
    return DistributedEnv(rank, local_rank, world_size, master_addr, port, "slurm")


def _slurm_nodes(env: Mapping[str, str]) -> int:
    for name in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if name in env:
            return _int(env, name)
    return 1


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError as e:
        raise ConfigError(f"environment variable {name} is not set") from e
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from e


def choose_backend(requested: str | None, cuda: bool) -> str:
    """The process-group backend: None/``"auto"`` -> ``"nccl"`` with CUDA, else ``"gloo"``.

    Raises:
        ConfigError: ``"nccl"`` without CUDA, or an unknown backend name.
    """
    name = "auto" if requested is None else requested.strip().lower()
    if name not in BACKENDS:
        raise unknown_name(str(requested), BACKENDS, "backend (--distributed-backend)")
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise ConfigError(
            "--distributed-backend nccl needs CUDA, which is not available here; "
            "use --distributed-backend gloo (or auto)"
        )
    return name


def setup(
    env: DistributedEnv, backend: str | None = None, *, timeout_s: float = 1800
) -> torch.device:
    """Join the process group described by ``env``; a no-op for one process.

    Calls ``init_process_group(backend, init_method="tcp://master_addr:master_port", rank,
    world_size)`` when ``env.world_size > 1``. With CUDA and ``nccl`` it also calls
    ``torch.cuda.set_device(local_rank)``. Returns the device the collectives use:
    ``cuda:local_rank`` for nccl, else cpu (for one process: ``cuda:local_rank`` when CUDA is
    available and the backend is not ``gloo``). The model device is the caller's choice.

    Raises:
        ConfigError: a bad backend (see :func:`choose_backend`).
        CatforgeError: the rendezvous failed (port in use, host unreachable, timeout).
    """
    cuda = torch.cuda.is_available()
    if env.world_size > 1:
        name = choose_backend(backend, cuda)
    else:  # nothing to join: check the name, but "nccl" without CUDA does no harm here
        nccl = backend is not None and backend.strip().lower() == "nccl"
        name = choose_backend(None if nccl else backend, cuda)
    device = torch.device("cpu")
    if cuda and (name == "nccl" or env.world_size > 1):  # one GPU per process, whatever backend
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank) if name == "nccl" else device
    if env.world_size <= 1:
        return device
    if is_initialized():
        raise CatforgeError("the process group is already initialised; call cleanup() first")
    address = f"tcp://{env.master_addr}:{env.master_port}"
    try:
        dist.init_process_group(
            name,
            init_method=address,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise CatforgeError(
            f"rank {env.rank} of {env.world_size} ({env.launcher}) could not join the {name} "
            f"process group at {address}: {e}. If the port is in use, pick another with "
            "--distributed-port (Slurm) or --master_port (torchrun/launch)"
        ) from e
    log.info(
        "rank %d of %d (local rank %d, %s, %s) joined at %s",
        env.rank,
        env.world_size,
        env.local_rank,
        env.launcher,
        name,
        address,
    )
    return device


def cleanup() -> None:
    """Leave the process group (``destroy_process_group``) if one is initialised."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether this process is in an initialised ``torch.distributed`` process group."""
    return bool(dist.is_available() and dist.is_initialized())


def get_rank() -> int:
    """This process's rank in the process group; 0 without one (pairs with :func:`get_world_size`
    for sharding; :func:`process_rank` also reads the launcher)."""
    return dist.get_rank() if is_initialized() else 0


def process_rank() -> int:
    """This process's rank for deciding what it shows (progress bars): the process group's when
    one is initialised, else the launcher's (:func:`launcher_rank`), so every rank of a starting
    or group-less run knows whether it is rank 0.

    Unlike :func:`get_rank` it can be non-zero without a process group (a Slurm task run without
    ``--distributed`` is rank 0 of 1 for its data), so shard with :func:`get_rank` and
    :func:`get_world_size`, not with this.
    """
    return dist.get_rank() if is_initialized() else launcher_rank()


def launcher_rank(env: Mapping[str, str] | None = None) -> int:
    """The rank the launcher gave this process (``os.environ`` by default): ``RANK`` (torchrun,
    launch), else ``SLURM_PROCID`` in a Slurm job of several tasks (``SLURM_JOB_ID`` set,
    ``SLURM_NTASKS`` > 1), else 0. Raises ConfigError when the variable is not an integer."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return _int(env, "RANK")
    slurm = "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    if slurm and _int(env, "SLURM_NTASKS") > 1:
        return _int(env, "SLURM_PROCID")
    return 0


def get_world_size() -> int:
    """The number of processes; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one process that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it; the identity without a process group.

    Any shape and numeric dtype. Under nccl a CPU tensor is summed through the current CUDA device
    and copied back; under gloo CPU tensors are summed directly. Not differentiable.
    """
    if not is_initialized():
        return tensor
    work = tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    elif not tensor.is_contiguous():
        work = tensor.contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (e.g. 1.0 when any rank was preempted); identity alone."""
    if not is_initialized():
        return float(value)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank; identity alone."""
    if not is_initialized():
        return obj
    box: list[object] = [obj]
    dist.broadcast_object_list(box, src=src)
    return cast(T, box[0])


def gather_objects(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj`` as a list in rank order on rank ``dst``, None on the other ranks.

    ``[obj]`` without a process group. Objects are pickled; keep them to results, not tensors on
    a GPU.
    """
    if not is_initialized():
        return [obj]
    if get_rank() != dst:
        dist.gather_object(obj, None, dst=dst)
        return None
    gathered: list[object] = [None] * get_world_size()
    dist.gather_object(obj, gathered, dst=dst)
    return cast(list[T], gathered)
