"""What the scripts in scripts/ share: configs, tokenizers, the time-budgeted Trainer, image arrays, metrics, model
cards and the Hub.

Not part of the installed package: the scripts import it as a sibling module (`python scripts/x.py` puts scripts/ on
sys.path), and `tests/test_workflows.py` does the same.
"""

import gzip
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoTokenizer,
    GPT2TokenizerFast,
    HfArgumentParser,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from modeling_aft import AFTConfig
from modeling_aft.model_card import render_model_card
from modeling_aft.tokenization_bytes import byte_level_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
# Read-only data beside the repository (see ../shared/README.md); scripts that need it take --data_dir.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

MNIST_LABELS = [str(digit) for digit in range(10)]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

logger = logging.getLogger(__name__)
# The scripts' loggers, whether a script runs as __main__ or is imported by another (main_job imports run_clm).
SCRIPT_MODULES = ("__main__", __name__, "run_clm", "run_image_classification", "sample_images", "generate", "main_job")


def setup_logging(training_args: TrainingArguments):
    """The scripts log INFO on the main process, warnings elsewhere; --log_level also sets transformers' verbosity.
    (And no pinned memory on a CPU.)"""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin for; avoids a warning per dataloader
    if training_args.log_level == "passive":  # the scripts' own INFO lines on the main process, transformers as it is
        level = logging.INFO if training_args.should_log else logging.WARNING
    else:
        level = training_args.get_process_log_level()
        transformers.utils.logging.set_verbosity(level)
    for name in SCRIPT_MODULES:
        logging.getLogger(name).setLevel(level)


# -- configs -----------------------------------------------------------------------------------------------------------
def parse_config_overrides(overrides: str | None) -> dict:
    """"hidden_size=128,aft_variant=local" → {"hidden_size": 128, "aft_variant": "local"} (values read as JSON when
    they parse, else kept as strings)."""
    parsed = {}
    for item in filter(None, (overrides or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} is not key=value")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value.strip()
    return parsed


def load_aft_config(config_name: str, overrides: str | None = None, **updates) -> AFTConfig:
    """An AFTConfig from a JSON file (a path, or a name in configs/), or from a checkpoint folder / Hub id, with
    `overrides` ("k=v,k=v") and `updates` applied before validation, so a bad combination fails here."""
    path = Path(config_name)
    if not path.exists() and (CONFIGS_DIR / config_name).exists():
        path = CONFIGS_DIR / config_name
    if path.is_file():
        values = json.loads(path.read_text())
    else:
        values = AFTConfig.from_pretrained(config_name).to_dict()
    values.update(parse_config_overrides(overrides), **updates)
    for derived in ("layer_types", "auto_map", "transformers_version", "model_type"):
        values.pop(derived, None)  # recomputed by AFTConfig from the fields above
    return AFTConfig(**values)


def load_text_tokenizer(model_name_or_path: str | None = None, tokenizer_name: str | None = None,
                        cache_dir: str | None = None):
    """`tokenizer_name`, else the checkpoint's own tokenizer, else the byte-level tokenizer (a checkpoint saved without
    tokenizer files, such as a converted byte-level model, or training from scratch). Always has a pad token."""
    source = tokenizer_name or model_name_or_path
    tokenizer = None
    if source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
        except (OSError, ValueError, TypeError):
            if tokenizer_name and all((Path(tokenizer_name) / f).exists() for f in ("vocab.json", "merges.txt")):
                # Bare GPT-2 BPE files without tokenizer_config.json: AutoTokenizer cannot tell their class.
                tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer_name)
            elif tokenizer_name:
                raise
    if tokenizer is None:
        return byte_level_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: pads only ever sit under attention_mask = 0
    tokenizer.padding_side = "left"  # for batched generation
    return tokenizer


# -- training under a wall-clock budget --------------------------------------------------------------------------------
@dataclass
class AFTTrainingArguments(TrainingArguments):
    max_train_seconds: float | None = field(
        default=None,
        metadata={"help": "Stop training after this many seconds and run the learning-rate schedule over that time "
                          "instead of over steps (warmup_steps must then be a fraction < 1 of the budget)."},
    )

    def __post_init__(self):
        # Several processes (torchrun, `accelerate launch --multi_gpu`) on a machine without GPUs: DDP over gloo on
        # the CPU. Without use_cpu the Trainer would not start a process group and every process would train alone.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                logger.warning("FSDP was requested, but accelerate enables it only on GPUs (MULTI_GPU-type setups): on "
                               "the CPU this run is plain DDP, every process holding the whole model")
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every AFT parameter takes part in each forward pass
        # The scripts push once, after training, with their own model card (`publish`): the Trainer's own pushing
        # would upload every checkpoint and replace README.md with its auto-generated card.
        self.push_final_checkpoint, self.push_to_hub = self.push_to_hub, False
        super().__post_init__()


class TrainingClock(TrainerCallback):
    """Elapsed fraction of a wall-clock budget, read once per step and agreed on by all processes (rank 0's clock),
    so every replica sees the same learning rate and stops at the same step. Keeps the progress bar's total at the
    number of steps the budget is expected to allow."""

    def __init__(self, budget_seconds: float, progress: ProgressCallback | None = None):
        self.budget_seconds = budget_seconds
        self.progress = progress
        self.started = None
        self.fraction = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_begin(self, args, state, control, **kwargs):
        elapsed = torch.tensor([time.monotonic() - self.started], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(elapsed, src=0)
        self.fraction = min(float(elapsed) / self.budget_seconds, 1.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.fraction >= 1.0:
            control.should_training_stop = True
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None and self.fraction > 0:
            bar.total = max(state.global_step, round(state.global_step / self.fraction))


class AFTTrainer(Trainer):
    """A Trainer that honours `AFTTrainingArguments.max_train_seconds` (see TrainingClock)."""

    SCHEDULE_RESOLUTION = 10_000  # the time budget is cut into this many schedule "steps"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = None
        budget = getattr(self.args, "max_train_seconds", None)
        if budget:
            if self.args.warmup_steps >= 1:
                raise ValueError("with --max_train_seconds give --warmup_steps as a fraction (< 1) of the budget")
            progress = next((c for c in self.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
            self.clock = TrainingClock(budget, progress)
            self.add_callback(self.clock)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.clock is None:
            return super().create_scheduler(num_training_steps, optimizer)
        scheduler = super().create_scheduler(self.SCHEDULE_RESOLUTION, optimizer)
        step_lambdas = scheduler.lr_lambdas
        scheduler.lr_lambdas = [
            lambda _step, by_step=by_step: by_step(round(self.clock.fraction * self.SCHEDULE_RESOLUTION))
            for by_step in step_lambdas
        ]
        return scheduler


# -- metrics -----------------------------------------------------------------------------------------------------------
def bits_per_unit(loss_nats: float, tokens: int, units: int) -> float:
    """Cross-entropy per token in nats → bits per byte/char/dim: loss / ln 2 × tokens per unit."""
    return loss_nats / math.log(2) * tokens / units


def log_and_save_metrics(trainer: Trainer, split: str, metrics: dict):
    """Print the metrics table and write {split}_results.json (and all_results.json)."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)


# -- the parts every script's main() shares ----------------------------------------------------------------------------
def parse_script_arguments(dataclass_types: tuple, argv: list[str] | None) -> tuple:
    """HfArgumentParser over `dataclass_types` (the last one AFTTrainingArguments) from `argv`, or from sys.argv where a
    single .json argument is a file of arguments; then logging and the seed."""
    parser = HfArgumentParser(dataclass_types)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    setup_logging(parsed[-1])
    set_seed(parsed[-1].seed)
    return parsed


def train_and_save(trainer: Trainer, train_samples: int) -> dict:
    """Train; save the model with its tokenizer / image processor and generation config; log and save the metrics."""
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    metrics = {**result.metrics, "train_samples": train_samples, "train_steps": trainer.state.global_step}
    trainer.save_model()
    log_and_save_metrics(trainer, "train", metrics)
    trainer.save_state()
    return metrics


# -- images ------------------------------------------------------------------------------------------------------------
@dataclass
class ImageSplits:
    """uint8 images (N, H, W, C) and integer labels for a train and a test split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list[str]
    description: str


def _split_sorted_by_label(images, labels, train_per_class: int) -> tuple[np.ndarray, ...]:
    """Per class, the first `train_per_class` rows train and the rest test (the files are sorted by label)."""
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rank_in_class[rows] = np.arange(len(rows))
    train = rank_in_class < train_per_class
    return images[train], labels[train], images[~train], labels[~train]


def load_mnist_5k(path: Path) -> ImageSplits:
    """../shared/data/mnist_5k.csv.gz: 784 pixels, then the label, per row; per class rows 0–449 train, 450–499 test."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :784].reshape(-1, 28, 28, 1), table[:, 784].astype(np.int64)
    return ImageSplits(*_split_sorted_by_label(images, labels, 450), MNIST_LABELS,
                       "MNIST, 5,000-digit subset (per class 450 train / 50 test)")


def load_cifar10_1k(path: Path) -> ImageSplits:
    """../shared/data/cifar10_test_1k.npz: 100 CIFAR-10 test images per class; per class 90 train / 10 test."""
    arrays = np.load(path)
    images, labels = arrays["x"], arrays["y"].astype(np.int64)
    return ImageSplits(*_split_sorted_by_label(images, labels, 90), CIFAR10_LABELS,
                       "CIFAR-10, 1,000 test images (JPEG-decoded; per class 90 train / 10 test)")


IMAGE_ARRAY_DATASETS = {"mnist5k": ("mnist_5k.csv.gz", load_mnist_5k),
                        "cifar10_1k": ("cifar10_test_1k.npz", load_cifar10_1k)}
IMAGE_DATASET_HUB_IDS = {"mnist5k": "mnist", "cifar10_1k": "cifar10"}


def load_image_arrays(name: str, data_dir: str | os.PathLike | None = None) -> ImageSplits:
    """One of IMAGE_ARRAY_DATASETS from `data_dir` (default ../shared/data)."""
    if name not in IMAGE_ARRAY_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(IMAGE_ARRAY_DATASETS)}")
    filename, loader = IMAGE_ARRAY_DATASETS[name]
    path = Path(data_dir or SHARED_DATA_DIR) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --dataset {name} reads it from --data_dir "
                                f"(default {SHARED_DATA_DIR})")
    return loader(path)


# -- model cards and the Hub -------------------------------------------------------------------------------------------
def architecture_rows(config: AFTConfig, model: torch.nn.Module) -> dict:
    rows = {
        "Layers × width": f"{config.num_hidden_layers} × {config.hidden_size} (MLP {config.intermediate_size})",
        "Parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
    }
    variants = set(config.layer_variants)
    if variants & {"local", "conv"}:
        rows["Window / kernel size s"] = str(config.window_size)
    if "conv" in variants:
        rows["AFT-conv heads"] = str(config.num_aft_heads)
    if variants & {"full", "local"}:
        rows["Position bias rank d'"] = str(config.position_bias_rank) if config.position_bias_rank else "full T×T"
    rows["Position embeddings"] = config.position_embedding_type
    if config.is_image_model:
        rows["Input"] = f"{config.image_size}×{config.image_size}×{config.num_channels}, patch {config.patch_size}"
    else:
        rows["Vocabulary"] = str(config.vocab_size)
    return rows


def training_summary(training_args: TrainingArguments, train_metrics: dict, data_note: str = "") -> str:
    """One paragraph on how the checkpoint was trained, from the arguments and the Trainer's train metrics."""
    processes = max(training_args.world_size, 1)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * processes
    parts = [
        f"Trained with the transformers Trainer (`scripts/`, modeling-aft) for {train_metrics.get('train_steps', '?')} "
        f"optimizer steps ({train_metrics.get('train_runtime', float('nan')):.0f} s on {processes} "
        f"{'process' if processes == 1 else 'processes'}, {'GPU' if torch.cuda.is_available() else 'CPU'}): AdamW, "
        f"learning rate {training_args.learning_rate:g} "
        f"({getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)} schedule"
        + (f" over a {training_args.max_train_seconds:g} s budget" if getattr(training_args, "max_train_seconds", None)
           else "")
        + f"), weight decay {training_args.weight_decay:g}, batch {batch}, seed {training_args.seed}.",
    ]
    if "train_loss" in train_metrics:
        parts.append(f"Mean training loss over the run {train_metrics['train_loss']:.4f} nats/token.")
    if data_note:
        parts.append(data_note)
    return " ".join(parts)


def card_metrics(metrics: dict) -> dict:
    """The evaluation figures worth a model card: eval_* metrics without the timing ones."""
    timing = ("_runtime", "_per_second", "_samples")
    return {name: value for name, value in metrics.items()
            if name.startswith("eval_") and not name.endswith(timing)}


def hub_base_model(model_name_or_path: str | None) -> str | None:
    """The checkpoint fine-tuned from, as the Hub id the card's `base_model` needs (None for a local folder)."""
    if model_name_or_path is None or Path(model_name_or_path).exists():
        return None
    return model_name_or_path


def write_model_card(output_dir: str, *, config: AFTConfig, model: torch.nn.Module, task: str, metrics: dict,
                     datasets: list[str], training: str, base_model: str | None = None, tags: list[str] = (),
                     repo_id: str | None = None) -> Path:
    card = render_model_card(
        model_name=Path(output_dir).resolve().name, task=task, variant=config.aft_variant, metrics=metrics,
        datasets=datasets, base_model=hub_base_model(base_model), training=training,
        architecture=architecture_rows(config, model), tags=list(tags), repo_id=repo_id,
    )
    path = Path(output_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def publish(trainer: Trainer, **card):
    """On the main process: write README.md (`write_model_card(**card)`), then upload output_dir if --push_to_hub."""
    if not trainer.is_world_process_zero():
        return
    write_model_card(trainer.args.output_dir, repo_id=hub_repo_id(trainer.args), **card)
    if trainer.args.push_final_checkpoint:
        push_output_dir(trainer.args)


def hub_repo_id(training_args: TrainingArguments) -> str:
    return training_args.hub_model_id or Path(training_args.output_dir).resolve().name


def push_output_dir(training_args: TrainingArguments) -> str:
    """Upload the saved output_dir (model, tokenizer / processor, generation config, README.md) to the Hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=training_args.hub_token)
    repo_id = api.create_repo(hub_repo_id(training_args), private=training_args.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=training_args.output_dir, commit_message="Upload AFT checkpoint",
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.pt"])
    logger.info("pushed %s to the Hub as %s", training_args.output_dir, repo_id)
    return repo_id
