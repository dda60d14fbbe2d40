# The character-level shakespeare recipe scaled down for a laptop CPU: about a minute on two cores.
# First: python prepare.py shakespeare_char  (or --input PATH to a local copy of tinyshakespeare)
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 10
sample_interval = 1000

batch_size = 12
block_size = 64
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

# GPT-2's architecture and AdamW: train.py's defaults are the modern options and Muon
pos_embedding = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False
optimizer = "adamw"

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
compile = "false"  # at this size compiling costs more time than it saves
# dtype stays auto: bf16 autocast on a CPU with native bf16 (1.36x per step here, bench/RESULTS.md),
# else fp32
