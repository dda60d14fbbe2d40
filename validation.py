"""What the loop decides from held-out data: each evaluation's record (best.pt on a new best val
loss, target_val_loss reached, evaluations without improvement), the stop rules that read them, the
multiple-choice task scored while training, and the test split scored once at the end."""

import math

from checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint, write_checkpoint
from eval import evaluate_task


def record_evaluation(run, losses):
    """Log an evaluation's {split: (loss, standard error)} of `run` (train.Run); a new best val loss
    saves best.pt (the weights alone). Counts the evaluations without an improvement of
    early_stop_min_delta, and records reaching target_val_loss."""
    cfg, state, log = run.cfg, run.state, run.log
    (train_loss, _), (val, val_se) = losses["train"], losses["val"]
    tokens = state.step * run.setup.tokens_per_step
    log.log({"step": state.step, "tokens": tokens, "train_seconds": state.train_seconds,
             "train_loss": train_loss, "val_loss": val, "val_loss_se": val_se,
             "val_ppl": math.exp(min(val, 50.0))},
            f"step {state.step}: eval train {train_loss:.4f}, val {val:.4f} ± {val_se:.4f}")
    if state.step > 0:  # the untrained model is neither a candidate nor a reference
        improved = val < state.best_val_loss - cfg.early_stop_min_delta
        state.stale_evals = 0 if improved else state.stale_evals + 1
    if val < state.best_val_loss and state.step > 0:
        if cfg.target_val_loss and val <= cfg.target_val_loss < state.best_val_loss:
            record_target(run, val, tokens)
        state.best_val_loss, state.best_step = val, state.step
        write_checkpoint("best", run)
    log.evaluated(state.step, tokens, val, state.best_val_loss, state.best_step)
    log.update(final_val_loss_se=val_se, train_seconds=state.train_seconds)


def record_target(run, val, tokens):
    """The first evaluation at or below target_val_loss: when, after how many tokens and seconds."""
    cfg, state, log = run.cfg, run.state, run.log
    log.log({"step": state.step, "tokens": tokens, "train_seconds": state.train_seconds,
             "target_val_loss": cfg.target_val_loss, "reached_target": True},
            f"step {state.step}: val {val:.4f} reached target_val_loss {cfg.target_val_loss} after "
            f"{tokens:,} tokens and {state.train_seconds:.1f} s of training steps")
    log.update(target_val_loss=cfg.target_val_loss, target_step=state.step, target_tokens=tokens,
               target_train_seconds=state.train_seconds)


def stop_reason(cfg, state):
    """Why the run should stop now by its rules (target_val_loss, early_stop_patience), or None."""
    if cfg.target_val_loss and state.best_val_loss <= cfg.target_val_loss:
        val, step = state.best_val_loss, state.best_step
        return f"reached target_val_loss {cfg.target_val_loss} (val {val:.4f} at step {step})"
    if cfg.early_stop_patience and state.stale_evals >= cfg.early_stop_patience:
        return (f"early stop: {state.stale_evals} evaluations without improving val loss by "
                f"more than {cfg.early_stop_min_delta}; best at step {state.best_step}")
    return None


def score_task(run):
    """Score the multiple-choice task (eval.py's rule) on the current weights; log its accuracy."""
    cfg, setup, log, step = run.cfg, run.setup, run.log, run.state.step
    result = evaluate_task(setup.gpt, setup.tokenizer, setup.task_examples, run.rt.device,
                           run.rt.autocast(), run.rank, run.world_size)
    log.log({"step": step, "tokens": step * setup.tokens_per_step, "task_acc": result["acc"],
             "task_acc_norm": result["acc_norm"], "task_n": result["n"]},
            f"step {step}: task {cfg.task_eval}: acc {result['acc']:.4f}, "
            f"acc_norm {result['acc_norm']:.4f} (n {result['n']})")
    best = max(result["acc_norm"], log.record.get("best_task_acc_norm") or 0.0)
    log.update(task=cfg.task_eval, task_acc=result["acc"], task_acc_norm=result["acc_norm"],
               best_task_acc_norm=best)


def score_test(run, estimate_loss):
    """The test split's loss (train.estimate_loss), once, at the end, with the selected checkpoint's
    weights (best.pt's, else the last's): no decision of the run ever reads it."""
    setup, log, rt = run.setup, run.log, run.rt
    setup.best_saver.wait()
    best = checkpoint_path(run.cfg.out_dir, "best", run.cfg.checkpoint_format)
    model = (model_from_checkpoint(load_checkpoint(best)).to(rt.device) if best.exists()
             else setup.model)
    test_loss, test_se = estimate_loss(model, setup.test_batches, rt.device, rt.autocast(),
                                       run.rank, run.world_size)["test"]
    used = best.name if best.exists() else "the final weights"
    log.log({"step": run.state.step, "test_loss": test_loss, "test_loss_se": test_se,
             "test_checkpoint": used},
            f"test loss {test_loss:.4f} ± {test_se:.4f} ({used}, scored once)")
    log.update(test_loss=test_loss, test_loss_se=test_se, test_checkpoint=used)
