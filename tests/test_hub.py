"""Hub round trips against the in-process fake Hub (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT at import time, so every client runs in a subprocess (tests/isolated.py):
push with the package importable, pull in a child where `import modeling_aft` is impossible.
"""

import importlib
import json
import urllib.error
import urllib.request

import pytest
import torch

from isolated import run_isolated, run_python


def _last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def test_run_isolated_blocks_only_the_installed_package():
    out = run_isolated("""
        import importlib.util, json, os, sys, transformers
        try:
            import modeling_aft
            blocked = None
        except ModuleNotFoundError as e:
            blocked = str(e)
        os.makedirs("pkg")  # a copy under another package (as transformers_modules.<...>) must still import
        open("pkg/__init__.py", "w").close()
        open("pkg/modeling_aft.py", "w").write("VALUE = 42\\n")
        from pkg.modeling_aft import VALUE
        sys.meta_path.pop(0)  # without the blocker the editable install is found: the blocker did the work
        print(json.dumps({"blocked": blocked, "copy": VALUE, "installed": importlib.util.find_spec("modeling_aft")
                          is not None, "transformers": transformers.__version__}))
    """)
    res = _last_json(out)
    assert res["blocked"] and "blocked by tests/isolated.py" in res["blocked"], res
    assert res["copy"] == 42 and res["installed"] and res["transformers"], res
    with pytest.raises(AssertionError, match="boom"):
        run_isolated("raise SystemExit('boom')")


def test_fake_hub_protocol(hub):
    """Plain huggingface_hub client calls, including the error types it derives from X-Error-Code."""
    out = run_python("""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
        api, repo = HfApi(), "user/proto"
        assert api.whoami()["name"] == "user"
        api.create_repo(repo)
        api.create_repo(repo, exist_ok=True)
        first = api.upload_file(path_or_fileobj=b"one", path_in_repo="a/b.txt", repo_id=repo).oid
        api.upload_file(path_or_fileobj=b"two", path_in_repo="a/b.txt", repo_id=repo)
        res = {"old": open(hf_hub_download(repo, "a/b.txt", revision=first)).read(),
               "new": open(hf_hub_download(repo, "a/b.txt")).read(),
               "tree": sorted(api.list_repo_files(repo)), "sha": api.model_info(repo).sha,
               "top": sorted(e.path for e in api.list_repo_tree(repo)),
               "info": [e.size for e in api.get_paths_info(repo, ["a/b.txt"])]}
        for exc, kwargs in [(RepositoryNotFoundError, dict(repo_id="user/missing", filename="x")),
                            (EntryNotFoundError, dict(repo_id=repo, filename="missing.txt")),
                            (RevisionNotFoundError, dict(repo_id=repo, filename="a/b.txt", revision="nope"))]:
            try:
                hf_hub_download(**kwargs)
                res[exc.__name__] = "no error"
            except exc:
                res[exc.__name__] = "ok"
        print(json.dumps(res))
    """, env=hub.env, isolated=False)
    res = _last_json(out)
    assert (res["old"], res["new"], res["info"]) == ("one", "two", [3]), res
    assert res["tree"] == [".gitattributes", "a/b.txt"] and res["top"] == [".gitattributes", "a"], res
    assert res["sha"] == hub.repos["user/proto"].branches["main"], res
    assert [res[k] for k in ("RepositoryNotFoundError", "EntryNotFoundError", "RevisionNotFoundError")] == ["ok"] * 3
    with pytest.raises(urllib.error.HTTPError) as err:  # unknown endpoints are answered 501 and recorded
        urllib.request.urlopen(f"{hub.url}/api/spaces/user/x", timeout=10)
    assert err.value.code == 501 and hub.errors == ["unknown request: GET /api/spaces/user/x"]
    hub.errors.clear()


TOKENIZER = """
from tokenizers import pre_tokenizers
from transformers import GPT2Tokenizer
proc = GPT2Tokenizer(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
"""
LM_RUN = """
def run(model, proc):
    ids = proc("hello hub", return_tensors="pt").input_ids
    with torch.no_grad():
        return {"ids": ids, "logits": model(ids).logits,
                "greedy": model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)}
"""
IMAGE_RUN = """
def run(model, proc):
    import numpy as np
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 1), dtype=np.uint8)
    pixel_values = proc(image, return_tensors="pt", input_data_format="channels_last").pixel_values
    with torch.no_grad():
        return {"pixel_values": pixel_values, "logits": model(pixel_values=pixel_values).logits}
"""
AFT = "hidden_size=32, num_hidden_layers=2, intermediate_size=64, aft_variant='conv', num_aft_heads=4"
FALLBACK_CARD = "---\nlibrary_name: transformers\ntags:\n- aft\n- custom_code\n---\n\n# Tiny AFT (test)\n"
CARD = """
try:
    from modeling_aft.model_card import render_model_card
except ImportError:
    render_model_card = None
card = render_model_card(model_name=REPO, task={task!r}, variant=model.config.aft_variant, metrics={{}}, datasets=[],
                         repo_id=REPO) if render_model_card else {fallback!r}
HfApi().upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=REPO, commit_message="Card")
"""
TASKS = {"AutoModelForCausalLM": "text-generation", "AutoModelForImageClassification": "image-classification"}
CASES = {  # name: (AFT classes needed, code building `model` and `proc`, Auto model class, Auto processor class, run)
    "gpt2": ((), TOKENIZER + "from transformers import GPT2Config, GPT2LMHeadModel\nmodel = GPT2LMHeadModel("
             "GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=2, n_head=4))",
             "AutoModelForCausalLM", "AutoTokenizer", LM_RUN),
    "aft-lm": (("AFTConfig", "AFTForCausalLM"), TOKENIZER + "from modeling_aft import AFTConfig, AFTForCausalLM\n"
               f"model = AFTForCausalLM(AFTConfig({AFT}, vocab_size=260, window_size=4, max_position_embeddings=64))",
               "AutoModelForCausalLM", "AutoTokenizer", LM_RUN),
    "aft-image": (("AFTConfig", "AFTForImageClassification"), "from transformers import ViTImageProcessor\n"
                  "proc = ViTImageProcessor(size={'height': 16, 'width': 16}, image_mean=[0.5], image_std=[0.5])\n"
                  "from modeling_aft import AFTConfig, AFTForImageClassification\nmodel = AFTForImageClassification("
                  f"AFTConfig({AFT}, window_size=3, image_size=16, patch_size=4, num_channels=1, num_labels=3))",
                  "AutoModelForImageClassification", "AutoImageProcessor", IMAGE_RUN),
}
PUSH = """
import json, torch
from huggingface_hub import HfApi
REPO, card = {repo!r}, None
torch.manual_seed(0)
{build}
{run}
model.eval()
model.push_to_hub(REPO)
proc.push_to_hub(REPO)
{card}
torch.save(run(model, proc), {out!r})
print(json.dumps({{"card": card}}))
"""
PULL = """
import json, torch, transformers
from huggingface_hub import HfApi, hf_hub_download
REPO = {repo!r}
{run}
model = transformers.{auto_model}.from_pretrained(REPO, trust_remote_code=True).eval()
proc = transformers.{auto_proc}.from_pretrained(REPO, trust_remote_code=True)
torch.save(run(model, proc), {out!r})
print(json.dumps({{"module": type(model).__module__, "files": HfApi().list_repo_files(REPO),
                   "readme": open(hf_hub_download(REPO, "README.md")).read()}}))
"""


@pytest.mark.parametrize("case", CASES)
def test_push_then_load_in_isolated_process(hub, tmp_path, case):
    needs, build, auto_model, auto_proc, run = CASES[case]
    if needs:
        try:
            missing = [n for n in needs if not hasattr(importlib.import_module("modeling_aft"), n)]
        except Exception as e:  # the package is being written concurrently
            pytest.skip(f"modeling_aft is not importable yet: {e!r}")
        if missing:
            pytest.skip(f"modeling_aft does not provide {missing} yet")
    repo, ref, got = f"user/tiny-{case}", tmp_path / "ref.pt", tmp_path / "got.pt"
    card = CARD.format(task=TASKS[auto_model], fallback=FALLBACK_CARD) if needs else ""
    pushed = _last_json(run_python(PUSH.format(repo=repo, build=build, run=run, card=card, out=str(ref)),
                                   env=hub.env, isolated=False))
    pulled = _last_json(run_isolated(PULL.format(repo=repo, run=run, auto_model=auto_model, auto_proc=auto_proc,
                                                 out=str(got)), env=hub.env))
    hub.assert_clean()
    ref, got = torch.load(ref), torch.load(got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # integer tensors (tokens) must match exactly
    assert "greedy" not in ref or ref["greedy"].shape[1] > ref["ids"].shape[1]  # generation did generate
    assert {"config.json", "model.safetensors", "README.md"} <= set(pulled["files"]), pulled["files"]
    front_matter = pulled["readme"].split("---")[1] if pulled["readme"].startswith("---\n") else ""
    assert "library_name:" in front_matter, pulled["readme"][:500]
    if needs:  # loaded through remote code only, and the card is the one the package renders
        assert pulled["module"].startswith("transformers_modules."), pulled["module"]
        assert any(f.endswith(".py") for f in pulled["files"]), pulled["files"]
        assert pulled["readme"] == pushed["card"]
