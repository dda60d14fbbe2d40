"""What the training loop watches between its steps: the time steps take, updates skipped for
non-finite values (the divergence guard, which ends a diverged run), progress lines with their speed
and MFU, stop signals, and the text samples it logs."""

import contextlib
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from checkpoint import how_to_go_on, write_checkpoint
from devices import peak_memory_mib
from runlog import WriteError


class Diverged(Exception):
    """Too many consecutive updates skipped for non-finite values."""


class OutOfMemory(Exception):
    """The device (or the host, on CPU) ran out of memory in a step or an evaluation."""


def end_on_out_of_memory(run):
    """The run's one-line OutOfMemory, recorded in run.json: the keys that would make it fit."""
    cfg, state, tokens = run.cfg, run.state, run.setup.tokens_per_step
    with contextlib.suppress(WriteError):  # a failed best.pt is not what stopped the run
        run.setup.best_saver.wait()
    run.log.finish(state.step, state.step * tokens, "out of memory")
    fix = ("pass those keys (a resume also --allow_new_eval_batches=True: "
           "batch_size makes the val batches)")
    return OutOfMemory(f"out of memory at step {state.step} with micro-batches of "
                       f"{cfg.batch_size} x {run.setup.gpt.config.block_size} tokens (evaluations "
                       f"use the same); lower --batch_size and raise --gradient_accumulation_steps "
                       f"to keep {tokens:,} tokens per step, or under torchrun use "
                       f"--parallel=fsdp; run.json records it; {how_to_go_on(cfg, fix)}")


class DivergenceGuard:
    """Watches each step's outcome. A skipped update (train_step skips non-finite ones) is logged
    with clues to its cause, and max_skipped_steps of them in a row end the run; an applied update
    whose loss is over loss_spike_factor times the running average is a warning. Its state is the
    TrainingState's (saved in checkpoints: a resumed run goes on counting); the updates this process
    applied are its own."""

    def __init__(self):
        self.steps, self.updates = 0, 0  # taken, applied by this process since it started/resumed

    def check(self, run, lr, loss, grad_norm, applied):
        """After each step of `run` (train.Run): raises Diverged (the run record closed) at
        max_skipped_steps consecutive skips."""
        cfg, setup, state, log, step = run.cfg, run.setup, run.state, run.log, run.state.step
        self.steps, self.updates = self.steps + 1, self.updates + applied
        if not applied:
            state.skipped_in_a_row += 1
            scaler = setup.scaler
            # under fp16 early overflows are routine: the scaler halves its scale after each
            scale = f", fp16 loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
            log.log({"step": step, "skipped": "non-finite loss or gradient norm", "loss": loss,
                     "grad_norm": grad_norm, "lr": lr,
                     "recent_grad_norms": state.recent_grad_norms[-10:],
                     "nonfinite_grads": nonfinite_gradients(setup.gpt)[:20],
                     "consecutive_skips": state.skipped_in_a_row,
                     "loss_scale": scaler.get_scale() if scaler.is_enabled() else None},
                    f"step {step}: skipped the update: loss {loss}, grad norm {grad_norm} "
                    f"({state.skipped_in_a_row} in a row, limit {cfg.max_skipped_steps}{scale})")
            if state.skipped_in_a_row >= cfg.max_skipped_steps:
                self.diverged(run, f"{state.skipped_in_a_row} consecutive steps up to step {step} "
                                   "had a non-finite loss or gradient")
        else:
            state.skipped_in_a_row = 0
            state.recent_grad_norms = [*state.recent_grad_norms[-99:], grad_norm]
            if state.loss_ema is not None and loss > cfg.loss_spike_factor * state.loss_ema:
                log.log({"step": step, "warning": "loss spike", "loss": loss,
                         "running_average": state.loss_ema},
                        f"step {step}: warning: loss {loss:.4f} is over "
                        f"{cfg.loss_spike_factor}x its running average {state.loss_ema:.4f}")
            state.loss_ema = loss if state.loss_ema is None else 0.95 * state.loss_ema + 0.05 * loss

    def check_updates_made(self, run):
        """At the end: a process whose every step was skipped made no update, so it did not train:
        Diverged, not an end that reads as finished. Not under fp16, whose first steps' skips are
        routine (the loss scaler halving its scale): there max_skipped_steps alone decides."""
        if self.steps and not self.updates and not run.setup.scaler.is_enabled():
            self.diverged(run, f"all {self.steps} steps of this run, up to step {run.state.step}, "
                               "had a non-finite loss or gradient, so no update was made")

    def diverged(self, run, what):
        state = run.state
        run.log.finish(state.step, state.step * run.setup.tokens_per_step, "diverged")
        raise Diverged(f"training diverged: {what}; "
                       f"{how_to_go_on(run.cfg, 'lower the learning rate or check the data')}")


def nonfinite_gradients(model):
    """Names of parameters whose gradient (under FSDP, this process's shard) holds inf or nan."""
    grads = {name: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return [name for name, grad in grads.items() if not grad.isfinite().all()]


def log_progress(run, end_step, lr, loss, grad_norm, dt, wall_dt):
    """A train line of `run` (train.Run): loss, lr, gradient norm, speed, memory peak and time left
    (the peak, devices.peak_memory_mib: on CUDA since the last line, on CPU the process's so far).
    Two throughputs: tok_per_sec over the optimizer steps alone (dt a step, and MFU from it against
    all processes' peak FLOP/s, where the device's is known), wall_tok_per_sec over the wall time
    since the last line (wall_dt a step), evaluations, samples and checkpoints included."""
    cfg, setup, state, log = run.cfg, run.setup, run.state, run.log
    step, peak = state.step, run.rt.peak_flops and run.rt.peak_flops * run.world_size
    record = {"step": step, "tokens": step * setup.tokens_per_step, "train_loss": loss, "lr": lr,
              "grad_norm": grad_norm, "dt_ms": 1000 * dt, "tok_per_sec": setup.tokens_per_step / dt,
              "wall_tok_per_sec": setup.tokens_per_step / wall_dt,
              "train_seconds": state.train_seconds}
    if peak:
        flops = setup.gpt.flops_per_token(setup.gpt.config.block_size)
        record["mfu"] = flops * record["tok_per_sec"] / peak
    memory = peak_memory_mib(run.rt.device)
    record.update(memory)
    eta = time.strftime("%H:%M:%S", time.gmtime(wall_dt * (end_step - step)))
    shown = f" | {max(memory.values()):,.0f} MiB peak" if memory else ""
    log.log(record, f"step {step}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{1000 * dt:.1f} ms | {record['tok_per_sec']:,.0f} tok/s "
                    f"({record['wall_tok_per_sec']:,.0f} wall){shown} | ETA {eta}")


class Progress:
    """The loop's watch over its steps: their time (the first apart while it compiles the model),
    the divergence guard, and a progress line every log_interval steps and at the last."""

    def __init__(self, run, end_step):
        self.run, self.end_step = run, end_step
        self.guard = DivergenceGuard()
        self.step_times, self.compiling = [], run.rt.compile
        self.window = time.perf_counter(), run.state.step  # wall clock and step at the last line
        self.line_written = False  # at this step: the loop then also checks for stop signals

    def stepped(self, elapsed, lr, loss, grad_norm, applied):
        """After a step of `elapsed` s (train_step's outcome): raises Diverged as the guard says."""
        run, state = self.run, self.run.state
        state.train_seconds += elapsed
        if self.compiling:  # the first step traces and compiles: reported apart from the step times
            self.compiling = False
            run.log.log({"step": state.step, "compile_s": elapsed},
                        f"step {state.step}: {elapsed:.1f}s, compiling the model")
        else:
            self.step_times.append(elapsed)
        self.guard.check(run, lr, loss, grad_norm, applied)
        self.line_written = state.step % run.cfg.log_interval == 0 or state.step == self.end_step
        if self.line_written:
            dt = sum(self.step_times) / len(self.step_times) if self.step_times else elapsed
            wall_dt = (time.perf_counter() - self.window[0]) / (state.step - self.window[1])
            self.step_times.clear()
            self.window = time.perf_counter(), state.step
            log_progress(run, self.end_step, lr, loss, grad_norm, dt, wall_dt)


@contextlib.contextmanager
def catch_stop_signals():
    """The names of the SIGINT/SIGTERM signals received within, which then no longer end the
    process: the loop stops at its next log line, saving last.pt. The handlers before are put
    back after (a caller of train.main, a notebook or a test, gets its Ctrl-C back)."""
    received = []

    def note(signum, frame):
        received.append(signal.Signals(signum).name)
    before = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def stop_requested(stop_signal, device, world_size):
    """Whether any process got SIGINT/SIGTERM; agreed by all, so all stop at the same step."""
    flag = torch.tensor(float(bool(stop_signal)), device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop_on_signal(run, stop_signals):
    """Save last.pt at this step for a stop signal (stop_requested); the run's end reason."""
    signal_name = stop_signals[0] if stop_signals else "a signal to another process"
    if run.rank == 0:
        print(f"stopping at step {run.state.step} on {signal_name}; saving the last checkpoint")
    write_checkpoint("last", run)
    return f"stopped by {signal_name}"


def write_sample(run):
    """Log a text sample, on every process: under FSDP each forward gathers parameters from all."""
    cfg, setup, rt, step = run.cfg, run.setup, run.rt, run.state.step
    tokenizer = setup.tokenizer
    start = tokenizer.document_start()
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    # eager: compiled blocks (FSDP compiles each) would recompile for every cache position and layer
    with rt.autocast(), torch.compiler.set_stance("force_eager"):
        ids = setup.gpt.generate(torch.tensor([start], device=rt.device), cfg.sample_tokens,
                                 temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None,
                                 vocab_limit=setup.meta["vocab_size"], generator=generator)
    text = tokenizer.decode(ids[0, len(start):].tolist())
    run.log.log({"step": step, "sample": text}, f"step {step}: sample\n{text}\n")
