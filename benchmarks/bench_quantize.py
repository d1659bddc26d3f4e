"""Benchmark of the quantizer's nearest-code search, k = argmin_j ||z - e_j||^2 (Eq. 1).

    python benchmarks/bench_quantize.py [--device cpu|cuda] [--repeats 7] [--min-seconds 1]
                                        [--threads T] [--no-memory]

For z (N, D) and a codebook e (K, D), compares
    expanded  ||z||^2 - 2 z e^T + ||e||^2, then argmin (Sonnet's vqvae.py)
    addmm     torch.addmm(||e||^2, z, e^T, alpha=-2).argmin(1) (vqvae.py's fallback)
    cdist     torch.cdist(z, e).argmin(1)
    ext       torch.ops.vqvae_ext.nearest_code(z, e) (csrc/)
    sgemm     z @ e^T alone: the matmul every method does, the reference rate; ext
              can beat it, as it never writes the (N, K) product to memory
and prints the median time, the rate in GFLOP/s counting 2*N*K*D flops per call,
and the peak extra memory of one call. On CPU torch's allocator keeps no
statistics, so each (method, size) runs once more in a fresh subprocess that
reads the growth of its peak RSS (VmHWM) over the call, with glibc's malloc told
to return every block over 64 KiB to the OS when freed.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

try:
    import vqvae_ext
except ImportError:
    vqvae_ext = None

SIZES = [(n, k, 64) for n in (8192, 65536, 262144) for k in (512, 1024)]


def expanded(z, e):
    d = (z ** 2).sum(1, keepdim=True) - 2 * z @ e.t() + (e ** 2).sum(1)  # (N, K)
    return d.argmin(1)


def addmm(z, e):
    return torch.addmm((e ** 2).sum(1), z, e.t(), alpha=-2).argmin(1)  # (N, K) -> (N,)


def cdist(z, e):
    return torch.cdist(z, e).argmin(1)


def ext(z, e):
    return torch.ops.vqvae_ext.nearest_code(z, e)


def sgemm(z, e):
    return z @ e.t()


METHODS = {"expanded": expanded, "addmm": addmm, "cdist": cdist, "ext": ext, "sgemm": sgemm}


def inputs(n, k, d, device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g).to(device), torch.randn(k, d, generator=g).to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, z, e, repeats, min_seconds, device):
    """Median over at least `repeats` calls and at least `min_seconds` of calls."""
    fn(z, e)  # warm-up: thread pools, BLAS buffers, CUDA context
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        sync(device)
        start = time.perf_counter()
        fn(z, e)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes(field):
    """VmRSS or VmHWM (peak RSS) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(method, n, k, d, device):
    """Peak memory one call of `method` allocates beyond its inputs."""
    if device.startswith("cuda"):
        z, e = inputs(n, k, d, device)
        METHODS[method](z, e)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        METHODS[method](z, e)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Fixed mmap threshold: freed blocks leave RSS, so the peak is this call's own.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
               "--probe", method, str(n), str(k), str(d)]
    out = subprocess.run(command,
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def probe(method, n, k, d):
    """Subprocess side of peak_extra_bytes on CPU: prints the peak RSS growth of one call."""
    z, e = inputs(n, k, d, "cpu")
    METHODS[method](z, e)  # one-time costs (OpenMP threads, MKL buffers) are not the method's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_bytes("VmRSS")
    METHODS[method](z, e)
    print(rss_bytes("VmHWM") - base)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7, help="at least this many timed calls")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="and at least this long")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        probe(args.probe[0], *map(int, args.probe[1:]))
        return

    methods = [m for m in METHODS if m != "ext" or vqvae_ext is not None]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, vqvae_ext {'found' if vqvae_ext else 'NOT BUILT'}; "
          f"median of >= {args.repeats} calls and >= {args.min_seconds} s")
    print(f"{'N':>7} {'K':>5} {'D':>3}  {'method':<9} {'ms':>9} {'GFLOP/s':>8} {'ext speed-up':>12} {'extra MB':>9}")
    for n, k, d in SIZES:
        z, e = inputs(n, k, d, args.device)
        times = {m: median_seconds(METHODS[m], z, e, args.repeats, args.min_seconds, args.device) for m in methods}
        del z, e
        for m in methods:
            speedup = f"{times[m] / times['ext']:.2f}x" if "ext" in times and m not in ("ext", "sgemm") else ""
            memory = "" if args.no_memory else f"{peak_extra_bytes(m, n, k, d, args.device) / 2**20:.1f}"
            print(f"{n:>7} {k:>5} {d:>3}  {m:<9} {times[m] * 1e3:>9.2f} {2 * n * k * d / times[m] / 1e9:>8.1f} "
                  f"{speedup:>12} {memory:>9}")
        if "ext" in times:
            print(f"{'':>19}ext reaches {times['sgemm'] / times['ext']:.0%} of the sgemm rate")


if __name__ == "__main__":
    main()
