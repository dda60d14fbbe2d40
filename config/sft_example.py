# Supervised fine-tuning of GPT-2 (124M) on config/sft_example.jsonl: small instruction records
# whose loss counts only the completion tokens and the end token (prepare.py's docstring gives the
# rendering rules).
#   python prepare.py sft --input config/sft_example.jsonl --block_size 128
#   python train.py config/sft_example.py
#   python sample.py --out_dir=out-sft --start=$'Reverse the letters of: apple\n' --temperature=0 \
#     --num_samples=1
# LoRA instead of full fine-tuning (adapters only, 0.95% of the parameters at rank 8; a higher rate
# suits them):
#   python train.py config/sft_example.py --lora_rank=8 --learning_rate=1e-3 --out_dir=out-sft-lora
out_dir = "out-sft"
init_from = "gpt2"
dataset = "sft"

batch_size = 8
block_size = 128  # as prepared: longer records were dropped there
gradient_accumulation_steps = 1
dropout = 0.0

learning_rate = 6e-5
min_lr = 6e-6
max_iters = 200
lr_decay_iters = 200
warmup_iters = 20
weight_decay = 0.0
optimizer = "adamw"  # Muon (train.py's default) is untested for fine-tuning here

# GPT-2's architecture, as the weights are (train.py's defaults are the modern options and Muon)
pos_embedding = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False

eval_interval = 50
eval_iters = 8  # 8 x 8 held-out examples, one per row: the completion-only loss
log_interval = 10
sample_interval = 0
