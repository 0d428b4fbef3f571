"""DDP scaling on this machine: training structures/s with 1 and 2 processes, and data waits.

Trains the demo S2EF SchNet (``configs/demo/s2ef_schnet.yml``) on the demo data for ``--steps``
steps in each setting: ``--processes`` (1 runs ``main.py`` directly, more run it under torchrun
with gloo on the CPU, or NCCL with ``--cuda``) times ``--workers`` (DataLoader workers per
process). Each process gets ``cores // processes`` torch threads and a per-process batch of
``--batch-size``, so N processes train N times the structures per step. The figures come from
the run's own ``metrics.jsonl`` (rank 0's windows of ``--print-every`` steps, the first window
dropped as warm-up): structures/s summed over ranks, and the fraction of step time spent waiting
for the next batch (loading and collating). Run, after ``catforge data demo --out demo_data``:

    python benchmarks/ddp_scaling.py [--data demo_data] [--steps 60] [--batch-size 8]
        [--processes 1 2] [--workers 0 2] [--cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "s2ef_schnet.yml"


def train_command(
    args: argparse.Namespace, processes: int, workers: int, run_dir: Path
) -> list[str]:
    data = Path(args.data).resolve()
    overrides = [
        f"--dataset.train.src={data / 's2ef' / 'train'}",
        f"--dataset.val.src={data / 's2ef' / 'val'}",
        f"--optim.max_steps={args.steps}", f"--optim.batch_size={args.batch_size}",
        f"--optim.num_workers={workers}", "--optim.eval_every=1000000",
        f"--print-every={args.print_every}", f"--run-dir={run_dir}", "--timestamp-id=bench",
    ]  # fmt: skip
    if not args.cuda:
        overrides.append("--cpu")
    main = [str(ROOT / "main.py"), "--mode=train", f"--config-yml={CONFIG}", *overrides]
    if processes == 1:
        return [sys.executable, *main]
    backend = "nccl" if args.cuda else "gloo"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            "--standalone", *main, "--distributed",
            f"--distributed-backend={backend}"]  # fmt: skip


def measure(args: argparse.Namespace, processes: int, workers: int) -> dict[str, float]:
    """Run one setting; structures/s (all ranks), data-wait fraction and wall time."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        start = time.perf_counter()
        done = subprocess.run(train_command(args, processes, workers, run_dir), cwd=ROOT, env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"training failed ({processes} processes):\n{done.stderr[-3000:]}")
        lines = (run_dir / "results" / "bench" / "metrics.jsonl").read_text().splitlines()
    windows = [record for record in map(json.loads, lines) if record["split"] == "train"][1:]
    if not windows:
        raise SystemExit("too few steps for a measurement: raise --steps")
    return {
        "structures_per_s": processes * statistics.mean(w["structures_per_s"] for w in windows),
        "data_wait": statistics.mean(w["data_wait_fraction"] for w in windows),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo_data", help="folder made by catforge data demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--print-every", type=int, default=10)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL")
    args = parser.parse_args()
    if not (Path(args.data) / "s2ef" / "train").is_dir():
        raise SystemExit(f"{args.data}: no demo data; run catforge data demo --out {args.data}")
    rows = []
    for workers in args.workers:
        for processes in args.processes:
            rows.append((processes, workers, measure(args, processes, workers)))
            print(f"measured {processes} process(es), {workers} workers", file=sys.stderr)
    print(f"{args.steps} steps, batch {args.batch_size} per process, {os.cpu_count()} cores\n")
    print("| processes | workers | structures/s | vs 1 process | waiting for data | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for processes, workers, figures in rows:
        single = next(f for p, w, f in rows if p == min(args.processes) and w == workers)
        ratio = figures["structures_per_s"] / single["structures_per_s"]
        print(f"| {processes} | {workers} | {figures['structures_per_s']:.1f} | {ratio:.2f}x "
              f"| {figures['data_wait']:.1%} | {figures['wall']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
