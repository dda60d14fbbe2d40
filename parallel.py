"""Several processes (torchrun): how the model is spread over them, applied from outside the model
as torchtitan's parallelize is: DDP replicas or FSDP2 shards, and which micro-batches exchange
gradients; and, applied the same way in one process or several, activation checkpointing."""

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from devices import process_group_backend


def place():
    """(rank, local_rank, world_size, processes on this machine) by torchrun; else (0, 0, 1, 1)."""
    return tuple(int(os.environ.get(key, default)) for key, default in
                 (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 1)))


def join(rt, rank):
    """Take this process's GPU (also for --device=cuda:N alone: its RNG state is the one saved and
    restored) and, under torchrun, join the process group: NCCL between GPUs where torch has it,
    else gloo (said once)."""
    if rt.device_type == "cuda":
        torch.cuda.set_device(rt.device)
    if "RANK" in os.environ:
        backend, note = process_group_backend(rt.device_type)
        if note and rank == 0:
            print(f"note: {note}")
        dist.init_process_group(backend=backend)


def distribute(gpt, rt, cfg, world_size):
    """The module that runs `gpt` over the processes: under torchrun with cfg.parallel=fsdp, gpt
    itself, sharded in place (shard); else gpt compiled (where rt says so) and, under torchrun, in
    DDP. With cfg.activation_checkpointing its blocks are checkpointed, then compiled, then sharded:
    torchtitan's order (apply_ac, apply_compile, apply_fsdp in its parallelize_llama)."""
    if cfg.activation_checkpointing:
        checkpoint_blocks(gpt)
    if world_size > 1 and cfg.parallel == "fsdp":
        shard(gpt, rt)
        return gpt  # its blocks are compiled one by one, in shard()
    model = rt.compiled(gpt)
    if world_size > 1:  # the rotary tables are buffers that never change: not re-sent each forward
        model = DDP(model, device_ids=[rt.device] if rt.device_type == "cuda" else None,
                    broadcast_buffers=False)
    return model


def shard(gpt, rt):
    """FSDP2: each block's parameters, gradients and optimizer state split across the processes.
    Under bf16 the gathered parameters are bf16 (half the bytes to send), gradients reduced in fp32.
    Each block is compiled before it is wrapped, so FSDP's hooks fall between compiled regions, not
    inside one."""
    bf16 = rt.dtype == torch.bfloat16
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in gpt.transformer.h:
        if rt.compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(gpt, mp_policy=policy)


def checkpoint_blocks(gpt):
    """Activation checkpointing, each block whole (torchtitan's apply_ac in its "full" mode): a
    block keeps only its input for the backward, which reruns the block's forward to get the rest
    back, so the blocks' inner activations are held one block at a time, for one more forward's
    compute. Each block's forward is wrapped in place, where torchtitan wraps the block in torch's
    CheckpointWrapper, so that no parameter's name gains a level (checkpoints, optimizer groups and
    exports go by name). The rerun draws the same dropout masks: checkpoint restores the RNG state
    the forward had (preserve_rng_state, its default)."""
    for block in gpt.transformer.h:
        block.forward = functools.partial(recomputed_in_backward, block.forward)


def recomputed_in_backward(forward, *args, **kwargs):
    """forward(*args, **kwargs), its activations recomputed in the backward; where no backward can
    follow (evaluation, generation), run as it is, so a KV cache is written once."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def gradient_sync(model, enabled):
    """Whether this micro-batch's backward exchanges gradients between processes (DDP all-reduce,
    FSDP reduce-scatter): only the last of a step's micro-batches needs to, the others just
    accumulate. FSDP also keeps the parameters gathered after those backwards, so the next forward
    need not regather."""
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)
    return contextlib.nullcontext()
