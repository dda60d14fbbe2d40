"""Causal attention forward+backward per dtype: `python bench/attention_speed.py [--key=value ...]`.

For each shape, times `F.scaled_dot_product_attention` with its backward on fp32 inputs, on bf16
inputs, and on bf16 inputs computed in fp32 (upcast, then the output cast back): what model.py does
under CPU autocast, because at the sequence lengths CPUs train torch's CPU kernels are faster in
fp32 than in bf16.
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# `python bench/attention_speed.py` puts bench/ on the path, not the repo root with the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devices
from bench import common
from configurator import ConfigError, run_main

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
shapes = "12x4x64x32,16x4x128x32,4x12x256x64,1x12x1024x64"  # list of batch x heads x T x head size
# device is devices.DeviceKey's key (--help lists it last); no dtype key: each precision is timed
warmup_steps = 5  # untimed passes first, per setting {>= 0}
steps = 50  # timed forward+backward passes per setting {> 0}
seed = 1337  # seeds the random queries, keys and values
out = "bench/results/attention_speed.json"  # JSON report
# ---- end of config ----

SETTINGS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
            "bf16 computed in fp32": (torch.bfloat16, True)}


def parse_shapes(text):
    try:
        parsed = [tuple(int(n) for n in shape.split("x")) for shape in text.split(",") if shape]
    except ValueError:
        parsed = []
    if not parsed or any(len(shape) != 4 or min(shape) <= 0 for shape in parsed):
        raise ConfigError("shapes must be positive BxHxTxD sizes separated by commas, "
                          f"like 12x4x64x32; got {text!r}")
    return parsed


def pass_ms(shape, dtype, upcast, cfg, device):
    """Median milliseconds of one causal attention forward+backward."""
    generator = torch.Generator().manual_seed(cfg.seed)
    q, k, v, grad = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def one_pass():
        inputs = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
        y = F.scaled_dot_product_attention(*inputs, is_causal=True).to(dtype)
        torch.autograd.grad(y, (q, k, v), grad)
        common.sync(device)

    for _ in range(cfg.warmup_steps):
        one_pass()
    seconds = []
    for _ in range(cfg.steps):
        start = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - start)
    return 1000 * statistics.median(seconds)


def benchmark(cfg):
    shapes = parse_shapes(cfg.shapes)
    device = devices.runtime(cfg).device
    results = []
    for shape in shapes:
        timings = {name: pass_ms(shape, dtype, upcast, cfg, device)
                   for name, (dtype, upcast) in SETTINGS.items()}
        results.append({"shape": list(shape), "ms": timings})
        print(f"B={shape[0]} heads={shape[1]} T={shape[2]} head size {shape[3]}: "
              + ", ".join(f"{name} {ms:.2f} ms" for name, ms in timings.items())
              + " (forward+backward, median)")
    common.write_report(cfg.out, {**common.machine_record(device), "config": vars(cfg),
                                  "results": results})


if __name__ == "__main__":
    run_main(benchmark, __file__, None, devices.DeviceKey)
