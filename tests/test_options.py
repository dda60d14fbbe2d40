"""The architecture options (rotary positions, RMSNorm, ReLU^2 and SwiGLU MLPs, QK-norm, an untied
head, zero-initialised projections, a logit soft-cap, value embeddings, U-net skips), the Muon
optimizer and the per-group learning rates: each trains, keeps the KV cache exact, and does what it
claims."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_log, run_here, tiny_args

from data import Windows
from engine import KVCache
from hf import WeightsError, save_hf
from model import GPT, GPT2_OPTIONS, GPTConfig, value_table
from muon import orthogonalize
from optimizers import configure_optimizer

BASE = {"block_size": 32, "vocab_size": 65, "n_layer": 2, "n_head": 2, "n_embd": 48, "bias": False,
        **GPT2_OPTIONS}
SPEEDRUN = {"zero_init_proj": True, "logit_softcap": 5.0, "value_embeddings": 1, "unet_skips": True}
OPTIONS = [{}, {"pos_embedding": "rope"}, {"norm": "rmsnorm"}, {"mlp": "relu2"}, {"mlp": "swiglu"},
           {"qk_norm": True}, {"tie_embeddings": False}, {"zero_init_proj": True},
           {"logit_softcap": 5.0}, {"value_embeddings": 1}, {"unet_skips": True},
           {"n_layer": 3, "value_embeddings": 1, "unet_skips": True},
           {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True,
            "tie_embeddings": False, **SPEEDRUN}]


def model_with(options, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **options}))


def with_weights_of(model, options):
    """A model with `options` holding `model`'s weights: (it, the names only `model` has)."""
    other = model_with(options)
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return other, unexpected


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "gpt2")
def test_each_option_trains_and_keeps_the_kv_cache_exact(options, data_root):
    model = model_with(options)
    windows = Windows(data_root / "shakespeare_char", "train", BASE["block_size"],
                      BASE["vocab_size"])
    optimizer = configure_optimizer(model, 0.1, 3e-3, (0.9, 0.99), "cpu")
    losses = []
    for i in range(60):
        x, y = windows.random_batch(0, i, 16)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(65)) < 0.3  # starts near uniform
    assert sum(losses[-10:]) / 10 < losses[0] - 1.0
    model.eval()
    prompt = torch.randint(0, 65, (2, 5))
    cached = model.generate(prompt, 40, temperature=0)  # past block_size: the cache is re-filled
    idx = prompt
    for _ in range(40):
        logits, _ = model(idx[:, -BASE["block_size"]:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, idx)


def test_what_each_option_changes_in_the_weights():
    gpt2 = model_with({})
    assert "transformer.wpe.weight" not in model_with({"pos_embedding": "rope"}).state_dict()
    # recomputed, not stored
    assert "rotary_cos" not in model_with({"pos_embedding": "rope"}).state_dict()
    rms = model_with({"norm": "rmsnorm"})
    assert isinstance(rms.transformer.ln_f, torch.nn.RMSNorm)
    assert "transformer.h.0.attn.q_norm.weight" in model_with({"qk_norm": True}).state_dict()
    swiglu = model_with({"mlp": "swiglu"})
    assert abs(swiglu.num_params() / gpt2.num_params() - 1) < 0.02  # 2/3 as wide, ~as many params
    untied = model_with({"tie_embeddings": False})
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - gpt2.num_params() == BASE["vocab_size"] * BASE["n_embd"]
    assert untied.flops_per_token() == gpt2.flops_per_token()  # the extra table is a lookup
    values = model_with({"value_embeddings": 1})
    assert (values.num_params() - gpt2.num_params()
            == BASE["vocab_size"] * BASE["n_embd"] + 2 * BASE["n_layer"])
    assert (values.num_params(embeddings=False) - gpt2.num_params(embeddings=False)
            == 2 * BASE["n_layer"])  # lambdas
    assert (values.flops_per_token() - gpt2.flops_per_token()
            == 6 * 2 * BASE["n_layer"])  # the table is a lookup


def test_rotary_attention_depends_only_on_relative_positions():
    """Every position moved by 10 gives the same logits: rotary embeddings encode distances only."""
    model = model_with({"pos_embedding": "rope"}).eval()
    tokens = torch.randint(0, 65, (1, 8))
    plain, _ = model(tokens)
    model.rotary_cos, model.rotary_sin = (model.rotary_cos.roll(-10, 0),
                                          model.rotary_sin.roll(-10, 0))
    moved, _ = model(tokens)
    torch.testing.assert_close(moved, plain, rtol=1e-4, atol=1e-4)


def test_zero_init_proj_starts_every_block_as_the_identity_and_trains_the_projections():
    model = model_with({"zero_init_proj": True})
    x, y = torch.randint(0, 65, (2, 8)), torch.randint(0, 65, (2, 8))
    embedded = model.transformer.wte(x) + model.transformer.wpe(torch.arange(8))
    assert torch.equal(model.hidden_states(x), model.transformer.ln_f(embedded))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    model(x, y)[1].backward()
    optimizer.step()
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(projections) == 2 * BASE["n_layer"] and all(p.abs().sum() > 0 for p in projections)


def test_logit_softcap_bounds_the_logits_on_every_path():
    cap = 0.2  # below the initial logits' largest (~0.5), above where tanh rounds to 1 in fp32
    capped = model_with({"logit_softcap": cap})
    plain, _ = with_weights_of(capped, {})
    x, y = torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))
    logits, _ = capped(x)
    assert logits.abs().max() < cap < plain(x)[0].abs().max()
    torch.testing.assert_close(logits, cap * torch.tanh(plain(x)[0] / cap))
    # the loss path
    torch.testing.assert_close(capped(x, y)[1], F.cross_entropy(logits.view(-1, 65), y.view(-1)))
    cached, _ = capped(x, kv_cache=KVCache(capped.config, 2, "cpu", torch.float32))
    torch.testing.assert_close(cached, logits[:, [-1]])
    huge, _ = with_weights_of(capped, {"logit_softcap": 1e6})
    assert abs(huge(x, y)[1].item() - plain(x, y)[1].item()) < 1e-5
    with pytest.raises(ValueError, match="logit_softcap must be 0"):
        GPTConfig(**{**BASE, "logit_softcap": -1.0})


def test_value_embeddings_feed_the_first_and_last_layers_and_add_only_their_mix():
    model = model_with({"n_layer": 5, "value_embeddings": 2})
    assert [value_table(model.config, layer) for layer in range(5)] == [0, 1, None, 1, 0]
    state = model.state_dict()
    assert [name for name in state if ".ve." in name] == ["transformer.ve.0.weight",
                                                          "transformer.ve.1.weight"]
    assert [name for name in state if "value_lambdas" in name] == [
        f"transformer.h.{layer}.attn.value_lambdas" for layer in (0, 1, 3, 4)]
    with pytest.raises(ValueError, match="value_embeddings must be between 0 and n_layer // 2 = 2"):
        GPTConfig(**{**BASE, "n_layer": 5, "value_embeddings": 3})
    with torch.no_grad():  # lambda_a = 1, lambda_b = 0: the attention's own values, nothing added
        for layer in (0, 1, 3, 4):
            model.transformer.h[layer].attn.value_lambdas.copy_(torch.tensor([1.0, 0.0]))
    plain, extra = with_weights_of(model, {"n_layer": 5})
    assert len(extra) == 2 + 4
    x = torch.randint(0, 65, (2, 16))
    assert torch.equal(model(x)[0], plain(x)[0])


@pytest.mark.parametrize("n_layer", [4, 5])
def test_unet_skips_add_each_first_half_output_before_its_mirror_block(n_layer):
    model = model_with({"n_layer": n_layer, "unet_skips": True})
    assert model.skip_weights.tolist() == [1.0] * (n_layer // 2)
    x = torch.randint(0, 65, (2, 16))
    inputs, outputs = [], []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
        block.register_forward_hook(lambda _, args, out: outputs.append(out))
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.5, 2.0]))
        model(x)
    if n_layer % 2:
        assert torch.equal(inputs[2], outputs[1])  # the middle block takes no skip
    # block 1's mirror, then block 0's
    torch.testing.assert_close(inputs[n_layer - 2], outputs[n_layer - 3] + 2.0 * outputs[1])
    torch.testing.assert_close(inputs[n_layer - 1], outputs[n_layer - 2] + 0.5 * outputs[0])
    with torch.no_grad():
        model.skip_weights.zero_()
    plain, extra = with_weights_of(model, {"n_layer": n_layer})
    assert extra == ["skip_weights"] and torch.equal(model(x)[0], plain(x)[0])


def named_groups(model, optimizer):
    """Each param group as ({parameter names}, weight_decay, lr_scale, muon)."""
    names = {p: name for name, p in model.named_parameters()}
    return [({names[p] for p in g["params"]}, g["weight_decay"], pytest.approx(g["lr_scale"]),
             g.get("muon", False))
            for g in optimizer.param_groups]


def names_of(model, *kinds):
    return {name for name, p in model.named_parameters() if any(kind(name, p) for kind in kinds)}


def block_matrix(name, p):
    return ".h." in name and p.dim() == 2


def one_d(name, p):
    return p.dim() < 2


def test_learning_rate_groups_by_role():
    embeddings = {"transformer.wte.weight", "transformer.wpe.weight"}
    tied = model_with({})
    adamw = configure_optimizer(tied, 0.1, 1e-3, (0.9, 0.99), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    assert named_groups(tied, adamw) == [(embeddings, 0.1, 1.0, False),
                                         (names_of(tied, block_matrix), 0.1, 1.0, False),
                                         (names_of(tied, one_d), 0.0, 1.0, False)]
    with pytest.raises(ValueError, match="head_lr needs tie_embeddings=False"):
        configure_optimizer(tied, 0.1, 1e-3, (0.9, 0.99), "cpu", head_lr=3e-3)
    untied = model_with({"tie_embeddings": False})
    adamw = configure_optimizer(untied, 0.1, 1e-3, (0.9, 0.99), "cpu", head_lr=3e-3)
    assert named_groups(untied, adamw) == [
        (embeddings, 0.1, 1.0, False), ({"lm_head.weight"}, 0.1, 3.0, False),
        (names_of(untied, block_matrix), 0.1, 1.0, False),
        (names_of(untied, one_d), 0.0, 1.0, False)]
    speedrun = model_with({"tie_embeddings": False, **SPEEDRUN})
    muon = configure_optimizer(speedrun, 0.1, 1e-3, (0.9, 0.99), "cpu", muon_lr=0.02,
                               embedding_lr=5e-3, head_lr=2e-3)
    assert named_groups(speedrun, muon) == [  # no other matrices: every one is a block's
        (names_of(speedrun, block_matrix), 0.1, 20.0, True),
        ({*embeddings, "transformer.ve.0.weight"}, 0.1, 5.0, False),
        ({"lm_head.weight"}, 0.1, 2.0, False), (names_of(speedrun, one_d), 0.0, 1.0, False)]
    assert {"skip_weights", "transformer.h.0.attn.value_lambdas"} <= names_of(speedrun, one_d)


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False, **SPEEDRUN}, {"lora_rank": 2}],
                         ids=str)
@pytest.mark.parametrize("muon_lr", [None, 0.02])
def test_every_trainable_parameter_is_in_exactly_one_group(options, muon_lr):
    model = model_with(options)
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu", muon_lr=muon_lr,
                                    embedding_lr=2e-3)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all(group["params"] and "lr_scale" in group for group in optimizer.param_groups)


@pytest.mark.parametrize("options", [{"norm": "rmsnorm"},
                                     *({key: value} for key, value in SPEEDRUN.items()
                                       if key != "zero_init_proj")],  # (init only)
                         ids=str)
def test_options_do_not_export_to_gpt2_layout(options, tmp_path):
    with pytest.raises(WeightsError, match="GPT-2 layout cannot hold"):
        save_hf(model_with(options), tmp_path)


@pytest.mark.slow
def test_a_run_with_every_option_resumes_and_samples(data_root, tmp_path):
    out = tmp_path / "run"
    options = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": "true",
               "tie_embeddings": "false", "zero_init_proj": "true", "logit_softcap": "30",
               "value_embeddings": "1", "unet_skips": "true"}
    run_here("train.py", tiny_args(data_root, out, max_iters=20, lr_decay_iters=20, stop_iter=10,
                                   **options))
    run_here("train.py", tiny_args(data_root, out, max_iters=20, lr_decay_iters=20,
                                   init_from="resume", **options))
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert evals[-1] < evals[0]
    result = run_here("sample.py", [f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=10",
                                    "--device=cpu"])
    assert result.stdout.endswith("---------------\n")
    wrong = run_here("train.py", tiny_args(data_root, tmp_path / "x", mlp="swish"), check=False)
    assert wrong.returncode == 2 and "mlp must be one of gelu, relu2, swiglu" in wrong.stderr


def test_newton_schulz_orthogonalizes():
    update = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    ortho = orthogonalize(update).float()
    singular = torch.linalg.svdvals(ortho)
    # Jordan's coefficients: near 1, not exactly 1
    assert singular.min() > 0.6 and singular.max() < 1.25
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    assert F.cosine_similarity(ortho.flatten(), (u @ vh).flatten(), dim=0) > 0.95


@pytest.mark.slow
def test_muon_trains_only_block_matrices_with_muon_and_resumes_exactly(data_root, tmp_path):
    optimizer = configure_optimizer(model_with({}), 0.1, 1e-3, (0.9, 0.99), "cpu", muon_lr=0.02)
    muon_group = next(g for g in optimizer.param_groups if g["muon"])
    assert len(muon_group["params"]) == 4 * BASE["n_layer"] and muon_group["lr_scale"] == 20.0
    common = {"optimizer": "muon", "max_iters": 20, "lr_decay_iters": 20, "eval_interval": 10}
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    run_here("train.py", tiny_args(data_root, whole, **common))
    run_here("train.py", tiny_args(data_root, paused, stop_iter=10, **common))
    run_here("train.py", tiny_args(data_root, paused, init_from="resume", **common))
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (whole, paused))
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [r["val_loss"] for r in read_log(whole) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.2
