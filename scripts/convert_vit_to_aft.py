#!/usr/bin/env python
"""Convert a pretrained ViT / DeiT checkpoint into an AFT image classifier (see modeling_aft/convert_vit.py).

    python scripts/convert_vit_to_aft.py --source ../shared/checkpoints/vit-mnist5k \
        --output outputs/aft-conv-from-vit --variant conv

Writes a `save_pretrained` folder (safetensors + the modeling code for trust_remote_code) that
`AutoModelForImageClassification.from_pretrained` loads, the source's image processor (or a ViTImageProcessor at
the source's image size, without normalisation, when it has none), and a README.md model card.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clean clone

from modeling_aft.convert_common import (  # noqa: E402
    add_conversion_arguments,
    base_model_of,
    conversion_kwargs,
    conversion_model_card,
    save_converted,
)
from modeling_aft.convert_vit import DEFAULT_IMAGE_WINDOW, convert_vit_to_aft  # noqa: E402


def source_image_processor(source: str, model):
    """The source's image processor if it ships one, else a ViTImageProcessor for the model's input size."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no preprocessor_config.json (e.g. the shared MNIST checkpoint)
    side = model.config.image_size
    # The source's normalisation is unknown, so none: pixels are only rescaled to [0, 1], as the shared checkpoint
    # was trained. A greyscale model gets one-channel statistics so the processor stays consistent if enabled.
    channels = model.config.num_channels
    return ViTImageProcessor(size={"height": side, "width": side}, do_normalize=False,
                             image_mean=[0.5] * channels, image_std=[0.5] * channels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversion_arguments(parser, default_window=DEFAULT_IMAGE_WINDOW)
    parser.add_argument("--num_labels", type=int, default=None, help="classes of a new head (bare ViTModel/DeiTModel)")
    args = parser.parse_args(argv)
    kwargs = conversion_kwargs(args)
    if args.num_labels is not None:
        kwargs["num_labels"] = args.num_labels
    model = convert_vit_to_aft(args.source, **kwargs)
    card = conversion_model_card(model, task="image-classification", base_model=base_model_of(args),
                                 repo_id=args.hub_model_id)
    pushed = save_converted(model, args.output, companions=[source_image_processor(args.source, model)], card=card,
                            push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id)
    print(f"wrote {args.output}" + (f" and pushed {pushed}" if pushed else ""))


if __name__ == "__main__":
    main()
