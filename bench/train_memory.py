"""Peak memory of one training step: full fine-tune against LoRA against gradient checkpointing.

A GPT-2 of ruGPT-3 medium's shape (24 layers, 1024 wide, 16 heads, vocabulary
50,257, 2,048 positions; 356M parameters) is built from a config with random
weights, since the weights cannot be downloaded here, and trained for one
optimizer step (forward, backward, AdamW step) through transformers' Trainer on
the CPU in fp32, set up by train_medium_context.py's own functions (parse_args
with the variant's flags, apply_lora, cast_frozen_weights, training_arguments),
so it measures the trainer's path. Each variant runs in a process of its own and
reports the peak of its own resident memory (VmHWM of /proc/self/status, which a child process
does not inherit); the table gives each peak as a ratio to the full fine-tune of
the same run, beside the bytes per parameter the arithmetic predicts for the
weights, gradients and AdamW state:

    full         every weight trains: 4 (weight) + 4 (gradient) + 8 (AdamW m, v) = 16 B/param
    lora         weights frozen at 4 B/param; only the adapters (16*r*d a layer) carry
                 gradient and AdamW state, 16 B each
    ckpt, lora+ckpt   the same state; activations kept only at block inputs and
                 recomputed in the backward pass

Optional variants (--variants): full-8bit (AdamW with 8-bit state, bitsandbytes,
4+4+2 = 10 B/param; skipped where bitsandbytes is not installed) and lora-bf16
(the frozen weights stored in bf16, 2 B/param, as on a GPU).

Run it (4-8 minutes on 2 cores; one variant at a time, peak 6.4 GiB at the defaults, 8.4 GiB
with --seq-len 256 --batch-size 4):
    python bench/train_memory.py
    python bench/train_memory.py --seq-len 256 --batch-size 4            # more activations
    python bench/train_memory.py --n-layer 4 --n-embd 256 --n-head 4     # a quick check
    python bench/train_memory.py --variants full,lora,ckpt,lora+ckpt,full-8bit,lora-bf16
    python bench/train_memory.py --gpu-table                             # the README's GPU table, arithmetic

--gpu-table prints the README's table "Which model on which GPU" in markdown: the GPU memory of a
training step by arithmetic, not measured (no model is loaded, no GPU needed; GB = 10**9 bytes).
For a GPT-2 of L layers, width h, vocabulary V and P positions, s x b tokens a batch (384 x 8, the
defaults of train_medium_context.py) and LoRA of rank r on c_attn, c_proj and c_fc:

    N parameters   V*h + P*h + L*(12*h*h + 13*h) + 2*h     (the head shares the embeddings' weights)
    A adapter      r*(fan_in + fan_out) for each adapted layer = 16*r*h a block (c_attn h->3h,
      parameters   attention c_proj h->h, c_fc h->4h, MLP c_proj 4h->h), so 16*r*h*L
    activations    34*s*b*h*L bytes: 16-bit, per block 34*s*b*h (Korthikanti et al. 2022 without the
                   attention scores, which SDPA does not keep)
    checkpointed   2*s*b*h*L + 34*s*b*h: only the block inputs (16-bit) are kept, and one block's
                   activations are alive again while it is recomputed
    logits, loss   10*s*b*V: the 16-bit logits (2), their fp32 copy for the loss (4), its gradient (4)
    LoRA dropout   7*s*b*h*L: with --lora-dropout above 0 (the trainers' default 0.05) each adapted
      masks        layer keeps a mask of its input, 1 byte an element on a GPU (h + h + h + 4h a
                   token a block); checkpointed, one block's: 7*s*b*h. (On a CPU the mask is fp32,
                   which is why the CPU runs' LoRA peak is high at 4 x 256.)
    8-bit state    AdamW keeps 32-bit state for the embeddings (V + P)*h, 6 bytes more a parameter
      of the       than 8-bit state: 6*(V + P)*h
      embeddings
    CUDA           1 GB: the context and the allocator's slack

    full fine-tune               16*N + activations     4 fp32 weight + 4 gradient + 8 AdamW (m, v)
    + --gradient-checkpointing   16*N + checkpointed
    + --optim-8bit too           10*N + 6*(V + P)*h + checkpointed   AdamW's m and v in 1 byte each
                                                                     (4 + 4 + 2), the embeddings' in 4
    --lora                       2*N + 16*A + activations + masks   frozen weights in 16 bits; adapters
                                                                    fp32 with gradient and AdamW state
    --lora --gradient-checkpointing   2*N + 16*A + checkpointed + one block's masks

each plus the logits and loss and CUDA's 1 GB. A cell reads "T4" up to 15 GB (what a T4, sold as
16 GB, offers), "too tight for a T4" up to 16 GB, else the smallest of a 24, 40 or 80 GB GPU that
holds it.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_medium_context as tm  # noqa: E402  (the trainer of ruGPT-3 medium: its flags and functions are measured)

# ----------------------------------------------------------------------------
# defaults: ruGPT-3 medium's shape
N_LAYER, N_EMBD, N_HEAD = 24, 1024, 16
VOCAB_SIZE = 50257
N_POSITIONS = 2048
SEQ_LEN = 128               # tokens an example; small so that a step takes seconds on 2 cores
BATCH_SIZE = 2
LORA_R, LORA_ALPHA = tm.LORA_R, tm.LORA_ALPHA
LORA_TARGETS = tm.LORA_TARGETS   # c_proj: the attention output and the MLP output
VARIANTS = "full,lora,ckpt,lora+ckpt"
ALL_VARIANTS = ("full", "lora", "ckpt", "lora+ckpt", "full-8bit", "lora-bf16")
THREADS = 2
SEED = 0
GIB = 1024 ** 3
GPU_TABLE = False           # True: print the GPU table by arithmetic (the docstring's formulas) instead of measuring
GPU_MODELS = (              # the table's rows: (label, parameters' shape: layers, width, vocabulary, positions)
    ("ruGPT-3 small (`train_transformer.py`)", 12, 768, 50264, 2048),
    ("ruGPT-3 medium (`train_medium_context.py`)", 24, 1024, 50257, 2048),
    ("ruGPT-3 large (`train_medium_context.py --model ai-forever/rugpt3large_based_on_gpt2`)", 24, 1536, 50257, 2048),
    ("a GPT-2 folder of ruGPT-3 XL's size", 24, 2048, 50264, 2048),
)
GPU_BATCH_SIZE, GPU_SEQ_LEN = 8, 384   # train_medium_context.py's BATCH_SIZE and MAX_LENGTH
CUDA_GB = 1.0               # CUDA's context and the allocator's slack
T4_GB = 15.0                # what a T4 offers of its 16 GB
GPU_SIZES_GB = (24, 40, 80)
GB = 10 ** 9


def vm_kib(field):
    """A memory figure of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# ----------------------------------------------------------------------------
# one variant, in a child process: the trainer's own flags, LoRA, casting and TrainingArguments

def variant_flags(variant, args, output_dir):
    """The train_medium_context.py command line of a variant."""
    flags = ["--output", output_dir, "--device", "cpu", "--batch-size", str(args.batch_size), "--grad-accum", "1",
             "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--lora-dropout", "0",
             "--seed", str(args.seed)]
    if variant.startswith("lora"):
        flags.append("--lora")
    if variant.endswith("ckpt"):
        flags.append("--gradient-checkpointing")
    if variant == "full-8bit":
        flags.append("--optim-8bit")
    return flags


def build_model(args):
    """ruGPT-3 medium's shape with random weights (the hub is out of reach), fp32 as the trainer loads it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.n_positions, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head)
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def build_variant(variant, args, output_dir):
    """(model, TrainingArguments) for one variant, through the trainer's functions; one optimizer step, no
    evaluation or checkpoint."""
    trainer_args = tm.parse_args(variant_flags(variant, args, output_dir))
    tm.check_training_flags(trainer_args)
    model = build_model(args)
    if trainer_args.lora:
        model = tm.apply_lora(model, trainer_args, [], "bench")
    if variant == "lora-bf16":  # what --lora does on a GPU with bf16: the frozen weights in 16 bits
        tm.cast_frozen_weights(model, "bf16")
    targs = dataclasses.replace(tm.training_arguments(trainer_args, "cpu", 1e-4), max_steps=1, eval_strategy="no",
                                save_strategy="no", load_best_model_at_end=False, logging_steps=1,
                                logging_first_step=False, disable_tqdm=True)
    return model, targs


def random_examples(args):
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator).tolist()
    return [{"input_ids": row, "attention_mask": [1] * len(row), "labels": row} for row in ids]


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer):
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)       # accelerate wraps it
    return tensor_bytes(v for state in inner.state.values() for v in state.values() if torch.is_tensor(v))


def optimizer_name(optimizer):
    cls = type(getattr(optimizer, "optimizer", optimizer))
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def run_child(variant, args):
    import tempfile

    import torch
    from transformers import Trainer, default_data_collator
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if variant.startswith("lora"):
        import peft  # noqa: F401  (its import belongs to the baseline, not to the step)
    baseline_kib = vm_kib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        model, targs = build_variant(variant, args, tmp)
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        built_kib = vm_kib("VmRSS")
        trainer = Trainer(model=model, args=targs, train_dataset=random_examples(args),
                          data_collator=default_data_collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        result = {
            "variant": variant, "params": sum(p.numel() for p in params),
            "embedding_params": sum(p.numel() for p in embeddings),
            "trainable": sum(p.numel() for p in trainable),
            "weight_bytes": tensor_bytes(params), "grad_bytes": tensor_bytes(trainable),
            "optimizer_bytes": optimizer_state_bytes(trainer.optimizer),
            "optimizer": optimizer_name(trainer.optimizer),
            "loss": trainer.state.log_history[-1].get("train_loss"), "seconds": seconds,
            "baseline_kib": baseline_kib, "built_kib": built_kib, "peak_kib": vm_kib("VmHWM"),
        }
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------
# the parent: one child a variant, then the table

def size_flags(args):
    return ["--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head", str(args.n_head),
            "--vocab-size", str(args.vocab_size), "--n-positions", str(args.n_positions),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--threads", str(args.threads), "--seed", str(args.seed)]


def run_variant(variant, args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", variant, *size_flags(args)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "error": tail}
    return json.loads(lines[-1][len("RESULT "):])


def bitsandbytes_missing():
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is None


def predicted_state(result):
    """Weights + gradients + AdamW state in bytes, from the arithmetic (not from the tensors)."""
    n, t = result["params"], result["trainable"]
    if result["variant"] == "full-8bit":
        # two 1-byte states a parameter, but the Trainer keeps the embeddings' state in 32 bits
        embeddings = result["embedding_params"]
        return n * (4 + 4) + (n - embeddings) * 2 + embeddings * 8
    if result["variant"].startswith("lora"):
        weight = 2 if result["variant"] == "lora-bf16" else 4
        return n * weight + t * (4 + 4 + 8)
    return n * (4 + 4 + 8)


def arithmetic_text(result):
    variant = result["variant"]
    if variant == "lora-bf16":
        return "2 B/param frozen (bf16) + 16 B/trainable"
    if variant.startswith("lora"):
        return "4 B/param frozen + 16 B/trainable"
    if variant == "full-8bit":
        return "4 + 4 + 2 = 10 B/param (embeddings 16)"
    return "4 + 4 + 8 = 16 B/param"


def print_table(results, args):
    ok = [r for r in results if "error" not in r]
    full = next((r for r in ok if r["variant"] == "full"), None)
    print(f"\nGPT-2 {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, vocabulary {args.vocab_size}, "
          f"{args.n_positions} positions; one step of {args.batch_size} x {args.seq_len} tokens, CPU, "
          f"{args.threads} threads; LoRA r={args.lora_r} on {', '.join(LORA_TARGETS)}")
    header = (f"{'variant':10} {'trainable':>13} {'arithmetic (weights+grads+AdamW)':41} {'state GiB':>9} "
              f"{'tensors GiB':>11} {'peak GiB':>8} {'step GiB':>8} {'peak/full':>9} {'step/full':>9} {'s':>6}")
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['variant']:10} failed: {r['error']}")
            continue
        peak = r["peak_kib"] * 1024
        above = (r["peak_kib"] - r["baseline_kib"]) * 1024         # over the process after its imports
        measured_state = r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        ratio = f"{peak / (full['peak_kib'] * 1024):.2f}" if full else "-"
        ratio_above = f"{above / ((full['peak_kib'] - full['baseline_kib']) * 1024):.2f}" if full else "-"
        print(f"{r['variant']:10} {r['trainable']:>13,} {arithmetic_text(r):41} "
              f"{predicted_state(r) / GIB:>9.2f} {measured_state / GIB:>11.2f} {peak / GIB:>8.2f} {above / GIB:>8.2f} "
              f"{ratio:>9} {ratio_above:>9} {r['seconds']:>6.1f}")
    if ok:
        optimizers = ", ".join(sorted({r["optimizer"] for r in ok}))
        print(f"\nstate GiB: weights + gradients + AdamW state from the bytes-per-parameter arithmetic; tensors GiB: "
              f"the same summed from the tensors after the step (optimizers: {optimizers}); peak GiB: "
              f"VmHWM of the variant's process; step GiB: that peak less the process after its imports "
              f"({ok[0]['baseline_kib'] / 1024 ** 2:.2f} GiB), i.e. the model, the step and the Trainer.")
    for r in ok:
        activations = (r["peak_kib"] - r["baseline_kib"]) * 1024 - (r["weight_bytes"] + r["grad_bytes"]
                                                                      + r["optimizer_bytes"])
        print(f"  {r['variant']:10} step GiB less the state tensors (activations, temporaries): "
              f"{activations / GIB:6.2f}; loss {r['loss']:.3f}")


# ----------------------------------------------------------------------------
# --gpu-table: the README's "Which model on which GPU", by the docstring's arithmetic

# (fan_in, fan_out) of each Conv1D a GPT-2 block has, in multiples of the width h
GPT2_BLOCK_LAYERS = {"c_attn": [(1, 3)], "c_proj": [(1, 1), (4, 1)], "c_fc": [(1, 4)]}


def gpt2_parameters(n_layer, n_embd, vocab_size, n_positions):
    """GPT-2's parameter count: embeddings, 12h^2 + 13h a block (weights, biases, two LayerNorms), the final
    LayerNorm; the LM head is the token embedding's matrix, so it adds nothing."""
    h = n_embd
    return vocab_size * h + n_positions * h + n_layer * (12 * h * h + 13 * h) + 2 * h


def lora_parameters(n_layer, n_embd, lora_r, targets=LORA_TARGETS):
    """A rank-r adapter on a fan_in -> fan_out layer has r*(fan_in + fan_out) parameters (A and B)."""
    per_block = sum(lora_r * (fan_in + fan_out) * n_embd
                    for name in targets for fan_in, fan_out in GPT2_BLOCK_LAYERS[name])
    return n_layer * per_block


def gpu_memory_bytes(n_layer, n_embd, vocab_size, n_positions, lora_r, batch_size=GPU_BATCH_SIZE,
                     seq_len=GPU_SEQ_LEN):
    """{column: bytes} of one training step on a GPU, the docstring's formulas."""
    n = gpt2_parameters(n_layer, n_embd, vocab_size, n_positions)
    adapters = lora_parameters(n_layer, n_embd, lora_r)
    tokens = batch_size * seq_len
    activations = 34 * tokens * n_embd * n_layer
    checkpointed = 2 * tokens * n_embd * n_layer + 34 * tokens * n_embd
    fixed = 10 * tokens * vocab_size + CUDA_GB * GB          # logits and loss, CUDA
    masks = 7 * tokens * n_embd                               # LoRA dropout masks of one block, 1 byte
    embeddings_state = 6 * (vocab_size + n_positions) * n_embd  # 32-bit AdamW state kept by --optim-8bit
    return {
        "full": 16 * n + activations + fixed,
        "ckpt": 16 * n + checkpointed + fixed,
        "8bit+ckpt": 10 * n + embeddings_state + checkpointed + fixed,
        "lora": 2 * n + 16 * adapters + activations + masks * n_layer + fixed,
        "lora+ckpt": 2 * n + 16 * adapters + checkpointed + masks + fixed,
    }


def gpu_that_fits(gb):
    if gb <= T4_GB:
        return "T4"
    if gb <= 16:     # within the T4's nominal 16 GB, but above what it leaves free
        return "too tight for a T4"
    return next((f"{size} GB GPU" for size in GPU_SIZES_GB if gb <= size), f"more than {GPU_SIZES_GB[-1]} GB")


def parameters_text(n):
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def print_gpu_table(lora_r):
    columns = ("full", "ckpt", "8bit+ckpt", "lora", "lora+ckpt")
    print(f"GPU memory of a training step by arithmetic (bench/train_memory.py --gpu-table; formulas in its "
          f"docstring): batch {GPU_BATCH_SIZE} x {GPU_SEQ_LEN} tokens, LoRA r={lora_r} on "
          f"{', '.join(LORA_TARGETS)}, {CUDA_GB:g} GB for CUDA, GB = 10^9 bytes, T4: {T4_GB:g} GB\n")
    print("| model (trainer) | parameters | full fine-tune (16 B/param) | + `--gradient-checkpointing` "
          "| + `--optim-8bit` too (10 B/param) | `--lora` (2 B/param frozen) | `--lora --gradient-checkpointing` |")
    print("|---|---|---|---|---|---|---|")
    for label, n_layer, n_embd, vocab_size, n_positions in GPU_MODELS:
        memory = gpu_memory_bytes(n_layer, n_embd, vocab_size, n_positions, lora_r)
        cells = [f"{memory[c] / GB:.1f} GB: {gpu_that_fits(memory[c] / GB)}" for c in columns]
        n = gpt2_parameters(n_layer, n_embd, vocab_size, n_positions)
        print(f"| {label} | {parameters_text(n)} | " + " | ".join(cells) + " |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=N_LAYER)
    parser.add_argument("--n-embd", type=int, default=N_EMBD)
    parser.add_argument("--n-head", type=int, default=N_HEAD)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--n-positions", type=int, default=N_POSITIONS)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lora-r", type=int, default=LORA_R)
    parser.add_argument("--lora-alpha", type=int, default=LORA_ALPHA)
    parser.add_argument("--variants", default=VARIANTS,
                        help=f"comma-separated, of {', '.join(ALL_VARIANTS)} (default %(default)s)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--gpu-table", action="store_true", default=GPU_TABLE,
                        help="print the README's GPU memory table by arithmetic (no model, no measurement) and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(ALL_VARIANTS)})")
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    args.variant_list = variants
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_table:
        print_gpu_table(args.lora_r)
        return 0
    if args.child:
        run_child(args.child, args)
        return 0
    if not os.path.exists("/proc/self/status"):
        print("skipped: peak memory is read from /proc/self/status, which this system lacks")
        return 0
    results = []
    for variant in args.variant_list:
        if variant == "full-8bit" and bitsandbytes_missing():
            print(f"  {variant}: skipped, bitsandbytes is not installed (pip install bitsandbytes)", flush=True)
            continue
        result = run_variant(variant, args)
        results.append(result)
        state = "failed" if "error" in result else \
            f"peak {result['peak_kib'] / 1024 ** 2:.2f} GiB, step {result['seconds']:.1f} s"
        print(f"  {variant}: {state}", flush=True)
    print_table(results, args)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
