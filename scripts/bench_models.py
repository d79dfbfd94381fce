#!/usr/bin/env python
"""Model-level benchmarks of the AFT causal LMs against GPT-2 of the same depth, width and MLP.

Three subcommands, each printing a markdown table and writing it (plus a PNG plot) to docs/benchmarks/:

* ``train``    — fwd+bwd tokens/s and peak memory per (width, T), B·T held constant. Peak memory is measured in a
  fresh subprocess per (setting, model): the growth of the peak RSS over the RSS just before the step on CPU,
  ``torch.cuda.max_memory_allocated`` growth on GPU. Timing runs in one subprocess per setting and interleaves the
  models step by step, so machine drift hits every model alike; ratios to GPT-2 are paired per round.
* ``generate`` — ms per decoded token and cache bytes after prefilling contexts of 128 … 8192 tokens (B=1): the
  model's forward with ``cache=`` and ``use_cache=True``, one token at a time.
* ``quality``  — byte-level LM training on enwik6 (90/5/5 split, T=512): held-out bits/byte at equal wall-clock and
  at equal steps. Models train in round-robin time slices so drift hits all alike.

Run alone (``python scripts/bench_models.py train --T 512 1024``) or through ``scripts/benchmark.py``, which calls
``add_parsers``. ``--device cuda`` works everywhere; absolute numbers only mean something there.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks"
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "enwik6.txt"
MODELS = ("aft-full", "aft-local", "aft-simple", "aft-conv", "gpt2")
AFT_LINEAR = ("aft-local", "aft-simple", "aft-conv")  # the variants with an O(T) training cost and O(1) state
RESULT_TAG = "BENCH_RESULT "

if str(REPO) not in sys.path:  # run alone from a checkout without `pip install -e`
    sys.path.append(str(REPO))


# ---------------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------------
def model_spec(args, hidden: int | None = None) -> dict:
    """The shape shared by every model of one comparison (a plain dict: it also travels to child processes)."""
    hidden = hidden or getattr(args, "hidden", None) or args.widths[0]
    return {
        "hidden": hidden,
        "layers": args.layers,
        "inner": 4 * hidden,
        "window": args.window,
        "rank": args.rank,
        "aft_heads": args.aft_heads,
        "gpt2_heads": args.gpt2_heads,
        "gpt2_act": args.gpt2_act,
        "gpt2_attn": getattr(args, "gpt2_attn", "sdpa"),
        "aft_positions": args.aft_positions,
        "vocab": 256,
    }


def build_model(name: str, spec: dict, max_len: int, seed: int = 0):
    """A freshly initialized causal LM: `aft-<variant>` or `gpt2` (sdpa attention, dropout off like AFT's)."""
    import torch

    torch.manual_seed(seed)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=spec["vocab"], n_embd=spec["hidden"], n_layer=spec["layers"], n_head=spec["gpt2_heads"],
            n_inner=spec["inner"], n_positions=max_len, activation_function=spec["gpt2_act"],
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        # GPT2LMHeadModel(config) takes no attn_implementation keyword in 5.x
        config._attn_implementation = spec.get("gpt2_attn", "sdpa")
        return GPT2LMHeadModel(config)
    if not name.startswith("aft-") or name[4:] not in ("full", "local", "simple", "conv"):
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    from modeling_aft import AFTConfig, AFTForCausalLM

    config = AFTConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
        intermediate_size=spec["inner"], aft_variant=name[4:], window_size=spec["window"],
        num_aft_heads=spec["aft_heads"], position_bias_rank=spec["rank"], max_position_embeddings=max_len,
        position_embedding_type=spec["aft_positions"],
    )
    return AFTForCausalLM(config)


def label(name: str, spec: dict | None = None) -> str:
    if name == "gpt2":
        return "GPT-2"
    variant = name[4:]
    if variant == "local" and spec is not None:
        return f"AFT-local-{spec['window']}"
    return f"AFT-{variant}"


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def uses_cpu_clock(device: str, threads: int) -> bool:
    """Time with the process's CPU time (not wall time) on a 1-thread CPU run: all the work then runs on the calling
    thread, so CPU time is what the step would take on an idle core, and the time other processes hold the core (this
    machine is shared) is left out. Wall time is recorded alongside. GPU runs and multi-thread runs use wall time."""
    return not device.startswith("cuda") and threads == 1


class Stopwatch:
    """Both clocks around one region: .cpu (process CPU time) and .wall (perf_counter), seconds."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.cpu, self.wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        return False

    def primary(self, cpu_clock: bool) -> float:
        return self.cpu if cpu_clock else self.wall


def clock_note(cpu_clock: bool) -> str:
    return ("process CPU time (1 torch thread: equals the wall time on an idle core; time the shared machine's other "
            "processes hold the core is excluded)" if cpu_clock else "wall-clock time")


def synchronize(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_nbytes(cache) -> int:
    """Bytes of every tensor a returned transformers cache holds (K/V of attention layers, states of linear ones)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        for name in ("recurrent_states", "conv_states"):
            states = getattr(layer, name, None)
            if isinstance(states, dict):
                total += sum(t.numel() * t.element_size() for t in states.values() if isinstance(t, torch.Tensor))
    return total


# ---------------------------------------------------------------------------------------------------------------------
# reporting helpers
# ---------------------------------------------------------------------------------------------------------------------
def machine_info(device: str) -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"nproc={os.cpu_count()}", f"CPU: {cpu}", f"torch {torch.__version__}",
             f"transformers {transformers.__version__}", f"torch threads={torch.get_num_threads()}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    return ", ".join(parts)


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.relpath(argv[0], REPO) if os.path.isabs(argv[0]) else argv[0]
    return "python " + " ".join(shlex.quote(a) for a in argv)


def header(title: str, args) -> list[str]:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"# {title}",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine_info(args.device)}; device `{args.device}`",
        f"- Date: {now}",
        "",
    ]


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_report(args, stem: str, lines: list[str]) -> Path:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}_{args.device.split(':')[0]}.md"
    text = "\n".join(lines).rstrip() + "\n"
    path.write_text(text)
    print(text)
    print(f"[written {path}]")
    return path


def plot_path(args, stem: str) -> Path:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{stem}_{args.device.split(':')[0]}.png"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def check_models(models: list[str]):
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")


# ---------------------------------------------------------------------------------------------------------------------
# train: fwd+bwd throughput and peak memory
# ---------------------------------------------------------------------------------------------------------------------
def _current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _train_step(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def train_child(job: dict) -> dict:
    """Runs in a fresh process (or inline with --inprocess). job["mode"]: "memory" (one model, one step) or "time"
    (several models, interleaved step by step)."""
    import torch

    device, spec = job["device"], job["spec"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    ids = torch.randint(0, spec["vocab"], (job["batch"], job["T"]), device=device)
    if job["mode"] == "memory":
        model = build_model(job["models"][0], spec, job["T"], job["seed"]).to(device).train()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        rss_before, max_before = _current_rss(), _max_rss()
        with Stopwatch(device) as watch:
            _train_step(model, ids)
        seconds = watch.wall
        if device.startswith("cuda"):
            peak, exact = torch.cuda.max_memory_allocated() - base, True
        else:
            max_after = _max_rss()
            # ru_maxrss is a lifetime peak: if the step never rose above an earlier peak it only bounds the step's.
            peak, exact = max(max_after - rss_before, 0), max_after > max_before
        return {"peak_bytes": peak, "exact": exact, "step_s": seconds, "params": count_params(model)}

    models = {m: build_model(m, spec, job["T"], job["seed"]).to(device).train() for m in job["models"]}
    if job["mode"] == "profile":
        return {m: profile_step(model, ids, device) for m, model in models.items()}
    times: dict[str, list[float]] = {m: [] for m in models}
    wall: dict[str, list[float]] = {m: [] for m in models}
    cpu_clock = uses_cpu_clock(device, job.get("threads") or 0)
    dropped: dict[str, str] = {}
    order = list(models)
    for rnd in range(job["warmup"] + job["repeats"]):
        # rotate the order each round: no model always runs right after the same neighbour
        for m in order[rnd % len(order):] + order[: rnd % len(order)]:
            if m in dropped:
                continue
            with Stopwatch(device) as watch:
                _train_step(models[m], ids)
            if rnd >= job["warmup"]:
                times[m].append(watch.primary(cpu_clock))
                wall[m].append(watch.wall)
            if watch.wall > job["time_cap"]:
                dropped[m] = f"step {watch.wall:.0f}s > time cap"
    return {"times": times, "wall": wall, "dropped": dropped}


# Profiler self-time categories: where one training step goes. Matmuls are what AFT and GPT-2 share (projections, MLP,
# LM head); "attention" is SDPA's fused kernels forward and backward (GPT-2 only).
PROFILE_CATEGORIES = (
    ("attention (SDPA fwd+bwd)", ("scaled_dot_product", "flash_attention", "efficient_attention", "_cudnn_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
)
OTHER_CATEGORY = "everything else (elementwise, norms, scans, copies, autograd)"


def profile_step(model, ids, device: str) -> dict:
    """Share of one fwd+bwd step's op self-time per PROFILE_CATEGORIES entry (after one warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    _train_step(model, ids)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        _train_step(model, ids)
        synchronize(device)
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    shares = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + [OTHER_CATEGORY], 0.0)
    for event in prof.key_averages():
        category = next((name for name, keys in PROFILE_CATEGORIES if any(k in event.key for k in keys)),
                        OTHER_CATEGORY)
        shares[category] += getattr(event, attr)
    total = sum(shares.values()) or 1.0
    return {name: value / total for name, value in shares.items()}


def _run_child(job: dict, timeout: float, mem_cap: float | None, inprocess: bool) -> dict:
    """Run train_child in a fresh interpreter; kill it past `timeout` seconds or `mem_cap` bytes of RSS."""
    if inprocess:
        return train_child(job)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_train-child", json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        import psutil

        watched = psutil.Process(proc.pid)
    except (ImportError, Exception):  # psutil missing: only the timeout guards the child
        watched = None
    start, reason = time.monotonic(), None
    try:
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                reason = "time cap"
            elif watched is not None and mem_cap:
                try:
                    if watched.memory_info().rss > mem_cap:
                        reason = "memory cap"
                except Exception:
                    pass
            if reason:
                return {"error": reason}
            time.sleep(0.05)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:  # over a cap, or this process interrupted: never leave the child running
            proc.kill()
            proc.wait()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (stderr.strip().splitlines() or ["?"])[-1]
    if proc.returncode in (-9, 137) or "out of memory" in stderr.lower() or "MemoryError" in stderr:
        return {"error": "out of memory"}
    return {"error": f"failed (rc={proc.returncode}): {tail[:120]}"}


def train_settings(args) -> list[tuple[int, int]]:
    settings = [(args.widths[0], T) for T in args.T]
    for width in args.widths[1:]:
        settings += [(width, T) for T in (args.wide_T or args.T)]
    return settings


def _set_threads(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_train(args):
    check_models(args.models)
    _set_threads(args)
    mem_cap = args.mem_cap_gb * 2**30 if args.mem_cap_gb else None
    startup = 15.0 if args.inprocess else 120.0  # interpreter + torch/transformers import under load
    results: dict[tuple[int, int], dict] = {}
    carried: dict[tuple[int, str], str] = {}  # (width, model) -> why a smaller T was skipped: larger T is too
    for width, T in train_settings(args):
        batch = max(1, args.tokens // T)
        spec = model_spec(args, width)
        entry = {"batch": batch, "models": {}}
        results[(width, T)] = entry
        base = {"device": args.device, "spec": spec, "seed": args.seed, "batch": batch, "T": T,
                "threads": args.threads, "time_cap": args.time_cap, "warmup": args.warmup, "repeats": args.repeats}
        rotation = len(results) % len(args.models)
        order = args.models[rotation:] + args.models[:rotation]
        for m in order:
            if (width, m) in carried:
                entry["models"][m] = {"skipped": carried[(width, m)] + " at smaller T"}
                continue
            log(f"[train] width={width} T={T} B={batch} {m}: memory")
            res = _run_child(dict(base, mode="memory", models=[m]), startup + args.time_cap, mem_cap, args.inprocess)
            if "error" not in res and res["step_s"] > args.time_cap:
                res = {"error": f"time cap ({res['step_s']:.0f}s/step)"}
            if "error" in res:
                entry["models"][m] = {"skipped": res["error"]}
                carried[(width, m)] = res["error"].split(" (")[0]
                log(f"[train]   skipped: {res['error']}")
            else:
                entry["models"][m] = res
        alive = [m for m in order if "skipped" not in entry["models"][m]]
        if alive:
            log(f"[train] width={width} T={T} B={batch}: timing {', '.join(alive)} interleaved")
            estimate = sum(entry["models"][m]["step_s"] for m in alive) * (args.warmup + args.repeats)
            res = _run_child(dict(base, mode="time", models=alive), startup + 3 * estimate, mem_cap, args.inprocess)
            if "error" in res:
                for m in alive:
                    entry["models"][m] = {"skipped": f"timing run: {res['error']}"}
            else:
                for m in alive:
                    if m in res["dropped"] or not res["times"][m]:
                        entry["models"][m] = {"skipped": res["dropped"].get(m, "no timing")}
                        carried[(width, m)] = "time cap"
                    else:
                        entry["models"][m]["times"] = res["times"][m]
                        entry["models"][m]["wall"] = res["wall"][m]
        summarize_train_setting(entry, T)
        log("[train]   " + ", ".join(f"{m}: {entry['models'][m].get('tokens_per_s', 0):.0f} tok/s"
                                     for m in args.models if "tokens_per_s" in entry["models"][m]))
    profiles = {}
    for T in args.profile_T:
        alive = [m for m in args.models if "tokens_per_s" in results.get((args.widths[0], T), {}).get("models", {})
                 .get(m, {})]
        if alive:
            log(f"[train] width={args.widths[0]} T={T}: profiling one step of {', '.join(alive)}")
            job = {"device": args.device, "spec": model_spec(args), "seed": args.seed, "batch": max(1, args.tokens // T),
                   "T": T, "threads": args.threads, "mode": "profile", "models": alive}
            res = _run_child(job, 120.0 + 6 * args.time_cap * len(alive), mem_cap, args.inprocess)
            if "error" not in res:
                profiles[T] = res
    report_train(args, results, profiles)
    return results


def summarize_train_setting(entry: dict, T: int):
    tokens = entry["batch"] * T
    ref = entry["models"].get("gpt2", {})
    for m, res in entry["models"].items():
        if "times" not in res:
            continue
        res["tokens_per_s"] = tokens / statistics.median(res["times"])
        res["wall_tokens_per_s"] = tokens / statistics.median(res["wall"])
        if "times" in ref:
            paired = [r / t for r, t in zip(ref["times"], res["times"])]  # same round, side by side
            res["speed_vs_gpt2"] = statistics.median(paired)
            res["wall_speed_vs_gpt2"] = statistics.median(r / t for r, t in zip(ref["wall"], res["wall"]))
            res["mem_vs_gpt2"] = res["peak_bytes"] / ref["peak_bytes"] if ref.get("peak_bytes") else None


def profile_lines(args, profiles: dict) -> list[str]:
    """The profiler's split of one step per model, and what it bounds: with a free attention, GPT-2's step would
    shrink by the attention share, so no model that keeps GPT-2's projections and MLP can be faster than
    1 / (1 - share) times GPT-2."""
    spec = model_spec(args)
    lines = []
    for T, per_model in profiles.items():
        categories = list(next(iter(per_model.values())))
        head = ["model"] + categories
        rows = [[label(m, spec)] + [f"{100 * shares[c]:.0f} %" for c in categories] for m, shares in per_model.items()]
        lines += ["", f"## Where one step's time goes (width {args.widths[0]}, T={T}; torch.profiler op self-time)", ""]
        lines += md_table(head, rows)
        attention = per_model.get("gpt2", {}).get(categories[0])
        if attention is not None and attention < 1 and args.gpt2_attn == "sdpa":  # eager attention is plain matmuls
            lines += ["", f"GPT-2 spends {100 * attention:.0f} % of its step in attention. An AFT model keeps GPT-2's "
                      "projections, MLP, norms and LM head, so even an AFT operator that cost nothing would run at "
                      f"most 1 / (1 − {attention:.2f}) = **{1 / (1 - attention):.2f}x** GPT-2's tokens/s at this size "
                      "and T."]
    return lines


def train_stem(args) -> str:
    """train_<device>.md for the issue's baseline (GPT-2 with SDPA); other GPT-2 kernels get their own files."""
    return "train" if args.gpt2_attn == "sdpa" else f"train_gpt2_{args.gpt2_attn}"


def report_train(args, results, profiles=None):
    spec = model_spec(args)
    models = args.models
    cpu_clock = uses_cpu_clock(args.device, args.threads)
    lines = header("Training throughput and peak memory (fwd+bwd)", args)
    lines += [
        f"Causal byte LMs, {args.layers} layers, MLP 4×width, vocab 256; AFT-local/conv window s={args.window}, "
        f"AFT-conv h={args.aft_heads} heads, AFT-full/local bias rank d'={args.rank}, AFT position embeddings "
        f"`{args.aft_positions}`; GPT-2 with {args.gpt2_heads} heads, {args.gpt2_attn} attention, activation "
        f"`{args.gpt2_act}`, "
        f"dropout 0. B·T ≈ {args.tokens} tokens per step, {args.threads or 'default'} torch thread(s). "
        f"tokens/s = B·T / median step time over {args.repeats} "
        "rounds in which the models run one step each, interleaved (order rotated every round); step time = "
        + clock_note(cpu_clock) + ("" if not cpu_clock else " (wall-clock tokens/s in the last table)") + "; "
        "× GPT-2 = median over rounds of the paired time ratio (> 1 is faster than GPT-2). Peak memory: "
        + ("growth of `torch.cuda.max_memory_allocated` over the step" if args.device.startswith("cuda") else
           "growth of the peak RSS (ru_maxrss) over the RSS just before the first step, in a fresh process per "
           "cell (weights, data and the interpreter are excluded; gradients and activations included; "
           "`≤` marks a peak that never rose above the process's earlier peak)")
        + f". Cells past `--time-cap {args.time_cap:g}` s per step or `--mem-cap-gb {args.mem_cap_gb:g}` are skipped.",
        "",
        "## Throughput (tokens/s, × GPT-2)",
        "",
    ]
    head = ["width", "T", "B"] + [label(m, spec) for m in models]
    rows, mem_rows, wall_rows = [], [], []
    for (width, T), entry in results.items():
        row, mem_row, wall_row = [width, T, entry["batch"]], [width, T, entry["batch"]], [width, T, entry["batch"]]
        for m in models:
            res = entry["models"][m]
            if "skipped" in res:
                row.append(f"skipped: {res['skipped']}")
                wall_row.append(f"skipped: {res['skipped']}")
                mem_row.append(f"skipped: {res['skipped']}" if "peak_bytes" not in res else fmt_bytes(res["peak_bytes"]))
                continue
            ratio = res.get("speed_vs_gpt2")
            row.append(f"{res['tokens_per_s']:,.0f}" + ("" if m == "gpt2" or ratio is None else f" ({fmt_ratio(ratio)})"))
            ratio = res.get("wall_speed_vs_gpt2")
            wall_row.append(f"{res['wall_tokens_per_s']:,.0f}"
                            + ("" if m == "gpt2" or ratio is None else f" ({fmt_ratio(ratio)})"))
            mem = ("" if res["exact"] else "≤") + fmt_bytes(res["peak_bytes"])
            mratio = res.get("mem_vs_gpt2")
            mem_row.append(mem + ("" if m == "gpt2" or mratio is None else f" ({fmt_ratio(mratio)})"))
        rows.append(row)
        mem_rows.append(mem_row)
        wall_rows.append(wall_row)
    lines += md_table(head, rows)
    lines += ["", "## Peak memory of one fwd+bwd step (× GPT-2)", ""]
    lines += md_table(head, mem_rows)
    if cpu_clock:
        lines += ["", "## Wall-clock throughput (tokens/s, × GPT-2; includes time other processes held the core)", ""]
        lines += md_table(head, wall_rows)
    params = {}
    for (width, _), entry in results.items():
        for m in models:
            if "params" in entry["models"][m]:
                params.setdefault(width, {})[m] = entry["models"][m]["params"]
    if params:
        lines += ["", "Parameters (at the largest T run; AFT-full/local's bias u, vᵀ grows with T): "
                  + "; ".join(f"width {w}: " + ", ".join(f"{label(m, spec)} {n / 1e6:.2f}M" for m, n in p.items())
                              for w, p in params.items())]
    lines += profile_lines(args, profiles or {})
    plot_train(args, results)
    lines += ["", f"![training benchmark]({plot_path(args, train_stem(args)).name})"]
    write_report(args, train_stem(args), lines)


def plot_train(args, results):
    plt = pyplot()
    spec = model_spec(args)
    widths = sorted({w for w, _ in results})
    fig, axes = plt.subplots(len(widths), 2, figsize=(11, 4 * len(widths)), squeeze=False)
    for row, width in enumerate(widths):
        for m in args.models:
            pts = [(T, e["models"][m]) for (w, T), e in results.items() if w == width]
            speed = [(T, r["tokens_per_s"]) for T, r in pts if "tokens_per_s" in r]
            mem = [(T, r["peak_bytes"] / 2**20) for T, r in pts if r.get("peak_bytes", 0) > 0]
            style = dict(marker="o", label=label(m, spec), linestyle="--" if m == "gpt2" else "-")
            if speed:
                axes[row, 0].plot(*zip(*speed), **style)
            if mem:
                axes[row, 1].plot(*zip(*mem), **style)
        for col, ylabel in enumerate(("fwd+bwd tokens/s", "peak memory growth (MiB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T (B·T constant)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"width {width}, {args.layers} layers, {args.device}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:  # e.g. every peak stayed below the process's earlier peak (the table marks those cells `≤`)
                ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    fig.savefig(plot_path(args, train_stem(args)), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# generate: cached decoding
# ---------------------------------------------------------------------------------------------------------------------
def _forward_cached(model, ids, cache):
    # transformers 5.24 names the argument `cache` for GPT-2 too (`past_key_values` is deprecated there)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits, out.cache


def cmd_generate(args):
    import torch

    check_models(args.models)
    _set_threads(args)
    spec = model_spec(args)
    max_len = max(args.contexts) + args.steps + 1
    models = {m: build_model(m, spec, max_len, args.seed).to(args.device).eval() for m in args.models}
    gen = torch.Generator().manual_seed(args.seed)
    # one random byte stream shared by every model: the context, then the tokens fed during decoding
    stream = torch.randint(0, 256, (args.batch, max_len), generator=gen).to(args.device)
    # results[(L, m)] = {"step_ms": [per-round medians], "all": [every step], "wall": [every step, wall clock],
    #                     "prefill_ms": [...], "cache_bytes": int}
    cpu_clock = uses_cpu_clock(args.device, args.threads)
    results: dict[tuple[int, str], dict] = {}
    with torch.inference_mode():
        for rnd in range(args.repeats):
            for L in args.contexts:
                rot = (rnd + args.contexts.index(L)) % len(args.models)
                for m in args.models[rot:] + args.models[:rot]:
                    model = models[m]
                    with Stopwatch(args.device) as watch:
                        logits, cache = _forward_cached(model, stream[:, :L], None)
                    prefill = watch.primary(cpu_clock)
                    cached = cache_nbytes(cache)
                    steps, walls = [], []
                    for i in range(args.steps):
                        token = stream[:, L + i: L + i + 1]
                        with Stopwatch(args.device) as watch:
                            logits, cache = _forward_cached(model, token, cache)
                        steps.append(watch.primary(cpu_clock))
                        walls.append(watch.wall)
                    res = results.setdefault((L, m), {"step_ms": [], "all": [], "wall": [], "prefill_ms": []})
                    res["step_ms"].append(1e3 * statistics.median(steps))
                    res["all"] += [1e3 * s for s in steps]
                    res["wall"] += [1e3 * s for s in walls]
                    res["prefill_ms"].append(1e3 * prefill)
                    res["cache_bytes"] = cached
                    res["cache_bytes_end"] = cache_nbytes(cache)
                    del cache, logits
                log(f"[generate] round {rnd + 1}/{args.repeats} L={L}: "
                    + ", ".join(f"{m} {results[(L, m)]['step_ms'][-1]:.2f} ms" for m in args.models))
    report_generate(args, results)
    return results


def _paired(results, a: tuple[int, str], b: tuple[int, str]) -> float | None:
    if a not in results or b not in results:
        return None
    return statistics.median(x / y for x, y in zip(results[a]["step_ms"], results[b]["step_ms"]))


def report_generate(args, results):
    spec = model_spec(args)
    lo, hi = min(args.contexts), max(args.contexts)
    cpu_clock = uses_cpu_clock(args.device, args.threads)
    lines = header("Cached decoding: ms per token and cache size", args)
    lines += [
        f"{args.layers} layers × {args.hidden} wide, B={args.batch}, vocab 256 (same models as `train`, randomly "
        f"initialized: speed and memory do not depend on the weights). For each context length L: prefill L tokens "
        f"with `use_cache=True`, then {args.steps} decode steps, one token per forward with `cache=` and "
        f"`use_cache=True` (GPT-2 takes the same `cache=` argument). ms/token = median over "
        f"{args.repeats} rounds × {args.steps} steps (models and lengths interleaved, order rotated) of the "
        + clock_note(cpu_clock) + ("; wall-clock medians are listed below" if cpu_clock else "")
        + ". Cache = bytes of the tensors in the returned cache after the prefill "
        "(`keys`/`values` of attention layers, `recurrent_states`/`conv_states` of linear-attention layers).",
        "",
        "## ms per decoded token",
        "",
    ]
    head = ["context L"] + [label(m, spec) for m in args.models]
    rows = []
    for L in args.contexts:
        row = [L]
        for m in args.models:
            res = results[(L, m)]
            ratio = _paired(results, (L, m), (L, "gpt2")) if m != "gpt2" else None
            row.append(f"{statistics.median(res['all']):.2f}" + ("" if ratio is None else f" ({fmt_ratio(ratio)})"))
        rows.append(row)
    lines += md_table(head, rows)
    lines += ["", "(× GPT-2 at the same L: median over rounds of the paired ratio of per-round medians.)", "",
              f"Growth of ms/token from L={lo} to L={hi} (paired per round): "
              + ", ".join(f"{label(m, spec)} {fmt_ratio(_paired(results, (hi, m), (lo, m)))}" for m in args.models),
              "", "## Cache bytes after the prefill", ""]
    rows = []
    for L in args.contexts:
        row = [L]
        ref = results.get((L, "gpt2"), {}).get("cache_bytes")
        for m in args.models:
            b = results[(L, m)]["cache_bytes"]
            if m == "gpt2" or not ref or not b:
                row.append(fmt_bytes(b))
            else:
                row.append(fmt_bytes(b) + (f" (1/{ref / b:.0f})" if ref >= b else f" ({b / ref:.1f}x)"))
        rows.append(row)
    lines += md_table(head, rows)
    if cpu_clock:
        lines += ["", "## Wall-clock ms per decoded token (median; includes time other processes held the core)", ""]
        lines += md_table(head, [[L] + [f"{statistics.median(results[(L, m)]['wall']):.2f}" for m in args.models]
                                 for L in args.contexts])
    lines += ["", "## Prefill time (ms, median over rounds, same clock as the first table)", ""]
    lines += md_table(head, [[L] + [f"{statistics.median(results[(L, m)]['prefill_ms']):.0f}" for m in args.models]
                             for L in args.contexts])
    plot_generate(args, results)
    lines += ["", f"![decoding benchmark]({plot_path(args, 'generate').name})"]
    write_report(args, "generate", lines)


def plot_generate(args, results):
    plt = pyplot()
    spec = model_spec(args)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in args.models:
        style = dict(marker="o", label=label(m, spec), linestyle="--" if m == "gpt2" else "-")
        axes[0].plot(args.contexts, [statistics.median(results[(L, m)]["all"]) for L in args.contexts], **style)
        axes[1].plot(args.contexts, [results[(L, m)]["cache_bytes"] for L in args.contexts], **style)
    for ax, ylabel in zip(axes, ("ms per decoded token", "cache bytes")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"decode, {args.layers}×{args.hidden}, B={args.batch}, {args.device}")
    axes[1].set_title("cache size after prefill")
    fig.tight_layout()
    fig.savefig(plot_path(args, "generate"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# quality: enwik6 bits/byte at equal wall-clock and equal steps
# ---------------------------------------------------------------------------------------------------------------------
def load_bytes(path: Path):
    import torch

    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    n = data.numel()
    train_end, val_end = int(0.9 * n), int(0.95 * n)
    return data[:train_end], data[train_end:val_end], data[val_end:]


def evaluate_bpb(model, data, T: int, device: str, batch: int = 16, max_windows: int | None = None) -> float:
    """Bits per byte over non-overlapping T-byte windows (each predicts its T-1 next bytes), summed exactly."""
    import torch
    import torch.nn.functional as F

    windows = data[: (data.numel() // T) * T].view(-1, T)
    if max_windows:
        windows = windows[:max_windows]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i: i + batch].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count / math.log(2)


class Trainee:
    """One model under training, with its own clock (seconds spent in its own training steps only)."""

    def __init__(self, name, spec, args, train_data):
        import torch

        self.name = name
        self.args = args
        self.model = build_model(name, spec, args.T, args.seed).to(args.device).train()
        self.params = count_params(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every model
        self.train_data = train_data
        self.cpu_clock = uses_cpu_clock(args.device, args.threads)
        self.clock = 0.0  # the budget's clock: CPU time on a 1-thread CPU run, else wall time
        self.wall = 0.0
        self.steps = 0
        self.curve: list[tuple[float, int, float]] = []  # (clock, steps, val bpb on a subset)
        self.points: dict[str, dict] = {}

    def step(self):
        import torch

        args = self.args
        starts = torch.randint(0, self.train_data.numel() - args.T, (args.batch,), generator=self.gen)
        ids = torch.stack([self.train_data[s: s + args.T] for s in starts.tolist()]).to(args.device)
        lr = args.lr * min(1.0, (self.steps + 1) / args.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with Stopwatch(args.device) as watch:
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.clock += watch.primary(self.cpu_clock)
        self.wall += watch.wall
        self.steps += 1
        return loss.item()


def cmd_quality(args):
    import torch

    check_models(args.models)
    data_path = Path(args.data)
    if not data_path.is_file():
        log(f"[quality] data file {data_path} is missing (expected enwik6 in ../shared/data next to the repo); "
            "nothing was run")
        raise SystemExit(2)
    _set_threads(args)
    train_data, val_data, test_data = load_bytes(data_path)
    spec = model_spec(args)
    seconds = args.seconds if args.seconds else 150.0 * args.budget
    log(f"[quality] {len(args.models)} models × {seconds:.0f}s of training each, slices of {args.slice:.0f}s")

    trainees = {m: Trainee(m, spec, args, train_data) for m in args.models}
    wall_start = time.perf_counter()
    # The equal-steps point S: what the slowest model reaches within the wall-clock budget, estimated from the first
    # round of slices (run under the same machine load as the rest, all models interleaved) unless --equal-steps.
    equal_steps = args.equal_steps or None
    marks: dict[str, tuple[int, float]] = {}  # (steps, clock) of each model at the end of the previous round

    def record(t: Trainee, key: str):
        same = [p for p in t.points.values() if p["steps"] == t.steps]  # both points on one step: evaluate once
        t.points[key] = dict(same[0]) if same else {
            "steps": t.steps, "clock": t.clock, "val_bpb": evaluate_bpb(t.model, val_data, args.T, args.device),
            "test_bpb": evaluate_bpb(t.model, test_data, args.T, args.device)}
        log(f"[quality]   {t.name} {key}: step {t.steps}, {t.clock:.0f}s, test {t.points[key]['test_bpb']:.3f} bpb")

    active = list(args.models)
    rnd = 0
    while active:
        rot = rnd % len(active)
        for m in active[rot:] + active[:rot]:
            t = trainees[m]
            slice_end, steps_before = t.clock + args.slice, t.steps
            while t.clock < slice_end:
                if t.clock >= seconds and "equal_time" not in t.points:
                    record(t, "equal_time")
                if equal_steps is not None and t.steps >= equal_steps and "equal_steps" not in t.points:
                    record(t, "equal_steps")
                if "equal_time" in t.points and "equal_steps" in t.points:
                    break
                loss = t.step()
                if not math.isfinite(loss):
                    log(f"[quality]   {m}: non-finite loss at step {t.steps}")
            if t.steps == steps_before:
                continue
            t.curve.append((t.clock, t.steps, evaluate_bpb(t.model, val_data, args.T, args.device,
                                                           max_windows=args.curve_windows)))
        # S from the rates of round 2 (round 1 carries one-time costs), or of round 1 for budgets of < 3 slices
        if equal_steps is None and (rnd == 1 or seconds < 3 * args.slice):
            rates = [(t.steps - marks.get(t.name, (0, 0.0))[0]) / max(t.clock - marks.get(t.name, (0, 0.0))[1], 1e-9)
                     for t in trainees.values()]
            # never below what a model has already done: its equal-steps point would be lost
            equal_steps = max(1, int(seconds * min(rates)), max(t.steps for t in trainees.values()))
            log(f"[quality] equal-steps point S={equal_steps} (slowest model: {1 / min(rates):.2f} s/step)")
        marks = {t.name: (t.steps, t.clock) for t in trainees.values()}
        active = [m for m in active if not {"equal_time", "equal_steps"} <= trainees[m].points.keys()]
        rnd += 1
        log(f"[quality] round {rnd}: " + ", ".join(f"{m} {trainees[m].steps} steps/{trainees[m].clock:.0f}s "
                                                   f"val~{trainees[m].curve[-1][2]:.3f}" for m in args.models))
    log(f"[quality] total wall time {time.perf_counter() - wall_start:.0f}s")
    report_quality(args, trainees, seconds, equal_steps)
    return trainees


def report_quality(args, trainees, seconds, equal_steps):
    spec = model_spec(args)
    lines = header("Quality: enwik6 bits/byte at equal wall-clock and at equal steps", args)
    lines += [
        f"Byte-level causal LMs ({args.layers} layers × {args.hidden}, MLP 4×) trained on the first 90% of "
        f"`{Path(args.data).name}` ({Path(args.data).stat().st_size / 1e6:.1f} MB), T={args.T}, batch {args.batch} "
        f"random windows, AdamW lr {args.lr:g} (β 0.9/0.95, wd 0.01, "
        f"{args.warmup_steps} warmup steps, then constant), grad clip 1. Held-out bits/byte on the last 5% (test; "
        "the 5% before it is the validation split, shown too), non-overlapping windows of T bytes. "
        f"Equal wall-clock: {seconds:.0f} s of each model's own training-step time, measured as "
        + clock_note(uses_cpu_clock(args.device, args.threads)) + "; the models train in "
        f"round-robin slices of {args.slice:g} s so machine drift hits all alike (evaluation time is not counted). "
        f"Equal steps: S={equal_steps} steps (≈ what the slowest model reaches in that time, estimated from the "
        "models' rates in the second round of slices), i.e. the same training bytes for every model.",
        "",
    ]
    head = ["model", "params", "s/step", "wall s/step", "steps @ equal time", "test bpb @ equal time", "val bpb @ equal time",
            f"test bpb @ {equal_steps} steps", f"val bpb @ {equal_steps} steps", "time to S"]
    rows = []
    for m, t in trainees.items():
        et, es = t.points["equal_time"], t.points["equal_steps"]
        rows.append([label(m, spec), f"{t.params / 1e6:.2f}M", f"{t.clock / max(t.steps, 1):.2f}",
                     f"{t.wall / max(t.steps, 1):.2f}", et["steps"],
                     f"{et['test_bpb']:.3f}", f"{et['val_bpb']:.3f}", f"{es['test_bpb']:.3f}", f"{es['val_bpb']:.3f}",
                     f"{es['clock']:.0f} s"])
    lines += md_table(head, rows)
    ranking_time = sorted(trainees, key=lambda m: trainees[m].points["equal_time"]["test_bpb"])
    ranking_steps = sorted(trainees, key=lambda m: trainees[m].points["equal_steps"]["test_bpb"])
    lines += ["", "Ranking by test bpb (lowest first), equal wall-clock: " + " < ".join(label(m, spec) for m in ranking_time),
              "", "Ranking by test bpb (lowest first), equal steps: " + " < ".join(label(m, spec) for m in ranking_steps)]
    if "gpt2" in trainees:
        ref = trainees["gpt2"].points["equal_time"]["test_bpb"]
        lines += ["", "Equal wall-clock, test bpb minus GPT-2's: " + ", ".join(
            f"{label(m, spec)} {trainees[m].points['equal_time']['test_bpb'] - ref:+.3f}" for m in trainees
            if m != "gpt2")]
    plot_quality(args, trainees, seconds, equal_steps)
    lines += ["", f"![quality benchmark]({plot_path(args, 'quality').name})"]
    write_report(args, "quality", lines)


def plot_quality(args, trainees, seconds, equal_steps):
    plt = pyplot()
    spec = model_spec(args)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, t in trainees.items():
        style = dict(marker=".", label=label(m, spec), linestyle="--" if m == "gpt2" else "-")
        axes[0].plot([c[0] for c in t.curve], [c[2] for c in t.curve], **style)
        axes[1].plot([c[1] for c in t.curve], [c[2] for c in t.curve], **style)
    axes[0].axvline(seconds, color="gray", linewidth=0.8)
    axes[1].axvline(equal_steps, color="gray", linewidth=0.8)
    axes[0].set_xlabel("own training time (s)")
    axes[1].set_xlabel("training steps")
    for ax in axes:
        ax.set_ylabel(f"val bits/byte (first {args.curve_windows} windows)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"enwik6, T={args.T}, {args.layers}×{args.hidden}, {args.device}")
    fig.tight_layout()
    fig.savefig(plot_path(args, "quality"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, hidden: bool = True):
    p.add_argument("--device", default="cpu", help="cpu or cuda (absolute numbers are meaningful only on a GPU)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"subset of {', '.join(MODELS)}")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help="where the markdown table and PNG go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default). 1 by default: on a shared CPU, several threads "
                        "stall at every op's barrier whenever another process holds a core, which penalizes models "
                        "made of many small ops (AFT's scans, cached decoding) more than big matmuls")
    p.add_argument("--layers", type=int, default=4)
    if hidden:
        p.add_argument("--hidden", type=int, default=256, help="width (MLP is 4× as wide)")
    p.add_argument("--window", type=int, default=32, help="AFT-local band / AFT-conv kernel size s")
    p.add_argument("--rank", type=int, default=128, help="AFT-full/local bias rank d'")
    p.add_argument("--aft-heads", type=int, default=8, help="AFT-conv heads h")
    p.add_argument("--gpt2-heads", type=int, default=4)
    p.add_argument("--gpt2-act", default="gelu",
                   help="GPT-2's MLP activation; 'gelu' matches AFT's MLP exactly (GPT-2's own default is gelu_new)")
    p.add_argument("--gpt2-attn", default="sdpa", choices=("sdpa", "eager"),
                   help="GPT-2's attention kernel: sdpa (flash on CPU: O(T) memory) or eager (materializes T×T)")
    p.add_argument("--aft-positions", default="none", choices=("none", "learned"),
                   help="AFT absolute position embeddings (GPT-2 always has learned ones)")


def add_parsers(subparsers):
    """Register the `train`, `generate` and `quality` subcommands on an argparse subparsers object.

    Each sets both `func` and `run` (scripts/benchmark.py dispatches on `args.run(args)`)."""
    p = subparsers.add_parser("train", help="fwd+bwd tokens/s and peak memory vs T (AFT variants vs GPT-2)")
    _common(p, hidden=False)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512],
                   help="hidden sizes: the first runs every --T, the others only --wide-T")
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--wide-T", type=int, nargs="+", default=[1024, 4096], help="T values for the wider settings")
    p.add_argument("--tokens", type=int, default=16384, help="B·T per step (B = max(1, tokens // T))")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one step per model per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--time-cap", type=float, default=120.0,
                   help="skip a model at this T (and larger T) when one fwd+bwd step takes longer (seconds)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="kill a CPU measurement past this RSS (0: no cap)")
    p.add_argument("--inprocess", action="store_true",
                   help="measure in this process instead of fresh subprocesses (quick checks; memory less exact)")
    p.add_argument("--profile-T", type=int, nargs="*", default=[1024, 4096],
                   help="profile one step of each model at these T (first width): where the time goes")
    p.set_defaults(func=cmd_train, run=cmd_train, hidden=None)

    p = subparsers.add_parser("generate", help="ms per decoded token and cache bytes vs context length")
    _common(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per context")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_generate, run=cmd_generate)

    p = subparsers.add_parser("quality", help="enwik6 held-out bits/byte at equal wall-clock and equal steps")
    _common(p)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="enwik6 (bytes; split 90/5/5)")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budget", type=float, default=1.0,
                   help="scales the default 150 s of training per model (1.0 ≈ 15 min in all on 2 CPU cores)")
    p.add_argument("--seconds", type=float, default=0.0, help="training seconds per model (overrides --budget)")
    p.add_argument("--equal-steps", type=int, default=0,
                   help="equal-steps point S (0: the slowest model's steps in the budget, from its rate in round 2)")
    p.add_argument("--slice", type=float, default=15.0, help="round-robin slice of training time per model (s)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--curve-windows", type=int, default=16, help="validation windows for the learning curves")
    p.set_defaults(func=cmd_quality, run=cmd_quality)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_train-child":  # internal: one measurement in a fresh process
        result = train_child(json.loads(argv[1]))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
