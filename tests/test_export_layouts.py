"""Export and load of the modern architecture options in transformers' Llama and Qwen3 layouts
(hf.LAYOUTS), checked against transformers; the options no layout holds are refused in one line."""

import json
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
from conftest import run_here, tiny_args

import export
from checkpoint import load_checkpoint, model_from_checkpoint
from data import DataError, read_meta
from hf import WeightsError, load_hf, read_safetensors, save_hf
from model import GPT, GPT2_OPTIONS, GPTConfig
from start import first_weights

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TINY = {"block_size": 32, "vocab_size": 72, "n_layer": 2, "n_head": 2, "n_embd": 32}
TOKENS = 65  # the exported vocabulary: the char dataset's, the rest of the 72 rows cropped
LLAMA = {**GPT2_OPTIONS, "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
QWEN3 = {**LLAMA, "qk_norm": True}
TOLERANCE = 1e-4  # fp32; the differences are ~1e-6, from the order of operations


def random_model(options):
    """Every parameter random and large, norms included: initial zeros and ones would hide mix-ups,
    and a swapped pair of tensors moves the logits by ~5."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


@torch.no_grad()
def max_logit_difference(ours, theirs):
    ids = torch.randint(0, TOKENS, (2, TINY["block_size"]),
                        generator=torch.Generator().manual_seed(1))
    return (ours(ids)[0][..., :TOKENS] - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize("options, architecture", [
    (LLAMA, "LlamaForCausalLM"),
    ({**LLAMA, "tie_embeddings": False, "bias": True}, "LlamaForCausalLM"),
    ({**LLAMA, "zero_init_proj": True}, "LlamaForCausalLM"),  # only an init: no layout needs it off
    (QWEN3, "Qwen3ForCausalLM"),
    ({**QWEN3, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ({**GPT2_OPTIONS, "zero_init_proj": True}, "GPT2LMHeadModel"),
], ids=["llama-tied", "llama-untied-biases", "llama-zero-init", "qwen3-tied", "qwen3-untied",
        "gpt2-zero-init"])
def test_exports_to_the_layout_that_holds_the_options(tmp_path, options, architecture):
    ours = random_model(options)
    save_hf(ours, tmp_path, vocab_size=TOKENS)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == architecture
    assert max_logit_difference(ours, theirs) <= TOLERANCE
    back = load_hf(tmp_path)
    if architecture != "GPT2LMHeadModel":  # (GPT-2's has biases; test_interop checks its weights)
        assert back.config == replace(ours.config, vocab_size=TOKENS, zero_init_proj=False)
        assert (back.lm_head.weight is back.transformer.wte.weight) == ours.config.tie_embeddings
        original = ours.state_dict()
        assert all(torch.equal(t, original[name][:len(t)]) for name, t in back.state_dict().items())
    assert max_logit_difference(back.eval(), theirs) <= TOLERANCE


def test_norms_eps_and_rope_are_written_as_the_model_computes(tmp_path):
    save_hf(random_model(QWEN3), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps  # nn.RMSNorm's eps=None in fp32
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["intermediate_size"] == 88 and config["head_dim"] == 16  # 8 * round(32 / 3)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_norm.weight"].shape == (16,)
    assert "lm_head.weight" not in tensors  # tied: transformers ties it on loading


@pytest.mark.parametrize("key, value", [("rms_norm_eps", 1e-6), ("num_key_value_heads", 1),
                                        ("hidden_act", "gelu"), ("intermediate_size", 64),
                                        ("rope_parameters", {"rope_theta": 5e5}),
                                        ("attention_bias", True), ("use_sliding_window", True)])
def test_loading_refuses_a_config_this_model_computes_otherwise(tmp_path, key, value):
    save_hf(random_model(QWEN3), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(WeightsError, match=key):
        load_hf(tmp_path)


def test_loading_reads_transformers_4_rope_keys_and_refuses_other_architectures(tmp_path):
    save_hf(random_model(LLAMA), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0,
                                                      "rope_scaling": None}))
    load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(WeightsError, match="model_type is 'mistral'"):
        load_hf(tmp_path)


def write_checkpoint(path, model, meta):
    """A checkpoint with what export.py reads of train.py's."""
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(), "meta": meta,
                "weights_from": "scratch"}, path)


@pytest.mark.parametrize("options, named", [
    ({**LLAMA, "mlp": "relu2"}, "mlp=relu2"),
    ({**LLAMA, "norm": "layernorm"}, "norm=layernorm"),
    ({**LLAMA, "pos_embedding": "learned"}, "pos_embedding=learned"),
    ({**LLAMA, "logit_softcap": 15.0}, "logit_softcap=15.0"),
    ({**LLAMA, "value_embeddings": 1}, "value_embeddings=1"),
    ({**LLAMA, "unet_skips": True}, "unet_skips=True"),
    ({**QWEN3, "bias": True}, "bias=True"),
    # the speedrun recipes'
    ({"norm": "layernorm", "mlp": "relu2", "bias": False}, "norm=layernorm, mlp=relu2"),
], ids=str)
def test_export_refuses_options_no_layout_holds(data_root, tmp_path, capsys, options, named):
    write_checkpoint(tmp_path / "best.pt", random_model(options),
                     read_meta(data_root / "shakespeare_char"))
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "best.pt"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert named in err
    assert not (tmp_path / "hf").exists()


def test_a_folder_with_meta_json_needs_data_of_its_tokenizer(data_root, tmp_path):
    meta = read_meta(data_root / "shakespeare_char")
    save_hf(random_model(LLAMA), tmp_path, vocab_size=TOKENS)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = SimpleNamespace(dataset="shakespeare_char", dropout=0.0)
    model, lineage = first_weights(cfg, meta, str(tmp_path))
    assert model.config.pos_embedding == "rope" and lineage is None
    gpt2_meta = {"tokenizer": "gpt2", "encoding": "r50k_base", "vocab_size": 50257, "eot_id": 50256}
    with pytest.raises(DataError, match="whose ids mean other tokens"):
        first_weights(SimpleNamespace(dataset="gpt2_data", dropout=0.0), gpt2_meta, str(tmp_path))


@pytest.mark.slow
def test_exported_qwen3_folder_trains_and_samples(data_root, tmp_path):
    """train.py and sample.py --init_from export.py's folder: its meta.json names the tokenizer."""
    write_checkpoint(tmp_path / "best.pt", random_model(QWEN3),
                     read_meta(data_root / "shakespeare_char"))
    folder, out = tmp_path / "hf", tmp_path / "run"
    export.main([str(tmp_path / "best.pt"), str(folder), "--crop_vocab"])
    run_here("train.py", tiny_args(data_root, out,
                                   recipe={"optimizer": "adamw", "learning_rate": 1e-3},
                                   init_from=folder, max_iters=2, lr_decay_iters=2, warmup_iters=1,
                                   eval_interval=2, sample_interval=0))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["weights_from"] == str(folder) and ckpt["model_config"]["qk_norm"] is True
    assert ckpt["model_config"]["vocab_size"] == TOKENS
    text = run_here("sample.py", [f"--init_from={folder}", "--num_samples=1", "--max_new_tokens=8",
                                  "--device=cpu"])
    assert text.stdout.endswith("---------------\n")


@pytest.mark.slow
def test_the_default_runs_model_exports_as_qwen3_with_the_same_logits(data_root, tmp_path):
    """train.py's defaults (recipe={}: rotary, RMSNorm, SwiGLU, QK-norm, Muon), tiny, trained, then
    `python export.py out/best.pt folder`: transformers loads it and computes our logits."""
    out, folder = tmp_path / "run", tmp_path / "hf"
    run_here("train.py", tiny_args(data_root, out, recipe={}, max_iters=4, lr_decay_iters=4,
                                   warmup_iters=1, eval_interval=4, sample_interval=0))
    run_here("export.py", [str(out / "best.pt"), str(folder)])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    ours = model_from_checkpoint(load_checkpoint(out / "best.pt")).eval()
    assert max_logit_difference(ours, theirs) <= TOLERANCE
