"""Generation speed, the KV cache against recomputing the context: `python bench/sample_speed.py`.

For each (prompt length, new tokens) case, greedy decoding from a random prompt on a randomly
initialised model, two ways: `GPT.generate(temperature=0)`, which feeds only the newest token once
its cache is filled, and a loop that runs the full forward over the last block_size tokens for
every new token. Both must pick the same tokens; a mismatch is reported loudly and makes the exit
status 1.
"""

import sys
import time
from pathlib import Path

import torch

# `python bench/sample_speed.py` puts bench/ on the path, not the repo root with the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checks
import devices
from bench import common
from configurator import ConfigError, run_main
from engine import generation_attention, sample_next
from model import GPT

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
# model: the GPT-2 124M shape, random weights
n_layer = 12  # transformer blocks {> 0}
n_head = 12  # attention heads per block {> 0}
n_embd = 768  # width of the residual stream {> 0}
block_size = 1024  # longest context; a longer sequence keeps its last block_size tokens {> 0}
vocab_size = 50304  # model vocabulary (GPT-2's 50257 padded to a multiple of 64) {> 0}
bias = False  # biases in Linear layers and LayerNorms
# cases
prompt_lengths = "16,128"  # prompt lengths in tokens, comma-separated
new_tokens = "100,500"  # tokens to generate per prompt; each pair with prompt_lengths is a case
batch_size = 1  # sequences generated together {> 0}
seed = 1337  # seeds the weights and the prompts
# system: device from devices.DeviceConfig (listed last); dtype here for its float32 default
dtype = "float32"  # float32, bfloat16, float16, or auto (devices.pick_dtype's choice)
out = "bench/results/sample_speed.json"  # JSON report
# ---- end of config ----

WARMUP_TOKENS = 4  # a short untimed run of each method first, so one-time allocations go untimed
ISSUE_CASE = (16, 500)  # acceptance point: KV cache >= ISSUE_SPEEDUP x faster on CPU at GPT-2 124M
ISSUE_SPEEDUP = 5.0


@torch.no_grad()
def generate_by_recomputing(model, idx, max_new_tokens):
    """Greedy decoding, no cache: every token costs a forward over the whole (cropped) context."""
    block_size = model.config.block_size
    with generation_attention():  # generate's kernels, so the two differ only by the cache
        for _ in range(max_new_tokens):
            logits = model.logits(model.hidden_states(idx[:, -block_size:])[:, -1])  # last position
            idx = torch.cat((idx, sample_next(logits.float(), temperature=0)), dim=1)
    return idx


def with_kv_cache(model, idx, max_new_tokens):
    return model.generate(idx, max_new_tokens, temperature=0)


def timed(method, model, prompt, count, autocast, device):
    """(tokens, seconds) of one run of a generation method."""
    common.sync(device)
    start = time.perf_counter()
    with autocast:
        tokens = method(model, prompt, count)
    common.sync(device)
    return tokens, time.perf_counter() - start


def parse_lengths(key, text):
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) <= 0:
        raise ConfigError(f"{key} must be positive integers separated by commas, got {text!r}")
    return lengths


def run_case(model, prompt, count, autocast, device):
    """Both methods on one prompt; the figures for one case."""
    cached, cached_s = timed(with_kv_cache, model, prompt, count, autocast, device)
    recomputed, recomputed_s = timed(generate_by_recomputing, model, prompt, count, autocast,
                                     device)
    differs = (cached != recomputed).any(dim=0).nonzero()
    generated = count * prompt.size(0)
    return {"prompt_tokens": prompt.size(1), "new_tokens": count, "batch_size": prompt.size(0),
            "kv_cache_s": cached_s, "recompute_s": recomputed_s,
            "kv_cache_tokens_per_sec": generated / cached_s,
            "recompute_tokens_per_sec": generated / recomputed_s,
            "speedup": recomputed_s / cached_s, "tokens_match": len(differs) == 0,
            "first_mismatch": int(differs[0]) - prompt.size(1) if len(differs) else None}


def issue_check(cases, device):
    """Whether the acceptance point holds, where its case was measured on a CPU; None otherwise."""
    case = next((c for c in cases if (c["prompt_tokens"], c["new_tokens"]) == ISSUE_CASE), None)
    if case is None or device != "cpu":
        return None
    return {"prompt_tokens": ISSUE_CASE[0], "new_tokens": ISSUE_CASE[1],
            "required_speedup": ISSUE_SPEEDUP, "speedup": case["speedup"],
            "holds": case["speedup"] >= ISSUE_SPEEDUP}


def benchmark(cfg):
    checks.check_model_options(cfg)
    grid = [(p, n) for p in parse_lengths("prompt_lengths", cfg.prompt_lengths)
            for n in parse_lengths("new_tokens", cfg.new_tokens)]
    rt = devices.runtime(cfg)
    device = rt.device
    machine = common.machine_record(device)
    autocast = rt.autocast()
    torch.manual_seed(cfg.seed)
    model = GPT(common.model_config(cfg, cfg.vocab_size)).to(device).eval()
    prompts = torch.randint(cfg.vocab_size, (cfg.batch_size, max(p for p, _ in grid)),
                            device=device)
    for method in (with_kv_cache, generate_by_recomputing):
        timed(method, model, prompts[:, :grid[0][0]], WARMUP_TOKENS, autocast, device)

    print(f"GPT {model.num_params() / 1e6:.1f}M ({cfg.n_layer} layers, {cfg.n_embd} wide, "
          f"vocab {cfg.vocab_size}, random weights), batch {cfg.batch_size}, "
          f"{common.dtype_name(rt.dtype)} ({rt.dtype_reason}), on {device}")
    cases = []
    for prompt_length, count in grid:
        case = run_case(model, prompts[:, :prompt_length], count, autocast, device)
        cases.append(case)
        print(f"  prompt {prompt_length:>4}, {count:>4} new: KV cache "
              f"{case['kv_cache_tokens_per_sec']:8.1f} tok/s, recompute "
              f"{case['recompute_tokens_per_sec']:7.1f} tok/s, speedup {case['speedup']:5.1f}x, "
              f"tokens {'match' if case['tokens_match'] else 'DIFFER'}")

    check = issue_check(cases, device)
    if check:
        print(f"issue check, KV cache >= {ISSUE_SPEEDUP:g}x recomputation at a "
              f"{ISSUE_CASE[0]}-token prompt and {ISSUE_CASE[1]} new tokens on CPU: "
              f"{'holds' if check['holds'] else 'FAILS'} ({check['speedup']:.1f}x)")
    memory_mib, memory_source = common.peak_memory(device)
    report = {**machine, "config": vars(cfg), "n_params": model.num_params(),
              "dtype": common.dtype_name(rt.dtype), "dtype_reason": rt.dtype_reason, "cases": cases,
              "tokens_match": all(c["tokens_match"] for c in cases), "issue_check": check,
              "peak_memory_mib": memory_mib, "peak_memory_source": memory_source}
    common.write_report(cfg.out, report)
    return report["tokens_match"]


def main():
    if not run_main(benchmark, __file__, None, devices.DeviceConfig):
        print("ERROR: the KV cache and recomputation chose different tokens "
              "(see first_mismatch in the report); in float32 that is a bug in the cache, "
              "under bf16/fp16 it can also be a rounding tie",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
