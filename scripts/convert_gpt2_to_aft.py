#!/usr/bin/env python
"""Convert a pretrained GPT-2 checkpoint into an AFT causal LM checkpoint (see modeling_aft/convert_gpt2.py).

    python scripts/convert_gpt2_to_aft.py --source ../shared/checkpoints/gpt2-char-shakespeare \
        --output outputs/aft-conv-from-gpt2 --variant conv

Writes a `save_pretrained` folder (safetensors + the modeling code for trust_remote_code) that
`AutoModelForCausalLM.from_pretrained` loads, the source's tokenizer (or, for a 256-byte vocabulary without one,
modeling_aft's byte-level tokenizer), and a README.md model card.
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
from modeling_aft.convert_gpt2 import DEFAULT_TEXT_WINDOW, convert_gpt2_to_aft  # noqa: E402


def source_tokenizer(source: str, model):
    """The source's tokenizer if it ships one; a byte-level one for a 256-byte vocabulary; else None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no tokenizer files next to the weights (e.g. the shared byte-level checkpoint)
    if model.config.vocab_size == 256:
        from modeling_aft.tokenization_bytes import byte_level_tokenizer

        return byte_level_tokenizer(model_max_length=model.config.max_position_embeddings)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversion_arguments(parser, default_window=DEFAULT_TEXT_WINDOW)
    args = parser.parse_args(argv)
    model = convert_gpt2_to_aft(args.source, **conversion_kwargs(args))
    tokenizer = source_tokenizer(args.source, model)
    card = conversion_model_card(model, task="text-generation", base_model=base_model_of(args),
                                 repo_id=args.hub_model_id)
    pushed = save_converted(model, args.output, companions=[tokenizer] if tokenizer is not None else [], card=card,
                            push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id)
    print(f"wrote {args.output}" + (f" and pushed {pushed}" if pushed else ""))


if __name__ == "__main__":
    main()
