"""The machines people have, each checked by faking torch's queries: a GPU torch has no Triton
for, a torch without NCCL, GPUs missing from the peak table (and AMD's, in it), and the GPU path's
smaller fixes."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import read_log, run_here, tiny_args

import checks
import devices
import train
from configurator import ConfigError
from model import GPT, GPTConfig
from optimizers import configure_optimizer


def test_compile_auto_is_off_with_its_reason_where_triton_is_missing(monkeypatch):
    monkeypatch.setattr(devices, "has_triton", lambda: False)
    compiled, reason = devices.use_compile("auto", "cuda:0")
    assert not compiled and "Triton is not installed" in reason and "triton-windows" in reason
    with pytest.raises(ConfigError,
                       match="compile=true on this GPU needs Triton, but Triton is not installed"):
        devices.use_compile("true", "cuda:0")
    assert devices.use_compile("false", "cuda:0") == (False, "")
    assert devices.use_compile("true", "cpu") == (True, "")  # Inductor on CPU needs no Triton
    monkeypatch.setattr(devices, "has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert devices.use_compile("auto", "cuda:0") == (True, "")
    assert devices.use_compile("auto", "cpu") == (False, "")


def test_compile_auto_is_off_below_the_compute_capability_triton_compiles_for(monkeypatch):
    """A P100 (6.0) or a GTX 10xx (6.1) with Triton would fail at the first step, after tracing."""
    monkeypatch.setattr(devices, "has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    compiled, reason = devices.use_compile("auto", "cuda:0")
    assert not compiled and "compute capability 7.0 and up, and this GPU has 6.0" in reason
    with pytest.raises(ConfigError, match="this GPU has 6.0; pass --compile=false"):
        devices.use_compile("true", "cuda:0")


def test_processes_talk_over_gloo_where_torch_has_no_nccl(monkeypatch):
    monkeypatch.setattr(devices.dist, "is_nccl_available", lambda: False)
    backend, note = devices.process_group_backend("cuda")
    assert backend == "gloo" and "no NCCL" in note
    assert devices.process_group_backend("cpu") == ("gloo", "")
    monkeypatch.setattr(devices.dist, "is_nccl_available", lambda: True)
    assert devices.process_group_backend("cuda") == ("nccl", "")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("AMD Instinct MI300X", 1307e12), ("AMD Instinct MI250X", 383e12)])
def test_known_gpus_have_their_bf16_peak(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert (devices.device_peak("cuda:0", torch.bfloat16)
            == (peak, f"{name}'s bfloat16 datasheet peak"))


def test_an_unknown_gpu_says_so_and_peak_tflops_gives_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX 9090")
    peak, reason = devices.device_peak("cuda:0", torch.bfloat16)
    assert peak is None and "NVIDIA RTX 9090 is not in devices.py's peak table" in reason
    assert "--peak_tflops" in reason
    assert devices.device_peak("cuda:0", torch.bfloat16, 312.0) == (312e12, "--peak_tflops")
    rt = devices.Runtime("cuda:0", torch.bfloat16, "as configured", peak_reason=reason)
    assert "no MFU: NVIDIA RTX 9090 is not in" in rt.describe()
    with pytest.raises(ConfigError, match="peak_tflops must be 0"):
        devices.device_peak("cpu", torch.float32, -1.0)
    assert devices.device_peak("cpu", torch.float32) == (None, "")  # nothing said on every CPU run


@pytest.mark.slow
def test_peak_tflops_puts_mfu_on_the_progress_lines(data_root, tmp_path):
    run_here("train.py", tiny_args(data_root, tmp_path, max_iters=10, sample_interval=0,
                                   peak_tflops=1.0))
    lines = [r for r in read_log(tmp_path) if "dt_ms" in r]
    assert lines and all(0 < r["mfu"] for r in lines)


def test_no_clipping_leaves_the_gradients_untouched(monkeypatch):
    """grad_clip=0 takes the norm alone (it was multiplying every gradient by 1.0)."""
    def refuse(*args, **kwargs):
        raise AssertionError("gradients rescaled without clipping")

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", refuse)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(32, (2, 8))
    loss, norm, applied = train.train_step(model, optimizer,
                                           torch.amp.GradScaler("cpu", enabled=False),
                                           torch.autocast("cpu", enabled=False), [(x, x)], 0.0)
    assert applied and norm > 0


def test_qk_norm_under_bf16_autocast_warns_of_nothing():
    """QK-norm's RMSNorm warned that it could not use the fused kernel (bf16 input, fp32 weight)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50,
                          qk_norm=True))
    x = torch.randint(50, (2, 16))
    with (warnings.catch_warnings(record=True) as caught,
          torch.autocast("cpu", dtype=torch.bfloat16)):
        warnings.simplefilter("always")
        model(x, x)[1].backward()
    assert [str(w.message) for w in caught] == []


def test_deterministic_turns_cudnn_attention_off_and_asks_for_deterministic_kernels(monkeypatch):
    """On an H200 torch warned cuDNN attention's backward is nondeterministic (bench/RESULTS.md)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.make_deterministic()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert devices.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch._inductor.config.deterministic = False


def test_fsdp_in_float16_is_refused_in_one_line():
    """Each process's scaler would see only its shard's overflows: the loss scales drift apart."""
    cfg = SimpleNamespace(parallel="fsdp")
    with pytest.raises(ConfigError,
                       match="--parallel=fsdp in float16 would give each process a "
                             "gradient scaler"):
        checks.check_precision(cfg, SimpleNamespace(dtype=torch.float16), world_size=2)
    checks.check_precision(cfg, SimpleNamespace(dtype=torch.bfloat16), world_size=2)
    checks.check_precision(cfg, SimpleNamespace(dtype=torch.float16), world_size=1)
    checks.check_precision(SimpleNamespace(parallel="ddp"), SimpleNamespace(dtype=torch.float16),
                           world_size=2)


def test_peak_memory_on_cuda_is_since_the_last_call(monkeypatch):
    """On CUDA a progress line's peak is the allocator's since the line before (counters reset)."""
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    assert devices.peak_memory_mib("cuda:0") == {"peak_allocated_mib": 3.0,
                                                 "peak_reserved_mib": 4.0}
    assert resets == ["cuda:0"]
    assert devices.peak_memory_mib("cpu")["peak_rss_mib"] > 10
