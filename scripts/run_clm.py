#!/usr/bin/env python
"""Train or fine-tune an Attention Free Transformer causal LM (`AFTForCausalLM`) on text with the transformers Trainer.

In the style of transformers' examples/pytorch/language-modeling/run_clm.py. Text is byte-level by default (vocab 256,
one token per byte, as in the paper's enwik8 setup); `--tokenizer_name` picks another tokenizer. Reports the held-out
loss as bits per byte and per character, and saves the model, tokenizer, generation config and a model card.

    python scripts/run_clm.py --config_name configs/cpu-bytes-aft-conv-tiny.json \\
        --train_file ../shared/data/tinyshakespeare.txt --block_size 256 \\
        --do_train --do_eval --max_steps 200 --output_dir outputs/aft-shakespeare

Several processes: `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml scripts/run_clm.py ...`.
"""

import logging
import math
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import datasets
from transformers import AutoModelForCausalLM, default_data_collator

from aft_data import (
    AFTTrainer,
    AFTTrainingArguments,
    bits_per_unit,
    card_metrics,
    load_aft_config,
    load_text_tokenizer,
    log_and_save_metrics,
    parse_script_arguments,
    publish,
    train_and_save,
    training_summary,
)
from modeling_aft import AFTForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1024


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An AFT checkpoint (folder or Hub id) to fine-tune. Leave unset to train from "
                                        "--config_name."})
    config_name: str | None = field(
        default=None, metadata={"help": "An AFT config to train from scratch: a JSON file, a name in configs/, or a "
                                        "checkpoint whose config to reuse."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Override config fields when training from scratch, e.g. "
                                        "'hidden_size=128,num_hidden_layers=2,aft_variant=local'."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer folder or Hub id (e.g. ../shared/data/gpt2-tokenizer). Default: "
                                        "the checkpoint's tokenizer, else the byte-level tokenizer."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A text dataset on the Hub (needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    text_column_name: str = field(default="text", metadata={"help": "The column holding the text."})
    train_file: str | None = field(default=None, metadata={"help": "A .txt, .json/.jsonl or .csv training file."})
    validation_file: str | None = field(default=None, metadata={"help": "The same for held-out evaluation."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Without a validation split: the first this many percent of train is held out."})
    block_size: int | None = field(
        default=None, metadata={"help": f"Training sequence length in tokens (default {DEFAULT_BLOCK_SIZE}, capped "
                                        "by max_position_embeddings where the model has learned positions)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation blocks."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("give --dataset_name, or --train_file (and optionally --validation_file)")


def load_raw_text(data_args: DataTrainingArguments, cache_dir: str | None) -> datasets.DatasetDict:
    """A DatasetDict with "train" and "validation" splits of raw text (one row per line for .txt files)."""
    if data_args.dataset_name is not None:
        load = dict(path=data_args.dataset_name, name=data_args.dataset_config_name, cache_dir=cache_dir)
    else:
        data_files = {split: path for split, path in (("train", data_args.train_file),
                                                       ("validation", data_args.validation_file)) if path}
        extension = Path(next(iter(data_files.values()))).suffix.lstrip(".")
        extension = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        load = dict(path=extension, data_files=data_files, cache_dir=cache_dir)
        if extension == "text":
            load["keep_linebreaks"] = data_args.keep_linebreaks
    raw = datasets.load_dataset(**load)
    if "validation" not in raw:
        held_out = f"{data_args.validation_split_percentage}%"
        raw["validation"] = datasets.load_dataset(**load, split=f"train[:{held_out}]")
        raw["train"] = datasets.load_dataset(**load, split=f"train[{held_out}:]")
    return raw


def load_model(model_args: ModelArguments, tokenizer) -> AFTForCausalLM:
    vocab_needed = len(tokenizer)
    if model_args.model_name_or_path is not None:
        if model_args.config_overrides:
            raise ValueError("--config_overrides only applies when training from scratch (--config_name)")
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
        if not isinstance(model, AFTForCausalLM):
            raise ValueError(f"{model_args.model_name_or_path} is a {type(model).__name__}, not an AFT model: "
                             "convert it first (modeling_aft.convert_gpt2)")
        if vocab_needed > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_needed} tokens but the checkpoint's vocab_size is "
                             f"{model.config.vocab_size}")
    elif model_args.config_name is not None:
        config = load_aft_config(model_args.config_name, model_args.config_overrides)
        if config.vocab_size < vocab_needed:
            logger.warning("config vocab_size %d < %d tokens of the tokenizer: using %d", config.vocab_size,
                           vocab_needed, vocab_needed)
            config = load_aft_config(model_args.config_name, model_args.config_overrides, vocab_size=vocab_needed)
        model = AFTForCausalLM(config)
    else:
        raise ValueError("give --config_name (train from scratch) or --model_name_or_path (fine-tune)")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name)
        setattr(model.config, name, value)
        setattr(model.generation_config, name, value)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("AFT model: %s, %.2f M parameters", model.config.aft_variant, n_params / 1e6)
    return model


def resolve_block_size(block_size: int | None, model: AFTForCausalLM) -> int:
    config = model.config
    limit = config.max_position_embeddings if config.needs_positions else None
    if block_size is None:
        return min(DEFAULT_BLOCK_SIZE, limit or DEFAULT_BLOCK_SIZE)
    if limit is not None and block_size > limit:
        raise ValueError(f"--block_size {block_size} exceeds max_position_embeddings={limit} of this model's learned "
                         "positions / position bias")
    return block_size


def tokenize_and_group(raw: datasets.DatasetDict, tokenizer, data_args: DataTrainingArguments, block_size: int,
                       training_args: AFTTrainingArguments) -> tuple[datasets.DatasetDict, dict]:
    """Tokenize every row, concatenate and cut into `block_size` blocks (labels = inputs; the model shifts them).

    Also returns {split: {"tokens", "bytes", "chars"}} over the whole split, to turn a loss per token into bits per
    byte / character.
    """
    text_column = data_args.text_column_name

    def tokenize(batch):
        texts = batch[text_column]
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
        encoded["num_bytes"] = [len(text.encode("utf-8")) for text in texts]
        encoded["num_chars"] = [len(text) for text in texts]
        return encoded

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        blocks = [ids[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers,
                            remove_columns=raw["train"].column_names,
                            load_from_cache_file=not data_args.overwrite_cache, desc="Tokenizing")
    text_stats = {
        split: {"tokens": sum(map(len, data["input_ids"])), "bytes": sum(data["num_bytes"]),
                "chars": sum(data["num_chars"])}
        for split, data in tokenized.items()
    }
    with training_args.main_process_first(desc="grouping texts"):
        # batch_size=None: one concatenation per split, so only the last partial block of the split is dropped.
        grouped = tokenized.remove_columns(["num_bytes", "num_chars"]).map(
            group, batched=True, batch_size=None, num_proc=None, load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Grouping into blocks of {block_size}",
        )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            grouped[split] = grouped[split].select(range(min(limit, len(grouped[split]))))
        if len(grouped[split]) == 0:
            raise ValueError(f"the {split} split has fewer than block_size={block_size} tokens "
                             f"({text_stats[split]['tokens']}): give more text or a smaller --block_size")
    return grouped, text_stats


def evaluation_metrics(metrics: dict, stats: dict) -> dict:
    """Add perplexity and bits per byte / character to the Trainer's eval metrics (loss in nats per token)."""
    loss = metrics["eval_loss"]
    metrics["eval_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    metrics["eval_bits_per_byte"] = bits_per_unit(loss, stats["tokens"], stats["bytes"])
    metrics["eval_bits_per_char"] = bits_per_unit(loss, stats["tokens"], stats["chars"])
    return metrics


def describe_data(data_args: DataTrainingArguments, stats: dict) -> list[str]:
    """The model card's data lines."""
    if data_args.dataset_name:
        return [data_args.dataset_name]
    lines = [f"training text: local file `{Path(data_args.train_file).name}` ({stats['train']['bytes']:,} bytes)"]
    if data_args.validation_file:
        lines.append(f"held-out text: local file `{Path(data_args.validation_file).name}` "
                     f"({stats['validation']['bytes']:,} bytes)")
    else:
        lines.append(f"held-out text: the first {data_args.validation_split_percentage}% of the training file "
                     f"({stats['validation']['bytes']:,} bytes)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Run the script on `argv` (default sys.argv); returns the train and eval metrics."""
    model_args, data_args, training_args = parse_script_arguments(
        (ModelArguments, DataTrainingArguments, AFTTrainingArguments), argv)
    raw = load_raw_text(data_args, model_args.cache_dir)
    tokenizer = load_text_tokenizer(model_args.model_name_or_path, model_args.tokenizer_name, model_args.cache_dir)
    model = load_model(model_args, tokenizer)
    block_size = resolve_block_size(data_args.block_size, model)
    lm_datasets, text_stats = tokenize_and_group(raw, tokenizer, data_args, block_size, training_args)

    trainer = AFTTrainer(
        model=model,
        args=training_args,
        train_dataset=lm_datasets["train"] if training_args.do_train else None,
        eval_dataset=lm_datasets["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    metrics = train_and_save(trainer, len(lm_datasets["train"])) if training_args.do_train else {}
    if training_args.do_eval:
        eval_metrics = evaluation_metrics(trainer.evaluate(), text_stats["validation"])
        eval_metrics["eval_samples"] = len(lm_datasets["validation"])
        log_and_save_metrics(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
        logger.info("held-out bits/byte %.4f, bits/char %.4f (%d tokens / %d bytes)",
                    eval_metrics["eval_bits_per_byte"], eval_metrics["eval_bits_per_char"],
                    text_stats["validation"]["tokens"], text_stats["validation"]["bytes"])
    if training_args.do_train:
        byte_level = model_args.tokenizer_name is None and len(tokenizer) == 256
        tokens = ("byte-level tokens (one per UTF-8 byte, vocab 256)" if byte_level
                  else f"{type(tokenizer).__name__} tokens ({len(tokenizer)})")
        publish(trainer, config=model.config, model=model, task="text-generation", metrics=card_metrics(metrics),
                datasets=describe_data(data_args, text_stats), base_model=model_args.model_name_or_path,
                training=training_summary(training_args, metrics, f"Sequences of {block_size} {tokens}."),
                tags=["text-generation"])
    return metrics


if __name__ == "__main__":
    main()
