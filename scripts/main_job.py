#!/usr/bin/env python
"""The main job (`make run`): train a small AFT-conv byte-level language model for a few minutes on the CPU, report its
held-out bits per byte, save the checkpoint with its tokenizer and model card, and stream a generated sample.

The default corpus needs no network and no data files: the Python standard-library sources of the running interpreter
(fixed module lists below; whole modules are held out, so the figure measures generalisation to unseen files).
`--data FILE` trains on a text file instead, holding out its first 5%. Training and generation are run_clm.py's and
generate.py's own code.

    python scripts/main_job.py --output_dir outputs/aft-bytes-lm      # 180 s of training, ≈ 3.5 min in all
    python scripts/main_job.py --output_dir outputs/x --data ../shared/data/enwik6.txt --max_steps 100
"""

import argparse
import importlib
import inspect
import sys
import tempfile
import time
from pathlib import Path

import run_clm
from aft_data import CONFIGS_DIR
from generate import load_model_and_tokenizer, generate_texts

TRAIN_MODULES = (
    "abc", "argparse", "ast", "bisect", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "email.message", "enum", "fractions", "functools", "gettext", "heapq", "http.client",
    "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "optparse", "pathlib", "pickle", "pprint",
    "random", "shutil", "smtplib", "socket", "statistics", "subprocess", "tarfile", "tempfile", "threading",
    "tokenize", "traceback", "typing", "urllib.parse", "uuid", "weakref", "zipfile",
)
HELD_OUT_MODULES = ("calendar", "queue", "sched", "shlex", "string", "textwrap")
MIN_CORPUS_BYTES = 100_000
DEFAULT_TIME_BUDGET_S = 180.0


def module_sources(names: tuple[str, ...]) -> str:
    """The concatenated source files of the named standard-library modules (those whose source is installed)."""
    texts, missing = [], []
    for name in names:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
        except (ImportError, TypeError):
            path = None
        if path is None:
            missing.append(name)
            continue
        texts.append(Path(path).read_text(encoding="utf-8"))
    if missing:
        print(f"[main_job] no source for {', '.join(missing)}: skipped", file=sys.stderr)
    return "\n".join(texts)


def write_stdlib_corpus(folder: Path) -> tuple[Path, Path]:
    train, held_out = module_sources(TRAIN_MODULES), module_sources(HELD_OUT_MODULES)
    if len(train.encode()) < MIN_CORPUS_BYTES or not held_out:
        raise SystemExit("this Python installs too few standard-library sources for the default corpus: "
                         "pass --data path/to/text.txt")
    python = f"python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    paths = (folder / f"{python}-stdlib-{len(TRAIN_MODULES)}-modules.txt",
             folder / f"{python}-stdlib-held-out-{len(HELD_OUT_MODULES)}-modules.txt")
    for path, text in zip(paths, (train, held_out)):
        path.write_text(text, encoding="utf-8")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where the checkpoint, tokenizer and README.md go.")
    parser.add_argument("--data", default=None, help="A text file to train on instead of the stdlib corpus.")
    parser.add_argument("--config_name", default=str(CONFIGS_DIR / "cpu-bytes-aft-conv-4x256.json"))
    parser.add_argument("--time_budget", type=float, default=None,
                        help=f"Training seconds (default {DEFAULT_TIME_BUDGET_S:g} unless --max_steps is given); the "
                             "learning-rate schedule runs over this time.")
    parser.add_argument("--max_steps", type=int, default=None, help="Train this many steps instead of for a time.")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on this many blocks only.")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.time_budget is None and args.max_steps is None:
        args.time_budget = DEFAULT_TIME_BUDGET_S
    return args


def run_clm_arguments(args: argparse.Namespace, train_file: Path, validation_file: Path | None) -> list[str]:
    argv = [
        "--config_name", args.config_name, "--train_file", str(train_file), "--block_size", str(args.block_size),
        "--output_dir", args.output_dir, "--do_train", "--do_eval", "--seed", str(args.seed),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "32",
        "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
        "--weight_decay", "0.01", "--max_grad_norm", "1.0", "--logging_steps", "25", "--save_strategy", "no",
        "--report_to", "none", "--num_train_epochs", "1000",
    ]
    if validation_file is not None:
        argv += ["--validation_file", str(validation_file)]
    if args.max_steps is not None:
        argv += ["--max_steps", str(args.max_steps)]
    if args.time_budget is not None:
        argv += ["--max_train_seconds", str(args.time_budget)]
    if args.max_eval_samples is not None:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    return argv


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aft-main-job-") as tmp:
        if args.data is None:
            train_file, validation_file = write_stdlib_corpus(Path(tmp))
            print(f"[main_job] corpus: Python {sys.version.split()[0]} standard library, {len(TRAIN_MODULES)} modules "
                  f"({train_file.stat().st_size:,} bytes) for training, {len(HELD_OUT_MODULES)} held out "
                  f"({validation_file.stat().st_size:,} bytes)", flush=True)
        else:
            train_file, validation_file = Path(args.data), None
        metrics = run_clm.main(run_clm_arguments(args, train_file, validation_file) + ["--cache_dir", tmp])

    print(f"\n[main_job] held-out bits/byte: {metrics['eval_bits_per_byte']:.4f} after {metrics['train_steps']} steps "
          f"({metrics['train_runtime']:.0f} s of training); checkpoint, tokenizer and README.md in {args.output_dir}")
    print(f"[main_job] sample (prompt {args.prompt!r}, top-k 20 sampling):\n", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.output_dir)
    generate_texts(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens, do_sample=True, top_k=20)
    print(f"\n[main_job] done in {time.monotonic() - started:.0f} s", flush=True)
    return metrics


if __name__ == "__main__":
    main()
