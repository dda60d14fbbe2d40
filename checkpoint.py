"""What a run's checkpoint holds and how it is written and read: crash-safe saves, one state format
for single-process, DDP and FSDP runs, every process's RNG state, and the checks before a resume.

A checkpoint is a dict: model, optimizer (full state dicts, by parameter name), scaler, step,
data_position (the sampler's whole state), best_val_loss, best_step, rng (one per process),
wandb_id, weights_from, config, model_config, meta, train_seconds. best.pt holds the weights alone
(no optimizer, scaler or rng): the run resumes from last.pt, and a smaller file written off the
training thread keeps evaluations cheap.

Two formats (train.py's checkpoint_format): "full", one file (last.pt) that rank 0 writes with every
tensor gathered to it; and "sharded", a folder (last/) that every process writes its own shards into
with torch.distributed.checkpoint, plus trainer_state.pt (the dict above without model and
optimizer). `last` is a symlink to the newest step's folder (last.0000500/), repointed atomically
once that folder is complete. Both load through load_checkpoint; a sharded checkpoint's tensors are
read with load_sharded_state.
"""

import contextlib
import hashlib
import os
import pickle
import random
import shutil
import threading
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from model import GPT, GPT2_OPTIONS, GPTConfig
from runlog import WriteError, new_wandb_id, write_failed, writing


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            # this process's GPU
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


WHOLE_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model):
    """Model state dict, whole tensors on the CPU; under FSDP gathered to rank 0 (others get {})."""
    return get_model_state_dict(model, options=WHOLE_ON_CPU)


def full_state(model, optimizer):
    """Model and optimizer state dicts with whole tensors, the optimizer's keyed by parameter name.
    Under FSDP they are gathered to rank 0 (others get empty dicts). One format for every run: a
    checkpoint resumes in one process, under DDP or under FSDP, whichever wrote it."""
    return full_weights(model), get_optimizer_state_dict(model, optimizer, options=WHOLE_ON_CPU)


def load_optimizer_state(model, optimizer, state):
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def gather_rng_states(world_size):
    """Every process's RNG state, in rank order: each process draws its own dropout masks."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(states, rank, world_size):
    """This process's saved RNG state. The data order does not depend on the world size, but dropout
    masks do: resuming on another world size continues correctly, though not bitwise like the
    original."""
    if len(states) != world_size and rank == 0:
        print(f"note: resuming {len(states)} process(es)' run on {world_size}; dropout masks will "
              "differ from an uninterrupted run")
    return states[rank % len(states)]


def save_checkpoint(path, state):
    """Atomic save: write a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    folder. A crash at any instant leaves the old or the new checkpoint, never a torn one; a failed
    write (runlog.WriteError: a full disk, a file size limit) removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: never shared by two
    with writing(path, tmp):
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


class BackgroundSaver:
    """Writes one checkpoint at a time on a thread of its own, so training goes on meanwhile; a
    failed write is raised by the next save or by wait()."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, path, state):
        self.wait()
        self.thread = threading.Thread(target=self._save, args=(path, state), daemon=True)
        self.thread.start()

    def _save(self, path, state):
        try:
            save_checkpoint(path, state)
        except BaseException as e:  # raised on the training thread, at the next save or wait()
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def checkpoint_path(out_dir, name, checkpoint_format):
    """out_dir/last.pt or out_dir/last (a sharded checkpoint's link), for name last or best."""
    return Path(out_dir) / (name if checkpoint_format == "sharded" else f"{name}.pt")


def save_sharded(link, model, optimizer, trainer_state, rank, keep=1):
    """Every process writes its shards of the model (and, given, the optimizer) into link's step
    folder, rank 0 adds trainer_state.pt, then points `link` at the folder: a crash leaves the link
    at the previous, complete one. The `keep` newest step folders stay (keep_last_k's periodic
    checkpoints), older ones are removed."""
    folder = link.with_name(f"{link.name}.{trainer_state['step']:07d}")
    if rank == 0 and folder.exists():  # a resumed run saving again at a step saved before its crash
        shutil.rmtree(folder)
    if dist.is_initialized():
        dist.barrier()
    tensors = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        tensors["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with one_process_quietly():
        try:
            # a collective: returns once every process's shards are written
            dcp.save(tensors, checkpoint_id=folder)
        except CheckpointException as e:  # raised in every process, with each one's error
            written = failed_sharded_save(folder, e)
            if written is None:
                raise
            raise written from None
    if rank == 0:
        try:
            save_checkpoint(folder / "trainer_state.pt", trainer_state)
        except WriteError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        tmp = link.with_name(f".{link.name}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name)
        os.replace(tmp, link)
        for old in sorted(link.parent.glob(f"{link.name}.[0-9]*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def failed_sharded_save(folder, error):
    """The WriteError for a sharded save that some process could not write (a full disk, a file size
    limit), its partial step folder removed (the link still names the last complete one); None for
    another failure."""
    written = [write_failed(folder, cause) for cause, _ in error.failures.values()]
    shutil.rmtree(folder, ignore_errors=True)
    return next((w for w in written if w is not None), None)


@contextlib.contextmanager
def one_process_quietly():
    """torch.distributed.checkpoint warns whenever it runs with no process group: intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message="torch.distributed is .*unavailable or uninitialized")
        yield


# What a sharded checkpoint's .metadata may name: torch.distributed.checkpoint reads that file with
# a plain pickle.load, which would run whatever code a planted file names, so it is vetted first
# with only these.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta",
                                              "TensorProperties", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},  # and the dtypes (find_class)
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    # Python 3.13's name
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class MetadataUnpickler(pickle.Unpickler):
    """pickle's Unpickler that builds only METADATA_GLOBALS' classes and torch's dtypes, refusing
    the rest."""

    def find_class(self, module, name):
        allowed = name in METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def vet_sharded(folder):
    """CheckpointError unless .metadata holds checkpoint metadata alone (nothing it names runs)."""
    try:
        with open(Path(folder) / ".metadata", "rb") as f:
            MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 -- what a damaged or crafted file raises becomes one line
        raise CheckpointError(f"{folder}/.metadata is not a sharded checkpoint's metadata "
                              f"({type(e).__name__}: {e}); nothing in it was run; "
                              f"{OWN_CHECKPOINTS}") from None


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """Reads the non-tensor values of a sharded checkpoint (the optimizer's settings) as
    torch.load's weights_only does, where torch's planner would unpickle anything."""

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"a sharded checkpoint's {read_item.dest_index.fqn} is not plain "
                                  "data (tensors, numbers, strings), so it was not loaded; "
                                  f"{OWN_CHECKPOINTS}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def load_sharded_state(folder, model, optimizer=None):
    """Read a sharded checkpoint's model (and optimizer) state into `model` as it is now, sharded or
    not, on any number of processes: torch.distributed.checkpoint reshards what was saved to what is
    asked. Its metadata and values are vetted first: nothing in the folder runs code."""
    vet_sharded(folder)
    tensors = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        tensors["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with one_process_quietly():
        try:
            dcp.load(tensors, checkpoint_id=folder, planner=WeightsOnlyPlanner())
        except CheckpointException as e:  # dcp gathers all processes' failures: one refusal is said
            refused = [error for error, _ in e.failures.values()
                       if isinstance(error, CheckpointError)]
            if not refused:
                raise
            raise refused[0] from None
    set_model_state_dict(model, tensors["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, tensors["optimizer"])


def saved_checkpoint(out_dir, name):
    """out_dir's checkpoint `name` (last or best): the newer of the file name.pt and the sharded
    folder name (a run may switch checkpoint_format on resuming), or name.pt if neither exists."""
    saved = [path for path in (Path(out_dir) / f"{name}.pt", Path(out_dir) / name) if path.exists()]
    return (max(saved, key=lambda p: state_file(p).stat().st_mtime) if saved
            else Path(out_dir) / f"{name}.pt")


def checkpoint_to_resume(out_dir, resume):
    """The last checkpoint's contents when resuming; otherwise None, refusing to start over a run
    already there."""
    last = saved_checkpoint(out_dir, "last")
    if resume:
        return load_checkpoint(last)
    if last.exists():
        raise CheckpointError(f"{out_dir} already holds a run ({last.name}); continue it with "
                              "--init_from=resume or choose another --out_dir")
    return None


def state_file(path):
    return Path(path) / "trainer_state.pt" if Path(path).is_dir() else Path(path)


OWN_CHECKPOINTS = ("pass a last.pt or best.pt that train.py wrote (GPT-2 weights from elsewhere "
                   "load from a Hugging Face folder: --init_from=FOLDER)")


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's contents (tensors and plain values only) plus `path`, or CheckpointError
    saying what is wrong. A sharded one's has `sharded` (its folder) in place of model and
    optimizer."""
    if not Path(path).exists():
        raise CheckpointError(f"no checkpoint at {path}; train one first, or name a run folder "
                              "that holds one")
    file = state_file(path)
    if not file.exists():
        what = ("a Hugging Face folder (config.json)" if (Path(path) / "config.json").exists()
                else "a folder")
        raise CheckpointError(f"{path} is {what}, not a checkpoint; name a run folder or a "
                              "checkpoint that train.py wrote")
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        # whole, but more than weights
        if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(file):
            raise CheckpointError(f"{path} is a whole file but holds Python objects besides "
                                  "tensors and plain values, which are not loaded (torch.load's "
                                  "weights_only), so another program wrote it; "
                                  f"{OWN_CHECKPOINTS}") from None
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); it is truncated or "
                              "corrupt: restore it from a copy or start a new run in another "
                              "out_dir") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        nanogpt = isinstance(ckpt, dict) and "model_args" in ckpt
        layout = "nanoGPT's layout: model_args, no model_config" if nanogpt else "no model_config"
        raise CheckpointError(f"{path} is not a checkpoint of this trainer ({layout});"
                              f" {OWN_CHECKPOINTS}")
    return {**ckpt, "path": Path(path),
            **({"sharded": Path(path).resolve()} if Path(path).is_dir() else {})}


def parent_checkpoint(init_from, name="best"):
    """The checkpoint of this trainer that init_from names, for a new run to start from (or
    sample.py to read): a checkpoint file, a sharded checkpoint folder, or a run folder (its
    checkpoint `name`); None where it names none (a Hugging Face folder holds config.json)."""
    path = Path(init_from)
    if path.is_file() or (path / "trainer_state.pt").is_file():
        return path
    if path.is_dir() and not (path / "config.json").exists():
        return saved_checkpoint(path, name)
    return None


def lineage(path, ckpt):
    """What a run started from a checkpoint records of it: the parent run's folder, the checkpoint,
    its step and sha256 (of the file; of a sharded folder's files in name order)."""
    digest, path = hashlib.sha256(), Path(path).resolve()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return {"run": str(path.parent), "checkpoint": str(path), "step": ckpt["step"],
            "sha256": digest.hexdigest()}


def saved_config(model_config):
    """The GPTConfig of a checkpoint's model_config: an option it lacks is newer, so GPT-2's."""
    return GPTConfig(**{**GPT2_OPTIONS, **model_config})


def model_from_checkpoint(ckpt):
    """The GPT (LoRA adapters included) whose weights a checkpoint holds, on the CPU; a sharded
    checkpoint's shards are gathered into it (in one process)."""
    model = GPT(saved_config(ckpt["model_config"]))
    if ckpt.get("sharded"):
        load_sharded_state(ckpt["sharded"], model)
    else:
        load_weights(model, ckpt["model"], ckpt["path"])
    return model


def load_weights(model, weights, path):
    """Load a checkpoint's weights into `model`, or CheckpointError naming the misfit tensors."""
    expected = model.state_dict()
    wrong = {"lacks": [name for name in expected if name not in weights],
             "has unexpected": [name for name in weights if name not in expected],
             "has a different shape of": [name for name, t in expected.items()
                                          if name in weights and weights[name].shape != t.shape]}
    found = [f"{what} {', '.join(names[:3])}"
             f"{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
             for what, names in wrong.items() if names]
    if found:
        raise CheckpointError(f"{path} does not fit the model its model_config describes: it "
                              f"{'; it '.join(found)}; it is damaged: restore it from a copy or "
                              "start a new run in another out_dir")
    model.load_state_dict(weights)


def keep_step_checkpoint(ckpt_path, step, keep):
    """Keep last.pt of this step as ckpt_<step>.pt too (a hard link: no copy), and only the newest
    `keep`."""
    link = ckpt_path.with_name(f"ckpt_{step:07d}.pt")
    with writing(link):
        link.unlink(missing_ok=True)
        os.link(ckpt_path, link)
    for old in sorted(ckpt_path.parent.glob("ckpt_*.pt"))[:-keep]:
        old.unlink()


# ---- the training state, and writing a run's checkpoints ----

@dataclass
class TrainingState:
    """Where training stands. A checkpoint saves it with every process's RNG (each draws its own
    dropout masks), and a resume restores both, so that the run goes on as if never stopped."""

    step: int = 0  # optimizer updates done
    data_position: int = 0  # micro-batches drawn over all processes: the sampler's whole state
    best_val_loss: float = float("inf")
    best_step: int | None = None  # the step best.pt holds
    wandb_id: str = field(default_factory=new_wandb_id)  # a resumed run continues its wandb run
    train_seconds: float = 0.0  # time in optimizer steps (evaluations, samples and saves excluded)
    stale_evals: int = 0  # evaluations since the val loss last improved by early_stop_min_delta
    skipped_in_a_row: int = 0  # the divergence guard's: consecutive non-finite updates skipped
    recent_grad_norms: list = field(default_factory=list)  # its: the last 100 applied grad norms
    loss_ema: float | None = None  # its: running average of the applied updates' losses

    @classmethod
    def start(cls, cfg, ckpt, rank, world_size):
        """A new run's state or the one `ckpt` saved, with this process's RNG seeded or restored."""
        torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks
        if ckpt is None:
            return cls()
        set_rng_state(restore_rng(ckpt["rng"], rank, world_size))
        # the entries after wandb_id are absent in older checkpoints
        return cls(ckpt["step"], ckpt["data_position"], ckpt["best_val_loss"], ckpt["best_step"],
                   ckpt["wandb_id"], ckpt.get("train_seconds", 0.0), ckpt.get("stale_evals", 0),
                   ckpt.get("skipped_in_a_row", 0), ckpt.get("recent_grad_norms", []),
                   ckpt.get("loss_ema"))

    def to_checkpoint(self, world_size):
        """The checkpoint entries for this state (a collective: every process's RNG is gathered)."""
        return {"step": self.step, "data_position": self.data_position,
                "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                "rng": gather_rng_states(world_size), "wandb_id": self.wandb_id,
                "train_seconds": self.train_seconds, "stale_evals": self.stale_evals,
                "skipped_in_a_row": self.skipped_in_a_row,
                "recent_grad_norms": self.recent_grad_norms, "loss_ema": self.loss_ema}


def write_checkpoint(name, run):
    """Save `run`'s (train.Run) `last` (all a resume needs) or `best` (the weights alone; as one
    file, written off the training thread) in checkpoint_format. Every process takes part. The
    training thread's time is logged as ckpt_s."""
    cfg, setup, state, rank, world_size = run.cfg, run.setup, run.state, run.rank, run.world_size
    start = time.perf_counter()
    path, last = checkpoint_path(cfg.out_dir, name, cfg.checkpoint_format), name == "last"
    progress = (state.to_checkpoint(world_size) if last
                else {"step": state.step, "best_val_loss": state.best_val_loss})
    described = {"weights_from": setup.weights_from, "parent": setup.parent, "config": vars(cfg),
                 "model_config": asdict(setup.gpt.config), "meta": setup.meta, **progress}
    if last:
        described["scaler"] = setup.scaler.state_dict() if setup.scaler.is_enabled() else None
    if cfg.checkpoint_format == "sharded":
        save_sharded(path, setup.gpt, setup.optimizer if last else None, described, rank,
                     1 + cfg.keep_last_k)
    elif last:
        model_state, optimizer_state = full_state(setup.gpt, setup.optimizer)
        if world_size > 1:
            dist.barrier()  # every process has finished the step before its state is written
        if rank == 0:
            save_checkpoint(path, {"model": model_state, "optimizer": optimizer_state, **described})
            if cfg.keep_last_k:
                keep_step_checkpoint(path, state.step, cfg.keep_last_k)
    else:
        weights = full_weights(setup.gpt)  # copied below: training goes on while the thread writes
        if rank == 0:
            setup.best_saver.save(path, {"model": {k: t.clone() for k, t in weights.items()},
                                         **described})
    run.log.log({"step": state.step, "checkpoint": path.name,
                 "ckpt_s": time.perf_counter() - start})


def how_to_go_on(cfg, fix):
    """The end of a stopped run's error line: `fix`, then resume from its last checkpoint or, where
    none was saved, start again (a new run sets old records aside: runlog.check_fresh_folder)."""
    last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
    if last.exists():
        return f"{last} is the last good checkpoint; {fix}, then resume with --init_from=resume"
    return f"no checkpoint was saved; {fix}, then start again (a new run sets these records aside)"


def end_on_write_failure(error, run):
    """The line a failed write (a full disk, a read-only folder, a file size limit) ends `run`
    (train.Run) with, once best.pt's writer has finished (removing its temporary file if it failed
    too) and run.json says why, if it can still be written."""
    cfg, setup, state, log = run.cfg, run.setup, run.state, run.log
    with contextlib.suppress(WriteError):
        setup.best_saver.wait()
    try:
        log.finish(state.step, state.step * setup.tokens_per_step, f"write failed: {error}")
        recorded = "run.json records why"
    except WriteError:
        recorded = "run.json could not be written either, so it still says running"
    return (f"{error}; the run stopped at step {state.step}, {recorded};"
            f" {how_to_go_on(cfg, 'make room')}")
