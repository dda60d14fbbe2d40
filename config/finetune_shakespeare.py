# Fine-tune GPT-2 (124M) on tiny-shakespeare, nanoGPT's classic fine-tune (gpt2-xl on a big GPU).
# First: python prepare.py text --input path/to/tinyshakespeare.txt --tokenizer gpt2 \
#          --name shakespeare_gpt2
# The weights come from the Hugging Face hub (pip install huggingface_hub) or a local GPT-2 folder.
init_from = "gpt2"
dataset = "shakespeare_gpt2"
out_dir = "out-shakespeare-finetune"
eval_interval = 5
eval_iters = 40
log_interval = 1
sample_interval = 20

block_size = 1024
batch_size = 1  # 1 x 1024 tokens x 32 micro-batches = 32,768 tokens per step
gradient_accumulation_steps = 32
max_iters = 20  # shakespeare is ~300K GPT-2 tokens: 20 steps are about two passes
dropout = 0.0

learning_rate = 3e-5  # a constant, small learning rate: the weights are already good
min_lr = 3e-5
warmup_iters = 0
weight_decay = 0.1
optimizer = "adamw"  # Muon (train.py's default) is untested for fine-tuning here

# GPT-2's architecture, as the weights are (train.py's defaults are the modern options and Muon)
pos_embedding = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False
