"""Default configuration: a small byte-level GPT on the built-in corpus.

Sized so that `jaxdp train` with no arguments finishes in a few minutes on a 2-core CPU
and reaches a validation loss well under the unigram entropy of the text (~3.3 nats).
Every field has one comment; `docs/configuration.md` is generated from these comments.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, data order and dropout; same seed => bitwise same run.
  c.num_steps = 600  # Optimizer steps to train for (the run stops here).
  c.global_batch_size = 32  # Sequences per optimizer step, summed over all devices and micro-batches.
  c.batch_ramp = ""  # Batch-size ramp "BATCH:STEPS,...": the first STEPS steps take BATCH sequences each, then the next stage, then global_batch_size (a stage larger than global_batch_size is refused); the data continues where it stopped (docs/data.md). Each size compiles the step once: keep stages few. "" is none.
  c.seq_len = 128  # Tokens per training sequence (the model's context length).
  c.grad_accum_steps = 1  # Micro-batches per optimizer step; gradients are token-weighted and all-reduced once.
  c.optimizer = "adamw"  # Update rule: "adamw", "sgd" (momentum; wants a ~100x larger learning_rate, e.g. 0.3 here), "lion" (3-10x smaller), "adafactor" (factored; ~10x larger, e.g. 3e-2) or "muon" (orthogonalised momentum for hidden 2-D weight matrices, Adam for the rest).
  c.learning_rate = 3e-3  # Peak learning rate, reached at the last warmup step.
  c.schedule = "cosine"  # Learning rate after warmup: "cosine" or "linear" decay to min_lr_ratio * peak at lr_decay_steps, "constant" (the peak), or "wsd" (warmup-stable-decay: the peak, then linear decay over the last decay_fraction of lr_decay_steps).
  c.min_lr_ratio = 0.1  # Final learning rate of the decay, as a fraction of the peak.
  c.warmup_steps = 50  # Linear warmup steps: step i (from 0) uses peak * (i + 1) / warmup_steps, so the first step already learns; 0 disables warmup.
  c.lr_decay_steps = config_dict.placeholder(int)  # Update at which the decay reaches its minimum; None means num_steps as the run started: a resume with another num_steps (extending a finished run) keeps the checkpoint's horizon and prints a notice; set it to decay over another horizon.
  c.decay_fraction = 0.2  # schedule="wsd": fraction of lr_decay_steps, at its end, over which the rate decays linearly to the minimum.
  c.weight_decay = 0.1  # Decoupled weight decay for every optimizer (multiplied by the scheduled rate), on weight matrices and embeddings only: not biases, norm parameters or other vectors.
  c.decay_exclude = ""  # Comma-separated parameter path-name substrings never weight-decayed, e.g. "wpe,embedding" (biases and norms never are).
  c.b1 = 0.9  # First-moment decay of adamw, lion and muon's Adam branch.
  c.b2 = 0.99  # Second-moment decay of adamw, lion and muon's Adam branch.
  c.momentum = 0.9  # optimizer="sgd": heavy-ball momentum; 0 is plain SGD.
  c.nesterov = False  # optimizer="sgd": use Nesterov momentum.
  c.grad_clip = 1.0  # Clip gradients to this global L2 norm; 0 disables clipping.
  c.log_every = 10  # Steps between train metric lines (metrics are fetched from the device only then).
  c.eval_every = 100  # Steps between evaluations on the validation split; 0 disables periodic evaluation.
  c.eval_steps = 8  # Evaluation covers the first eval_steps x global_batch_size validation windows (all of them if fewer), each once, a partial last batch padded with zero-weight rows; 0 evaluates the whole validation split.
  c.eval_tasks = ""  # Downstream tasks scored at each evaluation, after the validation loss: "KIND:FILE" joined by commas, hellaswag:FILE.jsonl (multiple choice in HellaSwag's JSONL: acc, acc_norm) or text:FILE (loss, perplexity, bits per byte); metrics named FILE_STEM/METRIC in metrics.jsonl (docs/evaluation.md); "" disables.
  c.patience = 0  # Early stopping: stop after this many evaluations without improvement; 0 disables.
  c.checkpoint_every = 200  # Steps between checkpoints (one is always written at the end); 0 writes only the final one.
  c.checkpoint_every_minutes = 0.0  # Also checkpoint when this many minutes passed since the last save (whichever of it and checkpoint_every comes first; judged at train lines by process 0's clock, the same step on every process); 0 disables.
  c.keep_last = 3  # Most recent checkpoints kept on disk (the best by validation loss, and the last one followed by a sane train loss, are kept as well).
  c.checkpoint_dir = ""  # Where checkpoints go: "" is WORKDIR/checkpoints; or a folder, or s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (pip install 'jaxdp[cloud]'; S3 endpoint and credentials from the standard AWS environment, e.g. AWS_ENDPOINT_URL); metrics and logs stay in the workdir, which records it (docs/multihost.md).
  c.keep_every = 0  # Also keep every checkpoint whose step is a multiple of this; 0 keeps none extra.
  c.nan_policy = "halt"  # Non-finite loss or gradients (fp16: also an overflow at loss scale 1): "halt" (stop, save the state before it, name the last checkpoint with a sane train loss and the command to go on from it) or "skip" (drop the update, go on).
  c.max_consecutive_skips = 10  # nan_policy="skip": halt after this many dropped updates in a row.
  c.spike_policy = "off"  # Loss spikes (a loss above the mean + spike_sigmas std of about the last spike_window steps): "off", "skip" (the step drops that update, counted in skipped_steps) or "rollback" (back to the last checkpoint before the spike, its batch skipped and recorded so a resume reproduces the run); docs/troubleshooting.md.
  c.spike_sigmas = 6.0  # spike_policy "skip" or "rollback": standard deviations above the running mean that make a loss a spike.
  c.spike_window = 100  # spike_policy "skip" or "rollback": steps the running mean and std of the loss average over (spikes are judged once this many losses were seen).
  c.spike_max_rollbacks = 3  # spike_policy="rollback": halt, with advice, at the spike that would be rollback number spike_max_rollbacks + 1 within spike_rollback_window steps.
  c.spike_rollback_window = 1000  # spike_policy="rollback": steps over which spike_max_rollbacks is counted.
  c.strategy = "dp"  # Parallelism: "dp" (shard_map, replicated state), or ZeRO under jit: "zero1" (optimizer state split over devices), "zero2" (also gradients), "zero3" (also parameters).
  c.offload_optimizer = False  # ZeRO-Offload: keep the optimizer state in pinned host memory (GPU/TPU; an error on CPU).
  c.step_timeout_s = 0.0  # Exit (status 3) if a training step takes longer than this many seconds, or (multi-process) a peer sends no heartbeat for this long in any phase, naming it and writing stacks to WORKDIR/hang/; 0: no step timing, and peers judged after 60 s. The first step (compilation) is not timed.
  c.straggler_factor = 1.5  # Warn (once per episode) about a process whose host time per step is this many times the other processes' median over health_window train lines, naming its index and host; 0 disables.
  c.grad_outlier_factor = 3.0  # Warn (once per episode) about a data-parallel device whose local gradient norm is this many times above (or below 1/this of) the other devices' median over health_window train lines; 0 disables.
  c.health_window = 5  # Train lines the straggler and gradient-outlier warnings average over.
  c.preempt_exit_code = 75  # Exit status of `jaxdp train` stopped by SIGTERM, SIGINT or SIGUSR1 after saving a checkpoint (resumable; every process agrees on the step): 75 (EX_TEMPFAIL) tells a requeueing scheduler "run again"; 0 reports it as success. 0-255, not 1-3 (errors, timeouts).
  c.reduction = "allreduce"  # How gradients, loss and token counts are summed over devices: "allreduce" (XLA's all-reduce, fastest; the order of addition depends on the device count, so another device count agrees within rounding) or "fixed_order" (a fixed binary tree over virtual_shards shards: bitwise the same run on 1, 2, 4, ... devices that divide virtual_shards; docs/determinism.md).
  c.virtual_shards = 8  # reduction="fixed_order": shards each micro-batch is split into (a power of two dividing global_batch_size / grad_accum_steps); the run is bitwise the same on every power-of-two device count that divides it, so set it to the largest device count the run may use.
  c.allreduce = "pmean"  # Gradient all-reduce: "pmean" (XLA all-reduce), "ring" (explicit ppermute ring) or "ps" (parameter server on device 0).
  c.compression = "none"  # Gradient compression: "none", "topk", "randomk" (sparsify), "int8" (per-chunk scale), "bf16" or "powersgd" (rank-compression_rank factors of each matrix).
  c.compression_ratio = 0.01  # Fraction of gradient entries top-k/random-k send each step.
  c.error_feedback = True  # Keep what compression dropped (per device, checkpointed) and add it to the next step's gradient.
  c.compression_rank = 4  # compression="powersgd": rank of each gradient matrix's approximation (>= 1; capped at the matrix's smaller side).
  c.compression_warmup_steps = 0  # topk/randomk: DGC warm-up steps, density 1/4, 1/16, ... down to compression_ratio; with compression_optimizer="frozen_variance": dense Adam steps before the variance freezes; 0 disables.
  c.local_grad_clip = 0.0  # Compression: each device clips its gradient share to this global-norm threshold x sqrt(devices) before compressing (DGC); 0 disables.
  c.compression_optimizer = "none"  # "none", or "frozen_variance" (1-bit Adam, optimizer="adamw"): after compression_warmup_steps dense steps Adam's variance freezes and the momentum is compressed instead of the gradient.
  c.momentum_correction = 0.0  # Top-k/random-k: local momentum accumulated before sparsifying (DGC); 0 disables.
  c.sync = "every_step"  # "every_step", "local_sgd" (average parameters every sync_every steps) or "stale" (apply gradients `staleness` steps old).
  c.sync_every = 4  # local_sgd: local optimizer steps between parameter averages (H).
  c.staleness = 1  # stale: age in steps of the averaged gradient applied (tau; 0 equals every_step).
  c.diloco = False  # local_sgd: move the average with an outer Nesterov SGD step on (anchor - average) (DiLoCo).
  c.outer_lr = 0.7  # DiLoCo outer learning rate.
  c.outer_momentum = 0.9  # DiLoCo outer Nesterov momentum; 0 is plain outer SGD.
  c.attention = "xla"  # Attention kernel: "xla" (jax.nn.dot_product_attention), "cudnn" (fused, GPU only) or "reference" (explicit einsum).
  c.precision = "fp32"  # Compute precision: "fp32", "bf16" (bf16 activations, fp32 params and optimizer) or "fp16" (same, with dynamic loss scaling).
  c.loss_scale_init = 2.0 ** 15  # fp16: initial loss scale (halved on every overflowing step, which is skipped; at 1 it cannot fall further, and an overflow there falls under nan_policy).
  c.loss_scale_period = 200  # fp16: overflow-free steps after which the loss scale doubles.
  c.init_from = ""  # Initial parameters of a fresh run: "" (random, from seed) or "hf:DIR", a local Hugging Face GPT-2 (family gpt, positions learned), Llama, Qwen2/2.5, Qwen3 or Mistral checkpoint (config.json + model.safetensors or its shards) whose architecture config.model must match; a resumed run keeps its checkpoint.
  c.target_losses = ""  # Eval losses to report the time to, e.g. "2.0,1.8,1.6": the first evaluation at or below each logs a "target_reached" line (step, tokens, wall and productive seconds) to metrics.jsonl and the run's summary; needs evaluation (eval_every, or the final one); "" disables.
  c.profile_steps = ""  # "START:STOP" writes a jax.profiler trace of the steps after step START up to step STOP into WORKDIR/profile (TensorBoard's profile plugin, Perfetto); START must be below num_steps (a window past the run's end would trace nothing; one that ends past it traces up to the end); "" disables.
  c.remat = "none"  # Activation rematerialisation: "none", "block" (keep matmul outputs, recompute the rest) or "full" (keep only block inputs).

  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""  # Weights & Biases project that receives the run's metrics and config (pip install 'jaxdp[wandb]'); "" disables.
  c.wandb.mode = "offline"  # W&B mode: "offline" (files in WORKDIR/wandb, or $WANDB_DIR; upload later with `wandb sync`), "online" (needs `wandb login` or WANDB_API_KEY) or "disabled".

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # Training data: "" for the built-in corpus (tinyshakespeare), a UTF-8 text file (byte tokens), a directory written by `jaxdp prepare` (read with its own tokenizer), or nanoGPT/llm.c .bin token files (a file, or a folder whose files named *val* are the validation split).
  c.data.val_fraction = 0.1  # Fraction of the corpus (its tail) held out for validation (not used for a .bin folder with val files).
  c.data.tokenizer = ""  # Tokenizer of .bin token files: a tokenizer.json (or .tiktoken) path; "" uses the tokenizer.json beside the .bin files. Ignored for other data.
  c.data.packing = "concat"  # "concat": windows cut across documents; "document": also segment ids and positions, so attention never crosses a document's end-of-text token.
  c.data.sources = ""  # Weighted mixture instead of data.path: "PATH:WEIGHT,PATH:WEIGHT" (weights > 0, normalised, rounded to 1/1000); every source needs the same tokenizer. "" uses data.path.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 0  # Devices on the "data" axis (ZeRO and batch split); 0 or -1 means all devices left after mesh.model.
  c.mesh.replica = 1  # Hybrid sharding: groups on the outer "replica" axis; the batch is split over replica x data, ZeRO splits state within a data group and keeps one copy per group (e.g. replica = hosts, data = GPUs per host); 1 is no hybrid axis.
  c.mesh.model = 1  # Devices on the "model" axis: the dimensions the model annotates as heads, kv_heads or mlp are split over it, Megatron-style (zero strategies); 1 is plain data parallelism.

  c.model = ml_collections.ConfigDict()
  c.model.family = "gpt"  # Built-in model: "gpt" (LayerNorm, GELU MLP, biases, tied head) or "llama" (RMSNorm, SwiGLU, grouped-query attention, no biases).
  c.model.n_layer = 4  # Transformer blocks.
  c.model.n_head = 4  # Attention heads per block.
  c.model.d_model = 128  # Residual stream width; must be divisible by n_head.
  c.model.mlp_ratio = 4.0  # MLP hidden width as a multiple of d_model (a float: Qwen2.5-0.5B's is 4864 * 1.5 / 896).
  c.model.mlp_dim = 0  # MLP hidden width itself, used instead of mlp_ratio when set (a checkpoint's intermediate_size, e.g. Llama-2-7B's 11008); 0 means from mlp_ratio.
  c.model.dropout = 0.0  # Dropout rate on attention output, MLP output and embeddings.
  c.model.positions = "rope"  # Position encoding: "rope" (rotary) or "learned" (absolute embeddings; gpt only).
  c.model.rope_theta = 10000.0  # Base of the rotary frequencies (larger suits longer contexts).
  c.model.n_kv_head = 0  # llama: key/value heads for grouped-query attention, dividing n_head; 0 means n_head.
  c.model.pad_vocab_to_multiple = 1  # Round the tokenizer's vocabulary up to a multiple of this (e.g. 64: GPT-2's 50257 -> 50304) for faster matmuls; padded ids get -inf logits.
  c.model.tie_embeddings = True  # Output head shares the input embedding matrix; False gives the model an output head of its own.
  c.model.norm_eps = 0.0  # Epsilon of every LayerNorm/RMSNorm; 0 means the family default (gpt 1e-6, llama 1e-5); GPT-2 checkpoints use 1e-5.
  c.model.variant = ""  # llama: the Hugging Face class imported and exported: "" (Llama), "qwen2" (needs qkv_bias), "qwen3" (needs qk_norm) or "mistral".
  c.model.head_dim = 0  # llama: head size independent of d_model / n_head (Qwen3: 128); 0 means d_model / n_head.
  c.model.qkv_bias = False  # llama: biases on the q, k and v projections (Qwen2/2.5; needs variant qwen2).
  c.model.qk_norm = False  # llama: RMSNorm over each head's q and k before rotary positions (Qwen3; needs variant qwen3).
  c.model.sliding_window = 0  # llama: each query attends to its last this many positions, itself included (Mistral, Qwen with use_sliding_window); 0 means all.
  return c
