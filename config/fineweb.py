# GPT-2 (124M) on 10B tokens of FineWeb, on one node of 8 GPUs:
#   python prepare.py fineweb10B    # ~10B GPT-2 tokens: val_000000.bin + 100M-token train shards
#   torchrun --standalone --nproc_per_node=8 train.py config/fineweb.py
# docs/multi-gpu.md shows the same recipe scaled down for one GPU and for CPU, and a 2-node launch.
out_dir = "out-fineweb"
dataset = "fineweb10B"

# 16 sequences x 1024 tokens x 32 micro-batches (4 per GPU on 8 GPUs) = 524,288 tokens per step
# (~0.5M). With fewer GPUs keep gradient_accumulation_steps = 32: each process then runs
# 32 / world_size micro-batches.
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32
max_iters = 19073  # x 524,288 tokens = 10.0B tokens, one pass over the prepared data
lr_decay_iters = 19073

# GPT-2 small, the vocabulary padded from 50,257 to 50,304 (a multiple of 64) for faster matmuls
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
dropout = 0.0
bias = True

# GPT-2's architecture and AdamW: train.py's defaults are the modern options and Muon
pos_embedding = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False
optimizer = "adamw"

# AdamW as in GPT-3 small: peak 6e-4, warmup, cosine to 10%
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_iters = 20  # 20 x 16 x 1024 = 327,680 tokens per split, shared among the processes
log_interval = 10
ckpt_interval = 1000
keep_last_k = 3
sample_interval = 1000
dtype = "auto"  # bf16 on A100/H100
compile = "true"
