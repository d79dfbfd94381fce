#!/usr/bin/env python
"""Autoregressive image modelling with AFT (the paper's Sec. 5.1): train or load a causal LM over pixel tokens, report
bits/dim on held-out images, and write a PNG grid of unconditional samples and a bits/dim training curve.

An image becomes a sequence of sub-pixel values (0–255, raster order, channels interleaved: R, G, B of a pixel in turn)
after one start token (id 256, the config's bos_token_id), so the model predicts every dimension and samples start from
nothing. Data: MNIST-5k (28×28×1, 784 dims) or the CIFAR-10 1k subset (32×32×3, 3072 dims) from --data_dir.

    python scripts/sample_images.py --dataset mnist5k --config_name configs/cpu-mnist-pixels-aft-local.json \\
        --do_train --max_steps 300 --learning_rate 3e-3 --output_dir outputs/aft-mnist-pixels
    python scripts/sample_images.py --dataset mnist5k --model_name_or_path outputs/aft-mnist-pixels \\
        --output_dir outputs/aft-mnist-pixels --num_samples 16
"""

import logging
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from aft_data import (
    IMAGE_ARRAY_DATASETS,
    IMAGE_DATASET_HUB_IDS,
    AFTTrainer,
    AFTTrainingArguments,
    bits_per_unit,
    card_metrics,
    load_aft_config,
    load_image_arrays,
    log_and_save_metrics,
    parse_script_arguments,
    publish,
    train_and_save,
    training_summary,
)
from modeling_aft import AFTForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_CONFIGS = {"mnist5k": "cpu-mnist-pixels-aft-local.json", "cifar10_1k": "cpu-cifar10-pixels-aft-local.json"}


@dataclass
class PixelModelArguments:
    dataset: str = field(default="mnist5k", metadata={"help": f"One of {', '.join(IMAGE_ARRAY_DATASETS)}."})
    data_dir: str | None = field(default=None, metadata={"help": "Where the dataset's file lies (../shared/data)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A trained pixel model to load."})
    config_name: str | None = field(
        default=None, metadata={"help": "Config to train from scratch (default: configs/cpu-<dataset>-pixels-*.json)."})
    config_overrides: str | None = field(default=None, metadata={"help": "e.g. 'hidden_size=128,window_size=64'."})
    max_train_images: int | None = field(default=None, metadata={"help": "Train on only this many images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Measure bits/dim on only this many images."})
    num_samples: int = field(default=16, metadata={"help": "Images to sample into samples.png."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    sample_top_k: int = field(default=0, metadata={"help": "Sample among the k most likely values (0: all)."})
    png_scale: int = field(default=2, metadata={"help": "Upscale the sample grid by this factor (nearest)."})


class PixelSequences(torch.utils.data.Dataset):
    """Images (N, H, W, C) uint8 → {"input_ids", "labels"}: the start token then the H·W·C sub-pixel values."""

    def __init__(self, images: np.ndarray, start_token: int):
        pixels = torch.from_numpy(images.reshape(len(images), -1).astype(np.int64))
        self.tokens = torch.cat([torch.full((len(images), 1), start_token), pixels], dim=1)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def write_png(path: Path, pixels: np.ndarray):
    """A PNG of uint8 pixels (H, W) or (H, W, 3), written with the standard library only."""
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2  # greyscale / truecolour
    rows = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(pixels, dtype=np.uint8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))


def image_grid(images: np.ndarray, scale: int = 1, border: int = 1) -> np.ndarray:
    """(N, H, W, C) → one (rows·(H+b), cols·(W+b)[, 3]) uint8 picture, images separated by a mid-grey border."""
    count, height, width, channels = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.full((rows * (height + border) + border, cols * (width + border) + border, channels), 128, np.uint8)
    for i, image in enumerate(images):
        top, left = border + (i // cols) * (height + border), border + (i % cols) * (width + border)
        grid[top:top + height, left:left + width] = image
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid[..., 0] if channels == 1 else grid


@torch.no_grad()
def sample_images(model: AFTForCausalLM, num_samples: int, image_shape: tuple, temperature: float, top_k: int):
    start = model.config.bos_token_id
    prompt = torch.full((num_samples, 1), start, device=model.device)
    tokens = model.generate(prompt, do_sample=True, max_new_tokens=int(np.prod(image_shape)), temperature=temperature,
                            top_k=top_k, suppress_tokens=[start])
    return tokens[:, 1:].clamp(0, 255).to(torch.uint8).reshape(num_samples, *image_shape).cpu().numpy()


def plot_bits_per_dim(log_history: list[dict], held_out: float | None, path: Path) -> bool:
    """Training loss in bits/dim against the step (and the held-out figure); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", path.name)
        return False
    steps = [entry["step"] for entry in log_history if "loss" in entry]
    bits = [bits_per_unit(entry["loss"], 1, 1) for entry in log_history if "loss" in entry]
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
    axes.plot(steps, bits, marker="o", markersize=3, label="training")
    if held_out is not None:
        axes.axhline(held_out, color="C1", linestyle="--", label=f"held-out {held_out:.3f}")
    axes.set(xlabel="optimizer step", ylabel="bits / dim", title="AFT pixel model")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def load_pixel_model(args: PixelModelArguments) -> AFTForCausalLM:
    if args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    else:
        config_name = args.config_name or DEFAULT_CONFIGS[args.dataset]
        model = AFTForCausalLM(load_aft_config(config_name, args.config_overrides))
    config = model.config
    if config.bos_token_id is None or config.vocab_size < 257 or config.bos_token_id < 256:
        raise ValueError("a pixel model needs the 256 sub-pixel values plus a start token: vocab_size >= 257 and "
                         f"bos_token_id >= 256 (got vocab_size={config.vocab_size}, "
                         f"bos_token_id={config.bos_token_id})")
    return model


def main(argv: list[str] | None = None) -> dict:
    """Run the script on `argv` (default sys.argv); returns the metrics (eval_bits_per_dim, ...)."""
    args, training_args = parse_script_arguments((PixelModelArguments, AFTTrainingArguments), argv)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = load_image_arrays(args.dataset, args.data_dir)
    model = load_pixel_model(args)
    image_shape = arrays.train_images.shape[1:]
    dims = int(np.prod(image_shape))
    if model.config.needs_positions and model.config.max_position_embeddings < dims + 1:
        raise ValueError(f"{args.dataset} images are {dims + 1} tokens with the start token, more than the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    train = PixelSequences(arrays.train_images[:args.max_train_images], model.config.bos_token_id)
    held_out = PixelSequences(arrays.test_images[:args.max_eval_images], model.config.bos_token_id)

    trainer = AFTTrainer(model=model, args=training_args, train_dataset=train if training_args.do_train else None,
                         eval_dataset=held_out)
    metrics = train_and_save(trainer, len(train)) if training_args.do_train else {}
    eval_metrics = trainer.evaluate()
    eval_metrics.update(eval_bits_per_dim=bits_per_unit(eval_metrics["eval_loss"], 1, 1), eval_samples=len(held_out))
    log_and_save_metrics(trainer, "eval", eval_metrics)
    metrics.update(eval_metrics)
    logger.info("held-out bits/dim %.4f on %d images", eval_metrics["eval_bits_per_dim"], len(held_out))

    if trainer.is_world_process_zero():
        samples = sample_images(model.eval(), args.num_samples, image_shape, args.sample_temperature, args.sample_top_k)
        write_png(output_dir / "samples.png", image_grid(samples, scale=args.png_scale))
        plot_bits_per_dim(trainer.state.log_history, eval_metrics["eval_bits_per_dim"], output_dir / "bits_per_dim.png")
        logger.info("wrote %s", ", ".join(str(p) for p in sorted(output_dir.glob("*.png"))))
    if training_args.do_train:
        publish(trainer, config=model.config, model=model, task="unconditional-image-generation",
                metrics=card_metrics(metrics), datasets=[IMAGE_DATASET_HUB_IDS[args.dataset], arrays.description],
                base_model=args.model_name_or_path, tags=["image-generation"],
                training=training_summary(training_args, metrics, f"{len(train)} training images of {dims} "
                                                                  "dimensions, one start token each."))
    return metrics


if __name__ == "__main__":
    main()
