"""Muon's batched update: the same numbers as the per-matrix, per-tensor update it replaced,
per-parameter state that checkpoints round-trip into bitwise-identical steps, and
bench/optimizer_speed.py's smoke run."""

import copy
import io
import json
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_here
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import train
from bench import optimizer_speed
from model import GPT, GPT2_OPTIONS, GPTConfig
from muon import (
    BATCH_ELEMENTS,
    batches,
    default_ns_dtype,
    newton_schulz_flops,
    orthogonalize,
    to_strips,
    use_gram_form,
)
from optimizers import configure_optimizer

CONFIG = GPTConfig(**GPT2_OPTIONS, block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32,
                   bias=True)


def model_and_optimizer(muon_split="whole"):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    return model, configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu", muon_lr=0.02,
                                      muon_split=muon_split)


def set_grads(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def step(optimizer, lr):
    """As train.py's loop: each group's lr is the schedule's lr times its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()


def reference_orthogonalize(update, dtype):
    """muon.orthogonalize as it was before batching (one matrix; bf16 was its only dtype)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.to(dtype)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(update.dtype)


def reference_strips(update, dtype, block):
    """Each strip `block` wide across the longer side (columns on ties) orthogonalised alone by
    slicing, scaled so that a semi-orthogonal strip's RMS is 1 / sqrt(cols), as a whole matrix's is
    after Muon's sqrt(max(1, r/c))."""
    rows, cols = update.shape
    ortho = torch.empty_like(update)
    for start in range(0, max(rows, cols), block):
        strip_slice = slice(start, start + block)
        piece = (strip_slice, slice(None)) if rows > cols else (slice(None), strip_slice)
        strip = reference_orthogonalize(update[piece], dtype)
        ortho[piece] = strip * (max(strip.shape) / cols) ** 0.5
    return ortho


@torch.no_grad()
def reference_step(optimizer, ns_dtype, block=0):
    """Muon.step before batching: a Python loop, one tensor (or with block, one strip) at a time."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            if group["muon"]:
                momentum = state.setdefault("momentum_buffer", torch.zeros_like(p))
                momentum.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(momentum, group["momentum"])  # one strip: the whole matrix
                p.add_(reference_strips(update, ns_dtype, block or max(p.shape)),
                       alpha=-group["lr"])
                continue
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            beta1, beta2 = group["betas"]
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = ((state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_()
                           .add_(group["eps"]))
            p.addcdiv_(state["exp_avg"], denominator,
                       value=-group["lr"] / (1 - beta1 ** state["step"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 48, 16), (3, 16, 48), (2, 32, 32)],
                         ids=["tall", "wide", "square"])
def test_batched_newton_schulz_equals_one_matrix_at_a_time(shape, dtype):
    stack = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    batched = orthogonalize(stack, dtype=dtype)
    assert batched.shape == stack.shape and batched.dtype == torch.float32
    for matrix, ortho in zip(stack, batched):
        # bitwise here; the tolerance (fp32 ~1e-6 relative, bf16 an ulp) is for other BLAS libraries
        torch.testing.assert_close(ortho, orthogonalize(matrix, dtype=dtype), rtol=0,
                                   atol=1e-6 if dtype == torch.float32 else 2**-8)
        if dtype == torch.float32:  # baddbmm's fused sums (and gram form) round differently, barely
            torch.testing.assert_close(ortho, reference_orthogonalize(matrix, dtype), rtol=0,
                                       atol=2e-6)


def random_and_rank_two(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(*shape[:-1], 2, generator=generator),
                   torch.randn(*shape[:-2], 2, shape[-1], generator=generator))
    return torch.randn(shape, generator=generator).to(dtype), (left @ right).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 32, 96)], ids=["tall", "wide", "stack"])
def test_gram_form_equals_the_plain_iteration(shape, dtype):
    for update in random_and_rank_two(shape, dtype):
        gram = orthogonalize(update, dtype=dtype, gram=True)
        assert gram.shape == update.shape and gram.dtype == dtype
        # measured: fp64 4e-14; fp32 8e-7 (random), 1.8e-5 (rank 2: rounding differs most there)
        torch.testing.assert_close(gram, orthogonalize(update, dtype=dtype, gram=False), rtol=0,
                                   atol=1e-12 if dtype == torch.float64 else 5e-5)


def test_gram_form_in_fp32_without_restarts_stays_near_float64_on_ill_conditioned_strips():
    generator = torch.Generator().manual_seed(0)
    u, _, v = torch.linalg.svd(torch.randn(64, 32, 128, generator=generator, dtype=torch.float64),
                               full_matrices=False)
    update = (u * torch.logspace(0, -6, 32, dtype=torch.float64)) @ v  # condition number 1e6
    exact = orthogonalize(update, dtype=torch.float64, gram=False)
    error = (orthogonalize(update.float(), dtype=torch.float32, gram=True).double()
             - exact).abs().max()
    assert error < 5e-4  # measured 2.8e-4, against entries of about 0.09


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)], ids=["wide", "tall"])
def test_gram_form_stays_as_close_to_float64_as_the_plain_one_in_bf16(shape):
    """Rank 4: without restarts the gram form's G lost its semi-definiteness in bf16 and diverged
    (error ~20)."""
    generator = torch.Generator().manual_seed(0)
    update = (torch.randn(shape[0], 4, generator=generator)
              @ torch.randn(4, shape[1], generator=generator))
    exact = orthogonalize(update.double(), dtype=torch.float64, gram=False)
    plain, gram = ((orthogonalize(update, dtype=torch.bfloat16, gram=form).double() - exact)
                   .abs().max() for form in (False, True))
    assert gram <= 1.5 * plain  # measured 0.091 and 0.083 against plain's 0.091 and 0.097


@pytest.mark.parametrize("magnitude", [1e-5, 30.0])
def test_16_bit_iterations_stay_in_range_for_small_and_large_updates(magnitude):
    """fp16 holds 6e-5 to 65504: X X^T of the update unscaled would leave it (NaN), so 16-bit X is
    scaled first."""
    update = torch.randn(4, 32, 128, generator=torch.Generator().manual_seed(0)) * magnitude
    exact = orthogonalize(update.double(), dtype=torch.float64, gram=False)
    for dtype in (torch.float16, torch.bfloat16):
        error = (orthogonalize(update, dtype=dtype, gram=True).double() - exact).abs().max()
        assert error < 0.05, dtype  # measured: fp16 3e-3, bf16 2e-2


def test_gram_form_where_it_does_fewer_multiply_adds():
    fp32, bf16 = torch.float32, torch.bfloat16
    for dtype in (fp32, bf16):
        assert newton_schulz_flops(128, 512, 5, False, dtype) == 5 * (2 * 128 * 128 * 512 + 128**3)
    assert (newton_schulz_flops(128, 512, 5, True, fp32)
            == 2 * 128 * 128 * 512 + 17 * 128**3)  # one segment
    assert (newton_schulz_flops(128, 512, 5, True, bf16)
            == 2 * (2 * 128 * 128 * 512) + (9 + 5) * 128**3)  # 3 + 2
    for dtype in (fp32, bf16):
        for steps in (2, 5, 6):  # wider than 1.5x its height, at any step count, restarted or not
            assert (not use_gram_form(128, 192, steps, dtype)
                    and use_gram_form(128, 193, steps, dtype))
        assert (not use_gram_form(128, 128, 5, dtype)
                and not use_gram_form(128, 4096, 1, dtype))  # one step: no saving


def test_newton_schulz_runs_in_bf16_on_cuda_and_fp32_elsewhere():
    assert default_ns_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert (default_ns_dtype(torch.device("cpu")) == default_ns_dtype(torch.device("mps"))
            == torch.float32)


@pytest.mark.parametrize("muon_split", ["whole", "head"])
def test_each_group_gets_the_same_update_as_the_per_tensor_loop(muon_split):
    model, optimizer = model_and_optimizer(muon_split)
    block = CONFIG.n_embd // CONFIG.n_head if muon_split == "head" else 0
    reference, reference_optimizer = copy.deepcopy((model, optimizer))
    for i in range(5):  # bias corrections and momenta change over the first steps
        for m, opt in ((model, optimizer), (reference, reference_optimizer)):
            set_grads(m, seed=i)
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (i + 1) * group.get("lr_scale", 1.0)
        optimizer.step()
        reference_step(reference_optimizer, torch.float32, block)
    muon_params = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["muon"] and len(muon_params) == 4 * CONFIG.n_layer
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        # Newton-Schulz: batched vs single matmuls; AdamW: torch's fused kernel vs the formula above
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6 if id(p) in muon_params else 1e-7,
                                   msg=name)
        state, reference_state = optimizer.state[p], reference_optimizer.state[q]
        assert state.keys() == reference_state.keys(), name
        assert repr(state.get("step")) == repr(reference_state.get("step")), name  # value and type
        for key in state.keys() - {"step"}:
            torch.testing.assert_close(state[key], reference_state[key], rtol=1e-6, atol=1e-7,
                                       msg=f"{name} {key}")


@pytest.mark.parametrize(("shape", "block", "pieces"), [
    ((96, 32), 16, (6, 16, 32)),  # tall: row strips (per head: q, k and v of each)
    ((32, 128), 16, (8, 16, 32)),  # wide: column strips, turned wide
    ((32, 32), 16, (2, 16, 32)),  # square: column strips (per head of the output projection)
    ((8, 128), 16, (8, 16, 8)),  # a LoRA factor is cut like any matrix
    ((32, 96), 64, (1, 32, 96)),  # a side the block does not divide: whole
    ((96, 32), 96, (1, 32, 96)),  # a block as wide as the side: whole, turned wide
    ((32, 128), 0, (1, 32, 128)),  # no block: whole
])
def test_strips_are_views_that_tile_the_matrix(shape, block, pieces):
    matrix = torch.zeros(shape)
    strips = to_strips(matrix, block)
    assert strips.shape == pieces and strips.data_ptr() == matrix.data_ptr()
    # lands in the matrix, once each
    strips.add_(torch.arange(strips.numel(), dtype=torch.float32).view(pieces))
    assert sorted(matrix.flatten().tolist()) == list(range(matrix.numel()))


def test_batches_hold_one_shape_and_at_most_batch_elements():
    big = torch.zeros(1).expand(BATCH_ELEMENTS // 3 // 64, 8, 8)  # a third of a batch, unallocated
    small = torch.zeros(1, 8, 16)
    pieces = [big, small, big, big, small, big]
    assert list(batches(pieces)) == [[0, 2, 3], [5], [1, 4]]


def test_strips_update_at_the_rms_of_whole_matrices():
    """Whole or in strips, a step moves each Muon matrix by about lr / sqrt(cols) per entry (Muon's
    sqrt(max(1, rows / cols)) convention): muon_lr means the same in both; the two steps differ."""
    moved = {}
    for split in ("whole", "head"):
        model, optimizer = model_and_optimizer(split)
        before = [p.clone() for p in optimizer.param_groups[0]["params"]]
        set_grads(model, seed=0)
        step(optimizer, 1e-3)  # Muon's lr: 0.02 (muon_lr), also scaling the weight decay of 0.1
        moved[split] = [p - b * (1 - 0.02 * 0.1)
                        for p, b in zip(optimizer.param_groups[0]["params"], before)]
    for whole, strips in zip(moved["whole"], moved["head"]):
        expected = 0.02 / whole.size(1) ** 0.5
        for update in (whole, strips):  # Newton-Schulz leaves singular values in about [0.7, 1.2]
            assert 0.7 * expected < update.pow(2).mean().sqrt() < 1.2 * expected
        assert not torch.allclose(whole, strips, atol=expected / 10)


def round_trip_by_name(model, optimizer, new_model, new_optimizer):
    """As checkpoint.py saves and loads: the full state dict keyed by name, through torch.save."""
    options = StateDictOptions(full_state_dict=True)
    buffer = io.BytesIO()
    torch.save(get_optimizer_state_dict(model, optimizer, options=options), buffer)
    buffer.seek(0)
    set_optimizer_state_dict(new_model, new_optimizer, torch.load(buffer, weights_only=True),
                             options=options)


def round_trip_plain(model, optimizer, new_model, new_optimizer):
    new_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


@pytest.mark.parametrize("muon_split", ["whole", "head"])
@pytest.mark.parametrize("round_trip", [round_trip_by_name, round_trip_plain],
                         ids=["by_name", "state_dict"])
def test_state_round_trips_into_bitwise_identical_steps(round_trip, muon_split):
    model, optimizer = model_and_optimizer(muon_split)
    for i in range(3):
        set_grads(model, seed=i)
        step(optimizer, 1e-3)
    for p in optimizer.param_groups[0]["params"]:
        assert optimizer.state[p].keys() == {"momentum_buffer"}
    for p in (p for group in optimizer.param_groups[1:] for p in group["params"]):
        assert (optimizer.state[p].keys() == {"step", "exp_avg", "exp_avg_sq"}
                and optimizer.state[p]["step"] == 3)
        assert type(optimizer.state[p]["step"]) is int  # as before batching: old checkpoints load
    resumed, resumed_optimizer = model_and_optimizer(muon_split)
    resumed.load_state_dict(model.state_dict())
    round_trip(model, optimizer, resumed, resumed_optimizer)
    for i in range(3, 6):
        for m, opt in ((model, optimizer), (resumed, resumed_optimizer)):
            set_grads(m, seed=i)
            step(opt, 1e-3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_optimizer_speed_bench_smoke(tmp_path):
    out = tmp_path / "report.json"
    run_here("bench/optimizer_speed.py", ["--shapes=2x2x32x16x2x65", "--rounds=2",
                                          "--round_s=0.001", "--warmup_steps=1", "--device=cpu",
                                          f"--out={out}"])
    report = json.loads(out.read_text())
    assert (report["command"].startswith("python bench/optimizer_speed.py ")
            and report["dtype"] == "float32")
    assert report["config"]["muon_split"] == "head"
    (shape,) = report["results"]
    assert shape["sizes"] == [2, 2, 32, 16, 2, 65] and shape["tokens_per_step"] == 32
    for name in ("adamw", "muon"):
        assert len(shape[name]["ms_per_step_all"]) == len(shape[name]["optimizer_ms_all"]) == 2
        assert shape[name]["ms_per_step_median"] > 0 and shape[name]["optimizer_ms_median"] > 0
    ratios = [r["muon_ms"] / r["adamw_ms"] for r in shape["rounds"]]
    assert len(ratios) == 2 and shape["step_ratio"] == pytest.approx(sum(ratios) / 2)  # median of 2
    assert (shape["meets_max_ratio"] == (shape["step_ratio"] <= 1.15)
            and shape["micro_batches_within_max_ratio"] >= 1)


@pytest.mark.slow
def test_optimizer_speed_under_torchrun_shares_muon_and_rank_0_reports(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "bench/optimizer_speed.py",
                             "--shapes=2x2x32x16x2x65", "--rounds=2", "--round_s=0.001",
                             "--warmup_steps=1", "--device=cpu", f"--out={out}"],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("2 process(es)") == 1  # rank 0 alone prints
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["results"][0]["muon"]["optimizer_ms_median"] > 0


def test_the_bench_times_muon_as_the_cpu_recipes_run_it():
    recipe = runpy.run_path(str(ROOT / "config" / "speedrun_char_cpu.py"))
    assert optimizer_speed.muon_split == train.muon_split == recipe["muon_split"] == "head"


def test_the_bench_char_shape_is_the_cpu_recipes():
    recipe = runpy.run_path(str(ROOT / "config" / "shakespeare_char_cpu.py"))
    sizes = ([recipe[key] for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")]
             + [65])
    assert optimizer_speed.SHAPES["char_cpu"] == "x".join(map(str, sizes))


def test_micro_batches_within_the_ratio_follow_from_the_step_parts():
    def figures(step_ms, optimizer_ms):
        return {"ms_per_step_median": step_ms, "optimizer_ms_median": optimizer_ms}

    # AdamW: 100 ms per step of which 1 optimizer, so 99 ms per micro-batch; Muon's optimizer 30 ms
    adamw, muon = figures(100.0, 1.0), figures(129.0, 30.0)
    n = optimizer_speed.micro_batches_within(adamw, muon, 1.15)
    assert (n * 99 + 30) / (n * 99 + 1) <= 1.15 < ((n - 1) * 99 + 30) / ((n - 1) * 99 + 1)
    assert optimizer_speed.micro_batches_within(adamw, figures(101.0, 2.0), 1.15) == 1
