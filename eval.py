"""Multiple-choice evaluation, HellaSwag style:
`python eval.py [--out_dir=out | --init_from=gpt2] [--task=hellaswag]`.

A task is JSON Lines in HellaSwag's layout, one example a line: {"ctx": str, "endings": [str, ...],
"label": int}. Each ending is scored as llm.c's dev/data/hellaswag.py scores it ("completion
style"): the context's tokens, then the ending's, encoded as " " + ending; the loss counts the
ending's tokens only. `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest mean
loss per token (which does not favour short endings). A context and ending longer than the model's
context keep their last tokens; the cut is counted and reported.

`--task=hellaswag` is the official val split (10,042 examples), downloaded once into `cache_dir` and
checked against its sha256. Under torchrun the processes share the examples and rank 0 reports for
all. The training loop can call load_task once and evaluate_task at any step.
"""

import hashlib
import http.client
import json
import os
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from checkpoint import CheckpointError
from configurator import ConfigError, run_main
from devices import DeviceConfig, runtime
from sample import load_model, weights_checkpoint

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
out_dir = "out"  # run folder to evaluate (train.py's default run)
ckpt = "best"  # which checkpoint: best (lowest val loss) or last {best|last}
init_from = ""  # weights: gpt2 ... gpt2-xl, a Hugging Face folder, or a run folder or checkpoint
adapters = ""  # LoRA adapters for the init_from weights: a folder from export.py --adapters_only
task = "hellaswag"  # hellaswag (its val split, downloaded once) or a JSON Lines file in its layout
max_examples = 0  # evaluate the task's first N examples only; 0 evaluates all {>= 0}
cache_dir = ""  # --task=hellaswag's cache folder; empty: $XDG_CACHE_HOME (or ~/.cache)/gpt-trainer
out = ""  # also write the scores and every example's predictions and losses to this JSON file
# device and dtype are devices.DeviceConfig's keys (--help lists them last)
# ---- end of config ----

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# The file's sha256 (12,246,618 bytes) as Hugging Face's datasets recorded it for its hellaswag
# builder (datasets/hellaswag/dataset_infos.json); unchanged in the hellaswag repository since 2019.
HELLASWAG_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
LAYOUT = '{"ctx": str, "endings": [str, ...], "label": int}'


# ---- tasks ----

def fetch(url):
    """The bytes at `url` (the tests put a fake in its place)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def hellaswag_file(cache_dir=""):
    """The HellaSwag val split's path in the cache, downloaded and checked first if missing. Written
    under a temporary name, renamed once its checksum matches, so no bad copy is ever cached."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
    folder = Path(cache_dir or cache_home / "gpt-trainer").expanduser()
    path = folder / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    print(f"downloading {HELLASWAG_URL} to {path}")
    try:
        content = fetch(HELLASWAG_URL)
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        raise data.DataError(f"could not download HellaSwag's val split ({e}); without a network, "
                             "give the task as the path of a copy of hellaswag_val.jsonl") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != HELLASWAG_SHA256:
        raise data.DataError(f"the downloaded hellaswag_val.jsonl has sha256 {digest}, not "
                             f"{HELLASWAG_SHA256}, so it is not the official val split and was not "
                             f"kept; retry, or download {HELLASWAG_URL} yourself and give "
                             "the task as its path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # each torchrun process writes its own
    tmp.write_bytes(content)
    os.replace(tmp, path)
    return path


def load_task(task, max_examples=0, cache_dir="", tokenizer=None):
    """A task's examples as {"ctx", "endings", "label", "line"} dicts in file order, the first
    `max_examples` (0: all): `hellaswag` or a JSON Lines file's path. DataError naming the file and
    line for a malformed one, or (given the tokenizer) for text it cannot encode: found here, in
    every process, not mid-scoring."""
    path = hellaswag_file(cache_dir) if task == "hellaswag" else Path(task)
    if not path.is_file():
        raise data.DataError(f"task file {path} does not exist; give the task as hellaswag or "
                             f"the path of a JSON Lines file of {LAYOUT} lines")
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if max_examples and len(examples) == max_examples:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise data.DataError(f"{path} line {number} is not UTF-8 text; give a JSON Lines "
                                     f"file of {LAYOUT}") from None
            if line.strip():
                examples.append(parse_example(line, path, number))
    if not examples:
        raise data.DataError(f"task file {path} holds no examples; give a JSON Lines file of "
                             f"{LAYOUT} lines")
    if tokenizer is not None:
        check_encodable(examples, tokenizer, path)
    return examples


def check_encodable(examples, tokenizer, path):
    """DataError naming the first line of the task file whose text the tokenizer cannot encode (as
    score() encodes it): found before scoring starts, in every process."""
    for example in examples:
        try:
            for text in (example["ctx"], *(" " + ending for ending in example["endings"])):
                tokenizer.encode(text)
        except data.DataError as e:
            raise data.DataError(f"{path} line {example['line']}: {e}") from None


def parse_example(line, path, number):
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise data.DataError(f"{where} is not JSON ({e.msg}); each line must be one "
                             f"{LAYOUT} object") from None
    fields = record if isinstance(record, dict) else {}
    ctx, endings, label = fields.get("ctx"), fields.get("endings"), fields.get("label")
    if not isinstance(ctx, str) or not ctx:  # an ending's first token needs a context
        problem = "has no ctx (a non-empty string)"
    elif (not isinstance(endings, list) or len(endings) < 2
          or not all(isinstance(e, str) for e in endings)):
        problem = "has no endings (a list of two or more strings)"
    elif type(label) is not int or not 0 <= label < len(endings):
        problem = f"has label {label!r}, not the index of one of its {len(endings)} endings"
    else:
        return {"ctx": ctx, "endings": endings, "label": label, "line": number}
    raise data.DataError(f"{where} {problem}; each line must be one {LAYOUT} object")


# ---- scoring ----

def score(model, tokenizer, example, device, autocast):
    """One example's endings in one forward: a row per ending (context then ending, its last
    block_size tokens), padded at the end (causal attention keeps padding out of the positions
    before it), with targets -100 everywhere but at the ending's tokens. The logits stop at the
    tokenizer's vocabulary, leaving out the entries that pad the model's (50304 for GPT-2's 50257
    tokens), as sample.py's vocab_limit does."""
    block_size = model.config.block_size
    context = tokenizer.encode(example["ctx"])
    rows = [context + tokenizer.encode(" " + ending) for ending in example["endings"]]
    idx = torch.zeros(len(rows), min(block_size, max(map(len, rows))), dtype=torch.long)
    targets = torch.full_like(idx, -100)
    for i, row in enumerate(rows):
        kept = row[-block_size:]
        scored = min(len(row) - len(context), len(kept) - 1)  # the first kept token is unscored
        idx[i, :len(kept)] = torch.tensor(kept)
        targets[i, len(kept) - 1 - scored:len(kept) - 1] = torch.tensor(kept[len(kept) - scored:])
    with autocast:
        logits, _ = model(idx.to(device))
    logits = logits[..., :tokenizer.vocab_size].float()
    targets = targets.to(device)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                             reduction="none").view(targets.shape).sum(1)
    tokens = (targets != -100).sum(1)
    return {"label": example["label"], "pred": int(losses.argmin()),
            "pred_norm": int((losses / tokens).argmin()), "losses": losses.tolist(),
            "tokens": tokens.tolist(), "cut": sum(max(0, len(r) - block_size) for r in rows)}


@torch.no_grad()
def evaluate_task(model, tokenizer, examples, device, autocast, rank=0, world_size=1):
    """Score `examples` (from load_task) with a GPT whose forward(idx) returns every position's
    logits, under `autocast` (a devices.Runtime.autocast()). Pass the plain GPT: a DDP wrapper has
    no config (the context length), a compiled one would recompile for the rows' changing lengths,
    and FSDP would need the same number of forwards in every process.

    Returns {acc, acc_norm, n, truncated (examples cut to the context), cut_tokens, examples},
    `examples` per example in task order: label, pred (by summed loss), pred_norm (by mean loss),
    losses (summed, per ending), tokens (scored, per ending), cut (tokens cut). Each of world_size
    processes (in an initialised process group if > 1) scores every world_size-th example, all
    returning the same dict. The model runs in eval mode, then returns to the mode it was in.
    """
    was_training = model.training
    model.eval()
    mine = range(rank, len(examples), world_size)
    pairs = [(i, score(model, tokenizer, examples[i], device, autocast)) for i in mine]
    model.train(was_training)
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, pairs)
        pairs = [pair for part in parts for pair in part]
    results = [result for _, result in sorted(pairs, key=lambda pair: pair[0])]
    n = len(results)
    return {"acc": sum(r["pred"] == r["label"] for r in results) / n,
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in results) / n, "n": n,
            "truncated": sum(r["cut"] > 0 for r in results),
            "cut_tokens": sum(r["cut"] for r in results), "examples": results}


# ---- the script ----

def report(cfg, result, seconds, block_size):
    speed = result["n"] / seconds
    print(f"{cfg.task}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f}, "
          f"n {result['n']} ({speed:.1f} examples/s)")
    if result["truncated"]:
        print(f"note: {result['truncated']} example(s) ran past the model's context of "
              f"{block_size} tokens and kept their last tokens: "
              f"{result['cut_tokens']} tokens cut in all")
    if cfg.out:
        summary = {"task": cfg.task,
                   "model": str(weights_checkpoint(cfg) or cfg.init_from),
                   "adapters": cfg.adapters or None,
                   "examples_per_s": speed, **result}
        Path(cfg.out).write_text(json.dumps(summary) + "\n")
        print(f"wrote {cfg.out}")


def evaluate(cfg):
    """Evaluate alone, or as one of torchrun's processes (torchrun sets RANK and the rest)."""
    if cfg.out and (Path(cfg.out).is_dir() or not Path(cfg.out).parent.is_dir()):  # before scoring
        raise ConfigError(f"out {cfg.out} is a folder or in a folder that does not exist; pass a "
                          "file path such as scores.json")
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = (int(os.environ[key])
                                        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    rt = runtime(cfg, local_rank, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if distributed:
        if rt.device_type == "cuda":
            torch.cuda.set_device(rt.device)
        dist.init_process_group(backend="nccl" if rt.device_type == "cuda" else "gloo")
    try:
        examples = load_task(cfg.task, cfg.max_examples, cfg.cache_dir)
        model, meta = load_model(cfg)
        model = model.to(rt.device)
        tokenizer = data.get_tokenizer(meta)
        check_encodable(examples, tokenizer, cfg.task)
        started = time.perf_counter()
        result = evaluate_task(model, tokenizer, examples, rt.device, rt.autocast(),
                               rank, world_size)
        if rank == 0:
            report(cfg, result, time.perf_counter() - started, model.config.block_size)
    finally:
        if distributed:
            dist.destroy_process_group()


def main(argv=None):
    run_main(evaluate, __file__, argv, DeviceConfig, errors=(CheckpointError, data.DataError))


if __name__ == "__main__":
    main()
