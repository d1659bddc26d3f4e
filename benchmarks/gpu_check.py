"""The one command that proves the GPU path of the quantizer, on a machine that has a GPU.

    python benchmarks/gpu_check.py                      # about 5 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --quick # the same code on small sizes (CI runs it)

Prints a table and writes --out (JSON) with one entry per check:
  build      torch, CUDA, the GPU, vqvae_ext.build_info() and vqvae_ext.describe(device)
  nearest    the extension's codes against a float64 brute force: random data in all four dtypes,
             exact ties, duplicated codes, sizes off the kernel's tile sizes, non-contiguous input,
             a side stream, and N x D > 2^31 (GPU only); and the CUDA kernel's codes equal to those
             of its CPU emulation (vqvae_ext.emulate_cuda_nearest_code), bit for bit
  ema_stats  counts and sums against bincount / index_add_; float64 stays float64; three runs under
             torch.use_deterministic_algorithms are bit-identical
  sanitizer  compute-sanitizer memcheck and racecheck on small shapes, when the tool is on PATH
  speed      ms per call of the extension, addmm + argmin and cdist + argmin, and the extension's
             extra memory, for N = 65,536 to 1,048,576, K = 512 and 1,024, D = 64
  train      train_cifar.py --preset quick for 200 steps with the extension and without it:
             steps/s and the final losses, which must agree
  compile    torch.compile(VectorQuantizer, fullgraph=True) against eager: codes, ms per call

A check that fails makes the exit status 1. Data for `train`: --data, else $VQVAE_CIFAR10, else
../shared/data/cifar10/cifar10-jpeg.tar.gz, else a generated image folder (speed and agreement
only: its losses mean nothing).
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vqvae  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
ops = torch.ops.vqvae_ext if vqvae.vqvae_ext is not None else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ correctness
def wrong_rows(z, codebook, codes, chunk=4096):
    """Rows whose index is not the float64 arg-min (lowest index on ties), where the best and
    second-best distances differ by more than the float32 rounding of ||e||^2 - 2 <z, e>; where they
    do not, the chosen code must be within that bound of the best. Inputs on any device."""
    e = codebook.double()
    e_norm = (e ** 2).sum(1)
    wrong = 0
    for start in range(0, len(z), chunk):
        zc = z[start:start + chunk].double()
        dist = (zc ** 2).sum(1, keepdim=True) - 2 * zc @ e.t() + e_norm                   # (n, K)
        idx = codes[start:start + chunk].to(dist.device)
        bound = 2 * (z.shape[1] + 2) * EPS32 * ((zc ** 2).sum(1) + e_norm.max())
        chosen = dist.gather(1, idx[:, None])[:, 0]
        if len(codebook) == 1:
            wrong += int((idx != 0).sum())
            continue
        top2 = dist.topk(2, dim=1, largest=False)
        clear = top2.values[:, 1] - top2.values[:, 0] > bound
        wrong += int(((idx != dist.argmin(1)) & clear).sum() + ((chosen - top2.values[:, 0] > bound) & ~clear).sum())
    return wrong


def check_nearest(device, quick):
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    cases = {}

    def record(name, z, codebook, expected=None):
        codes = ops.nearest_code(z, codebook)
        sync(device)
        bad = wrong_rows(z, codebook, codes) if expected is None else int((codes.cpu() != expected).sum())
        cases[name] = bad

    n = 20_000 if quick else 262_144
    for dtype in dtypes:
        z, e = torch.randn(n, 64, generator=g), torch.randn(512, 64, generator=g)
        record(f"random {str(dtype)[6:]}", z.to(device, dtype), e.to(device, dtype))
    for N, K, D in [(1, 1, 1), (31, 63, 31), (33, 65, 33), (1000, 130, 65), (4097, 1000, 3), (257, 513, 96)]:
        record(f"N={N} K={K} D={D}", torch.randn(N, D, generator=g).to(device), torch.randn(K, D, generator=g).to(device))
    e = 3 + torch.rand(130, 8, generator=g)
    e[77], e[5] = torch.linspace(-1, 1, 8), -torch.linspace(-1, 1, 8)    # equidistant from 0, across tiles
    record("exact ties", torch.zeros(300, 8, device=device), e.to(device), torch.full((300,), 5))
    e = torch.randn(100, 16, generator=g).repeat(3, 1)                    # code j == j + 100 == j + 200
    record("duplicated codes", e[:100].to(device), e.to(device), torch.arange(100))
    z, e = torch.randn(64, 5000, generator=g).t(), torch.randn(512, 128, generator=g)[:, ::2]
    record("non-contiguous", z.to(device), e.to(device))
    # The CUDA kernel's tiling run on the CPU thread by thread (csrc/vq_emulate.cpp): a GPU must
    # return its codes bit for bit, given the same squared norms; on a CPU it meets the brute force.
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        z, e = torch.randn(3000, 64, generator=g).to(dtype), torch.randn(515, 64, generator=g).to(dtype)
        norm_sq = e.to(device, torch.promote_types(dtype, torch.float32)).square().sum(1)
        emulated = vqvae.vqvae_ext.emulate_cuda_nearest_code(z, e, norm_sq.cpu())
        if device.type == "cuda":
            cases[f"CUDA == CPU emulation {str(dtype)[6:]}"] = int((ops.nearest_code(z.cuda(), e.cuda()).cpu()
                                                                   != emulated).sum())
        else:
            cases["CPU emulation of the CUDA tiling"] = wrong_rows(z, e, emulated)
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        z, e = torch.randn(100_000, 64, generator=g).to(device), torch.randn(1024, 64, generator=g).to(device)
        expected = ops.nearest_code(z, e).cpu()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            on_side = ops.nearest_code(z, e)
        stream.synchronize()
        cases["side stream"] = int((on_side.cpu() != expected).sum())
        if not quick:  # 64-bit indexing: N x D = 2^31 + 2^18 elements (8.6 GB of float32)
            big = torch.randn(2 ** 31 // 64 + 4096, 64, device=device)
            e = torch.randn(16, 64, device=device)
            idx = ops.nearest_code(big, e)
            cases["N x D > 2^31 (first and last 8192 rows)"] = (
                wrong_rows(big[:8192], e, idx[:8192]) + wrong_rows(big[-8192:], e, idx[-8192:]))
            del big, idx
    return {"passed": all(v == 0 for v in cases.values()), "wrong rows": cases}


def check_ema_stats(device, quick):
    g = torch.Generator().manual_seed(1)
    n = 20_000 if quick else 1_048_576
    results = {}
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(n, 64, generator=g, dtype=dtype).to(device)
        codes = torch.randint(0, 500, (n,), generator=g).to(device)     # codes 500..511 unused
        counts, sums = ops.ema_stats(z, codes, 512)
        expected = torch.zeros(512, 64, dtype=dtype, device=device).index_add_(0, codes, z)
        results[str(dtype)[6:]] = {
            "counts exact int64": counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(codes, minlength=512)),
            "sums dtype kept": sums.dtype == dtype,
            "sums max abs error": float((sums - expected).abs().max())}
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            runs = [ops.ema_stats(z, codes, 512)[1] for _ in range(3)]
        finally:
            torch.use_deterministic_algorithms(was)
        results[str(dtype)[6:]]["deterministic mode bit-identical"] = all(torch.equal(r, runs[0]) for r in runs)
    tolerance = {"float32": 1e-3, "float64": 1e-9}
    passed = all(r["counts exact int64"] and r["sums dtype kept"] and r["deterministic mode bit-identical"]
                 and r["sums max abs error"] < tolerance[k] for k, r in results.items())
    return {"passed": passed, **results}


SANITIZED = """
import torch, vqvae_ext
g = torch.Generator().manual_seed(0)
for N, K, D in [(1, 1, 1), (33, 65, 33), (257, 130, 65)]:
    for dtype in (torch.float32, torch.float16):
        z, e = torch.randn(N, D, generator=g).cuda().to(dtype), torch.randn(K, D, generator=g).cuda().to(dtype)
        torch.ops.vqvae_ext.ema_stats(z, torch.ops.vqvae_ext.nearest_code(z, e), K)
torch.cuda.synchronize()
"""


def check_sanitizer(device):
    tool = shutil.which("compute-sanitizer")
    if device.type != "cuda" or tool is None:
        return {"passed": True, "skipped": "no GPU" if device.type != "cuda" else "compute-sanitizer not on PATH"}
    results = {}
    for name in ("memcheck", "racecheck"):
        try:
            run = subprocess.run([tool, "--tool", name, "--error-exitcode", "1", sys.executable, "-c", SANITIZED],
                                 capture_output=True, text=True, timeout=150, cwd=ROOT)
            results[name] = "clean" if run.returncode == 0 else "ERRORS: " + run.stdout[-1500:]
        except subprocess.TimeoutExpired:
            results[name] = "timed out (150 s)"
    return {"passed": all(v == "clean" or v.startswith("timed out") for v in results.values()), **results}


# ------------------------------------------------------------------------------------ speed
def median_ms(fn, device, repeats=10):
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def extra_memory_mb(fn, device, baseline):
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2 ** 20


def check_speed(device, quick):
    sizes = [(4096, 512), (16384, 1024)] if quick else [(n, k) for n in (65_536, 262_144, 1_048_576) for k in (512, 1024)]
    rows = []
    for n, k in sizes:
        z, e = torch.randn(n, 64, device=device), torch.randn(k, 64, device=device)
        methods = {
            "extension": lambda: ops.nearest_code(z, e),
            "addmm+argmin": lambda: torch.addmm((e * e).sum(1), z, e.t(), alpha=-2).argmin(1),
            "cdist+argmin": lambda: torch.cdist(z, e).argmin(1)}
        if device.type == "cuda":
            zh, eh = z.bfloat16(), e.bfloat16()
            methods["extension bf16"] = lambda: ops.nearest_code(zh, eh)
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        row = {"N": n, "K": k, "D": 64}
        for name, fn in methods.items():
            row[f"{name} ms"] = median_ms(fn, device)
            row[f"{name} extra MB"] = extra_memory_mb(fn, device, baseline)
        row["addmm / extension"] = row["addmm+argmin ms"] / row["extension ms"]
        rows.append(row)
    return {"passed": True, "rows": rows}


# ------------------------------------------------------------------------------------ train
def synthetic_folder(root):
    """A small image folder <root>/{train,test}/<class>/*.png of random images."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 64), ("test", 16)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def check_train(device, quick, data, data_dir, workdir):
    steps = 20 if quick else 200
    argv = ["--preset", "quick", "--steps", str(steps), "--stages", "vqvae", "--device", device.type,
            "--data", str(data), "--data-dir", str(data_dir or workdir / "data"), "--log-every", str(steps // 10),
            "--checkpoint-every", str(steps)]
    if quick:
        argv += ["--max-train-images", "512", "--max-test-images", "64", "--hidden-channels", "32", "--res-channels", "16"]
    results = {}
    for name, hide in (("extension", False), ("PyTorch", True)):
        out = workdir / name.replace(" ", "_")
        # Without the extension: an import of vqvae_ext fails, for vqvae.py and everything else.
        code = ("import sys\n" + ("sys.modules['vqvae_ext'] = None\n" if hide else "") + "import train_cifar\n"
                + f"train_cifar.main({argv + ['--out', str(out)]!r})")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            return {"passed": False, name: "FAILED: " + (run.stdout + run.stderr)[-2000:]}
        rates = [float(w) for line in run.stdout.splitlines() if "it/s" in line
                 for w, nxt in zip(line.split(), line.split()[1:]) if nxt == "it/s"]
        history = torch.load(out / "vqvae.pt", weights_only=True)["history"]
        backend = next((m.group(1) for m in map(re.compile(r"quantizer (extension: CPU|extension: CUDA sm_\d+|"
                                                             r"PyTorch)").search, run.stdout.splitlines()) if m), "?")
        results[name] = {"backend": backend, "seconds": seconds, "steps/s (last report)": rates[-1] if rates else None,
                         "final loss": history["loss"][-1], "final perplexity": history["perplexity"][-1]}
    a, b = results["extension"]["final loss"], results["PyTorch"]["final loss"]
    return {"passed": abs(a - b) <= 0.05 * abs(b) + 1e-4, **results}


# ---------------------------------------------------------------------------------- compile
def check_compile(device, quick):
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(512, 64, decay=0.99).to(device).eval()
    compiled = torch.compile(q, fullgraph=True)
    z_e = torch.randn(64 if quick else 1024, 64, 8, 8, device=device)
    eager, got = q(z_e), compiled(z_e)
    same = torch.equal(eager.codes, got.codes)
    return {"passed": same, "same codes": same, "eager ms": median_ms(lambda: q(z_e), device),
            "compiled ms": median_ms(lambda: compiled(z_e), device)}


# ------------------------------------------------------------------------------------- main
def build_facts(device):
    facts = {"torch": torch.__version__, "torch CUDA": torch.version.cuda, "python": platform.python_version(),
             "vqvae_ext": vqvae.vqvae_ext.build_info() if vqvae.vqvae_ext else None,
             "quantizer backend": vqvae.vqvae_ext.describe(device) if vqvae.vqvae_ext else "PyTorch"}
    if device.type == "cuda":
        facts["GPU"] = torch.cuda.get_device_name(device)
        facts["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    return {"passed": facts["quantizer backend"] != "PyTorch", **facts}


def show(name, result):
    flat = json.dumps({k: v for k, v in result.items() if k != "passed"}, default=str)
    print(f"{name:<10} {'PASS' if result['passed'] else 'FAIL'}  {flat[:2000]}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and 20 training steps")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report")
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 source for the train check (see train_cifar.py)")
    p.add_argument("--data-dir", type=Path, default=None, help="decoded-data cache for the train check (default: temporary)")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out, e.g. sanitizer,train")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch (use --device cpu for the CPU run)")
    if ops is None:
        raise SystemExit("vqvae_ext is not built: pip install --no-build-isolation -e .")
    data = args.data or Path(os.environ.get("VQVAE_CIFAR10", ROOT.parent / "shared/data/cifar10/cifar10-jpeg.tar.gz"))
    report, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not data.exists():
            print(f"{data} not found: the train check uses generated images", flush=True)
            data = synthetic_folder(tmp / "images")
        checks = {"build": lambda: build_facts(device), "nearest": lambda: check_nearest(device, args.quick),
                  "ema_stats": lambda: check_ema_stats(device, args.quick), "sanitizer": lambda: check_sanitizer(device),
                  "speed": lambda: check_speed(device, args.quick),
                  "train": lambda: check_train(device, args.quick, data, args.data_dir, tmp),
                  "compile": lambda: check_compile(device, args.quick)}
        for name, check in checks.items():
            if name in args.skip.split(","):
                continue
            t0 = time.perf_counter()
            report[name] = check()
            report[name]["seconds"] = time.perf_counter() - t0
            show(name, report[name])
    if "speed" in report:
        print(f"\n{'N':>9} {'K':>5} " + " ".join(f"{m:>15}" for m in ("extension ms", "addmm ms", "cdist ms", "addmm/ext")))
        for r in report["speed"]["rows"]:
            print(f"{r['N']:>9} {r['K']:>5} {r['extension ms']:>15.3f} {r['addmm+argmin ms']:>15.3f} "
                  f"{r['cdist+argmin ms']:>15.3f} {r['addmm / extension']:>15.2f}")
    passed = all(r["passed"] for r in report.values())
    args.out.write_text(json.dumps({"passed": passed, "seconds": time.perf_counter() - start, **report},
                                   indent=2, default=str) + "\n")
    print(f"\n{'ALL PASSED' if passed else 'FAILED'} in {time.perf_counter() - start:.0f} s; wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
