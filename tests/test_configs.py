"""configs/: every JSON is a valid AFTConfig, the paper's setups carry the paper's numbers, the CPU-sized ones run.

Paper setups (Zhai et al., 2021, arXiv 2105.14103): enwik8 (Table 4/5: AFT-local-32 at 12×512 and 24×256, AFT-simple at
24×256, T = 1024, factorized bias d' = 256), CIFAR-10 pixels (Table 2: AFT-local-256 at 24×256 and 12×512, AFT-simple,
T = 3072, d' = 64, learned positions) and ImageNet (Table 7: DeiT tiny/small shapes; AFT-full with d' = 128 and learned
positions; AFT-conv without positions, kernel 11 or 15 and 16–384 heads; Table 8: base, kernel 25, 32 heads, 384 px).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import modeling_aft.modeling_aft
from modeling_aft import AFTConfig, AFTForCausalLM, AFTForImageClassification

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.json"))
CPU_CONFIGS = [p for p in CONFIG_FILES if p.name.startswith("cpu-")]

# name: (expected fields, paper's parameter count in millions where it reports one)
PAPER_SETUPS = {
    "enwik8-aft-local32-12x512": (dict(num_hidden_layers=12, hidden_size=512, intermediate_size=2048,
                                       aft_variant="local", window_size=32, position_bias_rank=256,
                                       max_position_embeddings=1024, vocab_size=256), None),
    "enwik8-aft-local32-24x256": (dict(num_hidden_layers=24, hidden_size=256, aft_variant="local", window_size=32,
                                       position_bias_rank=256, max_position_embeddings=1024), None),
    "enwik8-aft-simple-24x256": (dict(num_hidden_layers=24, hidden_size=256, aft_variant="simple"), None),
    "cifar10-pixels-aft-local256-24x256": (dict(num_hidden_layers=24, hidden_size=256, aft_variant="local",
                                                window_size=256, position_bias_rank=64, max_position_embeddings=3073,
                                                position_embedding_type="learned"), None),
    "cifar10-pixels-aft-local256-12x512": (dict(num_hidden_layers=12, hidden_size=512, window_size=256), None),
    "cifar10-pixels-aft-simple-24x256": (dict(num_hidden_layers=24, hidden_size=256, aft_variant="simple"), None),
    "imagenet-aft-full-tiny": (dict(hidden_size=192, aft_variant="full", position_bias_rank=128,
                                    position_embedding_type="learned"), 6.3),
    "imagenet-aft-full-small": (dict(hidden_size=384, aft_variant="full", position_bias_rank=128), 22.6),
    "imagenet-aft-conv-tiny-h32-k11": (dict(hidden_size=192, num_aft_heads=32, window_size=11,
                                            position_embedding_type="none"), 5.4),
    "imagenet-aft-conv-tiny-h192-k11": (dict(hidden_size=192, num_aft_heads=192, window_size=11), 5.9),
    "imagenet-aft-conv-small-h16-k11": (dict(hidden_size=384, num_aft_heads=16, window_size=11), 20.3),
    "imagenet-aft-conv-small-h384-k11": (dict(hidden_size=384, num_aft_heads=384, window_size=11), 22.5),
    "imagenet-aft-conv-small-h384-k15": (dict(hidden_size=384, num_aft_heads=384, window_size=15), 23.0),
    "imagenet384-aft-conv-base-h32-k25": (dict(hidden_size=768, num_aft_heads=32, window_size=25, image_size=384),
                                          79.7),
}


def load(path: Path) -> AFTConfig:
    return AFTConfig(**json.loads(path.read_text()))


def model_class(config: AFTConfig):
    return AFTForImageClassification if config.is_image_model else AFTForCausalLM


def test_every_paper_setup_is_shipped():
    missing = set(PAPER_SETUPS) - {p.stem for p in CONFIG_FILES}
    assert not missing, sorted(missing)
    assert len(CPU_CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_and_round_trips(path, tmp_path):
    config = load(path)
    config.save_pretrained(tmp_path)
    again = AFTConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert config.is_image_model == path.stem.startswith(("imagenet", "cpu-mnist-aft", "cpu-cifar10-aft"))
    if "pixels" in path.stem:  # sub-pixel values 0–255 plus the start token of scripts/sample_images.py
        assert (config.vocab_size, config.bos_token_id) == (257, 256)


@pytest.mark.parametrize("name", PAPER_SETUPS)
def test_paper_setup_numbers(name):
    fields, paper_params_m = PAPER_SETUPS[name]
    config = load(CONFIGS / f"{name}.json")
    for field, value in fields.items():
        assert getattr(config, field) == value, (field, getattr(config, field), value)
    if config.is_image_model:
        assert (config.patch_size, config.num_hidden_layers, config.num_labels) == (16, 12, 1000)
        assert config.intermediate_size == 4 * config.hidden_size
    if paper_params_m is not None:  # built without memory; the paper reports the ImageNet models' sizes
        with torch.device("meta"):
            model = model_class(config)(config)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        assert math.isclose(params_m, paper_params_m, rel_tol=0.02), (params_m, paper_params_m)


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.stem)
def test_cpu_config_builds_and_runs(path):
    config = load(path)
    torch.manual_seed(0)
    model = model_class(config)(config).eval()
    assert sum(p.numel() for p in model.parameters()) < 5e6  # CPU-sized
    with torch.no_grad():
        if config.is_image_model:
            pixels = torch.rand(2, config.num_channels, config.image_size, config.image_size)
            out = model(pixel_values=pixels, labels=torch.tensor([0, 1]))
            assert out.logits.shape == (2, config.num_labels)
        else:
            ids = torch.randint(0, config.vocab_size, (2, 48))
            out = model(ids, labels=ids)
            assert out.logits.shape == (2, 48, config.vocab_size)
    assert torch.isfinite(out.loss)


def test_accelerate_configs():
    ddp = yaml.safe_load((CONFIGS / "accelerate" / "ddp_cpu.yaml").read_text())
    fsdp = yaml.safe_load((CONFIGS / "accelerate" / "fsdp.yaml").read_text())
    assert ddp["num_processes"] == fsdp["num_processes"] == 2
    assert ddp["distributed_type"] == "MULTI_GPU" and fsdp["distributed_type"] == "FSDP"
    wrapped = fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert hasattr(modeling_aft.modeling_aft, wrapped), wrapped
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
