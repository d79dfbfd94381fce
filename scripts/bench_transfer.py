#!/usr/bin/env python
"""Does starting AFT from a pretrained Transformer beat training it from scratch? (issue: GPT-2 / ViT → AFT)

Two comparisons on the shared checkpoints, each between the converted AFT and the *same* AFT config initialised
from scratch, trained with the same batches, optimiser and learning-rate schedule:

- text: `gpt2-char-shakespeare` → AFT causal LM, `--steps` AdamW steps on batches of `--batch`×`--seq_len` bytes of
  the first 90% of tinyshakespeare; metric: bits/byte on the last 10% (non-overlapping `--seq_len` windows). The
  teacher GPT-2 is measured the same way, and the fraction of the scratch→teacher gap the conversion closes is
  (scratch − converted) / (scratch − teacher).
- image: `vit-mnist5k` → AFT image classifier, `--vit_epochs` epochs over the 4,500 training digits; metric:
  accuracy (and loss) on the 500 held-out digits.

    python scripts/bench_transfer.py                          # both, the issue's settings
    python scripts/bench_transfer.py --ablate                 # + Q/K initialisation ablation of the converter
    python scripts/benchmark.py transfer ...                  # the same, through the benchmark entry point
"""

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a clean clone
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_models' report helpers, also when loaded by path

from modeling_aft.convert_gpt2 import convert_gpt2_to_aft  # noqa: E402
from modeling_aft.convert_vit import convert_vit_to_aft  # noqa: E402
from modeling_aft.modeling_aft import AFTForCausalLM, AFTForImageClassification  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
GPT2_CHECKPOINT = SHARED / "checkpoints" / "gpt2-char-shakespeare"
VIT_CHECKPOINT = SHARED / "checkpoints" / "vit-mnist5k"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
MNIST = SHARED / "data" / "mnist_5k.csv.gz"
MNIST_TRAIN_ROWS_PER_CLASS, MNIST_ROWS_PER_CLASS = 450, 500


# -- data -----------------------------------------------------------------------------------------------------------
def load_shakespeare(path=SHAKESPEARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors: the first 90% and the last 10% of the file, as the teacher was trained."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def load_mnist(path=MNIST):
    """(x_train, y_train, x_test, y_test); x (N, 1, 28, 28) in [0, 1]. Rows are sorted by label, 500 per class:
    per class rows 0–449 train, 450–499 test."""
    with gzip.open(path, "rt") as f:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in f if line.strip()])
    pixels, labels = rows[:, :784].float().div(255).view(-1, 1, 28, 28), rows[:, 784]
    is_train = (torch.arange(len(rows)) % MNIST_ROWS_PER_CLASS) < MNIST_TRAIN_ROWS_PER_CLASS
    return pixels[is_train], labels[is_train], pixels[~is_train], labels[~is_train]


# -- training -------------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak: one schedule for every run in a comparison."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches, *, steps: int, lr: float, warmup: int, loss_of, log_every: int = 0) -> list[float]:
    """`steps` AdamW steps over `batches` (an iterator); returns the training losses (printed every `log_every`)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_of(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}: train loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    model.eval()
    return losses


def lm_batches(train_bytes: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Random windows of the training split, the same sequence for every model given the same seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(train_bytes) - seq_len, (batch,), generator=generator)
        yield torch.stack([train_bytes[s: s + seq_len] for s in starts.tolist()])


def lm_loss(model, tokens):
    logits = model(input_ids=tokens, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def bits_per_byte(model, held_out: torch.Tensor, seq_len: int, max_windows: int | None = None, batch: int = 16):
    """Mean next-byte cross-entropy in bits over non-overlapping `seq_len` windows of the held-out split."""
    model.eval()
    windows = held_out[: len(held_out) // seq_len * seq_len].view(-1, seq_len)[:max_windows]
    total_nats, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        total_nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                      reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total_nats / count / math.log(2)


def image_batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """Shuffled epochs of (x, y) minibatches (a partial last batch is kept)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        for index in order.split(batch):
            yield x[index], y[index]


def image_loss(model, batch):
    pixels, labels = batch
    return F.cross_entropy(model(pixel_values=pixels).logits, labels)


@torch.no_grad()
def classify(model, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on (x, y)."""
    model.eval()
    logits = torch.cat([model(pixel_values=chunk).logits for chunk in x.split(batch)])
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


# -- comparisons ----------------------------------------------------------------------------------------------------
def contenders(convert, checkpoint, model_class, *, variant: str, inits, seed: int) -> dict:
    """{name: model}: one converted model per (query_init, key_init), then "scratch", a fresh model of the same config.

    Every model starts from the same seed, so whatever the converter does not copy starts from the same values.
    """
    models = {}
    for query_init, key_init in inits:
        torch.manual_seed(seed)
        models[f"converted (Q {query_init}, K {key_init})"] = convert(
            checkpoint, aft_variant=variant, query_init=query_init, key_init=key_init)
    torch.manual_seed(seed)
    models["scratch"] = model_class(next(iter(models.values())).config)
    return models


def compare_text(*, steps=300, batch=16, seq_len=256, lr=1e-3, variant="conv", seed=0, eval_windows=None,
                 inits=(("copy", "mean"),), with_teacher=True, measure_before=True, data=None, log_every=0) -> dict:
    """Fine-tune the converted GPT-2 and train a from-scratch twin; held-out bits/byte of each (and the teacher)."""
    from transformers import GPT2LMHeadModel

    train_bytes, held_out = data or load_shakespeare()
    warmup = max(1, steps // 10)
    results = {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "variant": variant, "runs": {}}
    if with_teacher:
        teacher = GPT2LMHeadModel.from_pretrained(GPT2_CHECKPOINT, use_safetensors=True)
        results["teacher_bits_per_byte"] = bits_per_byte(teacher, held_out, seq_len, eval_windows)
        results["teacher_eval_json"] = json.loads((GPT2_CHECKPOINT / "eval.json").read_text())["val_bits_per_byte"]
    models = contenders(convert_gpt2_to_aft, GPT2_CHECKPOINT, AFTForCausalLM, variant=variant, inits=inits, seed=seed)
    for name, model in models.items():
        start = time.perf_counter()
        before = bits_per_byte(model, held_out, seq_len, eval_windows) if measure_before else math.nan
        print(f"text: {name}, held-out bits/byte before {before:.3f}", file=sys.stderr, flush=True)
        losses = train(model, lm_batches(train_bytes, batch, seq_len, seed), steps=steps, lr=lr, warmup=warmup,
                       loss_of=lm_loss, log_every=log_every)
        results["runs"][name] = {"bits_per_byte_before": before,
                                 "bits_per_byte": bits_per_byte(model, held_out, seq_len, eval_windows),
                                 "train_losses": losses, "seconds": time.perf_counter() - start}
    converted = results["runs"][next(iter(models))]["bits_per_byte"]
    scratch = results["runs"]["scratch"]["bits_per_byte"]
    if with_teacher:
        results["gap_closed"] = (scratch - converted) / (scratch - results["teacher_bits_per_byte"])
    return results


def compare_image(*, epochs=1.0, batch=64, lr=1e-3, variant="conv", seed=0, inits=(("copy", "mean"),),
                  with_teacher=True, measure_before=True, data=None, log_every=0) -> dict:
    """Fine-tune the converted ViT and train a from-scratch twin; held-out accuracy / loss of each (and teacher)."""
    from transformers import ViTForImageClassification

    x_train, y_train, x_test, y_test = data or load_mnist()
    steps = max(1, round(epochs * len(x_train) / batch))
    warmup = max(1, steps // 10)
    results = {"epochs": epochs, "steps": steps, "batch": batch, "lr": lr, "variant": variant, "runs": {}}
    if with_teacher:
        teacher = ViTForImageClassification.from_pretrained(VIT_CHECKPOINT, use_safetensors=True)
        with torch.no_grad():
            logits = torch.cat([teacher(pixel_values=chunk).logits for chunk in x_test.split(250)])
        results["teacher_accuracy"] = (logits.argmax(-1) == y_test).float().mean().item()
        results["teacher_eval_json"] = json.loads((VIT_CHECKPOINT / "eval.json").read_text())["test_accuracy"]
    models = contenders(convert_vit_to_aft, VIT_CHECKPOINT, AFTForImageClassification, variant=variant, inits=inits,
                        seed=seed)
    for name, model in models.items():
        start = time.perf_counter()
        loss_before, accuracy_before = classify(model, x_test, y_test) if measure_before else (math.nan, math.nan)
        print(f"image: {name}, test accuracy before {accuracy_before:.3f}", file=sys.stderr, flush=True)
        losses = train(model, image_batches(x_train, y_train, batch, seed), steps=steps, lr=lr, warmup=warmup,
                       loss_of=image_loss, log_every=log_every)
        loss, accuracy = classify(model, x_test, y_test)
        results["runs"][name] = {"accuracy_before": accuracy_before, "loss_before": loss_before,
                                 "accuracy": accuracy, "loss": loss, "train_losses": losses,
                                 "seconds": time.perf_counter() - start}
    return results


ABLATION_INITS = (("copy", "mean"), ("copy", "random"), ("random", "mean"), ("random", "random"))


# -- entry points ---------------------------------------------------------------------------------------------------
def add_parser(subparsers):
    """Register the `transfer` subcommand (scripts/benchmark.py) and return its parser."""
    parser = subparsers.add_parser("transfer", help="converted GPT-2/ViT → AFT vs the same AFT from scratch",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run, run=run)  # scripts/benchmark.py dispatches on args.run
    return parser


def add_arguments(parser):
    parser.add_argument("--tasks", default="text,image", help="comma-separated subset of text,image")
    parser.add_argument("--variant", default="conv", help="AFT variant of the converted and the scratch model")
    parser.add_argument("--steps", type=int, default=300, help="text: fine-tuning steps")
    parser.add_argument("--batch", type=int, default=16, help="text: sequences per step")
    parser.add_argument("--seq_len", type=int, default=256, help="text: bytes per sequence")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (both tasks)")
    parser.add_argument("--eval_windows", type=int, default=None, help="text: held-out windows (default: all)")
    parser.add_argument("--vit_epochs", type=float, default=1.0, help="image: epochs over the 4,500 train digits")
    parser.add_argument("--vit_batch", type=int, default=64, help="image: images per step")
    parser.add_argument("--ablate", action="store_true",
                        help="also compare the converter's Q/K initialisations (copy/mean vs re-initialised)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "docs" / "benchmarks"),
                        help="where transfer.md and transfer.png go ('' to skip the report)")
    parser.add_argument("--log_every", type=int, default=25, help="print the training loss every N steps (0: never)")


def _text_rows(results) -> list[str]:
    rows = [f"| {name} | {run['bits_per_byte_before']:.3f} | {run['bits_per_byte']:.3f} | {run['seconds']:.0f} |"
            for name, run in results["runs"].items()]
    if "teacher_bits_per_byte" in results:
        rows.append(f"| teacher GPT-2 (eval.json: {results['teacher_eval_json']:.3f}) | – | "
                    f"{results['teacher_bits_per_byte']:.3f} | – |")
    return ["| model | bits/byte before | bits/byte after | s |", "|---|---|---|---|", *rows]


def _image_rows(results) -> list[str]:
    rows = [f"| {name} | {run['accuracy_before']:.3f} | {run['accuracy']:.3f} | {run['loss']:.3f} | "
            f"{run['seconds']:.0f} |" for name, run in results["runs"].items()]
    if "teacher_accuracy" in results:
        rows.append(f"| teacher ViT (eval.json: {results['teacher_eval_json']:.3f}) | – | "
                    f"{results['teacher_accuracy']:.3f} | – | – |")
    return ["| model | accuracy before | accuracy after | loss after | s |", "|---|---|---|---|---|", *rows]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    tasks = set(args.tasks.split(","))
    inits = ABLATION_INITS if args.ablate else (("copy", "mean"),)
    results = {}
    if "text" in tasks:
        results["text"] = compare_text(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                                       variant=args.variant, seed=args.seed, eval_windows=args.eval_windows,
                                       inits=inits, log_every=args.log_every)
        print(f"\ntext: {args.steps} steps of {args.batch}x{args.seq_len} bytes, AFT-{args.variant}")
        print("\n".join(_text_rows(results["text"])))
        print(f"fraction of the scratch→teacher gap closed: {results['text']['gap_closed']:.3f}")
    if "image" in tasks:
        results["image"] = compare_image(epochs=args.vit_epochs, batch=args.vit_batch, lr=args.lr,
                                         variant=args.variant, seed=args.seed, inits=inits, log_every=args.log_every)
        print(f"\nimage: {args.vit_epochs} epoch(s), {results['image']['steps']} steps of {args.vit_batch}, "
              f"AFT-{args.variant}")
        print("\n".join(_image_rows(results["image"])))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.out_dir:
        write_transfer_report(args, results)
    return results


def _smoothed(values: list[float], width: int) -> list[float]:
    """Trailing mean over `width` steps: single minibatch losses are too noisy to compare curves by eye."""
    return [sum(values[max(0, i + 1 - width): i + 1]) / (i + 1 - max(0, i + 1 - width)) for i in range(len(values))]


def write_transfer_report(args, results: dict) -> None:
    """docs/benchmarks/transfer.md (settings, tables, gap closed) and transfer.png (training-loss curves)."""
    import bench_models

    args.device = "cpu"  # bench_models' header names the device; this benchmark is CPU-only
    lines = bench_models.header("Transfer: pretrained GPT-2 / ViT → AFT vs the same AFT from scratch", args)
    lines += [f"Variant AFT-{args.variant}. Each converted row names its Q/K initialisation (`copy`: the source "
              "attention's projection; K `mean`: AFT-conv's one key channel per head is the mean of that head's K "
              "rows; `random`: re-initialised); position biases start at zero. Converted and scratch models share "
              "the seed, batches, AdamW (β 0.9/0.95, wd 0.01), linear warm-up over 10% of the steps then cosine "
              "decay to 10%, grad clip 1.", ""]
    if "text" in results:
        text = results["text"]
        lines += [f"## Text: `gpt2-char-shakespeare` → AFT causal LM",
                  "", f"{text['steps']} steps of {text['batch']}×{text['seq_len']} bytes of the first 90% of "
                  "tinyshakespeare, lr " f"{text['lr']:g}; held-out bits/byte on the last 10% "
                  f"(non-overlapping {text['seq_len']}-byte windows).", "", *_text_rows(text), ""]
        if "gap_closed" in text:
            lines += [f"Fraction of the scratch → teacher gap closed by starting from GPT-2: "
                      f"**{text['gap_closed']:.3f}** ((scratch − converted) / (scratch − teacher)).", ""]
    if "image" in results:
        image = results["image"]
        lines += [f"## Image: `vit-mnist5k` → AFT image classifier", "",
                  f"{image['epochs']:g} epoch(s) = {image['steps']} steps of {image['batch']} of the 4,500 training "
                  f"digits, lr {image['lr']:g}; accuracy and loss on the 500 held-out digits.", "",
                  *_image_rows(image), ""]
    lines += ["![training losses](transfer.png)"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / "transfer.md"
    text_path.write_text("\n".join(lines) + "\n")
    print(f"[written {text_path}]")

    plt = bench_models.pyplot()
    panels = [(task, results[task]) for task in ("text", "image") if task in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (task, result) in zip(axes[0], panels):
        for name, run in result["runs"].items():
            ax.plot(_smoothed(run["train_losses"], 10), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats, mean of the last 10 steps)")
        ax.set_title({"text": "GPT-2 → AFT LM (Shakespeare)", "image": "ViT → AFT classifier (MNIST)"}[task])
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "transfer.png", dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
