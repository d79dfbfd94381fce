#!/usr/bin/env python
"""Benchmarks for modeling-aft.

    python scripts/benchmark.py ops [--device cpu|cuda] [--seq-lens 512 1024 ...] [--dim 512]
                                    [--repeat N] [--threads N] [--out docs/benchmarks/ops_cpu.md]

Each subcommand is a pair (add_arguments(parser), run(args)) registered in SUBCOMMANDS at the bottom;
`ops` lives here, further ones (train, generate, quality, transfer) plug in the same way and reuse the
module-level helpers: time_fn, peak_memory_mb, markdown_table, machine_description, write_report.
"""

import argparse
import ctypes
import os
import pathlib
import platform
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runs from a clean clone without installing the package
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profiler is chatty on stderr otherwise

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# shared helpers


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def single_thread_cpu(device) -> bool:
    """On the CPU with one torch thread all the work (the autograd backward too) runs on the calling thread, so its
    CPU time is the time on an idle core: the time other jobs of a shared machine hold the core is left out."""
    return not str(device).startswith("cuda") and torch.get_num_threads() == 1


def time_fn(fn, warmup=1, repeat=5, device="cpu"):
    """Milliseconds of fn(), one entry per repeat (after `warmup` untimed calls): the calling thread's CPU time
    where single_thread_cpu(device), else wall clock."""
    clock = time.thread_time if single_thread_cpu(device) else time.perf_counter
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        sync(device)
        times.append((clock() - t0) * 1e3)
    return times


def peak_memory_mb(fn, device="cpu"):
    """Peak of (allocated - freed) bytes while fn() runs, in MiB, relative to the start.

    CUDA: the caching allocator's peak. CPU: torch has no allocator statistics, so the profiler's
    allocation events are replayed in time order (every torch CPU allocation and free is recorded).
    Outputs and gradients created by fn count; inputs that existed before do not.
    """
    if str(device).startswith("cuda"):
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def markdown_table(headers, rows):
    """A GitHub markdown table; numbers are formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(device="cpu"):
    """Lines describing where the numbers come from."""
    lines = [
        f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs visible, "
        f"torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
        if model:
            lines[0] = lines[0].replace(platform.processor() or platform.machine(), model, 1)
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        lines.append("- load average (1, 5, 15 min) when the run ended: %.1f, %.1f, %.1f" % os.getloadavg())
    if str(device).startswith("cuda"):
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    return lines


def keep_freed_memory():
    """Ask glibc to keep freed memory instead of returning it to the OS after every large free.

    On this VM a first touch of fresh memory costs ~4 us per 4 KiB page, and glibc's adaptive mmap
    threshold makes whether a given allocation pays it depend on the history of earlier allocations:
    the same op measured twice could differ 2-3x. Applied once, to every operator alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False


def write_report(path, text):
    path = pathlib.Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------
# ops: AFT operators against scaled_dot_product_attention

OPS_HEADS, OPS_LOCAL_WINDOW, OPS_CONV_HEADS, OPS_CONV_SIZE = 8, 32, 8, 32
OPS_BIAS_RANK = 128  # AFTConfig.position_bias_rank's default
OPS_QUADRATIC = ("sdpa", "aft_full")  # time ~ T^2; the rest ~ T


def ops_candidates(T, D, device):
    """name -> (forward callable, leaf inputs that get gradients, gradient of the output).

    Every AFT call is causal at B=1, as in a decoder; SDPA uses 8 heads of D/8 at the same (B, T, D).
    """
    from modeling_aft.aft_ops import aft_conv1d, aft_full, aft_local, aft_simple

    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device)
    q, k, v, grad = (rand(1, T, D) for _ in range(4))
    pos_bias = rand(T, T, scale=0.1)
    u, w = rand(T, OPS_BIAS_RANK, scale=0.1), rand(T, OPS_BIAS_RANK, scale=0.1)
    k_conv, kernel = rand(1, T, OPS_CONV_HEADS), rand(OPS_CONV_HEADS, OPS_CONV_SIZE, scale=0.1)
    heads = lambda x: x.view(1, T, OPS_HEADS, D // OPS_HEADS).transpose(1, 2)
    probe_q, probe_k, probe_v = q.clone(), k.clone(), v.clone()
    return {
        "sdpa": (lambda: F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
                 .transpose(1, 2).reshape(1, T, D), [q, k, v], grad),
        "aft_full": (lambda: aft_full(q, k, v, pos_bias, causal=True), [q, k, v, pos_bias], grad),
        "aft_full_fixed_bias": (lambda: aft_full(q, k, v, pos_bias.detach(), causal=True), [q, k, v], grad),
        "aft_local": (lambda: aft_local(q, k, v, pos_bias, OPS_LOCAL_WINDOW, causal=True),
                      [q, k, v, pos_bias], grad),
        # the same op without a gradient for the (T, T) bias: what the dense T x T gradient costs
        "aft_local_fixed_bias": (lambda: aft_local(q, k, v, pos_bias.detach(), OPS_LOCAL_WINDOW, causal=True),
                                 [q, k, v], grad),
        # as AFTForCausalLM calls it: the factors of w = u vᵀ (rank OPS_BIAS_RANK), so nothing is T x T
        "aft_local_factorized": (lambda: aft_local(q, k, v, (u, w), OPS_LOCAL_WINDOW, causal=True),
                                 [q, k, v, u, w], grad),
        "aft_simple": (lambda: aft_simple(q, k, v, causal=True), [q, k, v], grad),
        "aft_conv1d": (lambda: aft_conv1d(q, k_conv, v, kernel, causal=True), [q, k_conv, v, kernel], grad),
        # one elementwise pass reading q, k, v and writing one output: the memory-bandwidth floor
        "bandwidth_probe": (lambda: torch.addcmul(probe_v, probe_q, probe_k), [], None),
    }


def _fwd(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def _fwd_bwd(fn, leaves, grad):
    def run():
        fn().backward(grad)
        for x in leaves:
            x.grad = None
    return run


def _ops_estimate(results, name, T, key):
    """Predicted seconds for (name, T) from the largest measured T: quadratic or linear growth."""
    done = [(t, r[key]) for (n, t), r in results.items() if n == name and r.get(key) is not None]
    if not done:
        return 0.0
    t_prev, ms = max(done)
    power = 2 if name.startswith(OPS_QUADRATIC) else 1
    return ms / 1e3 * (T / t_prev) ** power


def _ops_bias_gib(name, T):
    """The (T, T) bias and, when learned, its gradient: what aft_full / aft_local hold at once."""
    if name.endswith("_factorized") or not name.startswith(("aft_full", "aft_local")):
        return 0.0
    return (1 if name.endswith("_fixed_bias") else 2) * 4 * T * T / 2**30


def run_ops(args):
    device = args.device
    if device == "cpu" and not args.keep_malloc_defaults:
        args.malloc_note = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    results, skipped = {}, []
    started = time.time()
    for T in args.seq_lens:
        cands = ops_candidates(T, args.dim, device)
        active = {}
        for name, (fn, leaves, grad) in cands.items():
            if args.ops and name not in args.ops:
                continue
            est = _ops_estimate(results, name, T, "fwd_bwd_ms")
            if est * (args.repeat + 1) > args.time_cap:
                skipped.append((name, T, f"estimated {est:.0f} s per fwd+bwd x {args.repeat + 1} runs "
                                         f"> --time-cap {args.time_cap:.0f} s"))
            elif _ops_bias_gib(name, T) > args.mem_cap_gb:
                skipped.append((name, T, f"(T, T) bias + gradient {_ops_bias_gib(name, T):.1f} GiB "
                                         f"> --mem-cap-gb {args.mem_cap_gb}"))
            else:
                active[name] = (fn, leaves, grad)
        if not active:
            continue
        for x in (x for _, leaves, _ in active.values() for x in leaves):
            x.requires_grad_(True)
        runs = {n: {"fwd": _fwd(fn), "fwd_bwd": _fwd_bwd(fn, leaves, grad) if grad is not None else None}
                for n, (fn, leaves, grad) in active.items()}
        times = {(n, kind): [] for n in runs for kind in ("fwd", "fwd_bwd")}
        for n, r in runs.items():  # warm-up (and first-touch of buffers) for everyone first
            for kind, f in r.items():
                if f is not None:
                    f()
        for _ in range(args.repeat):  # interleaved: drift and other load hit all operators alike
            for n, r in runs.items():
                for kind, f in r.items():
                    if f is not None:
                        times[(n, kind)] += time_fn(f, warmup=0, repeat=1, device=device)
        for n, r in runs.items():
            results[(n, T)] = {
                "fwd_ms": statistics.median(times[(n, "fwd")]),
                "fwd_bwd_ms": statistics.median(times[(n, "fwd_bwd")]) if r["fwd_bwd"] else None,
                "mem_fwd_mb": peak_memory_mb(r["fwd"], device),
                "mem_fwd_bwd_mb": peak_memory_mb(r["fwd_bwd"], device) if r["fwd_bwd"] else None,
                # the gradient of the bias / factors / kernel (the leaves after q, k, v): an output the backward
                # must return, whatever the operator's own working memory
                "bias_grad_mb": sum(x.numel() * x.element_size() for x in active[n][1][3:]) / 2**20,
            }
            row = results[(n, T)]
            print(f"T={T:6d} {n:16s} fwd {row['fwd_ms']:9.1f} ms  fwd+bwd "
                  f"{row['fwd_bwd_ms'] if row['fwd_bwd_ms'] is not None else float('nan'):9.1f} ms  "
                  f"peak {row['mem_fwd_mb']:8.1f} / {row['mem_fwd_bwd_mb'] or 0:8.1f} MiB", flush=True)
        del cands, active, runs
    args.elapsed_s = time.time() - started
    report = ops_report(results, skipped, args)
    print(report)
    if args.out:
        print(f"wrote {write_report(args.out, report)}")
    return results


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def _memory_target(target, cells):
    """(target, held, detail) from cells (T, op MiB, SDPA MiB, what the op's figure is); None where not measured."""
    cells = [c for c in cells if c[1] is not None and c[2] is not None]
    worse = [f"T={t}: {a:.1f}{what} vs {s:.1f} MiB" for t, a, s, what in cells if a > s]
    return (target, None if not cells else not worse,
            "at every measured T" if cells and not worse else "; ".join(worse) or "not measured")


def ops_targets(results, seq_lens):
    """[(target, held: bool | None, detail)] for the performance goals of the AFT operators."""
    def r(n, T, key):
        return results.get((n, T), {}).get(key)

    out = []
    if not seq_lens:
        return out
    T = 8192 if 8192 in seq_lens else max(seq_lens)
    for n in ("aft_simple", "aft_local", "aft_local_factorized", "aft_conv1d"):
        a, s = r(n, T, "fwd_bwd_ms"), r("sdpa", T, "fwd_bwd_ms")
        ok = None if a is None or s is None else s / a >= 10
        detail = "not measured" if ok is None else f"{s / a:.1f}x ({a:.0f} ms vs {s:.0f} ms)"
        fixed = r("aft_local_fixed_bias", T, "fwd_bwd_ms")
        if n == "aft_local" and fixed and s:
            detail += f"; without the (T, T) bias gradient {s / fixed:.1f}x ({fixed:.0f} ms)"
        out.append((f"{n} causal fwd+bwd >= 10x faster than SDPA at T={T}", ok, detail))
    T4 = 4096 if 4096 in seq_lens else max(seq_lens)
    a, s = r("aft_full", T4, "fwd_bwd_ms"), r("sdpa", T4, "fwd_bwd_ms")
    ok = None if a is None or s is None else a <= s
    detail = "not measured" if ok is None else f"{a:.0f} ms vs {s:.0f} ms ({s / a:.2f}x)"
    fixed = r("aft_full_fixed_bias", T4, "fwd_bwd_ms")
    if fixed and s:
        detail += f"; without the (T, T) bias gradient {fixed:.0f} ms ({s / fixed:.2f}x)"
    out.append((f"aft_full causal fwd+bwd no slower than SDPA at T={T4}", ok, detail))
    a, p = r("aft_simple", T, "fwd_ms"), r("bandwidth_probe", T, "fwd_ms")
    ok = None if a is None or p is None else a <= 3 * p
    out.append((f"aft_simple forward within 3x of the bandwidth probe at T={T}", ok,
                "not measured" if ok is None else f"{a / p:.1f}x ({a:.1f} ms vs {p:.1f} ms)"))
    for kind, label in (("mem_fwd_mb", "forward"), ("mem_fwd_bwd_mb", "fwd+bwd")):
        for n in ("aft_full", "aft_full_fixed_bias", "aft_local", "aft_local_fixed_bias", "aft_local_factorized",
                  "aft_simple", "aft_conv1d"):
            out.append(_memory_target(f"{n} peak memory ({label}) <= SDPA's",
                                      [(t, r(n, t, kind), r("sdpa", t, kind), "") for t in seq_lens]))
    for n in ("aft_full", "aft_local", "aft_local_factorized"):  # what a learned bias costs, taken out
        cells = []
        for t in seq_lens:
            a, g = r(n, t, "mem_fwd_bwd_mb"), r(n, t, "bias_grad_mb")
            cells.append((t, None if a is None or g is None else a - g, r("sdpa", t, "mem_fwd_bwd_mb"),
                          f" once its {g or 0:.1f} MiB bias gradient is taken out,"))
        out.append(_memory_target(f"{n} peak memory (fwd+bwd) less the bias gradient it returns <= SDPA's", cells))
    return out


OPS_WHY = """\
Notes (what limits each number, and what would change it):
- aft_full / aft_local take a dense (T, T) pos_bias, so their backward hands back a dense (T, T)
  gradient: 4 T^2 bytes (256 MiB at T=8192) zero-filled and written every step, more than SDPA's
  whole fwd+bwd peak. No implementation of these calls can hold less than that; the target is
  therefore also checked with the bias gradient taken out (the last column), and the
  `aft_full_fixed_bias` / `aft_local_fixed_bias` rows are the same calls without that gradient. The
  `aft_local_factorized` row passes the factors (u, v) of w = u vᵀ (rank 128), as AFTForCausalLM
  does: neither the bias nor its gradient is T x T, but the u, v gradients (2 x T x 128 floats,
  8 MiB at T=8192) are outputs too.
- aft_local (all three rows): the fused kernel reads row t's window of biases straight from the
  dense bias (w[g, t, t - d], d < window) or computes it from u and v (one 128-long dot product per
  key), so no (T, window) band exists; the forward holds the output and a ring of window + 1 rows of
  per-feature state. The backward replays the forward 32 rows at a time from checkpoints of the running
  state that it keeps in the rows of dq it has not written yet, and holds dq, dk, dv, two chunk-sized
  buffers (0.5 MiB at D=512) and, when the bias is learned, one row of the band's gradient, handed to
  the dense or factor gradient as soon as the row is done (when rows are split into feature slices
  for idle threads, each slice sums a whole T x window band instead).
- aft_full (fused kernel, both directions): num = E @ (P V) and den = E @ P with E = exp(w - row
  max), built per tile of rows x keys x features together with [P V, P] and multiplied by the BLAS
  that torch links; num accumulates in the output itself. The forward holds y plus its tiles (at
  most 448 KiB, and an eighth of one (T, D) activation). For a backward it keeps den (T, D: AFT's
  softmax normalises every feature separately, where SDPA's logsumexp is T x heads), and the
  backward turns den's buffer into g / den and then into dq: a training step holds y, den = dq,
  dk, dv and tiles of at most 768 KiB, which is SDPA's y, dq, dk, dv and scratch. Its time is the
  three T^2 D products of any AFT-full (one forward, two backward) on L2-sized tiles, plus
  rebuilding E and [P V, P] for every tile (exps, and reads of q, k, v, y, g per tile: ~30 % of
  the backward at 256-row tiles). The eager PyTorch path (float64, other devices) kept den beside
  dq and used 512 x 512 tiles: ~7 MiB over SDPA forward, ~29 MiB over it fwd+bwd at T=8192.
- aft_simple / aft_conv1d: on the CPU both directions run the fused kernels of aft_kernels.py. The
  forward holds the output plus O(D) (AFT-conv: O(s + D/h) per head) floats of state; the backward
  saves only the inputs, reruns the forward scan and overwrites the gradient buffers on a reverse
  scan, so fwd+bwd holds y, dq, dk, dv (plus, for AFT-conv, 5 floats per row and head): what SDPA's
  fused kernel holds besides its ~1.3 MiB of logsumexp and per-thread scratch. AFT-conv's dk has one
  channel per head, which is why it ends below SDPA.
- aft_simple forward vs the probe: the probe is one fused elementwise kernel. aft_simple's fused
  forward (an online-softmax scan) also reads q, k, v once and writes y once, adding two vectorized
  polynomial exps, a division and the running-maximum selects per element. Each job reads whole
  rows (AFT-conv: all heads of a row together): scanning 256-feature slices of every row one after
  another, as an earlier kernel did, ran 2-3x slower per element (the prefetcher loses a stream that
  skips part of every row; 13.1 ms, 4.7x the probe, at T=8192 on this AMD EPYC). Rows are split
  into slices (heads into groups) only when the batch leaves threads idle. Without a compiler the
  eager scan runs instead: ~12 separate kernels, each a pass over (T, D), several times slower.
- Threads: measured with --threads 1. The 2 vCPUs were shared with other jobs (load average up to
  ~10 during this work): with 2 threads every OpenMP region waits for whichever thread is descheduled,
  which hits operators made of many short kernels far harder than one long SDPA kernel (aft_simple at
  T=512: ~190 ms with 2 threads vs 3-4 ms with 1 under that load). On an idle machine the default
  thread count is the fair setting.
"""


def ops_report(results, skipped, args):
    seq_lens = sorted({T for (_, T) in results})
    names = ["sdpa", "aft_full", "aft_full_fixed_bias", "aft_local", "aft_local_fixed_bias", "aft_local_factorized",
             "aft_simple", "aft_conv1d", "bandwidth_probe"]
    rows = []
    for T in seq_lens:
        s = results.get(("sdpa", T), {})
        for n in names:
            r = results.get((n, T))
            if r is None:
                continue
            speed = lambda key: (_fmt(s[key] / r[key], 1) + "x"
                                 if s.get(key) and r.get(key) and n != "bandwidth_probe" else "-")
            rows.append([T, n, _fmt(r["fwd_ms"]), speed("fwd_ms"), _fmt(r["fwd_bwd_ms"]), speed("fwd_bwd_ms"),
                         _fmt(r["mem_fwd_mb"]), _fmt(r["mem_fwd_bwd_mb"]), _fmt(r.get("bias_grad_mb"))])
    table = markdown_table(["T", "op", "fwd ms", "fwd speed-up vs SDPA", "fwd+bwd ms", "fwd+bwd speed-up vs SDPA",
                            "peak MiB fwd", "peak MiB fwd+bwd", "of which bias gradient MiB"], rows)
    targets = ops_targets(results, seq_lens)
    mark = {True: "held", False: "missed", None: "not measured"}
    target_lines = [f"- {mark[ok]}: {name} — {detail}" for name, ok, detail in targets]
    cmd = "python scripts/benchmark.py ops " + " ".join(
        [f"--device {args.device}", "--seq-lens " + " ".join(map(str, args.seq_lens)), f"--dim {args.dim}",
         f"--repeat {args.repeat}"] + ([f"--threads {args.threads}"] if args.threads else []))
    parts = [
        "# AFT operators vs. scaled_dot_product_attention (CPU)",
        "",
        f"Generated by `{cmd}` in {args.elapsed_s / 60:.1f} min.",
        "",
        "Setup: B=1, D=%d, every operator causal. SDPA: `F.scaled_dot_product_attention(is_causal=True)` with "
        "%d heads of %d. aft_full and aft_local get a (T, T) pos_bias (aft_local window %d), aft_conv1d h=%d "
        "heads with a kernel of %d. Gradients flow to every input, biases and kernels included. "
        "`bandwidth_probe` is `torch.addcmul(v, q, k)`: one elementwise pass reading q, k, v and writing "
        "one (T, D) output, i.e. the bytes any of these operators must move at least."
        % (args.dim, OPS_HEADS, args.dim // OPS_HEADS, OPS_LOCAL_WINDOW, OPS_CONV_HEADS, OPS_CONV_SIZE),
        "",
        "Times are medians of %d interleaved runs (%s, after one warm-up run of each). Peak memory "
        "is the largest amount of memory allocated and not yet freed during one call, from the profiler's "
        "allocation events (outputs and gradients count, pre-existing inputs do not; the fused kernels "
        "allocate their workspaces as tensors, so those count too). The last column is the part of the fwd+bwd "
        "peak that is the gradient of pos_bias / its factors / the conv kernel: an output the backward must "
        "return. Speed-ups are SDPA "
        "time / op time." % (args.repeat, "CPU time of the one torch thread, i.e. the time on an idle core: the "
                             "time other jobs of this shared machine held the core is left out"
                             if single_thread_cpu(args.device) else "wall clock"),
        "",
        "Machine:",
        "",
        *machine_description(args.device),
        "- glibc asked to keep freed memory (mallopt): %s — see `keep_freed_memory()` in the script"
        % ("yes" if getattr(args, "malloc_note", False) else "no"),
        "- The 2 CPUs are shared with other jobs: wall-clock times moved by up to 2x between runs while this "
        "was written (SDPA at T=8192: 2.1-4.3 s); memory-bandwidth contention still reaches CPU time, so "
        "expect ratios to move by ~10-20% from run to run.",
        "",
        table,
        "",
    ]
    if skipped:
        parts += ["Skipped:", ""] + [f"- {n} at T={T}: {why}" for n, T, why in skipped] + [""]
    parts += ["## Targets", "", *target_lines, "", OPS_WHY]
    return "\n".join(parts)


def add_ops_arguments(p):
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ops", nargs="+", default=None, help="only these candidates (default: all)")
    p.add_argument("--time-cap", type=float, default=120.0,
                   help="skip an op whose estimated measuring time exceeds this (s)")
    p.add_argument("--mem-cap-gb", type=float, default=4.0, help="skip aft_full/aft_local above this bias memory (GiB)")
    p.add_argument("--keep-malloc-defaults", action="store_true", help="do not call mallopt (see keep_freed_memory)")
    p.add_argument("--out", default="docs/benchmarks/ops_cpu.md", help="markdown report ('' to skip)")


# ----------------------------------------------------------------------------------------------------
# command line

SUBCOMMANDS = {
    "ops": (add_ops_arguments, run_ops, "time and memory of the AFT operators vs. SDPA"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    # model-level benchmarks (train, generate, quality) and the converter's transfer benchmark live beside this file
    import bench_models
    import bench_transfer

    bench_models.add_parsers(sub)
    bench_transfer.add_parser(sub)
    args = parser.parse_args(argv)
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    return (getattr(args, "run", None) or args.func)(args)


if __name__ == "__main__":
    main()
