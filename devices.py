"""Which device and precision a run uses (the runtime every script shares), and the GPU peaks that
MFU is measured against."""

import contextlib
import ctypes
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from configurator import ConfigError


@dataclass
class DeviceKey:
    """The device key alone, for a script that sets no precision of its own
    (bench/attention_speed.py times each one)."""

    device: str = "auto"  # auto (cuda, else mps, else cpu), or cpu, cuda, cuda:N, mps {changeable}


@dataclass
class DeviceConfig(DeviceKey):
    """The device keys of every script that runs a model, taken with load_config(..., DeviceConfig).
    A script that declares one of these keys itself keeps its own default and meaning."""

    dtype: str = "auto"  # auto: bf16/fp16 (CUDA)/fp32 {auto|float32|bfloat16|float16; changeable}


@dataclass
class RuntimeConfig(DeviceConfig):
    """The device keys of scripts that train a model (train.py and the training benchmarks)."""

    compile: str = "auto"  # torch.compile; auto: on CUDA with Triton {auto|true|false; changeable}
    deterministic: bool = False  # same bits each run, GPU too (bitwise resume); slower {changeable}
    peak_tflops: float = 0.0  # dense peak TFLOP/s at dtype (MFU); 0: GPU table {>= 0; changeable}


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: the device, autocast dtype (float32: none) and why, whether the
    training model is compiled. One place for the precision rules train, sample and bench use."""

    device: str  # "cpu", "cuda:0", "mps"
    dtype: torch.dtype
    dtype_reason: str
    compile: bool = False
    compile_reason: str = ""  # why compile is off where auto would have it on
    deterministic: bool = False
    peak_flops: float | None = None  # one device's dense peak at dtype, for MFU; None: no MFU
    peak_reason: str = ""  # where the peak comes from, or why there is none

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def grad_scaler(self):
        """Loss scaling for fp16, whose small gradients would underflow; no-op for other dtypes."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def compiled(self, model):
        return torch.compile(model) if self.compile else model

    def describe(self):
        threads = f", {torch.get_num_threads()} threads" if self.device_type == "cpu" else ""
        compiled = "compile on" if self.compile else "compile off"
        if self.compile_reason:
            compiled += f" ({self.compile_reason})"
        mfu = ""
        if self.peak_flops:
            mfu = f"; MFU against {self.peak_flops / 1e12:g} TFLOP/s ({self.peak_reason})"
        elif self.peak_reason:
            mfu = f"; no MFU: {self.peak_reason}"
        return (f"{self.device}, {str(self.dtype).removeprefix('torch.')} ({self.dtype_reason}), "
                f"{compiled}{', deterministic' if self.deterministic else ''}{threads}{mfu}")


def runtime(cfg, local_rank=0, processes=1, keep_freed=True):
    """The Runtime for a config's device keys (DeviceConfig's, plus compile if it has one; without
    dtype, float32), the process tuned for that device (see tune_for). Raises ConfigError for a
    device, dtype or compile value that cannot be had."""
    device = pick_device(cfg.device, local_rank)
    dtype, reason = pick_dtype(getattr(cfg, "dtype", "float32"), device.split(":")[0])
    compile_model, compile_reason = use_compile(getattr(cfg, "compile", "false"), device)
    tune_for(device, keep_freed, processes)
    deterministic = getattr(cfg, "deterministic", False)
    if deterministic:
        make_deterministic()
    peak, peak_reason = device_peak(device, dtype, getattr(cfg, "peak_tflops", 0.0))
    return Runtime(device, dtype, reason, compile_model, compile_reason, deterministic, peak,
                   peak_reason)


def make_deterministic():
    """The same bits every run, so a paused and resumed run equals an uninterrupted one on a GPU as
    on a CPU: cuBLAS with a fixed workspace, torch's deterministic algorithms (among them flash
    attention's backward and the embedding gradients' index_put without atomic adds), Inductor
    picking kernels without timing them (autotuning may pick others in another process), and cuDNN's
    attention off (flash attention's backward is deterministic when asked). Before anything compiles
    or touches cuBLAS; warn_only: an op with no deterministic kernel warns, naming itself."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_cudnn_sdp(False)  # its backward isn't deterministic (torch warns)
    inductor_config = importlib.import_module("torch._inductor.config")
    with contextlib.suppress(AttributeError):  # (Inductor's switch is newer than torch 2.6)
        inductor_config.deterministic = True


def use_compile(requested, device):
    """(whether to compile, why not where auto would): auto compiles only on CUDA (on CPU inductor
    gained nothing, bench/RESULTS.md) with Triton, Inductor's GPU compiler, installed: torch's
    Windows wheels lack it, and the first step would fail after minutes of tracing."""
    if requested not in ("auto", "true", "false"):
        raise ConfigError(f"compile must be auto, true or false, got {requested!r}")
    cuda = device.startswith("cuda")
    missing = cuda and requested != "false" and triton_missing(device)
    if missing and requested == "true":
        raise ConfigError(f"compile=true on this GPU needs Triton, but {missing}; "
                          "pass --compile=false")
    if missing:
        return False, missing
    return requested == "true" or (requested == "auto" and cuda), ""


def triton_missing(device):
    """Why Inductor's GPU compiler, Triton, cannot compile for this GPU, or "" where it can."""
    if not has_triton():
        return "Triton is not installed (on Windows: pip install triton-windows)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 0):  # Triton's floor: a P100 or GTX 10xx fails at step 1, after tracing
        return ("Triton compiles for compute capability 7.0 and up, and this GPU has "
                f"{capability[0]}.{capability[1]}")
    return ""


def has_triton():
    return importlib.util.find_spec("triton") is not None


def process_group_backend(device_type):
    """(backend, note): gloo between CPU processes; between GPUs NCCL where torch has it, else gloo
    (torch's Windows and macOS builds lack NCCL; gloo goes via host memory: slower, but works)."""
    if device_type == "cuda" and dist.is_nccl_available():
        return "nccl", ""
    if device_type == "cuda":
        return "gloo", ("this torch has no NCCL (Windows, macOS), so processes talk over gloo, "
                        "through host memory")
    return "gloo", ""


def cpu_has_bf16():
    """True if the CPU has native bf16 (x86 avx512_bf16 or AMX); elsewhere bf16 autocast is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def keep_freed_memory():
    """Make glibc keep freed memory for reuse, not return it to the OS at once (no-op elsewhere).

    A CPU training step frees and re-allocates the same large tensors every time (the logits alone
    are B * T * vocab floats). By default glibc serves those from fresh mmap pages, which the kernel
    must fault in and zero on each step: keeping them made a GPT-2 124M step on CPU 1.36x faster
    (bench/RESULTS.md). The cost: the process holds on to its peak memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def physical_cores(cpu_dir=Path("/sys/devices/system/cpu")):
    """Cores this process may run on, each core's SMT siblings (hyperthreads) counted once (Linux
    sysfs; elsewhere every logical CPU counts)."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cores = set()
    for cpu in os.sched_getaffinity(0):
        try:  # siblings of one core share the same list, e.g. "0,64"
            cores.add((cpu_dir / f"cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return len(cores)


def tune_for(device, keep_freed=True, processes=1):
    """Process-wide speed settings for the device: fp32 matmuls on TF32 tensor cores on CUDA
    (outside autocast); on CPU, one thread per physical core (shared among `processes` on this
    machine; a second thread on a core's sibling only contends for the same vector units) unless
    OMP_NUM_THREADS says otherwise, and freed memory kept for reuse."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, physical_cores() // processes))
        if keep_freed:
            keep_freed_memory()


def pick_device(requested, local_rank):
    if requested == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if requested.startswith("cuda"):
        name, _, index = requested.partition(":")
        if name != "cuda" or not (index.isdigit() or requested == "cuda"):
            raise ConfigError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
        index = int(index or local_rank)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {requested} does not exist: torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s); "
                              "use --device=auto or --device=cpu")
        return f"cuda:{index}"
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps is not available on this machine; "
                          "use --device=auto or --device=cpu")
    if requested not in ("cpu", "mps"):
        raise ConfigError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    return requested


def pick_dtype(requested, device_type):
    """(torch dtype, reason) for autocast; float32 means no autocast."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise ConfigError(f"unknown dtype {requested!r}; "
                              "use auto, float32, bfloat16 or float16")
        return names[requested], "as configured"
    if device_type == "cuda":
        # not counting emulation: a V100 or T4 "supports" bf16 only emulated (slow); fp16 is faster
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "the GPU supports bf16"
        return torch.float16, "the GPU lacks bf16, so fp16 with a gradient scaler"
    if device_type == "cpu" and cpu_has_bf16():
        return torch.bfloat16, "the CPU has native bf16 (avx512_bf16/amx)"
    return torch.float32, f"no fast bf16 on {device_type}"


# Dense (no sparsity) tensor-core peaks in FLOP/s from the data sheets, per autocast dtype; fp32
# matmuls run as TF32 here. Checked in order, so a more specific name comes before its prefix.
GPU_PEAK_FLOPS = [
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12}),  # SXM
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12}),  # SXM
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12}),
    ("V100", {"fp16": 125e12}),
    # AMD Instinct (ROCm builds of torch report them through torch.cuda)
    ("MI325X", {"bf16": 1307e12, "fp16": 1307e12, "tf32": 654e12}),
    ("MI300X", {"bf16": 1307e12, "fp16": 1307e12, "tf32": 654e12}),
    ("MI300A", {"bf16": 981e12, "fp16": 981e12, "tf32": 490e12}),
    ("MI250X", {"bf16": 383e12, "fp16": 383e12}),
    ("MI250", {"bf16": 362e12, "fp16": 362e12}),
    ("MI210", {"bf16": 181e12, "fp16": 181e12}),
]


def is_out_of_memory(error):
    """CUDA's OutOfMemoryError, or the RuntimeError that CPU and MPS allocators raise on failure."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError)
        and any(s in str(error) for s in ("can't allocate memory", "out of memory")))


def peak_memory_mib(device):
    """The memory peak since the last call, in MiB: on CUDA the allocator's (tensors) and what it
    reserved (the process's footprint on the GPU), its counters then reset; elsewhere the process's
    peak resident size so far (Linux reports KiB, macOS bytes)."""
    if device.startswith("cuda"):
        peaks = {"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                 "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
        torch.cuda.reset_peak_memory_stats(device)
        return peaks
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}


def peak_flops(device_name, dtype):
    """The dense peak of a named GPU for an autocast dtype; None where unknown (then no MFU)."""
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32"}[dtype]
    return next((peaks.get(kind) for key, peaks in GPU_PEAK_FLOPS if key in device_name), None)


def device_peak(device, dtype, peak_tflops=0.0):
    """(one device's dense peak FLOP/s at dtype, or None; its source, or why there is none)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if peak_tflops < 0:
        raise ConfigError("peak_tflops must be 0 (look the GPU up) or a positive TFLOP/s, "
                          f"got {peak_tflops}")
    if peak_tflops:
        return peak_tflops * 1e12, "--peak_tflops"
    if not device.startswith("cuda"):
        return None, ""  # no CPU or Apple peaks are known; nothing to say on every CPU run
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, dtype)
    if peak is None:
        return None, (f"{name} is not in devices.py's peak table for {dtype_name}; pass "
                      f"--peak_tflops=<its dense {dtype_name} TFLOP/s> "
                      "(or add it to GPU_PEAK_FLOPS)")
    return peak, f"{name}'s {dtype_name} datasheet peak"
