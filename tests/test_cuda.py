"""What only a GPU can show: bf16 and compiled steps, Muon's bf16 iteration, the KV cache and the
deterministic switch on CUDA. Marked `cuda` and skipped without a GPU; bench/gpu_check.py runs them
(`pytest -m cuda`)."""

import contextlib
import os
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import devices
import train
from bench.sample_speed import generate_by_recomputing
from engine import generation_attention
from model import GPT, GPTConfig
from muon import orthogonalize
from optimizers import configure_optimizer

# before any cuBLAS handle of this process: make_deterministic's workspace setting works only then
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=256,
                   pos_embedding="rope", mlp="relu2", qk_norm=True, bias=False, dropout=0.0)


def batches(seed=0, batch_size=8):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(CONFIG.vocab_size, (batch_size, CONFIG.block_size + 1),
                           generator=generator)
    return [(tokens[:, :-1].cuda(), tokens[:, 1:].cuda())]


def steps(compile_model, optimizer="muon", count=3, config=CONFIG):
    """Losses of `count` bf16 steps of a fresh model (seed 0), eager or compiled, and the model."""
    rt = devices.runtime(SimpleNamespace(device="cuda", dtype="bfloat16",
                                         compile=str(compile_model).lower()))
    torch.manual_seed(0)
    gpt = GPT(config).cuda()
    muon_lr = 0.02 if optimizer == "muon" else None
    opt = configure_optimizer(gpt, 0.1, 1e-3, (0.9, 0.95), "cuda", muon_lr=muon_lr)
    model, scaler = rt.compiled(gpt), rt.grad_scaler()
    losses = [train.train_step(model, opt, scaler, rt.autocast(), batches(i), 1.0)[0]
              for i in range(count)]
    return losses, gpt


def test_compiled_bf16_steps_follow_eager():
    eager, _ = steps(False)
    compiled, _ = steps(True)
    assert all(torch.isfinite(torch.tensor(eager + compiled)))
    assert compiled == pytest.approx(eager, abs=2e-2)


def test_bf16_forward_warns_of_nothing():
    """QK-norm under autocast warned it couldn't use the fused RMSNorm (bf16 input, fp32 weight)."""
    model = GPT(CONFIG).cuda()
    x, y = batches()[0]
    with (warnings.catch_warnings(record=True) as caught,
          torch.autocast("cuda", dtype=torch.bfloat16)):
        warnings.simplefilter("always")
        model(x, y)[1].backward()
    assert [str(w.message) for w in caught] == []


def test_kv_cache_generation_equals_recomputing_in_fp32():
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().eval()
    prompt = torch.randint(CONFIG.vocab_size, (2, 5), device="cuda")
    cached = model.generate(prompt, 30, temperature=0)
    assert torch.equal(cached, generate_by_recomputing(model, prompt, 30))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_a_chunk_after_the_kv_cache_matches_the_full_forward(dtype, tolerance):
    """Several new tokens after cached ones attend through an explicit mask (memory-efficient
    attention under generation_attention, as a chat turn is fed): one forward's hidden states."""
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().eval()
    idx = torch.randint(CONFIG.vocab_size, (2, 40), device="cuda")
    with (torch.no_grad(), generation_attention(),
          torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)):
        cache = model.new_cache(2, "cuda")
        model(idx[:, :24], kv_cache=cache)
        chunk = model.hidden_states(idx[:, 24:], cache)
        full = model.hidden_states(idx)[:, 24:]
    torch.testing.assert_close(chunk.float(), full.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("shape", [(768, 3072), (768, 2304), (3072, 768)])
def test_bf16_newton_schulz_near_orthogonal(shape):
    """Muon's bf16 iteration on GPT-2's matrix shapes: every singular value lands in the quintic's
    band around 1 (Keller Jordan's coefficients leave them in about 0.7-1.2), as the float64
    iteration does."""
    update = torch.randn(*shape, device="cuda")
    singular = torch.linalg.svdvals(orthogonalize(update, dtype=torch.bfloat16).double())
    reference = torch.linalg.svdvals(orthogonalize(update.double(), dtype=torch.float64).double())
    assert 0.5 < singular.min() and singular.max() < 1.3
    assert (singular.mean() - reference.mean()).abs() < 0.05


def test_deterministic_runs_are_bitwise_equal_with_dropout():
    devices.make_deterministic()
    try:
        first, model_a = steps(False, config=replace(CONFIG, dropout=0.1))
        second, model_b = steps(False, config=replace(CONFIG, dropout=0.1))
    finally:  # the switches make_deterministic set, back as the other tests expect them
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
        with contextlib.suppress(AttributeError):  # (Inductor's switch is newer than torch 2.6)
            torch._inductor.config.deterministic = False
    assert first == second
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
