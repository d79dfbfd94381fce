"""Smoke tests of the benchmarks (scripts/bench_models.py, scripts/benchmark.py ops): every subcommand's code path on
tiny sizes (seconds, not minutes)."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_models")


def test_ops_benchmark_tiny(tmp_path):
    ops_bench = _load("benchmark")
    parser = argparse.ArgumentParser()
    ops_bench.add_ops_arguments(parser)
    out = tmp_path / "ops.md"
    args = parser.parse_args(["--seq-lens", "32", "48", "--dim", "16", "--repeat", "1", "--threads", "1",
                              "--out", str(out)])
    results = ops_bench.run_ops(args)
    for name in ("sdpa", "aft_full", "aft_full_fixed_bias", "aft_local", "aft_local_factorized", "aft_simple",
                 "aft_conv1d"):
        assert results[(name, 48)]["fwd_bwd_ms"] > 0 and results[(name, 48)]["mem_fwd_bwd_mb"] > 0
    text = out.read_text()
    assert "## Targets" in text and "CPU time of the one torch thread" in text and "| 48 | aft_simple |" in text


TINY = ["--layers", "1", "--window", "4", "--rank", "4", "--aft-heads", "2", "--gpt2-heads", "2"]


def test_add_parsers_registers_subcommands(bench):
    parser = argparse.ArgumentParser()
    bench.add_parsers(parser.add_subparsers(dest="command"))
    for name in ("train", "generate", "quality"):
        args = parser.parse_args([name])
        assert callable(args.func)


def test_train_inprocess(bench, tmp_path):
    results = bench.main(["train", "--inprocess", "--widths", "16", "32", "--T", "16", "--wide-T", "8",
                          "--tokens", "32", "--repeats", "1", "--models", "aft-local", "aft-conv", "gpt2",
                          "--profile-T", "16", "--out-dir", str(tmp_path), *TINY])
    text = (tmp_path / "train_cpu.md").read_text()
    assert (tmp_path / "train_cpu.png").stat().st_size > 0
    assert "AFT-local-4" in text and "GPT-2" in text and "Command:" in text
    cell = results[(16, 16)]["models"]["aft-conv"]
    assert cell["tokens_per_s"] > 0 and cell["speed_vs_gpt2"] > 0 and "peak_bytes" in cell
    assert "Where one step's time goes (width 16, T=16" in text and "GPT-2 spends" in text


def test_profile_step_splits_the_step(bench):
    spec = bench.model_spec(argparse.Namespace(hidden=16, layers=1, window=4, rank=4, aft_heads=2, gpt2_heads=2,
                                               gpt2_act="gelu", aft_positions="none"))
    ids = torch.randint(0, 256, (2, 32))
    shares = {m: bench.profile_step(bench.build_model(m, spec, 32), ids, "cpu") for m in ("gpt2", "aft-conv")}
    for split in shares.values():
        assert abs(sum(split.values()) - 1) < 1e-6 and split["matmul"] > 0
    attention = bench.PROFILE_CATEGORIES[0][0]
    assert shares["gpt2"][attention] > 0 and shares["aft-conv"][attention] == 0


def test_train_child_subprocess_and_caps(bench):
    spec = bench.model_spec(argparse.Namespace(hidden=16, layers=1, window=4, rank=4, aft_heads=2, gpt2_heads=2,
                                               gpt2_act="gelu", aft_positions="none"))
    job = {"device": "cpu", "spec": spec, "seed": 0, "batch": 2, "T": 8, "threads": 1, "time_cap": 60,
           "warmup": 0, "repeats": 1, "mode": "memory", "models": ["aft-simple"]}
    res = bench._run_child(job, timeout=120, mem_cap=None, inprocess=False)
    assert res["peak_bytes"] >= 0 and res["step_s"] > 0
    assert bench._run_child(job, timeout=0.0, mem_cap=None, inprocess=False) == {"error": "time cap"}


def test_generate_and_cache_bytes(bench, tmp_path):
    results = bench.main(["generate", "--hidden", "16", "--contexts", "4", "8", "--steps", "2", "--repeats", "1",
                          "--out-dir", str(tmp_path), *TINY])
    assert (tmp_path / "generate_cpu.png").stat().st_size > 0
    # GPT-2 keeps K and V: 2 · L · hidden fp32 per layer; AFT-simple a constant-size state
    assert results[(8, "gpt2")]["cache_bytes"] == 2 * 8 * 16 * 4
    assert results[(4, "aft-simple")]["cache_bytes"] == results[(8, "aft-simple")]["cache_bytes"] > 0
    assert "ms per decoded token" in (tmp_path / "generate_cpu.md").read_text()


def test_quality_tiny(bench, tmp_path):
    data = tmp_path / "text.txt"
    data.write_bytes(bytes(range(32, 127)) * 200)
    trainees = bench.main(["quality", "--data", str(data), "--hidden", "16", "--T", "16", "--batch", "2",
                           "--seconds", "0.3", "--slice", "0.3", "--curve-windows", "2",
                           "--models", "aft-local", "gpt2", "--out-dir", str(tmp_path), *TINY])
    assert {"equal_time", "equal_steps"} <= trainees["gpt2"].points.keys()
    assert "bits/byte" in (tmp_path / "quality_cpu.md").read_text()
    assert (tmp_path / "quality_cpu.png").stat().st_size > 0


def test_quality_missing_data_exits_nonzero(bench, tmp_path):
    with pytest.raises(SystemExit) as err:
        bench.main(["quality", "--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)])
    assert err.value.code != 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("command", ["ops", "train", "generate"])
def test_cuda_request_without_a_gpu_is_a_clear_usage_error(command, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # main() imports its sibling scripts, as when run as a script
    with pytest.raises(SystemExit) as exit_info:
        _load("benchmark").main([command, "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "sees no CUDA device" in capsys.readouterr().err
