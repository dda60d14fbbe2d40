"""LoRA: adapters start as a no-op, merge into the weights without changing the logits, are the only
thing a LoRA run trains, and travel alone in PEFT's layout."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import PLAY, run_here, tiny_args

import hf
import prepare
from checkpoint import load_checkpoint, model_from_checkpoint
from hf import WeightsError, load_adapters, load_hf, save_adapters, save_hf
from lora import LoRALinear, merge_lora
from model import GPT, GPT2_OPTIONS, GPTConfig

BASE = GPTConfig(**GPT2_OPTIONS, block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32,
                 bias=True)
ROTARY = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
LAYOUT_OPTIONS = {"GPT2LMHeadModel": {}, "LlamaForCausalLM": ROTARY,  # the base's HF layout
                  "Qwen3ForCausalLM": {**ROTARY, "qk_norm": True}}


def lora_model(targets="attn,mlp", rank=4, options=None):
    """A LoRA model whose adapters are random (B starts at zero, which would hide any mix-up)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE.__dict__, **(options or {}), "lora_rank": rank,
                             "lora_alpha": 8.0, "lora_targets": targets}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def logits(model, seed=1):
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model(ids)[0]


@pytest.mark.parametrize("targets", ["attn", "mlp", "attn,mlp"])
def test_merged_and_unmerged_give_the_same_logits(targets):
    model = lora_model(targets)
    merged = merge_lora(model)
    assert merged.config.lora_rank == 0 and not any("lora_" in k for k in merged.state_dict())
    assert (logits(model) - logits(merged)).abs().max().item() <= 1e-5
    # adapters act
    assert (logits(model) - logits(GPT(BASE).eval().requires_grad_(False))).abs().max() > 1e-2


def test_new_adapters_change_nothing_and_only_they_train():
    torch.manual_seed(0)
    base = GPT(BASE).eval()
    model = GPT(GPTConfig(**{**BASE.__dict__, "lora_rank": 4, "lora_targets": "attn"})).eval()
    model.load_state_dict({**model.state_dict(), **base.state_dict()})
    assert torch.equal(logits(model), logits(base))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.{m}.lora_{ab}" for i in range(2)
                         for m in ("c_attn", "c_proj") for ab in "AB"}
    assert model.num_params(trainable_only=True) == 2 * 4 * ((32 + 96) + (32 + 32))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4


def base_of(model):
    """The LoRA model's base: a plain model of its options holding its frozen weights."""
    plain = GPT(replace(model.config, lora_rank=0))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    return plain


@pytest.mark.parametrize("targets", ["attn", "mlp", "attn,mlp"])
@pytest.mark.parametrize("layout", LAYOUT_OPTIONS)
def test_adapters_round_trip_alone_in_each_layout(tmp_path, layout, targets):
    model = lora_model(targets, options=LAYOUT_OPTIONS[layout])
    save_adapters(model, tmp_path / "adapters", base_model="base")
    again = load_adapters(base_of(model), tmp_path / "adapters").eval()
    assert again.config.lora_targets == targets
    assert torch.equal(logits(again), logits(model))


def test_adapters_refuse_other_weights_and_what_one_fused_adapter_cannot_hold(tmp_path):
    model = lora_model()
    save_adapters(model, tmp_path / "adapters", base_model="base")
    plain = base_of(model)
    wider = GPT(GPTConfig(**{**BASE.__dict__, "n_embd": 64}))
    with pytest.raises(WeightsError, match="do not fit"):
        load_adapters(wider, tmp_path / "adapters")
    with pytest.raises(WeightsError, match="no readable LoRA adapters"):
        load_adapters(plain, tmp_path)
    with pytest.raises(WeightsError, match="name GPT-2's modules, but this base is a Llama"):
        load_adapters(base_of(lora_model(options=ROTARY)), tmp_path / "adapters")
    # PEFT's own ways of naming targets: bare names, or a string; the tensors say what is adapted
    llama = lora_model(options=ROTARY)
    save_adapters(llama, tmp_path / "llama", base_model="base")
    config_path = tmp_path / "llama" / "adapter_config.json"
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    "all-linear"):
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                           "target_modules": targets}))
        again = load_adapters(base_of(llama), tmp_path / "llama").eval()
        assert torch.equal(logits(again), logits(llama))
    # adapters on Llama's q, k and v apart: our fused c_attn has one A for all three, on all three
    path = tmp_path / "llama" / "adapter_model.safetensors"
    tensors = hf.read_safetensors(path)
    k_proj = "base_model.model.model.layers.0.self_attn.k_proj"
    for change in ({f"{k_proj}.lora_A.weight": tensors[f"{k_proj}.lora_A.weight"] + 1},
                   {f"{k_proj}.lora_A.weight": None, f"{k_proj}.lora_B.weight": None}):
        hf.write_safetensors(path, {name: change.get(name, t) for name, t in tensors.items()
                                    if change.get(name, t) is not None})
        with pytest.raises(WeightsError, match=r"do not adapt .*q_proj, .*k_proj, .*v_proj as one"):
            load_adapters(base_of(llama), tmp_path / "llama")


@pytest.mark.parametrize("layout", LAYOUT_OPTIONS)
def test_peft_applies_our_adapters_to_transformers_models(tmp_path, layout):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = lora_model(options=LAYOUT_OPTIONS[layout])
    base = merge_lora(model)
    save_hf(base_of(model), tmp_path / "base")
    save_adapters(model, tmp_path / "adapters", base_model=tmp_path / "base")
    theirs = getattr(transformers, layout).from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapters").eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(ids).logits - logits(model)).abs().max().item() <= 1e-4
    assert (logits(base) - logits(model)).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A LoRA fine-tune of random GPT-2-layout weights on the test play in GPT-2 BPE."""
    tmp = tmp_path_factory.mktemp("lora")
    prepare.prepare("text", inputs=[str(PLAY)], tokenizer="gpt2", name="play_gpt2",
                    data_root=tmp / "data")
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(**GPT2_OPTIONS, block_size=64, vocab_size=50257, n_layer=2, n_head=2,
                         n_embd=32))
    save_hf(gpt2, tmp / "hf")
    args = tiny_args(tmp / "data", tmp / "run", dataset="play_gpt2", init_from=tmp / "hf",
                     lora_rank=4, lora_targets="attn,mlp", learning_rate=1e-2, max_iters=20,
                     lr_decay_iters=20, eval_interval=10, sample_interval=20)
    result = run_here("train.py", args)
    return tmp, result


@pytest.mark.slow
def test_a_lora_run_changes_only_the_adapters(gpt2_run):
    tmp, result = gpt2_run
    assert "LoRA: rank 4 adapters on attn,mlp; 4,096 trainable of" in result.stdout
    ckpt = load_checkpoint(tmp / "run" / "last.pt")
    base = load_hf(tmp / "hf").state_dict()
    base["transformer.wpe.weight"] = base["transformer.wpe.weight"][:32]
    saved = ckpt["model"]
    assert all(torch.equal(saved[k], base[k]) for k in base)
    assert all(saved[k].abs().sum() > 0 for k in saved if ".lora_B" in k)  # B started at zero
    assert set(ckpt["optimizer"]["state"]) == {k for k in saved if ".lora_" in k}


@pytest.mark.slow
def test_a_lora_run_exports_merged_or_alone_and_samples(gpt2_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    tmp, _ = gpt2_run
    run_here("export.py", [str(tmp / "run" / "best.pt"), str(tmp_path / "merged")])
    ours = model_from_checkpoint(load_checkpoint(tmp / "run" / "best.pt")).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)[0]).abs().max().item() <= 1e-4
    run_here("export.py", [str(tmp / "run" / "best.pt"), str(tmp_path / "adapters"),
                           "--adapters_only"])
    sample_args = ["--num_samples=1", "--max_new_tokens=8", "--device=cpu", "--temperature=0"]
    from_run = run_here("sample.py", [f"--out_dir={tmp / 'run'}", *sample_args]).stdout
    with_adapters = run_here("sample.py", [f"--init_from={tmp / 'hf'}",
                                           f"--adapters={tmp_path / 'adapters'}",
                                           *sample_args]).stdout
    assert from_run == with_adapters  # greedy: the run and base + adapters give the same tokens
