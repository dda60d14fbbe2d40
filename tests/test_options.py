"""The architecture options (rotary positions, RMSNorm, ReLU^2 and SwiGLU MLPs, QK-norm, an untied head) and
the Muon optimizer: each trains, keeps the KV cache exact, and does what it claims."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_log, run_script, tiny_args

from data import Windows
from model import GPT, GPTConfig, WeightsError
from muon import orthogonalize

BASE = {"block_size": 32, "vocab_size": 65, "n_layer": 2, "n_head": 2, "n_embd": 48, "bias": False}
OPTIONS = [{}, {"pos_embedding": "rope"}, {"norm": "rmsnorm"}, {"mlp": "relu2"}, {"mlp": "swiglu"},
           {"qk_norm": True}, {"tie_embeddings": False},
           {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "tie_embeddings": False}]


def model_with(options, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**BASE, **options))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "gpt2")
def test_each_option_trains_and_keeps_the_kv_cache_exact(options, data_root):
    model = model_with(options)
    windows = Windows(data_root / "shakespeare_char", "train", BASE["block_size"], BASE["vocab_size"])
    optimizer = model.configure_optimizer(0.1, 3e-3, (0.9, 0.99), "cpu")
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
    cached = model.generate(prompt, 40, temperature=0)  # runs past block_size: the cache is re-filled
    idx = prompt
    for _ in range(40):
        logits, _ = model(idx[:, -BASE["block_size"]:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, idx)


def test_what_each_option_changes_in_the_weights():
    gpt2 = model_with({})
    assert "transformer.wpe.weight" not in model_with({"pos_embedding": "rope"}).state_dict()
    assert "rotary_cos" not in model_with({"pos_embedding": "rope"}).state_dict()  # recomputed, not stored
    rms = model_with({"norm": "rmsnorm"})
    assert isinstance(rms.transformer.ln_f, torch.nn.RMSNorm)
    assert "transformer.h.0.attn.q_norm.weight" in model_with({"qk_norm": True}).state_dict()
    swiglu = model_with({"mlp": "swiglu"})
    assert abs(swiglu.num_params() / gpt2.num_params() - 1) < 0.02  # 2/3 as wide, about as many parameters
    untied = model_with({"tie_embeddings": False})
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - gpt2.num_params() == BASE["vocab_size"] * BASE["n_embd"]
    assert untied.flops_per_token() == gpt2.flops_per_token()  # the extra table is a lookup, not a matmul


def test_rotary_attention_depends_only_on_relative_positions():
    """Every position moved by 10 gives the same logits: rotary embeddings encode distances only."""
    model = model_with({"pos_embedding": "rope"}).eval()
    tokens = torch.randint(0, 65, (1, 8))
    plain, _ = model(tokens)
    model.rotary_cos, model.rotary_sin = model.rotary_cos.roll(-10, 0), model.rotary_sin.roll(-10, 0)
    moved, _ = model(tokens)
    torch.testing.assert_close(moved, plain, rtol=1e-4, atol=1e-4)


def test_options_do_not_export_to_gpt2_layout(tmp_path):
    with pytest.raises(WeightsError, match="GPT-2 layout cannot hold"):
        model_with({"norm": "rmsnorm"}).save_pretrained(tmp_path)


def test_a_run_with_every_option_resumes_and_samples(data_root, tmp_path):
    out = tmp_path / "run"
    options = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": "true",
               "tie_embeddings": "false"}
    run_script("train.py", tiny_args(data_root, out, max_iters=20, lr_decay_iters=20, stop_iter=10, **options))
    run_script("train.py", tiny_args(data_root, out, max_iters=20, lr_decay_iters=20, init_from="resume",
                                     **options))
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert evals[-1] < evals[0]
    result = run_script("sample.py", [f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=10", "--device=cpu"])
    assert result.stdout.endswith("---------------\n")
    wrong = run_script("train.py", tiny_args(data_root, tmp_path / "x", mlp="swish"), check=False)
    assert wrong.returncode == 2 and "mlp must be one of gelu, relu2, swiglu" in wrong.stderr


def test_newton_schulz_orthogonalizes():
    update = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    ortho = orthogonalize(update).float()
    singular = torch.linalg.svdvals(ortho)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Jordan's coefficients: near 1, not exactly 1
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    assert F.cosine_similarity(ortho.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_muon_trains_only_block_matrices_with_muon_and_resumes_exactly(data_root, tmp_path):
    optimizer = model_with({}).configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu", muon_lr=0.02)
    muon_group = next(g for g in optimizer.param_groups if g["muon"])
    assert len(muon_group["params"]) == 4 * BASE["n_layer"] and muon_group["lr_scale"] == 20.0
    common = {"optimizer": "muon", "max_iters": 20, "lr_decay_iters": 20, "eval_interval": 10}
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    run_script("train.py", tiny_args(data_root, whole, **common))
    run_script("train.py", tiny_args(data_root, paused, stop_iter=10, **common))
    run_script("train.py", tiny_args(data_root, paused, init_from="resume", **common))
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (whole, paused))
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [r["val_loss"] for r in read_log(whole) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.2
