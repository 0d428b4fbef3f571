"""catforge.runtime.distributed: launcher detection, the backend rule, the single-process
identities, and the collectives between two real gloo processes on the CPU."""

from __future__ import annotations

import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from catforge.errors import CatforgeError, ConfigError
from catforge.runtime import distributed
from catforge.runtime.distributed import DistributedEnv, choose_backend, detect
from catforge.runtime.hostlist import expand_hostlist

SPAWN_TIMEOUT_S = 60.0  # the whole 2-process group, start-up included
GROUP_TIMEOUT_S = 30.0  # init_process_group / collectives inside a child


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- detect() -----------------------------------------------------------------------------------

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29500",
}


def test_detect_torchrun() -> None:
    assert detect(env=TORCHRUN) == DistributedEnv(3, 1, 8, "10.0.0.5", 29500, "torchrun")


def test_detect_launch_arg_used_when_env_lacks_local_rank() -> None:
    env = {key: value for key, value in TORCHRUN.items() if key != "LOCAL_RANK"}
    assert detect(local_rank_arg=2, env=env) == DistributedEnv(3, 2, 8, "10.0.0.5", 29500, "launch")


def test_detect_launch_env_local_rank_wins_over_arg() -> None:
    found = detect(local_rank_arg=0, env=TORCHRUN)
    assert (found.local_rank, found.launcher) == (1, "launch")


def test_detect_launcher_beats_slurm() -> None:
    """torchrun inside a Slurm allocation: RANK is set, so the Slurm variables are ignored."""
    env = {**TORCHRUN, **slurm_env(ntasks=2, procid=1, localid=1, nodeid=0)}
    assert detect(env=env).launcher == "torchrun"


def test_detect_launcher_missing_world_size_or_bad_integer() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        detect(env={"RANK": "0"})
    with pytest.raises(ConfigError, match="LOCAL_RANK='x'"):
        detect(env={**TORCHRUN, "LOCAL_RANK": "x"})
    with pytest.raises(ConfigError, match="rank 8"):
        detect(env={**TORCHRUN, "RANK": "8"})


def test_detect_single() -> None:
    assert detect(env={}) == DistributedEnv(0, 0, 1, "127.0.0.1", 13356, "single")
    assert detect(port=4000, env={"SLURM_JOB_ID": "7"}).launcher == "single"  # salloc shell


def test_detect_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    assert detect().rank == 3


def slurm_env(
    ntasks: int, procid: int, localid: int, nodeid: int, nodes: int = 2, **extra: str
) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu[12-13]",
        **extra,
    }


def test_detect_slurm_several_tasks_per_node() -> None:
    env = slurm_env(ntasks=8, procid=5, localid=1, nodeid=1, SLURM_STEP_NODELIST="node[01-03,07]")
    assert detect(port=4242, gpus_per_node=4, env=env) == DistributedEnv(
        5, 1, 8, "node01", 4242, "slurm"
    )


def test_detect_slurm_ntasks_per_node_variable() -> None:
    env = slurm_env(ntasks=4, procid=3, localid=1, nodeid=1, SLURM_NTASKS_PER_NODE="2")
    found = detect(gpus_per_node=2, env=env)
    assert (found.rank, found.local_rank, found.world_size) == (3, 1, 4)


def test_detect_slurm_one_task_per_node() -> None:
    env = slurm_env(ntasks=2, procid=1, localid=0, nodeid=1)
    assert detect(env=env) == DistributedEnv(1, 0, 2, "gpu12", 13356, "slurm")
    with pytest.raises(ConfigError, match="ntasks-per-node=4"):  # no process per GPU: refuse
        detect(gpus_per_node=4, env=env)
    env = slurm_env(ntasks=3, procid=2, localid=0, nodeid=2, nodes=3, SLURM_NTASKS_PER_NODE="1")
    found = detect(env=env)
    assert (found.rank, found.local_rank, found.world_size) == (2, 0, 3)


def test_detect_slurm_bad_nodelist() -> None:
    env = slurm_env(ntasks=4, procid=0, localid=0, nodeid=0, SLURM_JOB_NODELIST="node[01-")
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        detect(env=env)


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a1,b2", ["a1", "b2"]),
        ("gpu[5]", ["gpu5"]),
        ("x-[009-011]", ["x-009", "x-010", "x-011"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]n[1-2].ib", ["r1n1.ib", "r1n2.ib", "r2n1.ib", "r2n2.ib"]),
        ("single-host", ["single-host"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "node[01-", "node]1[", "node[a-b]", "node[3-1]", "a,,b"])
def test_expand_hostlist_malformed(hostlist: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(hostlist)


# --- choose_backend() ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "cuda", "backend"),
    [
        (None, True, "nccl"),
        (None, False, "gloo"),
        ("auto", True, "nccl"),
        ("auto", False, "gloo"),
        ("gloo", True, "gloo"),
        ("gloo", False, "gloo"),
        ("nccl", True, "nccl"),
        ("NCCL", True, "nccl"),
    ],
)
def test_choose_backend(requested: str | None, cuda: bool, backend: str) -> None:
    assert choose_backend(requested, cuda) == backend


def test_choose_backend_nccl_without_cuda() -> None:
    with pytest.raises(ConfigError, match="--distributed-backend gloo"):
        choose_backend("nccl", cuda=False)


def test_choose_backend_unknown_name() -> None:
    with pytest.raises(ConfigError, match=r"\(--distributed-backend\) 'glo'\. Did you mean"):
        choose_backend("glo", cuda=False)


# --- without a process group --------------------------------------------------------------------


def test_helpers_are_identities_without_a_process_group() -> None:
    assert not distributed.is_initialized()
    assert distributed.get_rank() == 0
    assert distributed.get_world_size() == 1
    assert distributed.is_main()
    distributed.barrier()
    tensor = torch.arange(3.0)
    assert distributed.all_reduce_sum(tensor) is tensor
    assert torch.equal(tensor, torch.arange(3.0))
    assert distributed.all_reduce_max(0.5) == 0.5
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.gather_objects(obj) == [obj]
    distributed.cleanup()


def test_setup_single_process_is_a_no_op() -> None:
    env = detect(env={})
    # nccl is not checked when there is nothing to join
    for backend in (None, "auto", "gloo", "nccl"):
        device = distributed.setup(env, backend)
        assert not distributed.is_initialized()
        if backend == "gloo" or not torch.cuda.is_available():
            assert device == torch.device("cpu")
    with pytest.raises(ConfigError):
        distributed.setup(env, "nccll")


def test_setup_nccl_without_cuda_fails_before_joining() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    env = DistributedEnv(0, 0, 2, "127.0.0.1", free_port(), "torchrun")
    with pytest.raises(ConfigError, match="gloo"):
        distributed.setup(env, "nccl")
    assert not distributed.is_initialized()


def test_setup_port_in_use_names_the_flag() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = DistributedEnv(0, 0, 2, "127.0.0.1", port, "slurm")
        with pytest.raises(CatforgeError, match="--distributed-port") as raised:
            distributed.setup(env, "gloo", timeout_s=10)
    assert str(port) in str(raised.value)
    assert not distributed.is_initialized()


# --- two gloo processes -------------------------------------------------------------------------


def run_two_processes(worker: Callable[..., None], *args: Any) -> None:
    """``worker(rank, *args)`` in 2 spawned processes; raises if a child fails or time runs out.

    A failing child makes ``join`` raise at once (and terminates the other one), so a child
    blocked in a collective cannot hang the test.
    """
    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"2-process group did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5.0)


def collectives_worker(rank: int, port: int, out: str) -> None:
    """Joins through detect() + setup() as torchrun would, runs every helper, pickles results."""
    torch.set_num_threads(1)
    env = detect(
        env={
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    os.environ.pop("RANK", None)  # a misleading Slurm task id: the group's rank must win
    os.environ.update({**SLURM_TASK, "SLURM_PROCID": str(1 - rank)})
    device = distributed.setup(env, "auto", timeout_s=GROUP_TIMEOUT_S)
    try:
        summed = torch.tensor([1.0, 2.0]) * (rank + 1)
        returned = distributed.all_reduce_sum(summed)
        counts = torch.tensor([[rank, 10]], dtype=torch.long).t()  # not contiguous
        distributed.all_reduce_sum(counts)
        results = {
            "env": env,
            "device": str(device),
            "initialized": distributed.is_initialized(),
            "backend": dist.get_backend(),
            "rank": distributed.get_rank(),
            "process_rank": distributed.process_rank(),
            "world_size": distributed.get_world_size(),
            "is_main": distributed.is_main(),
            "sum": summed.tolist(),
            "sum_in_place": returned is summed,
            "sum_long": counts.tolist(),
            "max": distributed.all_reduce_max(0.25 if rank == 0 else 1.0),
            "max_none": distributed.all_reduce_max(0.0),
            "broadcast": distributed.broadcast_object({"run": f"id-{rank}"}),
            "broadcast_src1": distributed.broadcast_object(f"from-{rank}", src=1),
            "gather": distributed.gather_objects({"rank": rank, "items": list(range(rank + 1))}),
            "gather_dst1": distributed.gather_objects(rank * 10, dst=1),
        }
        distributed.barrier()
    finally:
        distributed.cleanup()
    results["after_cleanup"] = (distributed.is_initialized(), distributed.get_rank())
    results["launcher_after_cleanup"] = distributed.process_rank()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """The results of :func:`collectives_worker` on rank 0 and rank 1 (one spawn per module)."""
    out = tmp_path_factory.mktemp("two_ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        run_two_processes(collectives_worker, free_port(), str(out))
    yield [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in (0, 1)]


@pytest.mark.distributed
def test_setup_and_cleanup_through_detect(two_ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(two_ranks):
        assert result["env"].rank == rank
        assert result["env"].launcher == "torchrun"
        assert result["initialized"]
        assert result["backend"] == "gloo"
        assert result["device"] == "cpu"
        assert (result["rank"], result["world_size"], result["is_main"]) == (rank, 2, rank == 0)
        assert result["after_cleanup"] == (False, 0)
        assert result["process_rank"] == rank  # the group's, not SLURM_PROCID
        assert result["launcher_after_cleanup"] == 1 - rank  # no group: the launcher's


@pytest.mark.distributed
def test_all_reduce_sum(two_ranks: list[dict[str, Any]]) -> None:
    for result in two_ranks:
        assert result["sum"] == [3.0, 6.0]
        assert result["sum_in_place"]
        assert result["sum_long"] == [[1], [20]]


@pytest.mark.distributed
def test_all_reduce_max(two_ranks: list[dict[str, Any]]) -> None:
    for result in two_ranks:
        assert result["max"] == 1.0
        assert result["max_none"] == 0.0


@pytest.mark.distributed
def test_broadcast_object(two_ranks: list[dict[str, Any]]) -> None:
    for result in two_ranks:
        assert result["broadcast"] == {"run": "id-0"}
        assert result["broadcast_src1"] == "from-1"


@pytest.mark.distributed
def test_gather_objects(two_ranks: list[dict[str, Any]]) -> None:
    first, second = two_ranks
    assert first["gather"] == [{"rank": 0, "items": [0]}, {"rank": 1, "items": [0, 1]}]
    assert second["gather"] is None
    assert first["gather_dst1"] is None
    assert second["gather_dst1"] == [0, 10]


def failing_worker(rank: int, port: int) -> None:
    """Rank 1 dies before the barrier that rank 0 waits in."""
    torch.set_num_threads(1)
    env = DistributedEnv(rank, rank, 2, "127.0.0.1", port, "torchrun")
    distributed.setup(env, "gloo", timeout_s=GROUP_TIMEOUT_S)
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    distributed.barrier()
    distributed.barrier()


@pytest.mark.distributed
def test_a_failing_child_fails_the_test_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        run_two_processes(failing_worker, free_port())
    assert time.monotonic() - start < GROUP_TIMEOUT_S


SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3", "WORLD_SIZE": "4"}, 3),
        ({**SLURM_TASK, "RANK": "0"}, 0),  # torchrun inside an allocation: RANK wins
        (SLURM_TASK, 1),
        ({**SLURM_TASK, "SLURM_NTASKS": "1"}, 0),  # one task: a single process
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, 0),  # no Slurm job
    ],
)
def test_launcher_rank(env: dict[str, str], rank: int) -> None:
    assert distributed.launcher_rank(env) == rank


def test_launcher_rank_bad_integer_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        distributed.launcher_rank({**SLURM_TASK, "SLURM_PROCID": "x"})


def test_progress_asks_the_one_rank_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Slurm (SLURM_PROCID, no RANK) and before any process group, task 1 shows no bar;
    its data rank (get_rank, with world size 1) stays 0."""
    import sys

    from catforge.runtime import progress

    monkeypatch.delenv("RANK", raising=False)
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not distributed.is_initialized()
    assert distributed.process_rank() == 1
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    assert not progress.progress_enabled()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.process_rank() == 0
    assert progress.progress_enabled()
    assert not progress.progress_enabled(False)
