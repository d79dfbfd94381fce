#!/usr/bin/env python
"""Train or fine-tune an AFT image classifier (`AFTForImageClassification`) with the transformers Trainer.

In the style of transformers' examples/pytorch/image-classification/run_image_classification.py. The model comes
from a config (`--config_name`) or a checkpoint, e.g. one converted from ViT (`--model_name_or_path`); the data from
an image folder (`--train_dir`, one sub-folder per class), a Hub dataset (`--dataset_name`), or the small array
datasets beside the repository (`--dataset mnist5k` / `cifar10_1k`, read from --data_dir, default ../shared/data).
Reports accuracy and saves the model, its ViTImageProcessor and a model card.

    python scripts/run_image_classification.py --dataset mnist5k \\
        --config_name configs/cpu-mnist-aft-conv-classifier.json \\
        --do_train --do_eval --num_train_epochs 3 --learning_rate 2e-3 --output_dir outputs/aft-mnist
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.utils import is_torchvision_available

from aft_data import (
    IMAGE_ARRAY_DATASETS,
    IMAGE_DATASET_HUB_IDS,
    AFTTrainer,
    AFTTrainingArguments,
    card_metrics,
    load_aft_config,
    load_image_arrays,
    log_and_save_metrics,
    parse_script_arguments,
    publish,
    train_and_save,
    training_summary,
)
from modeling_aft import AFTForImageClassification

if is_torchvision_available():
    from transformers import ViTImageProcessor
else:  # the same processor (saved as "ViTImageProcessor") without the torchvision backend, and without its warning
    from transformers import ViTImageProcessorPil as ViTImageProcessor

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An AFT image-classification checkpoint (folder or Hub id) to fine-tune."})
    config_name: str | None = field(
        default=None, metadata={"help": "An AFT image config to train from scratch (JSON file or name in configs/)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Override config fields when training from scratch, e.g. 'window_size=5'."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "An image processor to use; default: the checkpoint's, else a new "
                                        "ViTImageProcessor for the config's image size."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub downloads are cached."})


@dataclass
class DataTrainingArguments:
    dataset: str | None = field(
        default=None, metadata={"help": f"A small array dataset from --data_dir: {', '.join(IMAGE_ARRAY_DATASETS)}."})
    data_dir: str | None = field(default=None, metadata={"help": "Where --dataset's file lies (../shared/data)."})
    dataset_name: str | None = field(default=None, metadata={"help": "An image dataset on the Hub (needs network)."})
    train_dir: str | None = field(default=None, metadata={"help": "An image folder: one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "The same for evaluation."})
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out fraction when there is no eval split."})
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation images."})

    def __post_init__(self):
        if sum(x is not None for x in (self.dataset, self.dataset_name, self.train_dir)) != 1:
            raise ValueError("give exactly one of --dataset, --dataset_name or --train_dir")


def image_datasets(data_args: DataTrainingArguments, cache_dir: str | None, seed: int):
    """(DatasetDict with "train" and "validation", a description of the data for the model card)."""
    if data_args.dataset is not None:
        arrays = load_image_arrays(data_args.dataset, data_args.data_dir)
        features = datasets.Features({data_args.image_column_name: datasets.Image(),
                                      data_args.label_column_name: datasets.ClassLabel(names=arrays.label_names)})

        def split(images, labels):  # Image() stores greyscale as (H, W)
            images = images[..., 0] if images.shape[-1] == 1 else images
            return datasets.Dataset.from_dict({data_args.image_column_name: list(images),
                                               data_args.label_column_name: labels.tolist()}, features=features)

        data = datasets.DatasetDict(train=split(arrays.train_images, arrays.train_labels),
                                    validation=split(arrays.test_images, arrays.test_labels))
        return data, [IMAGE_DATASET_HUB_IDS[data_args.dataset], arrays.description]
    if data_args.dataset_name is not None:
        data, described = datasets.load_dataset(data_args.dataset_name, cache_dir=cache_dir), [data_args.dataset_name]
    else:
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir}
        data = datasets.load_dataset("imagefolder", cache_dir=cache_dir, data_files={
            split: os.path.join(folder, "**") for split, folder in folders.items() if folder})
        described = [f"local image folder `{Path(data_args.train_dir).name}`"]
    if "validation" not in data and "test" in data:
        data["validation"] = data.pop("test")
    elif "validation" not in data:
        parts = data["train"].train_test_split(data_args.train_val_split, seed=seed)
        data["train"], data["validation"] = parts["train"], parts["test"]
    return data, described


def load_image_processor(model_args: ModelArguments, config):
    """--image_processor_name, else the checkpoint's processor, else a ViTImageProcessor for the config's input."""
    for source in (model_args.image_processor_name, model_args.model_name_or_path):
        if source is None:
            continue
        try:
            return AutoImageProcessor.from_pretrained(source, cache_dir=model_args.cache_dir)
        except OSError:
            if source == model_args.image_processor_name:
                raise  # asked for explicitly; a checkpoint without a processor falls through to a new one
    side = config.image_size
    return ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * config.num_channels,
                             image_std=[0.5] * config.num_channels)


def load_model(model_args: ModelArguments, label_names: list[str]) -> AFTForImageClassification:
    labels = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={name: i for i, name in enumerate(label_names)})
    if model_args.model_name_or_path is not None:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, ignore_mismatched_sizes=True, **labels)
        if not isinstance(model, AFTForImageClassification):
            raise ValueError(f"{model_args.model_name_or_path} is a {type(model).__name__}, not an AFT model: "
                             "convert it first (scripts/convert_vit_to_aft.py)")
        return model
    if model_args.config_name is None:
        raise ValueError("give --config_name (train from scratch) or --model_name_or_path (fine-tune)")
    return AFTForImageClassification(load_aft_config(model_args.config_name, model_args.config_overrides, **labels))


def main(argv: list[str] | None = None) -> dict:
    """Run the script on `argv` (default sys.argv); returns the train and eval metrics."""
    model_args, data_args, training_args = parse_script_arguments(
        (ModelArguments, DataTrainingArguments, AFTTrainingArguments), argv)
    training_args.remove_unused_columns = False  # the transform below needs the image column
    data, described_data = image_datasets(data_args, model_args.cache_dir, training_args.seed)
    label_names = data["train"].features[data_args.label_column_name].names
    model = load_model(model_args, label_names)
    image_processor = load_image_processor(model_args, model.config)
    image_mode = {1: "L", 3: "RGB"}[model.config.num_channels]

    def to_model_inputs(batch):
        images = [image.convert(image_mode) for image in batch[data_args.image_column_name]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch[data_args.label_column_name]}

    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            data[split] = data[split].shuffle(seed=training_args.seed).select(range(min(limit, len(data[split]))))
        data[split].set_transform(to_model_inputs)

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    def accuracy(eval_prediction):
        return {"accuracy": float(np.mean(np.argmax(eval_prediction.predictions, axis=1) == eval_prediction.label_ids))}

    trainer = AFTTrainer(
        model=model, args=training_args, data_collator=collate, compute_metrics=accuracy,
        train_dataset=data["train"] if training_args.do_train else None,
        eval_dataset=data["validation"] if training_args.do_eval else None,
        processing_class=image_processor,
    )
    metrics = train_and_save(trainer, len(data["train"])) if training_args.do_train else {}
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(data["validation"])}
        log_and_save_metrics(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
        logger.info("held-out accuracy %.4f on %d images", eval_metrics["eval_accuracy"], len(data["validation"]))
    if training_args.do_train:
        publish(trainer, config=model.config, model=model, task="image-classification", metrics=card_metrics(metrics),
                datasets=described_data, base_model=model_args.model_name_or_path, tags=["image-classification"],
                training=training_summary(training_args, metrics,
                                          f"{len(data['train'])} training images, {len(label_names)} classes."))
    return metrics


if __name__ == "__main__":
    main()
