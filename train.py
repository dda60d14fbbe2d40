"""Train a GPT: `python train.py [config/x.py ...] [--key=value ...]`, or under torchrun for several processes.

Read top to bottom: the config (every key with its default and meaning; the device keys come from
devices.RuntimeConfig, the architecture options from model.GPTConfig), the schedule (`lr_at`), `set_up` (data,
model, optimizer), `train_step` (one optimizer step, the heart of it), the loop's pieces (evaluation, samples,
the loader thread's batches), `train_loop`, then `train` (processes) and `main` (exit codes: 2 for refused
input, 1 for a diverged run or a failed write). Around it, each owning one thing: checks.py (the keys' ranges;
on resume, what the checkpoint fixes and what may change), parallel.py (DDP and FSDP), monitor.py (the
divergence guard, progress lines, stop signals), checkpoint.py (TrainingState and writing checkpoints),
runlog.py (the run's records).
"""

import contextlib
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import runlog
from checkpoint import (
    BackgroundSaver,
    CheckpointError,
    TrainingState,
    checkpoint_path,
    checkpoint_to_resume,
    load_checkpoint,
    load_optimizer_state,
    load_sharded_state,
    load_weights,
    model_from_checkpoint,
    write_checkpoint,
)
from checks import EVAL_BATCH_KEYS, OPTIMIZER_SETTINGS, check_config, check_precision, check_same_data, resume_changes
from configurator import ConfigError, load_config
from data import (
    DataError,
    Examples,
    Tokenizer,
    Windows,
    get_tokenizer,
    has_split,
    is_gpt2_bpe,
    leaked_documents,
    prepare_default,
    read_meta,
)
from devices import Runtime, RuntimeConfig, runtime
from eval import evaluate_task, load_task
from hf import WeightsError, load_gpt2
from model import GPT, GPTConfig, architecture_options
from monitor import Diverged, DivergenceGuard, catch_stop_signals, log_progress, stop_requested
from optimizers import configure_optimizer
from parallel import distribute, gradient_sync, join, place

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
# the run and its data
out_dir = "out"  # run folder: last.pt, best.pt, log.jsonl
init_from = "scratch"  # scratch, resume (continue out_dir/last.pt), or GPT-2 weights: gpt2 ... gpt2-xl, a HF folder
data_root = "data"  # folder that holds the prepared datasets
dataset = "python_stdlib"  # data_root/<dataset>, written by prepare.py (the default is prepared on first use)
seed = 1337  # seeds weights, dropout and the order of training batches
# batches
batch_size = 16  # sequences per micro-batch, per process
block_size = 128  # context length in tokens
gradient_accumulation_steps = 1  # micro-batches per optimizer step over all processes (divided by world size)
# model
# (the architecture options are model.GPTConfig's, listed last in --help with GPT-2's values as defaults;
# these three are set here: with Muon they reach the default run's val loss in under half the time, RESULTS.md)
pos_embedding = "rope"  # learned (a position table, GPT-2) or rope (rotary embeddings)
mlp = "relu2"  # MLP activation: gelu (GPT-2), relu2 (squared ReLU) or swiglu (gated, same parameter count)
qk_norm = True  # RMS-normalise each head's queries and keys before attention
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream
dropout = 0.0  # dropout on attention, residual branches and embeddings
bias = False  # biases in Linear layers and LayerNorms
vocab_size = 0  # model vocabulary; 0 takes the dataset's, a larger value pads it (e.g. 50304 for GPT-2 BPE)
# optimizer: Muon and AdamW, with warmup and decay
learning_rate = 3e-3  # peak learning rate, reached after warmup
min_lr = 1e-4  # floor the decay ends at
max_iters = 1100  # optimizer steps in the run
warmup_iters = 50  # steps of linear warmup from 0
lr_decay_iters = 0  # step where the decay reaches min_lr; 0 means max_iters
lr_schedule = "cosine"  # after warmup: cosine (decays all the way) or wsd (constant, then a linear cooldown)
cooldown_frac = 0.4  # wsd: share of the steps between warmup and lr_decay_iters that the linear cooldown takes
embedding_lr = 0.0  # peak lr of the token, position and value embeddings; 0 means learning_rate
head_lr = 0.0  # peak lr of an untied LM head (tie_embeddings=False); 0 means learning_rate
weight_decay = 0.1  # applied to 2-D weights and embeddings only
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
optimizer = "muon"  # muon: Muon for the blocks' weight matrices, AdamW for embeddings, head and 1-D weights; or adamw
muon_lr = 0.02  # with optimizer=muon: the peak learning rate of the Muon matrices (same warmup and decay)
muon_split = "head"  # with optimizer=muon: orthogonalise strips one head wide (less work on a CPU), or whole matrices
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables clipping (the norm is still logged)
# evaluation, logging, checkpoints
eval_interval = 250  # steps between evaluations on the fixed held-out batches (best.pt, weights only, follows val)
eval_iters = 20  # batches per split in each evaluation
val_tokens = 0  # > 0: val is the val split's first val_tokens tokens in contiguous windows (the speedrun measure)
allow_new_eval_batches = False  # resume with other batch_size, eval_iters or val_tokens (so other val batches)
log_interval = 10  # steps between train lines in the console and log.jsonl
ckpt_interval = 250  # steps between saves of last.pt (it is also saved when the run ends or stops)
sample_interval = 500  # steps between text samples written to the log; 0 turns them off
sample_tokens = 200  # length of each sample in tokens
sample_temperature = 0.8  # temperature of those samples (top-k 200); 0 is greedy
stop_iter = 0  # stop after this step (saving last.pt) without changing the schedule; 0 runs to max_iters
target_val_loss = 0.0  # stop at the first evaluation whose val loss is at or below this (time to target); 0 is off
early_stop_patience = 0  # stop after this many evaluations without a new best val loss (by min_delta); 0 is off
early_stop_min_delta = 0.0  # how much lower than the best so far a val loss must be to count as improving
task_eval = ""  # multiple-choice task scored while training: hellaswag or a JSON Lines file (see eval.py); empty: off
task_eval_interval = 0  # steps between task evaluations; 0 means eval_interval
task_eval_examples = 200  # the task's first N examples are scored each time; 0 scores all
# system
# (the device keys are devices.RuntimeConfig's, listed after train.py's own in --help)
parallel = "ddp"  # under torchrun: ddp (a replica per process) or fsdp (FSDP2 shards parameters, grads, optimizer)
# safety and records
checkpoint_format = "full"  # full: files rank 0 writes (last.pt, best.pt); sharded: folders (last, best) of all shards
keep_last_k = 0  # also keep the k newest periodic checkpoints (ckpt_<step>.pt; sharded: last.<step>); 0 keeps the last
max_skipped_steps = 25  # stop the run after this many consecutive updates skipped for non-finite values
loss_spike_factor = 1.5  # warn when a step's loss exceeds this multiple of its running average
# fine-tuning (SFT data comes from `prepare.py sft`; its prompt tokens are never trained)
lora_rank = 0  # > 0 trains low-rank adapters (LoRA) of this rank and freezes every other weight
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "attn,mlp"  # projections that get adapters: attn (c_attn, c_proj), mlp (c_fc, c_proj), or both
pack_examples = False  # SFT: rows of whole examples back to back (attention crosses them), not one padded per row
# Weights & Biases
wandb_log = False  # also send the logged metrics to Weights & Biases (needs `pip install wandb`)
wandb_project = "gpt"  # wandb project name
wandb_run_name = ""  # wandb run name; empty lets wandb choose
# ---- end of config ----


# ---- schedule ----

def lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr, schedule="cosine", cooldown_frac=0.4):
    """Learning rate for the update that follows `it` completed updates: linear warmup, then to min_lr at
    decay_iters either by a cosine or (wsd, warmup-stable-decay) by holding the peak and falling linearly over the
    last cooldown_frac of the steps after warmup."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    if schedule == "wsd":
        return min_lr + min(1.0, (1.0 - progress) / cooldown_frac) * (learning_rate - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def schedule_lr(cfg, it):
    """lr_at with the config's schedule keys."""
    return lr_at(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr,
                 cfg.lr_schedule, cfg.cooldown_frac)


# ---- the architecture, the data ----


def architecture(cfg, meta, weights_from, ckpt):
    """(GPTConfig, pretrained state dict or None). A resume keeps the checkpoint's (resume_changes has refused a
    config asking for another); from scratch the config's keys decide; with GPT-2 weights their config.json
    does, the position table cropped to block_size. Dropout and the LoRA keys always come from the config."""
    tuning = {"dropout": cfg.dropout, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "lora_targets": cfg.lora_targets}
    if ckpt is not None:
        return replace(GPTConfig(**ckpt["model_config"]), **tuning), None
    if weights_from == "scratch":
        vocab = cfg.vocab_size or meta["vocab_size"]
        if vocab < meta["vocab_size"]:
            raise ConfigError(f"vocab_size {vocab} is smaller than the dataset's {meta['vocab_size']}; use 0 or more")
        options = {option: getattr(cfg, option) for option in architecture_options()}
        return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, bias=cfg.bias, **options, **tuning), None
    if not is_gpt2_bpe(meta):
        raise ConfigError(f"GPT-2 weights read GPT-2 BPE tokens, but {cfg.dataset} holds {meta['tokenizer']} tokens; "
                          "prepare the data with --tokenizer gpt2")
    try:
        pretrained = load_gpt2(weights_from, dropout=cfg.dropout)
    except WeightsError as e:
        raise ConfigError(str(e)) from None
    if cfg.block_size > pretrained.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the {pretrained.config.block_size} positions of "
                          f"{weights_from}; use --block_size={pretrained.config.block_size} or less")
    state = pretrained.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size]
    return replace(pretrained.config, block_size=cfg.block_size, **tuning), state


def load_data(cfg, local_rank, world_size):
    """The dataset's folder and meta, preparing the embedded default on first use (by one process per
    machine while the others wait; if it fails every process stops with its error)."""
    data_dir = Path(cfg.data_root) / cfg.dataset
    if cfg.dataset == "python_stdlib" and not (data_dir / "meta.json").exists():
        error = prepare_default(data_dir) if local_rank == 0 else None
        errors = [error]
        if world_size > 1:
            errors = [None] * world_size
            dist.all_gather_object(errors, error)
        if any(errors):
            raise DataError(next(e for e in errors if e))
    return data_dir, read_meta(data_dir)


# ---- setup: the model, its optimizer and the data ----

@dataclass
class Setup:
    """What the loop trains with, built once by set_up."""

    gpt: GPT  # the model whose weights train and are saved (FSDP-sharded under parallel=fsdp)
    model: torch.nn.Module  # what runs it: gpt compiled, DDP-wrapped, or gpt itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; disabled for other dtypes
    train_data: Windows | Examples
    val_data: Windows | Examples
    eval_batches: dict  # split -> the fixed (x, y) batches of every evaluation
    test_batches: dict  # {"test": batches} when the dataset has a test split, scored once at the end; else {}
    task_examples: list  # task_eval's examples (eval.load_task), or [] without task_eval
    meta: dict  # the dataset's meta.json
    tokenizer: Tokenizer | None  # the data's, for samples and task_eval; None when the run uses neither
    weights_from: str  # scratch or the GPT-2 source the run's weights started from (a resume keeps it)
    tokens_per_step: int  # over all micro-batches and processes
    best_saver: BackgroundSaver  # writes best.pt off the training thread


def set_up(cfg, ckpt, rt, rank, local_rank, world_size):
    """The data; the model (given its pretrained or resumed weights), sharded, compiled or DDP-wrapped as
    configured; its optimizer and loss scaler (with their resumed state)."""
    data_dir, meta = load_data(cfg, local_rank, world_size)
    if ckpt is not None:
        check_same_data(ckpt, meta, data_dir)
    weights_from = ckpt["weights_from"] if ckpt else cfg.init_from
    model_config, pretrained_state = architecture(cfg, meta, weights_from, ckpt)
    try:
        train_data, val_data, eval_batches, test_batches = load_batches(cfg, data_dir, meta, model_config)
        eval_batches, test_batches = (own_share_on_device(held, rt.device, rank, world_size)
                                      for held in (eval_batches, test_batches))
    except (MemoryError, torch.OutOfMemoryError):
        raise ConfigError(f"the fixed evaluation batches ({cfg.eval_iters} x {cfg.batch_size} rows of "
                          f"{model_config.block_size} tokens per split, or val_tokens {cfg.val_tokens}) do not fit in "
                          "memory; lower --batch_size, --eval_iters or --val_tokens") from None
    task_examples = load_task(cfg.task_eval, cfg.task_eval_examples) if cfg.task_eval else []
    # a tokenizer that cannot load (an unknown one, GPT-2's offline without a cache) fails now, not at a sample
    tokenizer = get_tokenizer(meta) if cfg.sample_interval or cfg.task_eval else None

    torch.manual_seed(cfg.seed)  # the same initial weights in every process (FSDP shards them as they are)
    gpt = GPT(model_config).to(rt.device)
    if pretrained_state is not None:  # LoRA adapters, not in the pretrained weights, keep their initial values
        gpt.load_state_dict({**gpt.state_dict(), **pretrained_state})
    if ckpt is not None and not ckpt.get("sharded"):
        load_weights(gpt, ckpt["model"], ckpt["path"])
    model = distribute(gpt, rt, cfg.parallel, world_size)  # (before the optimizer: FSDP's shards are its params)
    try:
        optimizer = configure_optimizer(gpt, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                        rt.device_type, cfg.muon_lr if cfg.optimizer == "muon" else None,
                                        cfg.embedding_lr or None, cfg.head_lr or None, cfg.muon_split)
    except ValueError as e:  # a head_lr for a tied head
        raise ConfigError(str(e)) from None
    scaler = rt.grad_scaler()
    if ckpt is not None:
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if ckpt.get("sharded"):  # read as the model now is: sharded or whole, on any number of processes
            load_sharded_state(ckpt["sharded"], gpt, optimizer)
        else:
            load_optimizer_state(gpt, optimizer, ckpt["optimizer"])
        # loading also set the saved settings: the state (moments, step counts) resumes, but the settings are
        # the config's, so that a changed learning rate, weight decay or beta takes effect (OPTIMIZER_SETTINGS)
        for group, settings in zip(optimizer.param_groups, configured):
            group.update(settings)
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
    tokens_per_step = cfg.batch_size * model_config.block_size * cfg.gradient_accumulation_steps
    return Setup(gpt, model, optimizer, scaler, train_data, val_data, eval_batches, test_batches, task_examples,
                 meta, tokenizer, weights_from, tokens_per_step, BackgroundSaver())


def load_batches(cfg, data_dir, meta, model_config):
    """(train data, val data, the fixed evaluation batches of train and val, the test split's or {})."""
    block_size, vocab = model_config.block_size, model_config.vocab_size
    if meta.get("format") == "sft":
        if cfg.val_tokens:
            raise ConfigError("val_tokens measures a token stream, but this dataset holds SFT examples; leave it 0")
        train_data = Examples(data_dir, "train", block_size, vocab, cfg.pack_examples)
        val_data = Examples(data_dir, "val", block_size, vocab)
    else:
        train_data = Windows(data_dir, "train", block_size, vocab)
        val_data = Windows(data_dir, "val", block_size, vocab)
    eval_batches = {"train": train_data.fixed_batches(cfg.eval_iters, cfg.batch_size),
                    "val": (val_data.leading_batches(cfg.val_tokens, cfg.batch_size) if cfg.val_tokens
                            else val_data.fixed_batches(cfg.eval_iters, cfg.batch_size))}
    test_batches = {}
    if has_split(data_dir, "test"):
        test_data = (Examples if meta.get("format") == "sft" else Windows)(data_dir, "test", block_size, vocab)
        test_batches = {"test": test_data.fixed_batches(cfg.eval_iters, cfg.batch_size)}
    return train_data, val_data, eval_batches, test_batches


def own_share_on_device(batches, device, rank, world_size):
    """{split: fixed batches} with this process's share (the ones estimate_loss reads here: every world_size-th
    from rank) moved to the device once, so that each evaluation reads them there, with no copies from pageable
    memory."""
    return {split: [(x.to(device), y.to(device)) if i % world_size == rank else (x, y) for i, (x, y) in enumerate(held)]
            for split, held in batches.items()}


# ---- one optimizer step ----

def train_step(model, optimizer, scaler, autocast, batches, lr, grad_clip):
    """One optimizer step over a list of (x, y) micro-batches, in five moves: zero the gradients, forward
    and backward each micro-batch (its loss scaled by their count), clip, step the optimizer at this lr.

    Returns (mean loss, gradient norm before clipping, whether the update was applied). A non-finite loss
    or gradient skips the update, so a divergence never reaches the weights; reading the two values for
    that check is the step's one host-device sync. Gradients stay in place until the next call.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for micro, (x, y) in enumerate(batches):
        with gradient_sync(model, enabled=micro == len(batches) - 1):
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / len(batches)).backward()
        loss_sum += loss.detach()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss_sum)  # every process then takes the same skip decision
        loss_sum /= dist.get_world_size()  # (a sum: gloo has no average)
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip:  # (with no clipping the norm is still logged, and no gradient is rescaled by 1.0)
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    loss_value, norm = torch.stack([loss_sum / len(batches), grad_norm.float()]).tolist()
    applied = math.isfinite(loss_value) and math.isfinite(norm)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if applied:
        scaler.step(optimizer)
    scaler.update()
    return loss_value, norm, applied


# ---- the run: what the loop's pieces share ----

@dataclass
class Run:
    """What every piece of the loop reads, built once by train(): the config, the runtime (device, precision,
    compile), the set-up, the training state, the run's records, and this process's place among the others."""

    cfg: SimpleNamespace
    rt: Runtime
    setup: Setup
    state: TrainingState
    log: runlog.RunLog
    rank: int = 0
    world_size: int = 1


# ---- the loop's pieces: evaluation, samples, batches ----

@torch.no_grad()
def estimate_loss(model, batches, device, autocast, rank=0, world_size=1):
    """{split: (mean loss, its standard error)} over fixed batches per split, in eval mode (no dropout); the
    standard error is the batch losses' standard deviation over sqrt(batches): the noise in comparing two
    evaluations. Processes share the batches; each runs the same number of forward passes (FSDP gathers
    parameters in every one), the surplus ones counting zero."""
    model.eval()
    losses = {}
    for split, split_batches in batches.items():
        total = torch.zeros(3, device=device)  # sum of losses, of their squares, count
        for i in range(rank, math.ceil(len(split_batches) / world_size) * world_size, world_size):
            x, y = split_batches[min(i, len(split_batches) - 1)]
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            weight = float(i < len(split_batches))
            total += torch.stack([loss.float(), loss.float() ** 2, torch.tensor(1.0, device=device)]) * weight
        if world_size > 1:
            dist.all_reduce(total)
        loss_sum, square_sum, n = total.tolist()
        mean = loss_sum / n
        variance = max(square_sum / n - mean ** 2, 0.0) * n / (n - 1) if n > 1 else 0.0
        losses[split] = mean, math.sqrt(variance / n)
    model.train()
    return losses


def evaluate(run):
    """Log the losses on the fixed batches; a new best val loss saves best.pt (the weights alone). Counts the
    evaluations without an improvement of early_stop_min_delta, and records reaching target_val_loss."""
    cfg, setup, state, log = run.cfg, run.setup, run.state, run.log
    losses = estimate_loss(setup.model, setup.eval_batches, run.rt.device, run.rt.autocast(), run.rank,
                           run.world_size)
    (train_loss, _), (val, val_se) = losses["train"], losses["val"]
    tokens = state.step * setup.tokens_per_step
    log.log({"step": state.step, "tokens": tokens, "train_seconds": state.train_seconds, "train_loss": train_loss,
             "val_loss": val, "val_loss_se": val_se, "val_ppl": math.exp(min(val, 50.0))},
            f"step {state.step}: eval train {train_loss:.4f}, val {val:.4f} ± {val_se:.4f}")
    if state.step > 0:  # the untrained model is neither a candidate nor a reference
        improved = val < state.best_val_loss - cfg.early_stop_min_delta
        state.stale_evals = 0 if improved else state.stale_evals + 1
    if val < state.best_val_loss and state.step > 0:
        if cfg.target_val_loss and val <= cfg.target_val_loss < state.best_val_loss:
            log.log({"step": state.step, "tokens": tokens, "train_seconds": state.train_seconds,
                     "target_val_loss": cfg.target_val_loss, "reached_target": True},
                    f"step {state.step}: val {val:.4f} reached target_val_loss {cfg.target_val_loss} after "
                    f"{tokens:,} tokens and {state.train_seconds:.1f} s of training steps")
            log.update(target_val_loss=cfg.target_val_loss, target_step=state.step, target_tokens=tokens,
                       target_train_seconds=state.train_seconds)
        state.best_val_loss, state.best_step = val, state.step
        write_checkpoint("best", run)
    log.evaluated(state.step, tokens, val, state.best_val_loss, state.best_step)
    log.update(final_val_loss_se=val_se, train_seconds=state.train_seconds)


def stop_reason(cfg, state):
    """Why the run should stop now by its rules (target_val_loss, early_stop_patience), or None."""
    if cfg.target_val_loss and state.best_val_loss <= cfg.target_val_loss:
        val, step = state.best_val_loss, state.best_step
        return f"reached target_val_loss {cfg.target_val_loss} (val {val:.4f} at step {step})"
    if cfg.early_stop_patience and state.stale_evals >= cfg.early_stop_patience:
        return (f"early stop: {state.stale_evals} evaluations without improving val loss by more than "
                f"{cfg.early_stop_min_delta}; best at step {state.best_step}")
    return None


def evaluate_on_task(run):
    """Score the multiple-choice task (eval.py's rule) with the current weights and log its accuracy."""
    cfg, setup, log, step = run.cfg, run.setup, run.log, run.state.step
    result = evaluate_task(setup.gpt, setup.tokenizer, setup.task_examples, run.rt.device, run.rt.autocast(),
                           run.rank, run.world_size)
    log.log({"step": step, "tokens": step * setup.tokens_per_step, "task_acc": result["acc"],
             "task_acc_norm": result["acc_norm"], "task_n": result["n"]},
            f"step {step}: task {cfg.task_eval}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
            f"(n {result['n']})")
    best = max(result["acc_norm"], log.record.get("best_task_acc_norm") or 0.0)
    log.update(task=cfg.task_eval, task_acc=result["acc"], task_acc_norm=result["acc_norm"], best_task_acc_norm=best)


def evaluate_on_test(run):
    """The test split's loss, once, at the end, with the selected checkpoint's weights (best.pt's, else the
    last's): no decision of the run ever reads it."""
    setup, log, rt = run.setup, run.log, run.rt
    setup.best_saver.wait()
    best = checkpoint_path(run.cfg.out_dir, "best", run.cfg.checkpoint_format)
    model = model_from_checkpoint(load_checkpoint(best)).to(rt.device) if best.exists() else setup.model
    test_loss, test_se = estimate_loss(model, setup.test_batches, rt.device, rt.autocast(), run.rank,
                                       run.world_size)["test"]
    used = best.name if best.exists() else "the final weights"
    log.log({"step": run.state.step, "test_loss": test_loss, "test_loss_se": test_se, "test_checkpoint": used},
            f"test loss {test_loss:.4f} ± {test_se:.4f} ({used}, scored once)")
    log.update(test_loss=test_loss, test_loss_se=test_se, test_checkpoint=used)


def write_sample(run):
    """Log a sample of text. Every process runs it: under FSDP each forward gathers parameters from all."""
    cfg, setup, rt, step = run.cfg, run.setup, run.rt, run.state.step
    tokenizer = setup.tokenizer
    start = tokenizer.document_start()
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    # eager: compiled blocks (FSDP compiles each) would recompile for every cache position and layer
    with rt.autocast(), torch.compiler.set_stance("force_eager"):
        ids = setup.gpt.generate(torch.tensor([start], device=rt.device), cfg.sample_tokens,
                                 temperature=cfg.sample_temperature, top_k=200, vocab_limit=setup.meta["vocab_size"],
                                 generator=generator)
    text = tokenizer.decode(ids[0, len(start):].tolist())
    run.log.log({"step": step, "sample": text}, f"step {step}: sample\n{text}\n")


def step_batches(cfg, train_data, first, count, device_type):
    """Training micro-batches first .. first + count - 1: one step's, on the loader thread while the step
    before computes."""
    batches = [train_data.random_batch(cfg.seed, first + micro, cfg.batch_size) for micro in range(count)]
    if device_type == "cuda":  # page-locked host memory lets the copies overlap with compute
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    return batches


# ---- the loop ----

def begin(run, changed, end_step):
    """Before the first step: a new run (changed is None) evaluates the untrained model, a resumed one notes
    where it resumes and what it changed. Returns the reason a resumed run is already done by its stop rules, or
    None."""
    cfg, state, rank = run.cfg, run.state, run.rank
    if changed is not None:
        last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
        run.log.log({"step": state.step, "event": "resumed", "changed": changed},
                    f"resumed from {last} at step {state.step}")
        if rank == 0 and changed:
            notes = {**dict.fromkeys(OPTIMIZER_SETTINGS, " (set in the optimizer)"),
                     **dict.fromkeys(EVAL_BATCH_KEYS, " (new val batches)")}
            print("changed on resume: " + ", ".join(f"{key} {old} -> {new}{notes.get(key, '')}"
                                                     for key, (old, new) in changed.items()))
        done = stop_reason(cfg, state)
        if rank == 0 and done:
            print(f"{last} is done: it {done}; to train on, resume with that rule off (set it to 0)")
        elif rank == 0 and state.step >= end_step:
            limit = "--max_iters" if end_step == cfg.max_iters else "--stop_iter (or set it to 0)"
            print(f"{last} is already at step {state.step}; raise {limit} to train further")
        return done
    if rank == 0:
        vocab = run.setup.gpt.config.vocab_size
        print(f"expected loss at init: ln({vocab}) = {math.log(vocab):.4f}")
    evaluate(run)
    if cfg.task_eval:
        evaluate_on_task(run)
    return None


def after_step(run, end_step):
    """The evaluations, sample and save due after this step. Returns the stop rules' reason if one now holds
    (last.pt is then saved at this step), or None."""
    cfg, state = run.cfg, run.state
    final = state.step == cfg.max_iters  # the schedule's end, not stop_iter: a paused run evaluates as the whole
    if state.step % cfg.eval_interval == 0 or final:
        evaluate(run)
    if cfg.task_eval and (state.step % (cfg.task_eval_interval or cfg.eval_interval) == 0 or final):
        evaluate_on_task(run)
    if cfg.sample_interval and (state.step % cfg.sample_interval == 0 or final):
        write_sample(run)
    reason = stop_reason(cfg, state)
    if reason or state.step % cfg.ckpt_interval == 0 or state.step == end_step:
        write_checkpoint("last", run)
    if reason and run.rank == 0:
        print(f"step {state.step}: stopping: {reason}")
    return reason


def train_loop(run, changed):
    """Optimizer steps from state.step to max_iters (or stop_iter), each followed by after_step's work; a stop
    signal ends it at the next progress line, a stop rule (target, patience) at the evaluation that meets it.
    `changed`: the keys a resume changed (resume_changes), None for a new run."""
    cfg, setup, state, log, rt, rank, world_size = (run.cfg, run.setup, run.state, run.log, run.rt, run.rank,
                                                     run.world_size)
    end_step = min(cfg.stop_iter or cfg.max_iters, cfg.max_iters)
    stop_signals = catch_stop_signals()
    done = begin(run, changed, end_step)
    if done:
        end_step = state.step
    accum = cfg.gradient_accumulation_steps // world_size  # of each step's micro-batches, rank r draws the r-th share
    loader = ThreadPoolExecutor(max_workers=1)
    upcoming = loader.submit(step_batches, cfg, setup.train_data, state.data_position + rank * accum, accum,
                             rt.device_type)
    guard, step_times, compiling = DivergenceGuard(), [], rt.compile
    end_reason = done or ("finished" if end_step == cfg.max_iters else f"paused at stop_iter {end_step}")
    window = time.perf_counter(), state.step  # the wall clock and step at the last progress line
    while state.step < end_step:
        t0 = time.perf_counter()
        lr = schedule_lr(cfg, state.step)
        batches = upcoming.result()
        state.data_position += cfg.gradient_accumulation_steps
        upcoming = loader.submit(step_batches, cfg, setup.train_data, state.data_position + rank * accum, accum,
                                 rt.device_type)
        batches = [(x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)) for x, y in batches]
        loss, grad_norm, applied = train_step(setup.model, setup.optimizer, setup.scaler, rt.autocast(), batches,
                                              lr, cfg.grad_clip)
        state.step += 1
        elapsed = time.perf_counter() - t0
        state.train_seconds += elapsed
        if compiling:  # the first step traces and compiles the model: reported apart from the step times
            compiling = False
            log.log({"step": state.step, "compile_s": elapsed},
                    f"step {state.step}: {elapsed:.1f}s, compiling the model")
        else:
            step_times.append(elapsed)
        guard.check(run, lr, loss, grad_norm, applied)

        if state.step % cfg.log_interval == 0 or state.step == end_step:
            dt = sum(step_times) / len(step_times) if step_times else elapsed
            wall_dt = (time.perf_counter() - window[0]) / (state.step - window[1])
            step_times.clear()
            window = time.perf_counter(), state.step
            log_progress(run, end_step, lr, loss, grad_norm, dt, wall_dt)
            if stop_requested(stop_signals, rt.device, world_size):
                signal_name = stop_signals[0] if stop_signals else "a signal to another process"
                if rank == 0:
                    print(f"stopping at step {state.step} on {signal_name}; saving the last checkpoint")
                write_checkpoint("last", run)
                end_reason = f"stopped by {signal_name}"
                break
        reason = after_step(run, end_step)
        if reason:
            end_reason = reason
            break
    loader.shutdown(cancel_futures=True)
    setup.best_saver.wait()
    if setup.test_batches and not done and (end_reason == "finished" or stop_reason(cfg, state)):
        evaluate_on_test(run)
    log.finish(state.step, state.step * setup.tokens_per_step, end_reason)


# ---- processes ----

def train(cfg):
    """Train as the config says: alone, or as one of torchrun's processes (torchrun sets RANK and the rest)."""
    rank, local_rank, world_size, local_processes = place()
    check_config(cfg, world_size)
    rt = runtime(cfg, local_rank, processes=local_processes)
    check_precision(cfg, rt, world_size)
    join(rt, rank)
    lock = None
    try:
        if rank == 0:  # one run per folder, taken before anything reads or writes it
            lock = runlog.RunFolderLock(cfg.out_dir)
        ckpt = checkpoint_to_resume(Path(cfg.out_dir), cfg.init_from == "resume")
        if ckpt is None and rank == 0:
            runlog.check_fresh_folder(cfg.out_dir)
        changed = resume_changes(cfg, ckpt) if ckpt else None
        setup = set_up(cfg, ckpt, rt, rank, local_rank, world_size)
        state = TrainingState.start(cfg, ckpt, rank, world_size)
        log = runlog.RunLog(cfg.out_dir, rank == 0)  # the first write of the run: everything is checked by now
        run = Run(cfg, rt, setup, state, log, rank, world_size)
        try:
            log.start(cfg, setup.meta, rt.device, rt.dtype, world_size, ckpt["step"] if ckpt else None,
                      state.wandb_id, changed)
            if rank == 0:
                runlog.describe(cfg, setup, rt, world_size)
                if leaked := leaked_documents(setup.meta):
                    print(f"warning: {leaked:,} val/test {setup.meta['leakage']['unit']}s of {cfg.dataset} also "
                          "occur verbatim in train (meta.json's leakage audit); held-out losses will flatter the model")
            train_loop(run, changed)
        except runlog.WriteError as e:
            raise runlog.WriteError(end_on_write_failure(e, run)) from None
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def end_on_write_failure(error, run):
    """The line a failed write (a full disk, a read-only folder, a file size limit) ends the run with, once
    best.pt's writer has finished (removing its temporary file if it failed too) and run.json says why, if it
    can still be written."""
    cfg, setup, state, log = run.cfg, run.setup, run.state, run.log
    with contextlib.suppress(runlog.WriteError):
        setup.best_saver.wait()
    try:
        log.finish(state.step, state.step * setup.tokens_per_step, f"write failed: {error}")
        recorded = "run.json records why"
    except runlog.WriteError:
        recorded = "run.json could not be written either, so it still says running"
    last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
    kept = (f"{last} is the last good checkpoint; make room and resume with --init_from=resume" if last.exists() else
            "no checkpoint was saved; make room, remove log.jsonl and run.json and start again")
    return f"{error}; the run stopped at step {state.step}, {recorded}; {kept}"


def main(argv=None):
    # over a file size limit (ulimit -f) a write then fails with EFBIG, which the run reports, instead of the
    # signal killing the process mid-write
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        train(load_config(__file__, sys.argv[1:] if argv is None else argv, RuntimeConfig, GPTConfig))
    except (ConfigError, DataError, CheckpointError, runlog.RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Diverged, runlog.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
