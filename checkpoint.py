"""What a run's checkpoint holds and how it is written and read: crash-safe saves, one state format for
single-process, DDP and FSDP runs, every process's RNG state, and the checks before a resume.

A checkpoint is a dict: model, optimizer (full state dicts, by parameter name), scaler, step, data_position
(the sampler's whole state), best_val_loss, best_step, rng (one per process), wandb_id, weights_from,
config, model_config, meta.
"""

import os
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from model import GPT, GPTConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}  # this process's GPU


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def full_state(model, optimizer):
    """Model and optimizer state dicts with whole tensors, the optimizer's keyed by parameter name. Under
    FSDP they are gathered to rank 0 (others get empty dicts). One format for every run: a checkpoint
    resumes in one process, under DDP or under FSDP, whichever wrote it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state):
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gather_rng_states(world_size):
    """Every process's RNG state, in rank order: each process draws its own dropout masks."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(states, rank, world_size):
    """This process's saved RNG state. The data order does not depend on the world size, but dropout
    masks do: resuming on another world size continues correctly, though not bitwise like the original."""
    if len(states) != world_size and rank == 0:
        print(f"note: resuming {len(states)} process(es)' run on {world_size}; dropout masks will differ "
              "from an uninterrupted run")
    return states[rank % len(states)]


def save_checkpoint(path, state):
    """Atomic save: write a temporary file in the same folder, fsync it, rename it over `path`, fsync the
    folder. A crash at any instant leaves either the old or the new checkpoint, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def checkpoint_to_resume(out_dir, resume):
    """out_dir/last.pt's contents when resuming; otherwise None, refusing to start over a run already there."""
    if resume:
        return load_checkpoint(out_dir / "last.pt")
    if (out_dir / "last.pt").exists():
        raise CheckpointError(f"{out_dir} already holds a run (last.pt); continue it with --init_from=resume "
                              "or choose another --out_dir")
    return None


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's contents (tensors and plain values only), or CheckpointError saying what is wrong."""
    if not Path(path).exists():
        raise CheckpointError(f"no checkpoint at {path}; train one first, or point --out_dir at a run folder")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); it is truncated or corrupt: "
                              "restore it from a copy or start a new run in another out_dir") from None


def model_from_checkpoint(ckpt):
    """The GPT (LoRA adapters included) whose weights a checkpoint holds, on the CPU."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def check_architecture(ckpt, model_config, path):
    saved = asdict(GPTConfig(**ckpt["model_config"]))  # a checkpoint from before a field existed has its default
    for key, value in asdict(model_config).items():
        if key not in ("dropout", "lora_dropout") and saved[key] != value:
            raise CheckpointError(f"{path} holds a model with {key}={saved[key]} but the "
                                  f"config asks for {key}={value}; use the run's own config to resume it")


def keep_step_checkpoint(ckpt_path, step, keep):
    """Keep last.pt of this step as ckpt_<step>.pt too (a hard link: no copy), and only the newest `keep`."""
    link = ckpt_path.with_name(f"ckpt_{step:07d}.pt")
    link.unlink(missing_ok=True)
    os.link(ckpt_path, link)
    for old in sorted(ckpt_path.parent.glob("ckpt_*.pt"))[:-keep]:
        old.unlink()
