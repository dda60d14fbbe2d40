# GPT-2 (124M) on FineWeb with the modern recipe, aimed at val <= 3.28 within 1B tokens, on one node
# of 8 GPUs:
#   python prepare.py fineweb10B  # val_000000.bin + 100M-token train shards (10 of them are enough)
#   torchrun --standalone --nproc_per_node=8 train.py config/fineweb_speedrun.py
# EXPECTED, NOT MEASURED HERE: no GPU run of this file has been made yet. The ideas are those of
# modded-nanogpt's records of late 2024 (3.28 in about 1B tokens), each measured at small scale in
# bench/RESULTS.md's ablation; config/fineweb.py is the GPT-2 recipe (3.28 after about 10B tokens)
# to compare it with. Val is measured as the speedruns measure it: the first 10,485,760 tokens of
# the val shard, back to back.
out_dir = "out-fineweb-speedrun"
dataset = "fineweb10B"

# 16 sequences x 1024 tokens x 32 micro-batches (4 per GPU on 8 GPUs) = 524,288 tokens per step
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32
max_iters = 1875  # x 524,288 = 983M tokens at most
lr_decay_iters = 1875
target_val_loss = 3.28  # stop at the first evaluation at or below it

# GPT-2 small's shape with the options that won at small scale
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
dropout = 0.0
bias = False
pos_embedding = "rope"
norm = "rmsnorm"
mlp = "relu2"
qk_norm = True
tie_embeddings = False
zero_init_proj = True
logit_softcap = 30.0
value_embeddings = 3
unet_skips = True

# Muon for the blocks' matrices; AdamW (no decay) for the embeddings, the head and the scalars, each
# at its own peak lr (learning_rate is that of the norms' and skips' scalars); no warmup, a constant
# lr, then a linear cooldown over the last 40% of the steps
optimizer = "muon"
muon_lr = 0.05
muon_split = "whole"  # whole matrices, as in the records: cheap on GPUs at 524,288 tokens a step
learning_rate = 0.04
embedding_lr = 0.6
head_lr = 0.008
min_lr = 0.0
beta1 = 0.8
beta2 = 0.95
weight_decay = 0.0
grad_clip = 0.0
warmup_iters = 0
lr_schedule = "wsd"
cooldown_frac = 0.4

eval_interval = 125
val_tokens = 10485760  # = 640 batches of 16 x 1024
eval_iters = 20  # the train split's fixed batches only
log_interval = 10
ckpt_interval = 500
sample_interval = 0
dtype = "auto"  # bf16 on A100/H100
compile = "true"
