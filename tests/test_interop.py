"""Hugging Face GPT-2 interop, checked against transformers itself: hf.load_hf, hf.save_hf,
the safetensors reader and writer, and export.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PLAY, ROOT, read_log, run_here, tiny_args

import export
from checkpoint import load_checkpoint
from hf import WeightsError, load_hf, read_safetensors, save_hf, write_safetensors
from model import GPT, GPT2_OPTIONS, GPTConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TINY_HF = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 100}
TOLERANCE = 1e-4  # fp32; the differences are ~1e-6, from the order of operations


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def randomize(model):
    """Every parameter random, biases and LayerNorms included: zeros and ones would hide mix-ups."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def random_hf_model():
    config = transformers.GPT2Config(**TINY_HF, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return randomize(transformers.GPT2LMHeadModel(config))


@torch.no_grad()
def max_logit_difference(ours, hf, vocab_size=100):
    """Every position of a full context of random ids; `vocab_size` leaves out padded vocabulary."""
    ids = torch.randint(0, vocab_size, (2, ours.config.block_size),
                        generator=torch.Generator().manual_seed(1))
    ours_logits, _ = ours.eval()(ids)
    return (ours_logits[..., :vocab_size] - hf(ids).logits).abs().max().item()


@pytest.fixture
def hf_dir(tmp_path):
    """A random GPT-2 saved by transformers (model.safetensors), and the model itself."""
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf


def test_loads_transformers_safetensors(hf_dir):
    folder, hf = hf_dir
    assert (folder / "model.safetensors").is_file()
    ours = load_hf(folder)
    assert ours.config == GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=100, n_layer=2,
                                    n_head=2, n_embd=32, dropout=0.0, bias=True)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert max_logit_difference(ours, hf) <= TOLERANCE
    assert load_hf(folder, dropout=0.1).config.dropout == 0.1


def test_loads_original_gpt2_pickle_layout(hf_dir):
    """The hub's GPT-2 checkpoints were saved from the bare transformer: no `transformer.` prefix,
    causal masks stored as buffers, as pytorch_model.bin."""
    folder, hf = hf_dir
    (folder / "model.safetensors").unlink()
    state = {name.removeprefix("transformer."): tensor for name, tensor in hf.state_dict().items()
             if name != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    assert max_logit_difference(load_hf(folder), hf) <= TOLERANCE


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_through_transformers(tmp_path, bias):
    ours = randomize(GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=100, n_layer=2,
                                   n_head=2, n_embd=32, bias=bias)))
    save_hf(ours, tmp_path)
    written = pytest.importorskip("safetensors.torch").load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" not in written
            and all(t.dtype == torch.float32 for t in written.values()))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_logit_difference(ours, hf) <= TOLERANCE
    back = load_hf(tmp_path)
    original = ours.state_dict()
    for name, tensor in back.state_dict().items():  # without biases: the same weights, zero biases
        assert torch.equal(tensor, original.get(name, torch.zeros_like(tensor))), name


def test_cropped_vocabulary_keeps_the_real_tokens_logits(tmp_path):
    ours = randomize(GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=128, n_layer=2,
                                   n_head=2, n_embd=32)))
    save_hf(ours, tmp_path, vocab_size=100, eot_id=99)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (100, 99, 99)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_logit_difference(ours, hf) <= TOLERANCE


def test_safetensors_reader_and_writer_match_the_reference_library(tmp_path):
    library = pytest.importorskip("safetensors.torch")
    # odd sizes: offsets that are not 8-byte multiples
    tensors = {"half": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(),
               "fp32": torch.randn(2, 3, 4), "mask": torch.ones(3, dtype=torch.bool)}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    library.save_file(tensors, tmp_path / "theirs.safetensors")
    for read in (library.load_file(tmp_path / "ours.safetensors"),
                 read_safetensors(tmp_path / "theirs.safetensors")):
        assert read.keys() == tensors.keys()
        assert all(read[name].dtype == t.dtype and torch.equal(read[name], t)
                   for name, t in tensors.items())


@pytest.mark.slow
def test_export_script_end_to_end(data_root, tmp_path):
    out, folder = tmp_path / "out", tmp_path / "hf"
    run_here("train.py", tiny_args(data_root, out, max_iters=10, lr_decay_iters=10))
    result = run_here("export.py", [str(out / "best.pt"), str(folder)])
    assert "GPT2LMHeadModel.from_pretrained" in result.stdout
    ckpt = load_checkpoint(out / "best.pt")
    assert not ckpt["model_config"]["bias"]  # train.py's default: the export adds zero biases
    ours = GPT(GPTConfig(**ckpt["model_config"]))
    ours.load_state_dict(ckpt["model"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert max_logit_difference(ours, hf, vocab_size=ckpt["meta"]["vocab_size"]) <= TOLERANCE
    assert json.loads((folder / "meta.json").read_text()) == ckpt["meta"]
    export.main([str(out / "best.pt"), str(folder), "--force"])  # overwrites the folder's files


def test_export_refuses_a_non_empty_folder_and_a_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="2"):
        export.main([str(tmp_path / "best.pt"), str(tmp_path / "hf")])
    assert "is not empty; pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        export.main([str(tmp_path / "best.pt"), str(tmp_path / "other")])
    assert capsys.readouterr().err.startswith("error: no checkpoint at")
    assert not (tmp_path / "other").exists()


def expect_weights_error(name_or_dir, match):
    with pytest.raises(WeightsError, match=match) as error:
        load_hf(name_or_dir)
    assert "\n" not in str(error.value)


def test_folder_without_config(tmp_path):
    expect_weights_error(tmp_path, "has no config.json")
    expect_weights_error(tmp_path / "absent", "neither a folder nor one of gpt2")


def test_missing_tensor_and_wrong_shape(hf_dir):
    folder, _ = hf_dir
    tensors = read_safetensors(folder / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    write_safetensors(folder / "model.safetensors", tensors)
    expect_weights_error(folder, "lacks the tensor transformer.h.1.mlp.c_fc.weight")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_positions": 32}))
    expect_weights_error(folder, r"transformer.wpe.weight .* has shape \(64, 32\), "
                                 r"but config.json implies \(32, 32\)")


def test_corrupt_weights(hf_dir):
    folder, _ = hf_dir
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5000])
    expect_weights_error(folder, "truncated or corrupt")


@pytest.mark.parametrize("option, value", [
    ("activation_function", "relu"), ("n_inner", 64), ("scale_attn_by_inverse_layer_idx", True),
    ("tie_word_embeddings", False), ("layer_norm_epsilon", 1e-6)])
def test_unsupported_config(hf_dir, option, value):
    folder, _ = hf_dir
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, option: value}))
    expect_weights_error(folder, option)


def test_named_model_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called gpt2 here
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    expect_weights_error("gpt2", "pip install huggingface_hub, or pass a local folder")


@pytest.mark.slow
def test_named_model_offline_and_not_cached(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    code = ("from hf import WeightsError, load_hf\ntry: load_hf('gpt2')\n"
            "except WeightsError as e: print(e)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.startswith(
        "gpt2 is not in the Hugging Face cache and could not be downloaded")
    assert result.stdout.count("\n") == 1


@pytest.mark.slow
def test_fine_tune_and_sample_from_gpt2_layout_weights(data_root, tmp_path):
    """train.py --init_from=<HF folder> fine-tunes from those weights (context cropped), resumes,
    and sample.py --init_from samples from them directly; GPT-2 BPE comes from tiktoken's cache."""
    torch.manual_seed(0)
    hf = tmp_path / "tiny-gpt2"
    save_hf(GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=50257, n_layer=2, n_head=2,
                          n_embd=32, bias=True)), hf)
    data = tmp_path / "data"
    run_here("prepare.py", ["text", "--input", str(PLAY), "--tokenizer", "gpt2", "--name",
                            "play_gpt2", "--data_root", str(data)])
    out = tmp_path / "run"
    args = tiny_args(data, out, dataset="play_gpt2", init_from=hf, max_iters=20, lr_decay_iters=20,
                     eval_interval=10, sample_interval=0)
    started = run_here("train.py", [*args, "--stop_iter=10"]).stdout
    assert "context 32; learned, layernorm, gelu, tie_embeddings\n" in started  # the weights'
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["weights_from"] == str(hf)
            and ckpt["model_config"]["block_size"] == 32)  # cropped to the config
    assert ckpt["model_config"]["n_embd"] == 32 and ckpt["model_config"]["bias"] is True
    # so does run.json: GPT-2's options, whatever train.py's defaults are
    model = json.loads((out / "run.json").read_text())["model"]
    assert model == ckpt["model_config"] and model == {**model, **GPT2_OPTIONS}
    run_here("train.py", [*args, "--init_from=resume"])
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert evals[-1] < evals[0]
    text = run_here("sample.py", [f"--init_from={hf}", "--num_samples=1", "--max_new_tokens=8",
                                  "--device=cpu"])
    assert text.stdout.endswith("---------------\n")


@pytest.mark.slow
def test_pretrained_weights_need_gpt2_tokens(data_root, tmp_path):
    hf = tmp_path / "tiny-gpt2"
    save_hf(GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=50257, n_layer=2, n_head=2,
                          n_embd=32)), hf)
    result = run_here("train.py", tiny_args(data_root, tmp_path / "run", init_from=hf), check=False)
    assert result.returncode == 2 and "was trained on gpt2 tokens" in result.stderr
    assert "prepare the data with that tokenizer (prepare.py --tokenizer gpt2)" in result.stderr


def test_weights_other_than_gpt2s_need_a_meta_json_naming_their_tokenizer(data_root, tmp_path):
    """A Llama-layout folder, and a GPT-2 one whose vocabulary cannot hold GPT-2 BPE."""
    llama, small = tmp_path / "llama", tmp_path / "small"
    save_hf(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32,
                          bias=False, qk_norm=False)), llama)
    save_hf(GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=100, n_layer=2, n_head=2,
                          n_embd=32)), small)
    run = tmp_path / "run"
    for folder in (llama, small):
        for script, args in (("sample.py", [f"--init_from={folder}", "--device=cpu"]),
                             ("train.py", tiny_args(data_root, run, init_from=folder))):
            result = run_here(script, args, check=False)
            assert result.returncode == 2 and result.stderr.startswith(
                f"error: {folder} has no meta.json naming its tokenizer"), result.stderr
    assert not run.exists()


def test_a_config_json_no_gpt_can_hold_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "odd"
    save_hf(GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=100, n_layer=2, n_head=2,
                          n_embd=32)), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_head": 3}))
    with pytest.raises(WeightsError, match="config.json describes no model this GPT can be: "
                                           "n_embd 32 must be divisible by n_head 3"):
        load_hf(folder)
