"""What the training loop watches between its steps: the time steps take, updates skipped for non-finite
values (the divergence guard, which ends a diverged run), progress lines with their speed and MFU, stop
signals, and the text samples it logs."""

import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from checkpoint import checkpoint_path, write_checkpoint


class Diverged(Exception):
    """Too many consecutive updates skipped for non-finite values."""


@dataclass
class DivergenceGuard:
    """Watches each step's outcome. A skipped update (train_step skips non-finite ones) is logged with clues
    to its cause, and max_skipped_steps of them in a row end the run; an applied update whose loss is over
    loss_spike_factor times the running average is a warning."""

    skipped: int = 0  # consecutive skipped updates
    recent_norms: list = field(default_factory=list)  # gradient norms of the last 100 applied updates
    loss_ema: float | None = None  # running average of the applied updates' losses

    def check(self, run, lr, loss, grad_norm, applied):
        """After each step of `run` (train.Run): raises Diverged (the run record closed) at max_skipped_steps
        consecutive skips."""
        cfg, setup, log, step = run.cfg, run.setup, run.log, run.state.step
        if not applied:
            self.skipped += 1
            scaler = setup.scaler
            # under fp16 the first steps' overflows are routine: the scaler halves its scale after each
            scale = f", fp16 loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
            log.log({"step": step, "skipped": "non-finite loss or gradient norm", "loss": loss,
                     "grad_norm": grad_norm, "lr": lr, "recent_grad_norms": self.recent_norms[-10:],
                     "nonfinite_grads": nonfinite_gradients(setup.gpt)[:20], "consecutive_skips": self.skipped,
                     "loss_scale": scaler.get_scale() if scaler.is_enabled() else None},
                    f"step {step}: skipped the update: loss {loss}, grad norm {grad_norm} "
                    f"({self.skipped} in a row, limit {cfg.max_skipped_steps}{scale})")
            if self.skipped >= cfg.max_skipped_steps:
                log.finish(step, step * setup.tokens_per_step, "diverged")
                last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
                then = ("resume" if last.exists() else
                        "start again (no checkpoint was saved; the new run sets these records aside)")
                where = f"the last good checkpoint is {last}; " if last.exists() else ""
                raise Diverged(f"training diverged: {self.skipped} consecutive steps up to step {step} had a "
                               f"non-finite loss or gradient; {where}lower the learning rate or check the data, "
                               f"then {then}")
        else:
            self.skipped = 0
            self.recent_norms = [*self.recent_norms[-99:], grad_norm]
            if self.loss_ema is not None and loss > cfg.loss_spike_factor * self.loss_ema:
                log.log({"step": step, "warning": "loss spike", "loss": loss, "running_average": self.loss_ema},
                        f"step {step}: warning: loss {loss:.4f} is over {cfg.loss_spike_factor}x its "
                        f"running average {self.loss_ema:.4f}")
            self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss


def nonfinite_gradients(model):
    """Names of parameters whose gradient (this process's shard of it, under FSDP) holds inf or nan."""
    grads = {name: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return [name for name, grad in grads.items() if not grad.isfinite().all()]


def log_progress(run, end_step, lr, loss, grad_norm, dt, wall_dt):
    """A train line of `run` (train.Run): loss, lr, gradient norm, speed and time left. Two throughputs:
    tok_per_sec over the optimizer steps alone (dt a step, and MFU from it against all processes' peak FLOP/s,
    where the device's is known), wall_tok_per_sec over the wall time since the last line (wall_dt a step),
    evaluations, samples and checkpoints included."""
    cfg, setup, state, log = run.cfg, run.setup, run.state, run.log
    step, peak = state.step, run.rt.peak_flops and run.rt.peak_flops * run.world_size
    record = {"step": step, "tokens": step * setup.tokens_per_step, "train_loss": loss, "lr": lr,
              "grad_norm": grad_norm, "dt_ms": 1000 * dt, "tok_per_sec": setup.tokens_per_step / dt,
              "wall_tok_per_sec": setup.tokens_per_step / wall_dt, "train_seconds": state.train_seconds}
    if peak:
        record["mfu"] = setup.gpt.flops_per_token(setup.gpt.config.block_size) * record["tok_per_sec"] / peak
    eta = time.strftime("%H:%M:%S", time.gmtime(wall_dt * (end_step - step)))
    log.log(record, f"step {step}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {1000 * dt:.1f} ms | "
                    f"{record['tok_per_sec']:,.0f} tok/s ({record['wall_tok_per_sec']:,.0f} wall) | ETA {eta}")


class Progress:
    """The loop's watch over its steps: their time (the first apart while it compiles the model), the
    divergence guard, and a progress line every log_interval steps and at the last."""

    def __init__(self, run, end_step):
        self.run, self.end_step = run, end_step
        self.guard = DivergenceGuard()
        self.step_times, self.compiling = [], run.rt.compile
        self.window = time.perf_counter(), run.state.step  # the wall clock and step at the last progress line
        self.line_written = False  # at this step: the loop then also checks for stop signals

    def stepped(self, elapsed, lr, loss, grad_norm, applied):
        """After a step of `elapsed` seconds (train_step's outcome): raises Diverged as the guard says."""
        run, state = self.run, self.run.state
        state.train_seconds += elapsed
        if self.compiling:  # the first step traces and compiles the model: reported apart from the step times
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


def catch_stop_signals():
    """The names of the SIGINT/SIGTERM signals received from now on, which no longer end the process: the
    loop stops at its next log line, saving last.pt."""
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    return received


def stop_requested(stop_signal, device, world_size):
    """Whether any process got SIGINT/SIGTERM; agreed by all so that every process stops at the same step."""
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
    """Log a sample of text. Every process runs it: under FSDP each forward gathers parameters from all."""
    cfg, setup, rt, step = run.cfg, run.setup, run.rt, run.state.step
    tokenizer = setup.tokenizer
    start = tokenizer.document_start()
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    # eager: compiled blocks (FSDP compiles each) would recompile for every cache position and layer
    with rt.autocast(), torch.compiler.set_stance("force_eager"):
        ids = setup.gpt.generate(torch.tensor([start], device=rt.device), cfg.sample_tokens,
                                 temperature=cfg.sample_temperature, top_k=200,
                                 vocab_limit=setup.meta["vocab_size"], generator=generator)
    text = tokenizer.decode(ids[0, len(start):].tolist())
    run.log.log({"step": step, "sample": text}, f"step {step}: sample\n{text}\n")
