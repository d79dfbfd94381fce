"""Model cards (README.md) for AFT checkpoints: YAML front matter the Hub reads, then the card text.

The template lives here, so an installed package renders cards without the repository. `model_cards/aft_model_card.md`
is its human-readable copy, written by
`python -m modeling_aft.model_card --write-template model_cards/aft_model_card.md` (a test checks that they agree).
"""

import argparse
import json
import re
from collections import Counter
from string import Template

PAPER_BIBTEX = """@article{zhai2021attention,
  title   = {An Attention Free Transformer},
  author  = {Zhai, Shuangfei and Talbott, Walter and Srivastava, Nitish and Huang, Chen and Goh, Hanlin and
             Zhang, Ruixiang and Susskind, Josh},
  journal = {arXiv preprint arXiv:2105.14103},
  year    = {2021}
}"""

MODEL_CARD_TEMPLATE = """---
$front_matter
---

# $model_name

$summary

## Model

| | |
|---|---|
$architecture_rows

AFT replaces dot-product attention with an element-wise operation: keys and values are combined with learned pairwise
position biases, normalized over positions and gated by σ(Q), so memory is linear in the context length
([Zhai et al., 2021](https://arxiv.org/abs/2105.14103)). This checkpoint was produced with the `modeling-aft` package
for transformers.

## Intended use

$intended_use

## Limitations

$limitations

## Training data

$dataset_lines

## Training procedure

$training

## Evaluation

On held-out data (see Training data):

| metric | value |
|---|---|
$metric_rows

## How to use

```python
$usage
```

Where the `modeling_aft` package is not installed, pass `trust_remote_code=True`: the checkpoint carries its
modeling code.

## Citation

```bibtex
$citation
```
"""

TASK_DEFAULTS = {
    "text-generation": {
        "summary": "An Attention Free Transformer ($variant) causal language model.",
        "intended_use": "Research on efficient sequence models: text generation and density estimation (bits per byte) "
                        "on text like its training data, and a starting point for fine-tuning.",
        "limitations": "A small model trained briefly: its text is locally plausible but not factual or coherent over "
                       "long spans, and it reproduces the style and biases of its training data. Not for production "
                       "or for any decision about people.",
        "usage": 'from transformers import pipeline\n\n'
                 'generator = pipeline("text-generation", model="$repo_id")\n'
                 'print(generator("The ", max_new_tokens=64, do_sample=True, top_k=20)[0]["generated_text"])',
    },
    "image-classification": {
        "summary": "An Attention Free Transformer ($variant) image classifier.",
        "intended_use": "Research on attention-free vision models; classifying images like those it was trained on "
                        "(same size, channels and label set).",
        "limitations": "Trained on a small dataset: accuracy outside that distribution (other image sizes, domains or "
                       "classes) is unknown and likely poor. Not for any decision about people.",
        "usage": 'from transformers import pipeline\n\n'
                 'classifier = pipeline("image-classification", model="$repo_id")\n'
                 'print(classifier(image))  # RGB models: a PIL image or a path; any model: an (H, W, C) uint8 array',
    },
    "unconditional-image-generation": {
        "summary": "An Attention Free Transformer ($variant) autoregressive image model: a causal LM over sub-pixel "
                   "values (0–255, raster order, channels interleaved) after a start token, as in the paper's CIFAR-10 "
                   "experiments.",
        "intended_use": "Research on attention-free density estimation (bits per dimension) and unconditional "
                        "sampling of small images like its training data.",
        "limitations": "A small model trained on few images: samples show the data's coarse statistics rather than "
                       "convincing images, and bits/dim on other image distributions is unknown.",
        "usage": 'import torch\n'
                 'from transformers import AutoModelForCausalLM\n\n'
                 'model = AutoModelForCausalLM.from_pretrained("$repo_id")\n'
                 'start = torch.full((4, 1), model.config.bos_token_id)\n'
                 'dims = model.config.max_position_embeddings - 1  # H·W·C\n'
                 'pixels = model.generate(start, do_sample=True, max_new_tokens=dims,\n'
                 '                        suppress_tokens=[model.config.bos_token_id])[:, 1:]  # reshape to (H, W, C)',
    },
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def describe_variant(variant) -> str:
    """"conv" → "AFT-conv"; a per-layer list → "AFT-conv ×2 + AFT-local ×2" (in order of first appearance)."""
    if isinstance(variant, str):
        return variant if variant.startswith("AFT") else f"AFT-{variant}"
    counts = Counter(variant)
    if len(counts) == 1:
        return describe_variant(variant[0])
    return " + ".join(f"{describe_variant(v)} ×{n}" for v, n in counts.items())


def _yaml_value(value) -> str:
    # JSON is valid YAML (flow style), which keeps quoting and escaping right without a YAML library.
    return json.dumps(value, ensure_ascii=False)


def _front_matter(*, task, tags, hub_datasets, metrics, model_name, base_model, license, dataset_label) -> str:
    metadata = {"library_name": "transformers", "license": license, "pipeline_tag": task, "tags": tags}
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    if metrics:
        metadata["metrics"] = sorted(metrics)
    if base_model:
        metadata["base_model"] = base_model
    if metrics:
        metadata["model-index"] = [{
            "name": model_name,
            "results": [{
                "task": {"type": task},
                "dataset": {"name": dataset_label, "type": hub_datasets[0] if hub_datasets else "custom"},
                "metrics": [{"type": name, "value": value, "name": name} for name, value in metrics.items()],
            }],
        }]
    return "\n".join(f"{key}: {_yaml_value(value)}" for key, value in metadata.items())


def _format_metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_model_card(
    *,
    model_name: str,
    task: str,
    variant,
    metrics: dict,
    datasets: list,
    base_model: str | None = None,
    intended_use: str | None = None,
    limitations: str | None = None,
    training: str = "Not recorded.",
    architecture: dict | None = None,
    tags: list | tuple = (),
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """The README.md of a checkpoint.

    task: the Hub pipeline tag ("text-generation" or "image-classification"). variant: an `aft_variant` value.
    metrics: {name: number} as measured (non-numbers are dropped). datasets: Hub dataset ids (these also go into the
    front matter) or free-text descriptions of local data. architecture: extra {row: value} for the model table.
    """
    if task not in TASK_DEFAULTS:
        raise ValueError(f"task={task!r}: expected one of {sorted(TASK_DEFAULTS)}")
    defaults = TASK_DEFAULTS[task]
    variant_text = describe_variant(variant)
    numeric = {name: value for name, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    hub_datasets = [d for d in datasets if _HUB_ID.match(d)]
    variant_tags = sorted({describe_variant(v).lower() for v in ([variant] if isinstance(variant, str) else variant)})
    all_tags = list(dict.fromkeys(["aft", "attention-free-transformer", *variant_tags, *tags]))
    rows = {"Architecture": f"Attention Free Transformer, {variant_text}", **(architecture or {})}
    fields = {
        "front_matter": _front_matter(
            task=task, tags=all_tags, hub_datasets=hub_datasets, metrics=numeric, model_name=model_name,
            base_model=base_model, license=license, dataset_label=datasets[0] if datasets else "unknown",
        ),
        "model_name": model_name,
        "summary": Template(defaults["summary"]).substitute(variant=variant_text)
        + (f" Fine-tuned from `{base_model}`." if base_model else ""),
        "architecture_rows": "\n".join(f"| {key} | {value} |" for key, value in rows.items()),
        "intended_use": intended_use or defaults["intended_use"],
        "limitations": limitations or defaults["limitations"],
        "dataset_lines": "\n".join(f"- {d}" for d in datasets) or "- Not recorded.",
        "training": training,
        "metric_rows": "\n".join(f"| {name} | {_format_metric(value)} |" for name, value in numeric.items())
        or "| (none) | |",
        "usage": Template(defaults["usage"]).substitute(repo_id=repo_id or model_name),
        "citation": PAPER_BIBTEX,
    }
    return Template(MODEL_CARD_TEMPLATE).substitute(fields)


def _main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-template", metavar="PATH", required=True, help="write the raw template to PATH")
    path = parser.parse_args().write_template
    with open(path, "w", encoding="utf-8") as f:
        f.write(MODEL_CARD_TEMPLATE)


if __name__ == "__main__":
    _main()


__all__ = ["render_model_card", "describe_variant", "MODEL_CARD_TEMPLATE", "PAPER_BIBTEX"]
