"""Export a run's checkpoint in a Hugging Face layout: `python export.py out/best.pt hf-dir/`.

The layout follows the run's architecture options (hf.LAYOUTS): GPT-2's (GPT2LMHeadModel), Llama's
(LlamaForCausalLM: rotary positions, RMSNorm, SwiGLU) or Qwen3's (Qwen3ForCausalLM: those with
QK-norm); options none holds are refused. The folder gets config.json and model.safetensors, which
transformers loads with the same logits (and hf.load_hf loads back), plus the run's meta.json, from
which data.get_tokenizer rebuilds its tokenizer. A tokenizer that prepare.py trained (bpe) goes with
it as tokenizer.json and tokenizer_config.json, which transformers' AutoTokenizer loads; GPT-2 BPE
runs take GPT-2's own; byte and char tokens have none in Hugging Face. A LoRA run's adapters are
merged into the weights; with --adapters_only they are written alone instead, in PEFT's layout.
"""

import shlex
import sys
from pathlib import Path

import data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, parent_checkpoint
from configurator import ArgumentParser
from hf import WeightsError, layout_for, save_adapters, save_hf, save_tokenizer_config
from lora import adapter_state


class ExportError(Exception):
    """An export that would overwrite files; the message names the fix."""


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint",
                        help="a run's checkpoint, e.g. out/best.pt (or out/best, a sharded one), "
                             "or a run folder (its best)")
    parser.add_argument("folder",
                        help="where to write config.json, model.safetensors and meta.json")
    parser.add_argument("--crop_vocab", action="store_true",
                        help="drop the vocabulary padding beyond the tokenizer's (e.g. 50304 -> "
                             "50257 rows); the logits of real tokens stay the same")
    parser.add_argument("--adapters_only", action="store_true",
                        help="a LoRA run: write only its adapters (adapter_config.json, "
                             "adapter_model.safetensors, PEFT's layout), to apply to the base "
                             "weights it was trained on")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that is not empty")
    return parser.parse_args(argv)


def check_destination(folder, force):
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; choose a folder to export into")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ExportError(f"{folder} is not empty; pass --force to overwrite its files, or choose "
                          "another folder")


def export(checkpoint, folder, crop_vocab=False, force=False, adapters_only=False):
    """Write the checkpoint's model in the Hugging Face layout its options fit (or its LoRA adapters
    alone), and its tokenizer meta, to `folder`."""
    folder = Path(folder)
    check_destination(folder, force)
    ckpt = load_checkpoint(parent_checkpoint(checkpoint) or checkpoint)  # a run folder: best
    model, meta = model_from_checkpoint(ckpt), ckpt["meta"]
    if adapters_only:
        if not model.config.lora_rank:
            raise ExportError(f"{checkpoint} is not a LoRA run (lora_rank 0), so it has no "
                              "adapters; export it without --adapters_only")
        if ckpt["weights_from"] == "scratch":
            command = shlex.join(["python", "sample.py", f"--out_dir={ckpt['path'].parent}"])
            raise ExportError(f"{checkpoint} is a LoRA run trained from scratch: its base weights "
                              "are its own random initialisation, which exists only in the "
                              "checkpoint, so its adapters alone apply to nothing; export it "
                              "without --adapters_only (the adapters merged), or sample it with "
                              f"`{command}`")
        save_adapters(model, folder, base_model=adapters_base(ckpt))
    else:
        save_hf(model, folder, vocab_size=meta["vocab_size"] if crop_vocab else None,
                eot_id=meta["eot_id"])
    data.write_meta(folder, meta)
    if "tokenizer_json" in meta:
        save_tokenizer_config(folder, data.EOT_TEXT)
    return model, meta, adapters_base(ckpt)


def adapters_base(ckpt):
    """The weights a LoRA run's adapters apply to: its parent checkpoint's path as lineage recorded
    it (absolute), or the init_from it named (Hugging Face weights)."""
    return ckpt["parent"]["checkpoint"] if ckpt.get("parent") else ckpt["weights_from"]


def report_adapters(folder, model, base):
    print(f"wrote {folder}/adapter_config.json and adapter_model.safetensors: LoRA rank "
          f"{model.config.lora_rank} on {model.config.lora_targets}, "
          f"{sum(t.numel() for t in adapter_state(model).values()):,} parameters")
    command = shlex.join(["python", "sample.py", f"--init_from={base}", f"--adapters={folder}"])
    hf_base, export_base = str(base), ""
    if parent_checkpoint(base) is not None:  # a run of ours: PEFT needs it in a Hugging Face layout
        hf_base = str(Path(base).with_name(Path(base).name.removesuffix(".pt") + "-hf"))
        export_base = f" after `{shlex.join(['python', 'export.py', str(base), hf_base])}`"
    architecture = layout_for(model.config).architecture
    print(f"apply them to {base}: here `{command}`; with PEFT{export_base} "
          f"PeftModel.from_pretrained({architecture}.from_pretrained({hf_base!r}), "
          f"{str(folder)!r})")


def report(folder, model, meta, crop_vocab):
    cfg, layout = model.config, layout_for(model.config)
    vocab = meta["vocab_size"] if crop_vocab else cfg.vocab_size
    print(f"wrote {folder}/config.json, model.safetensors and meta.json: {cfg.n_layer} layers, "
          f"{cfg.n_head} heads, {cfg.n_embd} wide, context {cfg.block_size}, vocab {vocab} "
          f"({meta['vocab_size']} tokens)")
    print(f"load it with transformers: {layout.architecture}.from_pretrained({str(folder)!r}) "
          f"(the {layout.name} layout), or here: hf.load_hf({str(folder)!r})")
    if data.is_gpt2_bpe(meta):
        print('tokenizer: GPT-2 BPE, AutoTokenizer.from_pretrained("openai-community/gpt2")')
    elif "tokenizer_json" in meta:
        print("tokenizer: the data's own BPE (tokenizer.json), "
              f"AutoTokenizer.from_pretrained({str(folder)!r})")
    else:
        print(f"tokenizer: {meta['tokenizer']}, not a Hugging Face one; rebuild it with "
              f"data.get_tokenizer(data.read_meta({str(folder)!r}))")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, meta, base = export(args.checkpoint, args.folder, args.crop_vocab, args.force,
                                   args.adapters_only)
    except (CheckpointError, ExportError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only folder
        print(f"error: cannot write {e.filename or args.folder} ({e.strerror or e}); make room "
              "there or choose another folder", file=sys.stderr)
        sys.exit(1)
    if args.adapters_only:
        report_adapters(Path(args.folder), model, base)
    else:
        report(Path(args.folder), model, meta, args.crop_vocab)


if __name__ == "__main__":
    main()
