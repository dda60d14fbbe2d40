# A small character-level GPT on tiny-shakespeare: the GPU recipe (minutes on one GPU).
# First: python prepare.py shakespeare_char
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250  # evaluate often: this model overfits
eval_iters = 200
log_interval = 10
sample_interval = 1000

batch_size = 64
block_size = 256  # context of up to 256 previous characters
gradient_accumulation_steps = 1

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

# GPT-2's architecture and AdamW: train.py's defaults are the modern options and Muon
pos_embedding = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False
optimizer = "adamw"

learning_rate = 1e-3  # small networks can take a higher learning rate
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little higher than usual: few tokens per step
warmup_iters = 100
