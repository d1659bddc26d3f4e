"""Stress check (not collected by pytest): do two-process gloo jobs end with status 0?

Each round starts two processes that do what a script's training stages do at their end (DDP
steps, a metrics all-reduce, runs.teardown) and leave at once, the main one after a short
solo computation, as evaluation does. With `runs.run_main` (the scripts' way) every exit
should be clean; a plain return from main() lets Python finalize while a gloo worker may still
hold the last collective's tensors, which can abort the process (README gives the rates measured).

    OMP_NUM_THREADS=1 python tests/stress_distributed_exit.py --rounds 100 --exit both
"""
import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job() -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from lab import runs

    device, rank, _ = runs.setup(seed=0, device="cpu")
    model = DistributedDataParallel(torch.nn.Linear(64, 64))
    for _ in range(5):
        model(torch.randn(8, 64)).square().mean().backward()
    runs.read_metrics({"loss": torch.tensor(1.0)}, device)
    runs.teardown()
    if rank == 0:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            torch.randn(100, 100) @ torch.randn(100, 100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rounds(n: int, exit_mode: str) -> int:
    failures = 0
    for i in range(n):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", exit_mode], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": "2"})
                 for r in range(2)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        codes = [p.returncode for p in procs]
        if any(codes):
            failures += 1
            first = [o.strip().splitlines()[:1] for o in outputs]
            print(f"  {exit_mode} round {i}: exit status {codes}, first lines {first}", flush=True)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="two-process jobs per exit mode (default 100)")
    parser.add_argument("--exit", choices=["run_main", "plain", "both"], default="both",
                        help="how main() ends: runs.run_main, a plain return, or both in turn (default both)")
    parser.add_argument("--worker", choices=["run_main", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "run_main":
        from lab import runs
        return runs.run_main(job)
    if args.worker == "plain":
        return job()
    for mode in ["run_main", "plain"] if args.exit == "both" else [args.exit]:
        t = time.perf_counter()
        failures = rounds(args.rounds, mode)
        print(f"{mode}: {failures} of {args.rounds} jobs failed ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
