"""What a training run will hold in memory, per process, estimated before its first step in closed
form (no forward is run): weights, gradients, optimizer state and activations; what the device has;
and, where the estimate exceeds it, the keys that would bring it under.

Activations, per token of a micro-batch (B x T tokens), with C = n_embd, H = n_head, F = the MLP's
hidden width, V = vocab_size, a = the bytes of the autocast dtype (2 for bf16 and fp16, 4 without
autocast), s = the bytes attention computes in (4 on CPU, where model.py runs bf16 attention in
fp32; else a) and m = the bytes of a dropout mask (1 on CUDA, whose fused dropout keeps a bool mask;
elsewhere the masked tensor's dtype). What autograd saves for the backward, counted with
torch.autograd.graph.saved_tensors_hooks on CPU; each block:
    8C        the residual stream (fp32) at the inputs of its two norms
    8C        rmsnorm: torch's RMSNorm keeps 4 bytes a channel more than LayerNorm, in each norm
    3aC       the inputs of c_attn, c_fc (the norms' outputs, cast to a) and attention's c_proj
    4sC + 4H  q, k, v and the output as the fused attention kernel saves them, and its logsumexp
    2sC       rope, where attention takes its rotated q and k as they are (s = a): new tensors,
              while the c_attn output stays saved for v
    8C        qk_norm: q and k normalised in fp32 (kept for the norms' weights: not with LoRA, which
              freezes them), and their fp32 copies (8C more) where a < 4
    2aF       relu2 and gelu: the MLP's hidden layer before and after the activation; swiglu 4aF
              (its 2F-wide input, the gate's silu, the product)
    2mC       dropout: the masks of the two residual branches; off CUDA attention with dropout
              runs torch's math kernel, which saves no output (- sC) but three fp32 T x T matrices
              per head (probabilities, mask, dropped probabilities): + 12HT
and besides the blocks:
    2sC       each value-embedding layer: the table's rows and the mixed values (two layers a table)
    4C        each U-net skip: the block output it takes back
    4C + aC   ln_f's input (fp32) and the LM head's input
    4V        the loss in fp32 over the full vocabulary: log-softmax's output
    aV        logit_softcap: tanh's output
    mC        dropout: the embeddings' mask (fp32 off CUDA: 4C)
and, on top, the backward's largest transient: the loss's gradient going into and out of log-softmax
(8V, the peak of a model with a large vocabulary), or one block's MLP gradient (relu2's square takes
three hidden-wide temporaries, 3aF; gelu aF; swiglu 2aF), whichever is larger. With activation
checkpointing each block keeps only its input (4C) and one block's activations are recomputed at a
time in the backward. Left out: norm statistics (8 bytes a token a norm), LoRA's rank-wide
intermediates and dropout, the batch, torch.compile's rearrangements (a compiled model saves less:
the estimate is the eager one), the CUDA allocator's fragmentation. CUDA's terms follow the same
reading of torch's kernels; only CPU's were measured.

Weights: every parameter, and under autocast an a-byte copy of every Linear weight, cast once per
forward and kept for the backward. Gradients: the trained parameters' (with LoRA the adapters'); DDP
keeps a second copy in its buckets. Optimizer state: AdamW two moments per trained parameter, Muon
one momentum per block matrix (AdamW for the rest). FSDP splits all three over the processes; while
accumulating micro-batches a process keeps the parameters gathered (in the autocast dtype under
bf16) and their gradients whole (parallel.gradient_sync). The parts are summed: with one micro-batch
the gradients grow as the activations are freed, so the sum is an upper bound there. Muon's step
also holds its update (as large as its matrices' gradients) and Newton-Schulz's copies (counted as
much again): the step's peak, with the activations gone, is the larger where the batch is small.

Checked on CPU (tests/test_memory.py) against the resident peak of a fresh process's training steps,
allocations over 64 KiB given pages of their own so it follows the live tensors: within 15% (0.97 to
1.03 of it) at three shapes (GPT-2's vocabulary, a character vocabulary under bf16 autocast,
activation checkpointing with SwiGLU and dropout). A CPU run keeps freed memory for reuse
(devices.keep_freed_memory), where glibc's heap fragments: its resident peak, the progress lines'
figure, can be well above the live tensors counted here (1.1x to 2.6x at the shapes measured).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model import mlp_width
from optimizers import lr_groups
from parallel import place


@dataclass(frozen=True)
class Estimate:
    """Bytes one process holds, by part; `muon_step`: the temporaries of Muon's step, held when the
    activations are not."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    muon_step: int = 0

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + max(self.activations, self.muon_step)


def estimate(gpt, batch_size, dtype, device_type, optimizer="muon", world_size=1, parallel="ddp",
             activation_checkpointing=False, micro_batches=1):
    """The Estimate for training `gpt` (its config gives T, the shape and the options) on
    micro-batches of `batch_size` sequences, `micro_batches` of them per process and step, under
    autocast to `dtype` (float32: none) on `device_type`, with `optimizer` (muon or adamw) and
    `world_size` processes running `parallel` (ddp or fsdp)."""
    a = dtype.itemsize
    params = list(gpt.parameters())
    trained = [p for p in params if p.requires_grad]
    weights, grads = size(params), size(trained)
    muon = sum(size(group["params"])
               for group in lr_groups(gpt, 0.0, 1.0, 1.0 if optimizer == "muon" else None)
               if group.get("muon"))
    state = muon + 2 * (grads - muon)
    if world_size > 1 and parallel == "fsdp":
        weights, grads, state, muon = (part // world_size for part in (weights, grads, state, muon))
        if micro_batches > 1:  # between micro-batches: parameters gathered, gradients whole
            weights += sum(p.numel() for p in params) * (2 if dtype == torch.bfloat16 else 4)
            grads += size(trained)
    else:
        if a < 4:  # autocast's copies of the matmul weights
            weights += a * sum(m.weight.numel() for m in gpt.modules() if isinstance(m, nn.Linear))
        if world_size > 1:  # DDP's buckets
            grads *= 2
    tokens = batch_size * gpt.config.block_size
    activations = tokens * activation_bytes_per_token(gpt.config, a, device_type,
                                                      activation_checkpointing)
    return Estimate(weights, grads, state, activations, 2 * muon)


def size(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_bytes_per_token(config, a, device_type, checkpointing):
    """What the forward keeps for the backward, and the backward's largest transient, per token."""
    C, s = config.n_embd, attention_bytes(a, device_type)
    block = block_bytes_per_token(config, a, device_type)
    kept = config.n_layer * 4 * C + block if checkpointing else config.n_layer * block
    between_blocks = (4 * s * C * config.value_embeddings
                      + 4 * C * (config.n_layer // 2) * config.unet_skips)
    return (kept + between_blocks + head_bytes_per_token(config, a, device_type)
            + backward_bytes_per_token(config, a))


def attention_bytes(a, device_type):
    return 4 if device_type == "cpu" else a


def block_bytes_per_token(config, a, device_type):
    C, H, T, F = config.n_embd, config.n_head, config.block_size, mlp_width(config)
    s = attention_bytes(a, device_type)
    total = 8 * C + 3 * a * C + 4 * s * C + 4 * H + (4 if config.mlp == "swiglu" else 2) * a * F
    if config.pos_embedding == "rope" and s == a:
        total += 2 * s * C
    if config.norm == "rmsnorm":  # 4 more bytes a channel than torch's LayerNorm (measured on CPU)
        total += 2 * 4 * C
    if config.qk_norm:  # fp32 q and k where a < 4; the normalised ones kept for the norms' weights
        total += (8 * C if a < 4 else 0) + (0 if config.lora_rank else 8 * C)
    if config.dropout:
        total += 2 * (1 if device_type == "cuda" else a) * C
        total += 0 if device_type == "cuda" else 12 * H * T - s * C
    return total


def head_bytes_per_token(config, a, device_type):
    C, V = config.n_embd, config.vocab_size
    total = 4 * C + a * C + 4 * V
    if config.logit_softcap:
        total += a * V
    if config.dropout:
        total += (1 if device_type == "cuda" else 4) * C
    return total


def backward_bytes_per_token(config, a):
    """The backward's largest transient: the loss's two fp32 gradients over the vocabulary, or the
    MLP's activation gradient (relu2's square: 3 hidden-wide temporaries, gelu 1, swiglu 2)."""
    mlp = {"relu2": 3, "gelu": 1, "swiglu": 2}[config.mlp] * a * mlp_width(config)
    return max(8 * config.vocab_size, mlp)


# ---- the run's lines ----

def for_run(cfg, gpt, rt, world_size, **changes):
    """The Estimate of a train.py run (its config's keys, the Runtime's device and dtype), `changes`
    (config keys, and world_size) in place of what they name."""
    keys = {"batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "activation_checkpointing": cfg.activation_checkpointing, "parallel": cfg.parallel,
            "world_size": world_size} | changes
    return estimate(gpt, keys["batch_size"], rt.dtype, rt.device_type, cfg.optimizer,
                    keys["world_size"], keys["parallel"], keys["activation_checkpointing"],
                    keys["gradient_accumulation_steps"] // keys["world_size"])


def available_bytes(device):
    """What this process's tensors may take, or None where unknown: on CUDA the GPU's free memory
    and what torch already holds there (the weights, by now); on MPS the recommended working set;
    on CPU the RAM available, shared by this machine's processes."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    if device == "mps":
        return (torch.mps.recommended_max_memory()
                if hasattr(torch.mps, "recommended_max_memory") else None)
    ram = available_ram()
    return None if ram is None else ram // place()[3]


def available_ram():
    """Linux's MemAvailable (free memory and reclaimable cache), else the free pages, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows: no sysconf; macOS: no SC_AVPHYS_PAGES
        return None


def lines(cfg, gpt, rt, world_size):
    """runlog.describe's memory lines: the estimate against what the device has and, where it is
    over, the keys that would bring it under. Only words: an estimate never stops a run."""
    est, available = for_run(cfg, gpt, rt, world_size), available_bytes(rt.device)
    parts = (f"weights {amount(est.weights)}, grads {amount(est.grads)}, "
             f"optimizer {amount(est.optimizer)}, activations {amount(est.activations)} "
             f"at {cfg.batch_size} x {gpt.config.block_size}")
    if est.muon_step > est.activations:
        parts += f"; Muon's step {amount(est.muon_step)}, its peak"
    said = (f"memory: ~{amount(est.total)} estimated for the tensors"
            f"{' per process' if world_size > 1 else ''} ({parts})")
    if available is None:
        return [f"{said}; the device's memory is unknown"]
    said += f" of {amount(available)} available"
    if est.total <= available:
        return [said]
    over = "memory: over what is available (an estimate: the run goes on)"
    ways = ways_to_fit(cfg, gpt, rt, world_size, available)
    if ways:
        return [said, f"{over}; these would fit: "
                      + "; ".join(f"{keys} (~{amount(fit.total)})" for keys, fit in ways)]
    accumulation = cfg.batch_size * cfg.gradient_accumulation_steps
    least = for_run(cfg, gpt, rt, world_size, batch_size=1,
                    gradient_accumulation_steps=accumulation, activation_checkpointing=True)
    return [said, f"{over}, and no key here brings it under: --batch_size=1 "
                  f"--gradient_accumulation_steps={accumulation} --activation_checkpointing=True "
                  f"still needs ~{amount(least.total)}; a smaller model or a shorter "
                  "--block_size would"]


def amount(n_bytes):
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.3g} MiB"


def smaller_batches(cfg):
    """(batch_size, gradient_accumulation_steps) pairs of the same tokens per step, the micro-batch
    shrinking."""
    rows = cfg.batch_size * cfg.gradient_accumulation_steps
    return ((b, rows // b) for b in range(cfg.batch_size - 1, 0, -1) if cfg.batch_size % b == 0)


def ways_to_fit(cfg, gpt, rt, world_size, available):
    """[(the keys as arguments, their Estimate)] for the ways that bring the estimate under
    `available`: a smaller --batch_size (with the --gradient_accumulation_steps that keeps the
    tokens per step); activation checkpointing; FSDP, under torchrun, given several processes or
    GPUs. Each at the largest micro-batch that fits, named only if the ways before allow less."""
    ways = [({}, world_size)]
    if not cfg.activation_checkpointing:
        ways.append(({"activation_checkpointing": True}, world_size))
    gpus = torch.cuda.device_count() if rt.device_type == "cuda" else 0
    if cfg.parallel != "fsdp" and max(world_size, gpus) > 1:
        ways.append(({"parallel": "fsdp"}, max(world_size, gpus)))
    found, largest = [], 0
    for keys, processes in ways:
        batches = [{}] if keys else []
        batches += [{"batch_size": b, "gradient_accumulation_steps": steps}
                    for b, steps in smaller_batches(cfg)]
        for batch in batches:
            micro_batch = batch.get("batch_size", cfg.batch_size)
            if micro_batch <= largest:
                break
            if batch.get("gradient_accumulation_steps",
                         cfg.gradient_accumulation_steps) % processes:
                continue
            fit = for_run(cfg, gpt, rt, processes, **batch, **keys)
            if fit.total <= available:
                arguments = " ".join(f"--{key}={value}" for key, value in (batch | keys).items())
                where = f" under torchrun, {processes} GPUs" if processes > world_size else ""
                found.append((arguments + where, fit))
                largest = micro_batch
                break
    return found
