"""Tokens/s and MFU of the real training step: `python bench/train_speed.py [--key=value ...]`.

Times `train.train_step` (one optimizer step: forward and backward over the micro-batches, clip,
AdamW step) on random tokens, after untimed warm-up steps; with compilation the first step is timed
apart as `compile_s`. `--compare_fp32_eager=True` also builds a plain fp32, uncompiled copy of the
model (same weights, same batches; matmuls in TF32 on CUDA, as in train.py) and alternates rounds of
steps between the two, so that noise from other work on the machine hits both alike.
`--time_matmuls=True` splits each setting's step into its matrix multiplies (the projections' and
the head's; attention's own stay inside its fused kernel) and the rest: it records every matmul of
one forward and backward (shapes, layouts, dtypes) and times them replayed alone, which shows how
much of a step a faster matmul precision can speed up.
"""

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# `python bench/train_speed.py` puts bench/ on the path, not the repo root with the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checks
import devices
from bench import common
from configurator import ConfigError, run_main

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
# model: the GPT-2 124M shape
n_layer = 12  # transformer blocks {> 0}
n_head = 12  # attention heads per block {> 0}
n_embd = 768  # width of the residual stream {> 0}
block_size = 1024  # context length T of every sequence {> 0}
vocab_size = 50304  # model vocabulary (GPT-2's 50257 padded to a multiple of 64) {> 0}
bias = False  # biases in Linear layers and LayerNorms
dropout = 0.0  # dropout on attention, residual branches and embeddings {[0, 1)}
# batches of random tokens
batch_size = 8  # sequences per micro-batch {> 0}
gradient_accumulation_steps = 1  # micro-batches per optimizer step {> 0}
seed = 1337  # seeds the weights and the random batches
# system: device, dtype and compile are devices.RuntimeConfig's keys (--help lists them last)
# measurement
warmup_steps = 3  # untimed steps first (with compile, the first is the compile_s figure) {>= 0}
steps = 10  # timed optimizer steps (per round with compare_fp32_eager) {> 0}
peak_flops = 0.0  # peak FLOP/s for MFU, all settings; 0 looks a GPU up by name (no CPU peak) {>= 0}
compare_fp32_eager = False  # also time an fp32 eager baseline (rounds alternate) for the speedup
rounds = 3  # with compare_fp32_eager: rounds of `steps` steps per setting, alternating {> 0}
time_matmuls = False  # also time each setting's matmuls replayed alone: their share of the step
keep_freed_memory = True  # CPU: glibc keeps freed memory to reuse (as train.py); False: its default
out = "bench/results/train_speed.json"  # JSON report
# ---- end of config ----


# ---- the training step ----

class Setting(common.TrainStep):
    """One setting compared (model and optimizer, precision, compile choice) with its timings."""

    def __init__(self, config, seed, rt):
        super().__init__(config, seed, rt)
        self.compile_s = None
        self.seconds = []  # timed steps
        self.matmul_replay = None  # with time_matmuls: one step's matmuls, ready to replay
        self.matmul_seconds = []  # each replayed pass

    def label(self):
        return f"{common.dtype_name(self.rt.dtype)} {'compiled' if self.rt.compile else 'eager'}"

    def warm_up(self, step_batches, count):
        for i in range(count):
            seconds = self.step(step_batches[i % len(step_batches)])
            if i == 0 and self.rt.compile:
                self.compile_s = seconds


# ---- the step's matmuls alone ----

MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.baddbmm.default}


class MatmulRecorder(TorchDispatchMode):
    """Notes each matrix multiply run under it (autocast has already chosen its dtype): the op and,
    for each tensor argument, its shape, strides and dtype."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_OPS:
            layouts = tuple((a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                            for a in args)
            self.calls.append((func, layouts, kwargs or {}))
        return func(*args, **(kwargs or {}))


def step_matmuls(setting, batches):
    """The matmuls of one forward and backward over `batches` (the uncompiled model; AdamW and
    clipping have none)."""
    recorder = MatmulRecorder()
    with recorder:
        for x, y in batches:
            with setting.autocast:
                _, loss = setting.raw_model(x, y)
            loss.backward()
    setting.raw_model.zero_grad(set_to_none=True)
    return recorder.calls


def strided_random(shape, stride, dtype, device):
    """A random tensor with the step's exact layout (a transposed view, a broadcast bias)."""
    size = 1 + sum((n - 1) * step for n, step in zip(shape, stride))
    return torch.randn(size, dtype=dtype, device=device).as_strided(shape, stride)


def matmul_replay(calls, device):
    """The calls with random operands of the recorded layouts (one tensor per distinct layout)."""
    operands = {}
    for _, layouts, _ in calls:
        for layout in layouts:
            if isinstance(layout, tuple) and layout not in operands:
                operands[layout] = strided_random(*layout, device)
    return [(func, [operands[a] if isinstance(a, tuple) else a for a in layouts], kwargs)
            for func, layouts, kwargs in calls]


def replay_seconds(replay, device, passes):
    """Seconds of each of `passes` passes over the replayed matmuls, after one untimed pass."""
    seconds = []
    for _ in range(passes + 1):
        common.sync(device)
        start = time.perf_counter()
        for func, args, kwargs in replay:
            func(*args, **kwargs)
        common.sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def random_batches(cfg, device, count):
    """`count` steps' worth of (x, y) micro-batches of random tokens, fixed by the seed, on the
    device up front."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return [[common.random_batch(cfg.vocab_size, cfg.batch_size, cfg.block_size, device, generator)
             for _ in range(cfg.gradient_accumulation_steps)] for _ in range(count)]


def peak_for(override, device, ptdtype):
    """(peak FLOP/s or None, where it comes from or why there is none)."""
    if override:
        return override, "peak from --peak_flops"
    if not device.startswith("cuda"):
        return None, (f"MFU is not defined against a {device.upper()} peak here (devices.py's "
                      "table holds CUDA GPUs only); pass --peak_flops=FLOP/s to set one")
    name = torch.cuda.get_device_name(device)
    peak = devices.peak_flops(name, ptdtype)
    if peak is None:
        return None, (f"no {common.dtype_name(ptdtype)} peak known for {name}; "
                      "pass --peak_flops=FLOP/s for MFU")
    return peak, f"dense {common.dtype_name(ptdtype)} peak of {name} from devices.py's table"


def figures(setting, tokens_per_step, flops_per_token, peak_override):
    """A setting's timing, throughput and MFU; throughput uses the median step, the figure least
    moved by noise."""
    median = statistics.median(setting.seconds)
    tokens_per_sec = tokens_per_step / median
    peak, note = peak_for(peak_override, setting.rt.device, setting.rt.dtype)
    achieved = flops_per_token * tokens_per_sec
    return {"dtype": common.dtype_name(setting.rt.dtype), "compile": setting.rt.compile,
            "compile_s": setting.compile_s, "steps_timed": len(setting.seconds),
            "ms_per_step_median": 1000 * median,
            "ms_per_step_mean": 1000 * statistics.mean(setting.seconds),
            "ms_per_step_all": [round(1000 * s, 2) for s in setting.seconds],
            "tokens_per_sec": tokens_per_sec, "achieved_flops_per_sec": achieved,
            "peak_flops": peak, "mfu": achieved / peak if peak else None, "mfu_note": note,
            **(matmul_figures(setting, median) if setting.matmul_seconds else {})}


def matmul_figures(setting, step_median):
    matmul = statistics.median(setting.matmul_seconds)
    return {"matmuls_per_step": len(setting.matmul_replay), "matmul_ms_per_step": 1000 * matmul,
            "rest_ms_per_step": 1000 * (step_median - matmul), "matmul_share": matmul / step_median}


def describe(result):
    mfu = f"MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else "MFU n/a"
    compile_time = (f", compile {result['compile_s']:.1f}s"
                    if result["compile_s"] is not None else "")
    return (f"{result['dtype']} {'compiled' if result['compile'] else 'eager'}: "
            f"{result['ms_per_step_median']:.1f} ms/step median "
            f"({result['ms_per_step_mean']:.1f} mean, {result['steps_timed']} steps) | "
            f"{result['tokens_per_sec']:,.0f} tok/s | "
            f"{result['achieved_flops_per_sec'] / 1e12:.3f} TFLOP/s | {mfu}{compile_time}" + (
                f"\n    matmuls alone {result['matmul_ms_per_step']:.1f} ms "
                f"({result['matmuls_per_step']} per step, {100 * result['matmul_share']:.0f}% "
                f"of the step), the rest {result['rest_ms_per_step']:.1f} ms"
                if "matmul_ms_per_step" in result else ""))


def measure(settings, step_batches, cfg):
    """Warm every setting up, then time rounds of steps, alternating settings so a noisy spell slows
    them all."""
    for setting in settings:
        setting.warm_up(step_batches, cfg.warmup_steps)
        if cfg.time_matmuls:
            setting.matmul_replay = matmul_replay(step_matmuls(setting, step_batches[0]),
                                                  setting.rt.device)
    rounds = cfg.rounds if cfg.compare_fp32_eager else 1
    for round_index in range(rounds):
        for setting in settings:
            setting.seconds += [setting.step(batches) for batches in step_batches]
            if setting.matmul_replay:
                setting.matmul_seconds += replay_seconds(setting.matmul_replay, setting.rt.device,
                                                         len(step_batches))
        if rounds > 1:  # a long comparison shows that it is moving, and how much the rounds differ
            print(f"  round {round_index + 1}/{rounds}: " + ", ".join(
                f"{s.label()} "
                f"{1000 * statistics.median(s.seconds[-len(step_batches):]):.0f} ms/step"
                for s in settings), flush=True)


def benchmark(cfg):
    checks.check_model_options(cfg)
    rt = devices.runtime(cfg, keep_freed=cfg.keep_freed_memory)
    if rt.compile and cfg.warmup_steps < 1:
        raise ConfigError("compiling needs warmup_steps >= 1: "
                          "the first step compiles and is timed apart")
    config = common.model_config(cfg, cfg.vocab_size)
    settings = [Setting(config, cfg.seed, rt)]
    if cfg.compare_fp32_eager:  # TF32 matmuls on CUDA, as devices.tune_for sets them for train.py
        baseline = replace(rt, dtype=torch.float32, dtype_reason="the fp32 eager baseline",
                           compile=False)
        settings.append(Setting(config, cfg.seed, baseline))
    raw_model = settings[0].raw_model
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    machine = common.machine_record(rt.device)
    print(f"GPT {raw_model.num_params() / 1e6:.1f}M ({cfg.n_layer} layers, {cfg.n_embd} wide, "
          f"vocab {cfg.vocab_size}) on {machine['device']} ({rt.device}), "
          f"torch {torch.__version__}")
    print(f"batch {cfg.batch_size} x T {cfg.block_size} x {cfg.gradient_accumulation_steps} "
          f"micro-steps = {tokens_per_step:,} tokens/step; {flops_per_token / 1e6:.1f} MFLOPs/token"
          f"; dtype {common.dtype_name(rt.dtype)} ({rt.dtype_reason})", flush=True)

    measure(settings, random_batches(cfg, rt.device, cfg.steps), cfg)
    results = [figures(s, tokens_per_step, flops_per_token, cfg.peak_flops) for s in settings]
    memory_mib, memory_source = common.peak_memory(rt.device)
    report = {**machine, "config": vars(cfg), "n_params": raw_model.num_params(),
              "batch_size": cfg.batch_size, "block_size": cfg.block_size,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
              "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token,
              "dtype_reason": rt.dtype_reason, **results[0],
              "peak_memory_mib": memory_mib, "peak_memory_source": memory_source}
    for result in results:
        print("  " + describe(result))
    if cfg.compare_fp32_eager:
        report["baseline"] = results[1]
        report["speedup"] = results[1]["ms_per_step_median"] / results[0]["ms_per_step_median"]
        print(f"speedup over fp32 eager: {report['speedup']:.2f}x "
              f"(median steps, {cfg.rounds} alternating rounds)")
        if cfg.time_matmuls:
            report["matmul_speedup"] = (results[1]["matmul_ms_per_step"]
                                        / results[0]["matmul_ms_per_step"])
            print(f"matmuls alone: {report['matmul_speedup']:.2f}x "
                  "(the step's speedup if nothing else took time)")
    if report["mfu"] is None:
        print(f"MFU: {report['mfu_note']}")
    print(f"peak memory: {memory_mib:,.0f} MiB "
          f"({memory_source}{', both models' if len(settings) > 1 else ''})")
    common.write_report(cfg.out, report)


if __name__ == "__main__":
    run_main(benchmark, __file__, None, devices.RuntimeConfig)
