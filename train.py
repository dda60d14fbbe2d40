"""Train a GPT: `python train.py [config/x.py ...] [--key=value ...]`, alone or under torchrun.

Read top to bottom: the config (every key with its default and meaning), the schedule (`lr_at`),
`set_up`, `train_step` (one optimizer step, the heart of it), `estimate_loss`, the loop
(`train_loop`, whose once-in-a-while blocks each call a module owning its policy), then `train`
(processes) and `main` (exit codes: 2 for refused input, 1 for a diverged run or a failed write).
Around it, each owning one thing: checks.py (keys' ranges; on resume, what may change), start.py
(data, architecture, first weights, what a resume restores), parallel.py (DDP, FSDP), validation.py
(best.pt, stop rules, task and test scores), monitor.py (step times, divergence guard, progress
lines, signals, samples), checkpoint.py (TrainingState, checkpoint writes), runlog.py (run records).
"""

import functools
import gc
import math
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import checkpoint
import checks
import monitor
import runlog
from configurator import ConfigError, all_keys, load_config
from data import DataError, Examples, Tokenizer, Windows, get_tokenizer
from devices import Runtime, RuntimeConfig, is_out_of_memory, runtime
from eval import load_task
from model import GPT, GPTConfig
from optimizers import configure_optimizer, set_lr
from parallel import distribute, gradient_sync, join, place
from start import architecture, load_batches, load_data, restore_optimizer
from validation import record_evaluation, score_task, score_test, stop_reason

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
# a meaning may end in {allowed values; resume class} (configurator.RESUME_CLASSES; none: fixed)

# the run and its data
out_dir = "out"  # run folder: last.pt, best.pt, log.jsonl {changeable}
init_from = "scratch"  # scratch, resume (out_dir), run or .pt, gpt2 ... gpt2-xl, HF dir {control}
data_root = "data"  # folder that holds the prepared datasets {changeable}
dataset = "python_stdlib"  # data_root/<dataset> by prepare.py (default auto-prepared) {changeable}
seed = 1337  # seeds weights, dropout and the order of training batches {>= 0; changeable}
# batches
batch_size = 16  # sequences per micro-batch, per process {> 0; val batches}
block_size = 128  # context length in tokens {> 0}
gradient_accumulation_steps = 1  # micro-batches per step, all processes together {> 0; changeable}
# model (the architecture options are model.GPTConfig's, listed last in --help)
n_layer = 4  # transformer blocks {> 0}
n_head = 4  # attention heads per block {> 0}
n_embd = 128  # width of the residual stream {> 0}
dropout = 0.0  # dropout on attention, residual branches and embeddings {[0, 1); changeable}
bias = False  # biases in Linear layers and LayerNorms
vocab_size = 0  # model vocabulary; 0 takes the dataset's, more pads it (50304 for GPT-2 BPE) {>= 0}
# optimizer: Muon and AdamW, with warmup and decay
learning_rate = 3e-3  # peak learning rate, reached after warmup {> 0; optimizer}
min_lr = 1e-4  # floor the decay ends at {>= 0; changeable}
max_iters = 1100  # optimizer steps in the run {> 0; changeable}
warmup_iters = 50  # steps of linear warmup from 0 {>= 0; changeable}
lr_decay_iters = 0  # step where the decay reaches min_lr; 0 means max_iters {>= 0; changeable}
lr_schedule = "cosine"  # cosine decay or wsd (flat, then linear cooldown) {cosine|wsd; changeable}
cooldown_frac = 0.4  # wsd: cooldown's share of the decay steps (after warmup) {(0, 1]; changeable}
embedding_lr = 0.0  # peak lr of token/position/value embeddings; 0: learning_rate {>= 0; optimizer}
head_lr = 0.0  # untied LM head's peak lr (tie_embeddings=False); 0: learning_rate {>= 0; optimizer}
weight_decay = 0.1  # applied to 2-D weights and embeddings only {>= 0; optimizer}
beta1 = 0.9  # AdamW beta1 {[0, 1); optimizer}
beta2 = 0.99  # AdamW beta2 {[0, 1); optimizer}
optimizer = "muon"  # muon: Muon for the blocks' matrices, AdamW for the rest; or adamw {muon|adamw}
muon_lr = 0.02  # with optimizer=muon: the peak learning rate of the Muon matrices {> 0; optimizer}
muon_split = "head"  # Muon: orthogonalise per head (less CPU work) or whole {head|whole; optimizer}
grad_clip = 1.0  # clip the global gradient norm to this; 0: off (still logged) {>= 0; changeable}
# evaluation, logging, checkpoints
eval_interval = 250  # steps between evaluations on the fixed held-out batches {> 0; changeable}
eval_iters = 20  # batches per split in each evaluation {> 0; val batches}
val_tokens = 0  # > 0: val is the val split's first N tokens (speedrun measure) {>= 0; val batches}
allow_new_eval_batches = False  # resume with other batch_size, eval_iters or val_tokens {control}
log_interval = 10  # steps between train lines in the console and log.jsonl {> 0; changeable}
ckpt_interval = 250  # steps between saves of last.pt (and at the end or a stop) {> 0; changeable}
sample_interval = 500  # steps between text samples written to the log; 0 is off {>= 0; changeable}
sample_tokens = 200  # length of each sample in tokens {> 0; changeable}
sample_temperature = 0.8  # temperature of those samples; 0 is greedy {>= 0; changeable}
sample_top_k = 200  # those samples draw from the k likeliest tokens; 0 keeps all {>= 0; changeable}
stop_iter = 0  # stop after this step, saving last.pt, same schedule; 0 is off {>= 0; changeable}
target_val_loss = 0.0  # stop once val loss <= this (time to target); 0 is off {>= 0; changeable}
early_stop_patience = 0  # stop after N evaluations without a new best; 0 is off {>= 0; changeable}
early_stop_min_delta = 0.0  # how far below the best a val loss must be to count {>= 0; changeable}
task_eval = ""  # multiple-choice task: hellaswag or a JSON Lines file; empty: off {changeable}
task_eval_interval = 0  # steps between task evaluations; 0 means eval_interval {>= 0; changeable}
task_eval_examples = 200  # score the task's first N examples each time; 0: all {>= 0; changeable}
# system (the device keys are devices.RuntimeConfig's, listed after train.py's own in --help)
parallel = "ddp"  # under torchrun: ddp (replicas) or fsdp (FSDP2 shards) {ddp|fsdp; changeable}
activation_checkpointing = False  # recompute each block in the backward: less memory {changeable}
# safety and records
checkpoint_format = "full"  # full: .pt files; sharded: folders of shards {full|sharded; changeable}
keep_last_k = 0  # also keep the k latest saves (ckpt_<step>.pt, last.<step>) {>= 0; changeable}
max_skipped_steps = 25  # stop after N updates in a row skipped as non-finite {> 0; changeable}
loss_spike_factor = 1.5  # warn at a step's loss over this times its running mean {> 1; changeable}
# fine-tuning (SFT data comes from `prepare.py sft`; its prompt tokens are never trained)
lora_rank = 0  # > 0 trains low-rank adapters (LoRA) of this rank, freezes every other weight {>= 0}
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank {> 0}
lora_dropout = 0.0  # dropout on the adapters' input {[0, 1); changeable}
lora_targets = "attn,mlp"  # adapted projections: attn (c_attn, c_proj), mlp (c_fc, c_proj) or both
pack_examples = False  # SFT: pack whole examples back to back, not one padded per row {changeable}
# Weights & Biases
wandb_log = False  # also send logged metrics to Weights & Biases (pip install wandb) {changeable}
wandb_project = "gpt"  # wandb project name {changeable}
wandb_run_name = ""  # wandb run name; empty lets wandb choose {changeable}
# ---- end of config ----
KEYS_FROM = (RuntimeConfig, GPTConfig)  # whose fields are keys too, after the block's (all_keys)


@functools.cache  # the declarations are this file's and the classes' source: read once a process
def declared():
    """{key: configurator.Key} as declared: default, meaning, allowed values and resume class."""
    return all_keys(__file__, *KEYS_FROM)


# ---- schedule ----

def lr_at(it, cfg):
    """The lr of the update after `it` done: linear warmup to learning_rate, then to min_lr at
    lr_decay_iters (0: max_iters) by a cosine, or (wsd) held, then linear over cooldown_frac."""
    decay_iters, span = cfg.lr_decay_iters or cfg.max_iters, cfg.learning_rate - cfg.min_lr
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    if cfg.lr_schedule == "wsd":
        return cfg.min_lr + min(1.0, (1.0 - progress) / cfg.cooldown_frac) * span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * span


# ---- set-up: the data, the model, its optimizer ----

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
    test_batches: dict  # {"test": batches} if the data has a test split, scored at the end; else {}
    task_examples: list  # task_eval's examples (eval.load_task), or [] without task_eval
    meta: dict  # the dataset's meta.json
    tokenizer: Tokenizer | None  # the data's, for samples and task_eval; None if neither is used
    weights_from: str  # scratch, or the GPT-2 weights or checkpoint it began from (kept on resume)
    parent: dict | None  # checkpoint it began from: run, path, step, sha256 (checkpoint.lineage)
    tokens_per_step: int  # over all micro-batches and processes
    best_saver: checkpoint.BackgroundSaver  # writes best.pt off the training thread


def set_up(cfg, ckpt, rt, rank, local_rank, world_size):
    """Data, model (first weights; sharded, compiled or DDP-wrapped), optimizer, scaler, resumed."""
    data_dir, meta = load_data(cfg, local_rank, world_size)
    if ckpt is not None:
        checks.check_same_data(ckpt, meta, data_dir)
    weights_from = ckpt["weights_from"] if ckpt else cfg.init_from
    model_config, pretrained_state, parent = architecture(cfg, meta, weights_from, ckpt, declared())
    train_data, val_data, eval_batches, test_batches = load_batches(
        cfg, data_dir, meta, model_config, rt.device, rank, world_size)
    # a tokenizer that cannot load (unknown; GPT-2's offline, uncached) fails now, not at a sample
    tokenizer = get_tokenizer(meta) if cfg.sample_interval or cfg.task_eval else None
    task_examples = (load_task(cfg.task_eval, cfg.task_eval_examples, tokenizer=tokenizer)
                     if cfg.task_eval else [])

    torch.manual_seed(cfg.seed)  # same initial weights in every process (FSDP shards them as is)
    gpt = GPT(model_config).to(rt.device)
    if pretrained_state is not None:  # LoRA adapters, not pretrained, keep their initial values
        gpt.load_state_dict({**gpt.state_dict(), **pretrained_state})
    if ckpt is not None and not ckpt.get("sharded"):
        checkpoint.load_weights(gpt, ckpt["model"], ckpt["path"])
    model = distribute(gpt, rt, cfg, world_size)  # (before the optimizer: it gets FSDP's shards)
    try:
        optimizer = configure_optimizer(
            gpt, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type,
            cfg.muon_lr if cfg.optimizer == "muon" else None, cfg.embedding_lr or None,
            cfg.head_lr or None, cfg.muon_split)
    except ValueError as e:  # a head_lr for a tied head
        raise ConfigError(str(e)) from None
    scaler = rt.grad_scaler()
    if ckpt is not None:
        restore_optimizer(ckpt, gpt, optimizer, scaler)
    tokens_per_step = cfg.batch_size * model_config.block_size * cfg.gradient_accumulation_steps
    return Setup(gpt, model, optimizer, scaler, train_data, val_data, eval_batches, test_batches,
                 task_examples, meta, tokenizer, weights_from, parent, tokens_per_step,
                 checkpoint.BackgroundSaver())


# ---- one optimizer step ----

def train_step(model, optimizer, scaler, autocast, batches, grad_clip):
    """One optimizer step over (x, y) micro-batches at the lr set in the optimizer (set_lr). The
    loss is the mean over every trained target (y != -100) of all micro-batches and processes, as
    one large batch would: each micro-batch's mean weighs by its share of them (nanochat #59).

    Returns (mean loss, gradient norm before clipping, whether the update was applied). A non-finite
    loss or gradient skips the update, so a divergence never reaches the weights; reading the two
    values for that check is the step's one host-device sync. Gradients stay until the next call.
    """
    optimizer.zero_grad(set_to_none=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    counts = torch.stack([(y != -100).sum() for _, y in batches])  # trained targets per micro-batch
    total = counts.sum()
    if world > 1:
        dist.all_reduce(total)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for micro, (x, y) in enumerate(batches):
        with gradient_sync(model, enabled=micro == len(batches) - 1):
            with autocast:
                _, loss = model(x, y)
            # its share times the processes (gradients are averaged); with no trained target (mean
            # 0/0) it adds nothing. With every target trained, the divisor is the micro-batch count.
            loss = torch.where(counts[micro] > 0, loss, 0.0) / (total / (counts[micro] * world))
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)  # every process then takes the same skip decision
        loss_sum /= world  # (a sum: gloo has no average)
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip:  # (with no clipping the norm is still logged, and no gradient is rescaled by 1.0)
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    loss_value, norm = torch.stack([loss_sum, grad_norm.float()]).tolist()
    applied = math.isfinite(loss_value) and math.isfinite(norm)
    if applied:
        scaler.step(optimizer)
    scaler.update()
    return loss_value, norm, applied


@torch.no_grad()
def estimate_loss(model, batches, device, autocast, rank=0, world_size=1):
    """{split: (mean loss, its standard error)} over fixed batches per split, in eval mode; the
    standard error (std over sqrt(batches)) is the noise in comparing two evaluations. Processes
    share the batches, each the same number of passes (FSDP gathers in each), surplus ones left out
    of the sums."""
    model.eval()
    losses = {}
    for split, split_batches in batches.items():
        kept = []  # this process's losses; a surplus pass only keeps FSDP's gathers in step
        for i in range(rank, math.ceil(len(split_batches) / world_size) * world_size, world_size):
            x, y = split_batches[min(i, len(split_batches) - 1)]
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            kept += [loss.float()] if i < len(split_batches) else []
        zero = torch.zeros((), device=device)
        total = torch.stack([sum(kept, zero), torch.tensor(float(len(kept)), device=device)])
        if world_size > 1:
            dist.all_reduce(total)
        loss_sum, n = total.tolist()
        mean = loss_sum / n
        # spread about the mean: as E[x^2] - mean^2, float32 cancels it to noise (0 at 2 batches)
        spread = sum(((loss - mean) ** 2 for loss in kept), zero)
        if world_size > 1:
            dist.all_reduce(spread)
        variance = spread.item() / (n - 1) if n > 1 else 0.0
        losses[split] = mean, math.sqrt(variance / n)
    model.train()
    return losses


# ---- the loop ----

@dataclass
class Run:
    """What every piece of the loop reads, built once by train()."""

    cfg: SimpleNamespace
    rt: Runtime
    setup: Setup
    state: checkpoint.TrainingState
    log: runlog.RunLog
    rank: int = 0
    world_size: int = 1


def evaluate(run):
    """The fixed batches' losses, recorded (validation.py: best.pt, target, early stopping)."""
    setup, rt = run.setup, run.rt
    losses = estimate_loss(setup.model, setup.eval_batches, rt.device, rt.autocast(), run.rank,
                           run.world_size)
    record_evaluation(run, losses)


def step_batches(cfg, train_data, first, count, device_type):
    """One step's training micro-batches, first .. first + count - 1 (on the loader thread)."""
    batches = [train_data.random_batch(cfg.seed, first + micro, cfg.batch_size)
               for micro in range(count)]
    if device_type == "cuda":  # page-locked host memory lets the copies overlap with compute
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    return batches


def begin(run, changed, end_step):
    """Before the first step: a new run (changed is None) evaluates the untrained model, a resumed
    one says where it resumes and what changed. Returns its stop reason if already done, or None."""
    cfg, state = run.cfg, run.state
    if changed is None:
        if run.rank == 0 and run.setup.weights_from == "scratch":  # (trained weights start lower)
            vocab = run.setup.gpt.config.vocab_size
            print(f"expected loss at init: ln({vocab}) = {math.log(vocab):.4f}")
        evaluate(run)
        if cfg.task_eval:
            score_task(run)
        return None
    done = stop_reason(cfg, state)
    last = checkpoint.checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
    run.log.log({"step": state.step, "event": "resumed", "changed": changed},
                f"resumed from {last} at step {state.step}")
    if run.rank == 0:
        checks.describe_resume(last, done, state.step, end_step, cfg.max_iters)
    return done


def after_step(run, end_step):
    """The step's evals, sample and save; a stop rule's reason (last.pt then saved), or None."""
    cfg, state = run.cfg, run.state
    final = state.step == cfg.max_iters  # not stop_iter: a paused run evaluates as an unpaused one
    if state.step % cfg.eval_interval == 0 or final:
        evaluate(run)
    if cfg.task_eval and (state.step % (cfg.task_eval_interval or cfg.eval_interval) == 0 or final):
        score_task(run)
    if cfg.sample_interval and (state.step % cfg.sample_interval == 0 or final):
        monitor.write_sample(run)
    reason = stop_reason(cfg, state)
    if reason or state.step % cfg.ckpt_interval == 0 or state.step == end_step:
        checkpoint.write_checkpoint("last", run)
    if reason and run.rank == 0:
        print(f"step {state.step}: stopping: {reason}")
    return reason


def train_loop(run, changed, stop_signals):
    """Steps from state.step to max_iters (or stop_iter), each then after_step's; a stop signal
    (in stop_signals) ends them at a progress line, a stop rule at its evaluation. `changed`: what
    the resume changed (None: a new run)."""
    cfg, setup, state, rt = run.cfg, run.setup, run.state, run.rt
    end_step = min(cfg.stop_iter or cfg.max_iters, cfg.max_iters)
    done = begin(run, changed, end_step)
    end_step = state.step if done else end_step
    accum = cfg.gradient_accumulation_steps // run.world_size  # micro-batches per process per step
    loader = ThreadPoolExecutor(max_workers=1)

    def next_batches():  # drawn on the loader thread while the step before computes
        first = state.data_position + run.rank * accum
        return loader.submit(step_batches, cfg, setup.train_data, first, accum, rt.device_type)

    upcoming, progress = next_batches(), monitor.Progress(run, end_step)
    end_reason = done or ("finished" if end_step == cfg.max_iters
                          else f"paused at stop_iter {end_step}")
    while state.step < end_step:
        t0 = time.perf_counter()
        lr = lr_at(state.step, cfg)
        batches = upcoming.result()
        state.data_position += cfg.gradient_accumulation_steps
        upcoming = next_batches()
        batches = [(x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True))
                   for x, y in batches]
        set_lr(setup.optimizer, lr)
        loss, grad_norm, applied = train_step(setup.model, setup.optimizer, setup.scaler,
                                              rt.autocast(), batches, cfg.grad_clip)
        state.step += 1
        progress.stepped(time.perf_counter() - t0, lr, loss, grad_norm, applied)
        may_stop = progress.line_written and state.step < end_step  # the last step finishes the run
        if may_stop and monitor.stop_requested(stop_signals, rt.device, run.world_size):
            end_reason = monitor.stop_on_signal(run, stop_signals)
            break
        if reason := after_step(run, end_step):
            end_reason = reason
            break
    loader.shutdown(cancel_futures=True)
    setup.best_saver.wait()
    progress.guard.check_updates_made(run)  # a run whose every step was skipped did not train
    if setup.test_batches and not done and (end_reason == "finished" or stop_reason(cfg, state)):
        score_test(run, estimate_loss)
    run.log.finish(state.step, state.step * setup.tokens_per_step, end_reason)


# ---- processes ----

def train(cfg):
    """Train as configured: alone, or as one of torchrun's processes (it sets RANK and the rest)."""
    rank, local_rank, world_size, local_processes = place()
    checks.check_config(cfg, world_size)
    rt = runtime(cfg, local_rank, processes=local_processes)
    checks.check_precision(cfg, rt, world_size)
    join(rt, rank)
    try:
        train_in_folder(cfg, rt, rank, local_rank, world_size)
    except BaseException as e:
        release_frames(e)
        raise
    finally:
        # the run's objects go first: a DDP reducer holding a gloo process group's last reference
        # destroys it holding the GIL, which can deadlock with gloo's worker thread (pytorch#56297)
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def release_frames(error):
    """Free the locals (the run's model, activations) of the frames an error and its chain hold."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def train_in_folder(cfg, rt, rank, local_rank, world_size):
    """The run in out_dir, which this process holds (rank 0 takes its lock) from start to end."""
    lock = runlog.RunFolderLock(cfg.out_dir) if rank == 0 else None  # before anything touches it
    try:
        ckpt = checkpoint.checkpoint_to_resume(Path(cfg.out_dir), cfg.init_from == "resume")
        if ckpt is None and rank == 0:
            runlog.check_fresh_folder(cfg.out_dir)
        keys = declared()
        changed = checks.resume_changes(cfg, ckpt, keys) if ckpt else None
        if changed and rank == 0:
            checks.describe_changes(changed, keys)
        setup = set_up(cfg, ckpt, rt, rank, local_rank, world_size)
        state = checkpoint.TrainingState.start(cfg, ckpt, rank, world_size)
        log = runlog.RunLog(cfg.out_dir, rank == 0)  # the run's first write: all checks done by now
        run = Run(cfg, rt, setup, state, log, rank, world_size)
        with monitor.catch_stop_signals() as stop_signals:  # also through an ending's writes
            try:
                log.start(cfg, setup.meta, rt.device, rt.dtype, world_size,
                          ckpt["step"] if ckpt else None, state.wandb_id, changed, setup.parent,
                          setup.gpt.config)
                if rank == 0:
                    runlog.describe(cfg, setup, rt, world_size)
                train_loop(run, changed, stop_signals)
            except runlog.WriteError as e:
                raise runlog.WriteError(checkpoint.end_on_write_failure(e, run)) from None
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                raise monitor.end_on_out_of_memory(run) from None
    finally:
        if lock is not None:
            lock.release()


def main(argv=None):
    # past ulimit -f, a write then fails with EFBIG (the run reports it) instead of a mid-write kill
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        train(load_config(__file__, sys.argv[1:] if argv is None else argv, *KEYS_FROM))
    except (ConfigError, DataError, checkpoint.CheckpointError, runlog.RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (monitor.Diverged, monitor.OutOfMemory, runlog.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
