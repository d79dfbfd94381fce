"""User workflows end to end, each for a handful of steps on tiny data: the scripts in scripts/ as a user runs them.

run_clm trains → reports bits/byte → saves model, tokenizer, generation config and card → the checkpoint loads with
AutoModelForCausalLM and in `pipeline`, generate.py continues prompts (streamed, and batched with left padding) →
--push_to_hub uploads it to a fake Hub and an interpreter without the package loads it back (remote code);
run_image_classification on MNIST-5k → accuracy, image processor, pipeline; sample_images → PNG grid, bits/dim figure;
main_job on its built-in corpus and on --data; DDP in 2 processes. Scripts run in-process through their `main(argv)`
(one interpreter start-up less per test) except where a fresh process is the point (CLI + Hub, accelerate launch).
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from isolated import run_isolated
from modeling_aft import AFTForCausalLM, AFTForImageClassification
from modeling_aft.model_card import MODEL_CARD_TEMPLATE, render_model_card
from modeling_aft.tokenization_bytes import byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(SCRIPTS))

import generate  # noqa: E402
import main_job  # noqa: E402
import run_clm  # noqa: E402
import run_image_classification  # noqa: E402
import sample_images  # noqa: E402

needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist_5k.csv.gz").exists(),
                                 reason=f"{SHARED_DATA / 'mnist_5k.csv.gz'} is absent (../shared beside the repo)")
needs_gpt2_tokenizer = pytest.mark.skipif(not (SHARED_DATA / "gpt2-tokenizer" / "vocab.json").exists(),
                                          reason=f"{SHARED_DATA / 'gpt2-tokenizer'} is absent")

TINY_LM = str(REPO / "configs" / "cpu-bytes-aft-conv-tiny.json")
UNIFORM_BYTE_LOSS = math.log(256)
# Multi-byte characters make bits per character differ from bits per byte.
BYTE_TOKENIZER = byte_level_tokenizer()
UNICODE_LINES = "naïve café — 日本語のテキスト — Ελληνικά — emoji 🎉\n" * 20


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """`make test` runs two pytest workers on two cores: one intra-op thread each, or every small op of a decoding step
    waits on an oversubscribed thread pool (milliseconds instead of microseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_files(folder: Path) -> tuple[Path, Path]:
    """≈45 kB of training text and ≈8 kB held out: Python sources (this interpreter's) and some non-ASCII text."""
    import argparse
    import textwrap

    train = Path(argparse.__file__).read_text()[:40_000] + UNICODE_LINES
    held_out = Path(textwrap.__file__).read_text()[:6_000] + UNICODE_LINES
    paths = folder / "train.txt", folder / "validation.txt"
    for path, text in zip(paths, (train, held_out)):
        path.write_text(text, encoding="utf-8")
    return paths


def quick_training_args(output_dir: Path, *, steps: int, batch: int, lr: float = 3e-3) -> list[str]:
    return ["--output_dir", str(output_dir), "--do_train", "--do_eval", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "16",
            "--learning_rate", str(lr),
            "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--seed", "0"]


def read_card(folder: Path) -> ModelCard:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:200]
    assert "arXiv:2105.14103" in text and "@article{zhai2021attention" in text  # the paper's BibTeX
    return ModelCard(text)


def card_metric(card: ModelCard, name: str) -> float:
    (value,) = [r.metric_value for r in card.data.eval_results if r.metric_type == name]
    return value


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory):
    """run_clm from a config on local text files, byte-level tokens: (output dir, metrics, held-out file)."""
    tmp = tmp_path_factory.mktemp("byte_lm")
    train_file, validation_file = corpus_files(tmp)
    out = tmp / "aft-bytes"
    metrics = run_clm.main([
        "--config_name", TINY_LM, "--train_file", str(train_file), "--validation_file", str(validation_file),
        "--block_size", "64", "--cache_dir", str(tmp / "cache"), *quick_training_args(out, steps=16, batch=8),
    ])
    return out, metrics, validation_file


def test_model_card_template_copy_matches_the_package():
    assert (REPO / "model_cards" / "aft_model_card.md").read_text(encoding="utf-8") == MODEL_CARD_TEMPLATE, \
        "regenerate: python -m modeling_aft.model_card --write-template model_cards/aft_model_card.md"


def test_render_model_card_front_matter():
    text = render_model_card(model_name="tiny", task="text-generation", variant=["conv", "local"],
                             metrics={"eval_bits_per_byte": 1.25, "note": "not a number"},
                             datasets=["enwik8", "a local file (2 kB)"], base_model="user/base", training="Trained.")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["datasets"] == ["enwik8"] and metadata["base_model"] == "user/base"  # Hub ids only
    assert {"aft", "aft-conv", "aft-local"} <= set(metadata["tags"]) and metadata["license"] == "apache-2.0"
    (result,) = metadata["model-index"][0]["results"]
    assert result["metrics"] == [{"type": "eval_bits_per_byte", "value": 1.25, "name": "eval_bits_per_byte"}]
    assert "AFT-conv ×1 + AFT-local ×1" in text and "a local file (2 kB)" in text and "Trained." in text
    assert "$" not in text.replace("$repo_id", "")  # every placeholder filled
    with pytest.raises(ValueError, match="task="):
        render_model_card(model_name="x", task="translation", variant="conv", metrics={}, datasets=[])


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_byte_level_tokenizer_round_trips(text):
    tokenizer = BYTE_TOKENIZER
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text


def test_byte_level_tokenizer_pads_left_with_nul():
    batch = BYTE_TOKENIZER(["Ā", "abc"], padding=True)  # "Ā" is GPT-2's stand-in character for byte 0
    assert batch["input_ids"] == [[0, 196, 128], [97, 98, 99]] and batch["attention_mask"][0] == [0, 1, 1]
    assert (len(BYTE_TOKENIZER), BYTE_TOKENIZER.pad_token_id, BYTE_TOKENIZER.bos_token_id) == (256, 0, None)


def test_scripts_have_help(capsys):
    for script in (run_clm, run_image_classification, sample_images, generate, main_job):
        with pytest.raises(SystemExit) as exit_info:
            (script.parse_args if hasattr(script, "parse_args") else script.main)(["--help"])
        assert exit_info.value.code == 0
        assert "--output_dir" in capsys.readouterr().out or script is generate


def test_run_clm_trains_reports_bits_per_byte_and_saves(byte_lm):
    out, metrics, validation_file = byte_lm
    assert metrics["train_steps"] == 16 and metrics["eval_loss"] < UNIFORM_BYTE_LOSS - 0.5  # it learned something
    text = validation_file.read_text(encoding="utf-8")
    # One token per byte: bits/byte is the loss in bits; bits/char rescales by bytes per character of the held-out text.
    assert metrics["eval_bits_per_byte"] == pytest.approx(metrics["eval_loss"] / math.log(2))
    assert metrics["eval_bits_per_char"] == pytest.approx(
        metrics["eval_bits_per_byte"] * len(text.encode()) / len(text))
    assert json.loads((out / "eval_results.json").read_text())["eval_bits_per_byte"] == metrics["eval_bits_per_byte"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "modeling_aft.py"):
        assert (out / name).exists(), name
    card = read_card(out)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"aft", "aft-conv"} <= set(card.data.tags) and card.data.license
    assert card_metric(card, "eval_bits_per_byte") == pytest.approx(metrics["eval_bits_per_byte"])
    assert "train.txt" in card.text and "16 optimizer steps" in card.text
    tokenizer = AutoTokenizer.from_pretrained(out)
    sample = "bytes \x00 Ā ü 日本 🎉\n"
    assert tokenizer(sample)["input_ids"] == list(sample.encode()) and tokenizer.decode(list(sample.encode())) == sample


def test_checkpoint_generates(byte_lm, capsys):
    out = byte_lm[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, AFTForCausalLM) and model.generation_config.pad_token_id == 0
    streamed = generate.main(["--model_name_or_path", str(out), "--prompt", "def ", "--max_new_tokens", "24",
                              "--do_sample", "--top_k", "8", "--temperature", "0.8"])
    assert streamed[0].startswith("def ") and len(streamed[0].encode()) > len("def ")
    assert streamed[0] in capsys.readouterr().out  # TextStreamer printed it
    prompts = ["import os\n", "x = "]  # different lengths: left padding
    batched = generate.main(["--model_name_or_path", str(out), "--max_new_tokens", "12", "--no_stream"]
                            + [arg for p in prompts for arg in ("--prompt", p)])
    alone = [generate.main(["--model_name_or_path", str(out), "--prompt", p, "--max_new_tokens", "12",
                            "--no_stream"])[0] for p in prompts]
    assert batched == alone  # greedy: padding must not change any continuation
    beams = generate.main(["--model_name_or_path", str(out), "--max_new_tokens", "8", "--num_beams", "3"]
                          + [arg for p in prompts for arg in ("--prompt", p)])
    assert [b.startswith(p) for b, p in zip(beams, prompts)] == [True, True]


def test_text_generation_pipeline(byte_lm):
    generator = pipeline("text-generation", model=str(byte_lm[0]))
    result = generator("class ", max_new_tokens=10, do_sample=False)
    assert result[0]["generated_text"].startswith("class ") and len(result[0]["generated_text"]) > len("class ")


@needs_gpt2_tokenizer
def test_run_clm_with_a_bpe_tokenizer(tmp_path):
    train_file, validation_file = corpus_files(tmp_path)
    metrics = run_clm.main([
        "--config_name", TINY_LM, "--config_overrides", "num_hidden_layers=1,hidden_size=32,num_aft_heads=4",
        "--tokenizer_name", str(SHARED_DATA / "gpt2-tokenizer"), "--train_file", str(train_file),
        "--validation_file", str(validation_file), "--block_size", "32", "--cache_dir", str(tmp_path / "cache"),
        *quick_training_args(tmp_path / "out", steps=2, batch=4),
    ])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["num_hidden_layers"] == 1  # resized to the tokenizer
    tokens = len(AutoTokenizer.from_pretrained(tmp_path / "out")(validation_file.read_text())["input_ids"])
    n_bytes = len(validation_file.read_bytes())
    assert tokens < n_bytes / 2  # BPE: several bytes per token ...
    ratio = metrics["eval_bits_per_byte"] / (metrics["eval_loss"] / math.log(2))
    assert ratio == pytest.approx(tokens / n_bytes, rel=0.02)  # ... so bits/byte = bits/token × tokens/byte


def _run_script(args: list[str], env: dict | None = None, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, f"{args[0]} failed\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_cli_train_push_and_load_elsewhere(hub, tmp_path):
    """The command line as a user types it, with --push_to_hub; then a machine without modeling_aft loads the repo."""
    train_file, validation_file = corpus_files(tmp_path)
    out = tmp_path / "aft-pushed"
    log = _run_script(["scripts/run_clm.py", "--config_name", "cpu-bytes-aft-conv-tiny.json", "--train_file",
                       str(train_file), "--validation_file", str(validation_file), "--block_size", "32",
                       "--cache_dir", str(tmp_path / "cache"), "--push_to_hub", "--hub_model_id", "user/aft-cli",
                       *quick_training_args(out, steps=2, batch=4)],
                      env={**hub.env, "HF_HOME": str(tmp_path / "hf_home")})
    assert re.search(r"eval_bits_per_byte\s+=\s+\d\.\d+", log), log[-2000:]
    repo = hub.repos["user/aft-cli"]
    files = repo.commits[repo.branches["main"]][0]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "modeling_aft.py",
            "aft_ops.py"} <= set(files), sorted(files)
    assert files["README.md"] == (out / "README.md").read_bytes()  # our card, not the Trainer's
    pulled = json.loads(run_isolated("""
        import json
        from transformers import pipeline
        generator = pipeline("text-generation", model="user/aft-cli", trust_remote_code=True)
        text = generator("The ", max_new_tokens=6, do_sample=False)[0]["generated_text"]
        print(json.dumps({"module": type(generator.model).__module__, "text": text}))
    """, env={**hub.env, "OMP_NUM_THREADS": "1"}).strip().splitlines()[-1])
    assert pulled["module"].startswith("transformers_modules.") and pulled["text"].startswith("The ")


@needs_mnist
def test_image_classification_on_mnist(tmp_path):
    out = tmp_path / "aft-mnist"
    metrics = run_image_classification.main([
        "--dataset", "mnist5k", "--config_name", "cpu-mnist-aft-conv-classifier.json",
        "--max_train_samples", "512", "--max_eval_samples", "100", *quick_training_args(out, steps=12, batch=32),
    ])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_samples"] == 100
    assert metrics["train_loss"] < math.log(10) + 0.2  # no divergence from the uniform guess
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "ViTImageProcessor" and processor["size"] == {"height": 28, "width": 28}
    card = read_card(out)
    assert card.data.pipeline_tag == "image-classification" and card.data.datasets == ["mnist"]
    assert card_metric(card, "eval_accuracy") == pytest.approx(metrics["eval_accuracy"])
    classifier = pipeline("image-classification", model=str(out))
    assert isinstance(classifier.model, AFTForImageClassification)
    digit = np.zeros((28, 28, 1), np.uint8)
    digit[4:24, 12:16] = 255  # a "1"
    predictions = classifier(digit, top_k=3)
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= {str(d) for d in range(10)}


def test_image_classification_from_an_image_folder(tmp_path):
    """--train_dir with one sub-folder per class (datasets' imagefolder), an RGB model, the pipeline on a file path."""
    rng = np.random.default_rng(0)
    for label, brightness in (("dark", 40), ("light", 215)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(brightness, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            sample_images.write_png(tmp_path / "images" / label / f"{i}.png", pixels)
    out = tmp_path / "aft-folder"
    metrics = run_image_classification.main([
        "--train_dir", str(tmp_path / "images"), "--config_name", "cpu-cifar10-aft-conv-classifier.json",
        "--train_val_split", "0.25", "--cache_dir", str(tmp_path / "cache"), *quick_training_args(out, steps=3, batch=4),
    ])
    assert metrics["eval_samples"] == 4 and metrics["train_samples"] == 12
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "dark", "1": "light"}
    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(str(tmp_path / "images" / "light" / "0.png"))  # 16×16 file, resized to the model's 32
    assert {p["label"] for p in predictions} == {"dark", "light"}


def test_png_writer_round_trips(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for shape in ((5, 7), (4, 6, 3)):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        sample_images.write_png(tmp_path / "x.png", pixels)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), pixels)
    grid = sample_images.image_grid(rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8), scale=2)
    assert grid.shape == (2 * (2 * 5 + 1), 2 * (3 * 5 + 1))  # 5 images → 2 rows × 3 columns, 1 px borders


@needs_mnist
def test_sample_images_writes_png_and_bits_per_dim(tmp_path):
    out = tmp_path / "aft-pixels"
    metrics = sample_images.main([
        "--dataset", "mnist5k", "--max_train_images", "32", "--max_eval_images", "8", "--num_samples", "4",
        "--png_scale", "1", *quick_training_args(out, steps=3, batch=8),
    ])
    assert metrics["eval_bits_per_dim"] == pytest.approx(metrics["eval_loss"] / math.log(2))
    assert metrics["eval_bits_per_dim"] < 8.2  # 8 bits/dim is a uniform guess over 256 values
    png = (out / "samples.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (2 * 29 + 1, 2 * 29 + 1)  # 4 samples of 28×28 in a 2×2 grid
    assert zlib.crc32(png[12:29]) == int.from_bytes(png[29:33], "big")
    assert (out / "bits_per_dim.png").read_bytes().startswith(b"\x89PNG")
    assert read_card(out).data.pipeline_tag == "unconditional-image-generation"


def test_main_job_on_its_builtin_corpus(tmp_path, capsys):
    assert not set(main_job.TRAIN_MODULES) & set(main_job.HELD_OUT_MODULES)
    out = tmp_path / "aft-bytes-lm"
    metrics = main_job.main(["--output_dir", str(out), "--max_steps", "2", "--block_size", "64", "--batch_size", "4",
                             "--max_eval_samples", "4", "--max_new_tokens", "16"])
    printed = capsys.readouterr().out
    assert f"held-out bits/byte: {metrics['eval_bits_per_byte']:.4f}" in printed
    assert "standard library" in printed and "def " in printed.split("sample")[-1]
    assert read_card(out).data.pipeline_tag == "text-generation"


def test_main_job_on_given_data(tmp_path, capsys):
    data = corpus_files(tmp_path)[0]
    metrics = main_job.main(["--output_dir", str(tmp_path / "out"), "--data", str(data), "--time_budget", "3",
                             "--block_size", "64", "--batch_size", "4", "--max_new_tokens", "8", "--prompt", "x"])
    assert metrics["train_runtime"] < 30 and metrics["train_steps"] >= 1  # stopped by the time budget
    assert "train.txt" in (tmp_path / "out" / "README.md").read_text()
    assert "standard library" not in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_follow_one_process(tmp_path):
    """2 DDP processes × batch 4 train like 1 process × batch 8: same epochs per step, same loss curve shape."""
    train_file, validation_file = corpus_files(tmp_path)
    common = ["--config_name", TINY_LM, "--train_file", str(train_file), "--validation_file", str(validation_file),
              "--block_size", "64", "--cache_dir", str(tmp_path / "cache"), "--max_eval_samples", "8"]
    single = run_clm.main(common + quick_training_args(tmp_path / "one", steps=12, batch=8))
    _run_script(["-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp_cpu.yaml",
                 "--main_process_port", str(_free_port()), "scripts/run_clm.py", *common,
                 *quick_training_args(tmp_path / "two", steps=12, batch=4)], timeout=120)
    curves = {}
    for name in ("one", "two"):
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        curves[name] = [(entry["epoch"], entry["loss"]) for entry in history if "loss" in entry]
    (epochs_one, loss_one), (epochs_two, loss_two) = (zip(*curves[n]) for n in ("one", "two"))
    assert epochs_two == pytest.approx(epochs_one)  # 2 processes really split each global batch of 8
    assert loss_two[0] == pytest.approx(loss_one[0], abs=0.15)  # same initialisation
    assert loss_two[-1] < loss_two[0] - 0.5 and loss_one[-1] < loss_one[0] - 0.5
    assert np.max(np.abs(np.array(loss_two) - np.array(loss_one))) < 0.35, curves
    saved = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert saved["eval_bits_per_byte"] == pytest.approx(saved["eval_loss"] / math.log(2))
    assert single["train_steps"] == 12
