#!/usr/bin/env python
"""Generate text with an AFT causal LM: prompt(s) in, text out, streamed as it is produced.

    python scripts/generate.py --model_name_or_path outputs/aft-bytes-lm --prompt "def main(" --do_sample --top_k 20
    python scripts/generate.py --model_name_or_path outputs/aft-bytes-lm --prompt "import " --prompt "class " \\
        --num_beams 4 --max_new_tokens 40

One prompt with greedy or sampled decoding is streamed token by token (`TextStreamer`); several prompts are generated
as one left-padded batch, and beam search picks its best beam at the end, so those are printed when done.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, TextStreamer, set_seed

from aft_data import load_text_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True, help="An AFT checkpoint folder or Hub id.")
    parser.add_argument("--tokenizer_name", default=None,
                        help="Default: the checkpoint's tokenizer, else the byte-level one.")
    parser.add_argument("--prompt", action="append", required=True, help="A prompt; repeat for a batch.")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy / beam search.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="Keep the k most likely tokens (0: all).")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass.")
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_stream", action="store_true", help="Print only when generation is done.")
    return parser.parse_args(argv)


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                  repetition_penalty=args.repetition_penalty)
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kwargs


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], stream: bool = True, **kwargs) -> list[str]:
    """Prompt + continuation for each prompt. `stream` prints a single greedy/sampled prompt as it is generated."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    streamer = None
    if stream and len(prompts) == 1 and kwargs.get("num_beams", 1) == 1:
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    output = model.generate(**inputs, streamer=streamer, **kwargs)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    if streamer is None and stream:
        for i, text in enumerate(texts):
            print(f"=== [{i}] ===\n{text}", flush=True)
    return texts


def load_model_and_tokenizer(model_name_or_path: str, tokenizer_name: str | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path).eval()
    tokenizer = load_text_tokenizer(model_name_or_path, tokenizer_name)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.tokenizer_name)
    return generate_texts(model, tokenizer, args.prompt, stream=not args.no_stream, **generation_kwargs(args))


if __name__ == "__main__":
    main()
