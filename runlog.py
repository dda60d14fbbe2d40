"""What a run writes besides checkpoints: log.jsonl, the console, run.json, loss.png, and wandb if
asked; the run folder's guards: one run per folder (.lock), no new run over an old run's log; and
WriteError, what every write of the run (checkpoints included) raises when a disk is full, read-only
or over a file size limit.

Only the main process writes; on other processes every method does nothing.
"""

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

import memory
import plot
from data import leaked_documents
from model import architecture_options
from preparation.common import alive

SELECTION_RULE = "lowest val loss on the fixed val batches"
CARRIED_ON_RESUME = ("started", "tokens_seen", "final_val_loss", "final_val_loss_se",
                     "best_val_loss", "best_step", "selected_checkpoint", "train_seconds",
                     "target_val_loss", "target_step", "target_tokens", "target_train_seconds",
                     "task", "task_acc", "task_acc_norm", "best_task_acc_norm")
read_log = plot.read_log  # log.jsonl's whole records; in plot.py, which must run without torch


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version():
    """The git commit of this checkout and whether tracked files differ; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


class WriteError(Exception):
    """A file of the run that could not be written (a full disk, a read-only folder, a file size
    limit); the message names the file, the reason and the free space on its disk."""


def write_failed(path, error):
    """The WriteError for `error` while writing `path`, or None if `error` is no I/O error.
    torch.save reports a failed write as a RuntimeError whose context is the OSError."""
    cause = error if isinstance(error, OSError) else error.__context__
    if not isinstance(cause, OSError):
        return None
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 1e9:.2f} GB free on its disk"
    except OSError:
        free = "the free space on its disk unknown"
    return WriteError(f"cannot write {path} ({cause.strerror or cause}; {free})")


@contextlib.contextmanager
def writing(path, tmp=None):
    """Around a write of `path` (through the temporary file `tmp`, renamed over it): a failure
    removes tmp and an I/O error becomes a WriteError."""
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        failed = write_failed(path, e) if isinstance(e, Exception) else None
        if failed is None:
            raise
        raise failed from None


def write_json_atomic(path, data):
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


class RunLog:
    def __init__(self, out_dir, enabled):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.record = {}
        self.wandb = None
        self.said_no_plot = False  # a plot that cannot be drawn is said once, not every evaluation

    def start(self, cfg, meta, device, dtype, world_size, resumed_from, wandb_id, changed=None,
              parent=None, model=None):
        """Write run.json's opening state and, with wandb_log, open (or reopen) the wandb run. A
        resumed run keeps what run.json already says about the run's start, progress and best
        checkpoint, and records the config keys this resume changed ({key: [old, new]}). `parent`:
        the checkpoint the run started from (checkpoint.lineage), or None; `model`: the GPTConfig
        that trains, whose shape and options are the weights' where they come from elsewhere (the
        config's keys left at their defaults say nothing of them then)."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        earlier = self.read_record() if resumed_from is not None else {}
        if resumed_from is not None:
            set_aside_torn_line(self.out_dir / "log.jsonl")
        self.record = {
            "code": code_version(), "config": vars(cfg), "seed": cfg.seed,
            "model": asdict(model) if model else None,
            "data": {k: meta.get(k) for k in ("dataset", "tokenizer", "vocab_size",
                                              "tokenizer_sha256", "source_sha256", "tokens")},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda},
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
            "dtype": str(dtype).removeprefix("torch."), "world_size": world_size,
            "command": shlex.join(["python", *sys.argv]), "started": now(),
            "resumed_from_step": resumed_from, "changed_on_resume": changed, "parent": parent,
            "ended": None, "end_reason": "running", "step": resumed_from or 0, "tokens_seen": 0,
            "final_val_loss": None, "best_val_loss": None, "best_step": None,
            "selected_checkpoint": None, "selection_rule": SELECTION_RULE,
            **{key: earlier[key] for key in CARRIED_ON_RESUME if key in earlier},
        }
        self.write_record()
        if cfg.wandb_log:
            self.wandb = open_wandb(cfg, wandb_id, self.record)

    def log(self, record, console=None):
        """Append a line to log.jsonl (and its numbers to wandb); print `console` if given."""
        if not self.enabled:
            return
        path = self.out_dir / "log.jsonl"
        with writing(path), open(path, "a") as f:  # resume sets aside a line a full disk cut short
            f.write(json.dumps(record) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items()
                       if isinstance(v, (int, float)) and k != "step"}
            self.wandb.log(numbers, step=record["step"])

    def evaluated(self, step, tokens, val_loss, best_val_loss, best_step):
        """Record an evaluation in run.json and redraw loss.png."""
        if not self.enabled:
            return
        self.record.update(step=step, tokens_seen=tokens, final_val_loss=val_loss,
                           best_val_loss=best_val_loss, best_step=best_step,
                           selected_checkpoint="best.pt" if math.isfinite(best_val_loss) else None)
        self.write_record()
        log_path, png_path = self.out_dir / "log.jsonl", self.out_dir / "loss.png"
        try:  # loss.png is a convenience: nothing about drawing it may stop training
            problem = None if plot.draw([log_path], png_path) else plot.MISSING_MATPLOTLIB
        except Exception as e:
            problem = f"warning: loss.png not drawn ({type(e).__name__}: {e}); training goes on"
        if problem and not self.said_no_plot:
            print(problem, flush=True)
            self.said_no_plot = True

    def update(self, **fields):
        """Set fields of run.json (a target reached, test loss, task accuracy, training seconds)."""
        if not self.enabled:
            return
        self.record.update(fields)
        self.write_record()

    def finish(self, step, tokens, reason):
        """Close the run record with why it ended: finished, stopped by a signal, paused at
        stop_iter, diverged."""
        if not self.enabled:
            return
        self.record.update(step=step, tokens_seen=tokens, ended=now(), end_reason=reason)
        self.write_record()
        if self.wandb is not None:
            self.wandb.summary.update({k: self.record[k]
                                       for k in ("end_reason", "best_val_loss", "best_step")})
            self.wandb.finish(exit_code=0 if reason != "diverged" else 1)

    def read_record(self):
        try:
            return json.loads((self.out_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_record(self):
        write_json_atomic(self.out_dir / "run.json", self.record)


def set_aside_torn_line(log_path):
    """A crash or a full disk can leave log.jsonl ending in a cut-short line
    (`{"step": 696, "tokens": 17`); a resumed run appending after it would glue two records into one
    that no reader can parse. Move such a last line (no newline at its end, or not a JSON object) to
    log.jsonl.torn and cut the log back to its last whole line."""
    try:
        data = log_path.read_bytes()
    except FileNotFoundError:
        return
    start = data.rfind(b"\n", 0, len(data) - 1) + 1  # where the last line begins, ended or not
    last = data[start:]
    if not last or (last.endswith(b"\n") and plot.parse_record(last) is not None):
        return
    torn = log_path.with_name(log_path.name + ".torn")
    with writing(torn), open(torn, "ab") as f:
        f.write(last.rstrip(b"\n") + b"\n")
    with writing(log_path):
        os.truncate(log_path, start)
    print(f"{log_path} ended in a torn line (left by a crash or a full disk); moved it to {torn}, "
          "the log goes on after its last whole line", flush=True)


class RunFolderError(Exception):
    """A run folder that another live run holds, or that holds an old run's records; the message
    names the fix."""


class RunFolderLock:
    """out_dir/.lock, JSON {pid, host, started}, held while a run writes there: two runs in one
    folder would interleave log.jsonl and overwrite each other's checkpoints. A hard link makes
    taking it atomic; a lock left by a killed run (this host, its pid gone) is taken over. Two runs
    taking over one stale lock at the same instant are not told apart. Taken before anything else
    looks at the folder, so a run that cannot start learns it at once; a folder the lock had to
    create, and that is still empty at release, is removed."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / ".lock"
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise RunFolderError(f"--out_dir {self.path.parent} is a file, not a folder; "
                                 "choose another --out_dir")
        self.made_folder = not self.path.parent.exists()
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while not self.create(owner):
                self.take_over_if_stale()
        except OSError as e:
            raise RunFolderError(f"cannot take {self.path} ({e.strerror or e}); "
                                 "choose another --out_dir") from None

    def create(self, owner):
        """Create the lock holding `owner`; False if there is one already. The owner is written to a
        file of this process first, then linked as the lock (atomic, and refused if a lock exists),
        so that another run never reads a lock whose owner is not written yet."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(owner))
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def take_over_if_stale(self):
        """Remove the lock if its owner is a process of this host that is gone; otherwise refuse."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host, since = int(owner["pid"]), owner["host"], owner["started"]
        except FileNotFoundError:
            return  # released in the meantime: try again
        except (OSError, ValueError, TypeError, KeyError):
            raise RunFolderError(f"{self.path} cannot be read, so whether another run uses "
                                 f"{self.path.parent} is unknown; if none does, remove the lock "
                                 "file (or choose another --out_dir)") from None
        if host == socket.gethostname() and not alive(pid):
            print(f"taking over {self.path}: its run (pid {pid}, started {since}) is gone",
                  flush=True)
            self.path.unlink(missing_ok=True)
            return
        raise RunFolderError(f"{self.path.parent} is in use by another run (pid {pid} on {host}, "
                             f"since {since}): wait for it to end, or choose another --out_dir, or "
                             f"remove {self.path} if that process is gone")

    def release(self):
        with contextlib.suppress(OSError):  # read-only folder: the next run takes the lock over
            self.path.unlink(missing_ok=True)
        if self.made_folder:
            with contextlib.suppress(OSError):  # rmdir removes only an empty one: nothing written
                self.path.parent.rmdir()


RECORDS = ("log.jsonl", "log.jsonl.torn", "run.json", "loss.png")
CHECKPOINTS = ("last.pt", "last", "best.pt", "best")  # full files, sharded links


def check_fresh_folder(out_dir):
    """A new run's folder. An old run's records there would mix with the new run's in one log and
    one plot: where that run saved a checkpoint, refuse (resume it or choose another folder); where
    it saved none (it failed before its first save), nothing can resume it, so its records are set
    aside in earlier-<n>/."""
    out_dir = Path(out_dir)
    found = [name for name in RECORDS if (out_dir / name).exists()]
    if not found:
        return
    if any((out_dir / name).exists() for name in CHECKPOINTS):
        resume = (", or continue it with --init_from=resume" if (out_dir / "last.pt").exists()
                  else "")
        raise RunFolderError(f"{out_dir} already holds a run's log.jsonl, and a new run would mix "
                             "its records with the old ones: choose another --out_dir, or delete "
                             f"log.jsonl and run.json there{resume}")
    aside = next(out_dir / f"earlier-{n}" for n in range(1, 10**6)
                 if not (out_dir / f"earlier-{n}").exists())
    with writing(aside):
        aside.mkdir()
        for name in found:
            os.replace(out_dir / name, aside / name)
    print(f"note: {out_dir} held the records of a run that saved no checkpoint "
          f"({', '.join(found)}); they are set aside in {aside.name}/, and this run starts afresh")


def new_wandb_id():
    return uuid.uuid4().hex[:12]


def open_wandb(cfg, run_id, record):
    """A wandb run with a stable id, so a resumed training run continues the same wandb run."""
    import wandb  # optional, for wandb_log=True only (checks.check_config made sure it is there)

    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=run_id,
                      resume="allow", config={**vars(cfg), "run": record},
                      dir=str(Path(cfg.out_dir)))


def option_summary(config):
    """The architecture options that train, in a few words (from init_from weights, theirs): the
    string options' values, the on/off ones that are on, the others where not 0."""
    words = []
    for option in architecture_options():
        value = getattr(config, option)
        if isinstance(value, str):
            words.append(value)
        elif isinstance(value, bool):
            words += [option] if value else []
        elif value:
            words.append(f"{option}={value}")
    return ", ".join(words)


def describe(cfg, setup, rt, world_size):
    """The run's opening console lines: model, data, batch, compute, device, memory (train.set_up's
    Setup, a Runtime)."""
    gpt, config = setup.gpt, setup.gpt.config
    n_params, T = gpt.num_params(), config.block_size
    print(f"model: {n_params / 1e6:.2f}M parameters "
          f"({gpt.num_params(False) / 1e6:.2f}M without embeddings), {config.n_layer} layers, "
          f"{config.n_head} heads, {config.n_embd} wide, vocab {config.vocab_size}, context {T}; "
          f"{option_summary(config)}")
    if config.lora_rank:
        trainable = gpt.num_params(trainable_only=True)
        print(f"LoRA: rank {config.lora_rank} adapters on {config.lora_targets}; {trainable:,} "
              f"trainable of {n_params:,} parameters ({100 * trainable / n_params:.2f}%)")
    print(f"data: {cfg.dataset} ({setup.meta['tokenizer']} tokens): "
          f"{setup.train_data.summary} train, {setup.val_data.summary} val")
    tokens_per_step = setup.tokens_per_step
    rows = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.max_iters
    print(f"batch: {cfg.batch_size} x {T} tokens x {cfg.gradient_accumulation_steps // world_size} "
          f"micro-steps x {world_size} process(es) = {tokens_per_step:,} tokens/step; "
          f"{cfg.max_iters} steps = {tokens_per_step * cfg.max_iters / 1e6:.1f}M tokens "
          f"({rows / setup.train_data.rows_per_epoch:.1f} epochs)")
    print(f"compute: 6ND = {6 * n_params * tokens_per_step * cfg.max_iters:.2e} FLOPs; "
          f"{gpt.flops_per_token(T) / 1e6:.1f} MFLOPs per token with attention")
    print(f"device: {rt.describe()}")
    print(*memory.lines(cfg, gpt, rt, world_size), sep="\n")
    if leaked := leaked_documents(setup.meta):
        print(f"warning: {leaked:,} val/test {setup.meta['leakage']['unit']}s of {cfg.dataset} "
              "also occur verbatim in train (meta.json's leakage audit); held-out losses will "
              "flatter the model")
