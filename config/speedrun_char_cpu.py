# The fastest way found on a 2-core CPU to val <= 1.88 on shakespeare_char (the same data and fixed
# val batches as config/shakespeare_char_cpu.py, the nanoGPT-comparable baseline): the modern
# architecture options and Muon, on a shorter schedule: val 1.864 at step 450, in 0.27 of the
# baseline's training seconds (bench/time_to_loss.py, bench/RESULTS.md).
# First: python prepare.py shakespeare_char  (or --input PATH to a local copy of tinyshakespeare)
out_dir = "out-speedrun-char-cpu"
dataset = "shakespeare_char"
eval_interval = 50
eval_iters = 20
log_interval = 10
sample_interval = 0
target_val_loss = 1.88

batch_size = 12
block_size = 64
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos_embedding = "rope"
norm = "layernorm"
mlp = "relu2"
qk_norm = True

optimizer = "muon"
muon_lr = 0.02
muon_split = "head"  # strips a head wide: 1.88 at the same step as whole matrices, 0.88 of the time
learning_rate = 3e-3
max_iters = 1000
lr_decay_iters = 1000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 50
compile = "false"
