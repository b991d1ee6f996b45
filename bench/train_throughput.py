"""The research recipe against train_transformer.py's, in one run, on the same tiny model.

Research recipe: every example padded to 128 tokens, pad token = EOS, labels =
input_ids with the language-modelling collator, which masks every pad id, and so
every EOS. Ours: batches padded to their longest example and grouped by length,
a pad token of its own, loss on the answer and its EOS only.

Both train a GPT-2 model from the same initial weights for the same number of
optimizer steps on question -> answer pairs (consecutive turns) of
../shared/data/anekdot_dialogues.parquet, and report:
  - non-padding tokens per second while training, and ours / research;
  - validation loss on the answers (answer tokens + EOS, the same measure for both);
  - the share of greedy replies to validation questions that stop on EOS.

Run it (a few minutes on a CPU; skips with a message where ../shared is absent):
    python bench/train_throughput.py
    python bench/train_throughput.py --steps 600 --device cuda
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_transformer as tt  # noqa: E402  (the recipe under test)

# ----------------------------------------------------------------------------
# defaults
CORPUS = REPO.parent / "shared" / "data" / "anekdot_dialogues.parquet"
DIALOGUES = 6000            # first N dialogues of the corpus
VAL_EVERY = 20              # every 20th dialogue goes to validation
STEPS = 200
BATCH_SIZE = 16
LR = 1e-3
PAD_TO = 128                # the research's fixed length; also our --max-length here
N_LAYER, N_HEAD, N_EMBD, VOCAB_SIZE = 2, 4, 128, 4000
GENERATE = 100              # validation questions answered greedily
MAX_NEW_TOKENS = 48
SEED = 0
THREADS = 1                 # CPU threads: one keeps the timing steady on a shared machine


def read_pairs(path, dialogues):
    """Train and validation (question, answer) pairs, split by dialogue."""
    import pyarrow.parquet as pq

    samples = pq.read_table(path, columns=["sample"]).column("sample").slice(0, dialogues).to_pylist()
    train, val = [], []
    for i, turns in enumerate(samples):
        turns = [t.strip() for t in turns or [] if t and t.strip()]
        pairs = [(q, a) for q, a in zip(turns, turns[1:])]
        (val if i % VAL_EVERY == 0 else train).extend(pairs)
    return train, val


def research_examples(tokenizer, pairs):
    """Prompt + answer + EOS, padded to PAD_TO; the collator later derives labels from input_ids."""
    texts = [tt.prompt_text([q]) + " " + tt.prepare_turn(a) + tokenizer.eos_token for q, a in pairs]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=PAD_TO,
                        add_special_tokens=False)
    return [{"input_ids": ids, "attention_mask": mask}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]


def new_model(tokenizer, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=PAD_TO, n_embd=N_EMBD, n_layer=N_LAYER,
                        n_head=N_HEAD, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def train(model, dataset, collator, tokenizer, args, sampling, out):
    """(non-padding tokens, seconds) for `args.steps` optimizer steps."""
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=out, use_cpu=args.device == "cpu", max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=0.05,
        lr_scheduler_type="cosine", weight_decay=0.01, train_sampling_strategy=sampling,
        include_num_input_tokens_seen="non_padding", eval_strategy="no", save_strategy="no",
        logging_steps=10 ** 6, report_to="none", disable_tqdm=True, seed=args.seed,
        remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return trainer.state.num_input_tokens_seen, seconds


def answer_loss(model, examples, collator, batch_size=64):
    """Mean loss per answer token (EOS included) over the validation examples."""
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=tt.IGNORE_INDEX, reduction="sum")
            total += losses.item()
            count += (labels != tt.IGNORE_INDEX).sum().item()
    return total / max(count, 1)


def eos_share(model, tokenizer, questions, max_new_tokens):
    """Share of greedy replies that end with the tokenizer's EOS within max_new_tokens."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    stopped = 0
    with torch.no_grad():
        for question in questions:
            ids = torch.tensor([tt.fit_prompt(tokenizer, [question], 1, PAD_TO - max_new_tokens)], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            stopped += tokenizer.eos_token_id in out[0, ids.shape[1]:].tolist()
    return stopped / max(len(questions), 1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(CORPUS))
    parser.add_argument("--dialogues", type=int, default=DIALOGUES)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--generate", type=int, default=GENERATE)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def main(argv=None):
    import tempfile

    import torch
    from transformers import DataCollatorForLanguageModeling, set_seed
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"skipped: {args.input} is absent (the bench needs ../shared/data)")
        return 0
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    train_pairs, val_pairs = read_pairs(args.input, args.dialogues)
    print(f"{len(train_pairs)} train pairs, {len(val_pairs)} validation pairs from the first "
          f"{args.dialogues} dialogues of {Path(args.input).name}", flush=True)

    ours_tok = tt.train_tokenizer(tt.tokenizer_texts([([q], a) for q, a in train_pairs], 1), VOCAB_SIZE, PAD_TO)
    research_tok = copy.deepcopy(ours_tok)
    research_tok.pad_token = research_tok.eos_token         # the research's setting

    window = {"max_turns": 1, "context_tokens": PAD_TO - MAX_NEW_TOKENS, "max_length": PAD_TO}
    ours_train, _ = tt.encode_examples(ours_tok, [([q], a) for q, a in train_pairs], window, "encoding")
    val_examples, _ = tt.encode_examples(ours_tok, [([q], a) for q, a in val_pairs], window, "encoding")
    research_train = research_examples(research_tok, train_pairs)
    ours_collator = tt.make_collator(ours_tok, args.device)
    questions = [q for q, _ in val_pairs[:args.generate]]

    recipes = [
        ("research: pad to 128, pad=EOS, loss on all", research_tok, research_train,
         DataCollatorForLanguageModeling(research_tok, mlm=False), "random"),
        ("ours: dynamic padding, loss on answer+EOS", ours_tok, ours_train, ours_collator, "group_by_length"),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, tokenizer, dataset, collator, sampling in recipes:
            model = new_model(ours_tok, args.seed)      # the same initial weights for both
            if args.device == "cuda":
                model = model.cuda()
            tokens, seconds = train(model, dataset, collator, tokenizer, args, sampling, tmp)
            loss = answer_loss(model, val_examples, ours_collator)
            stops = eos_share(model, ours_tok, questions, MAX_NEW_TOKENS)
            results.append((name, tokens, seconds, tokens / seconds, loss, stops))
            print(f"  {name}: trained in {seconds:.1f} s", flush=True)

    print(f"\nsame model ({N_LAYER} layers, {N_EMBD} wide, vocabulary {len(ours_tok)}), {args.steps} optimizer "
          f"steps of {args.batch_size} examples each, device {args.device}")
    print(f"{'recipe':46} {'non-pad tokens':>14} {'seconds':>8} {'tokens/s':>9} {'val loss':>9} {'EOS stops':>10}")
    for name, tokens, seconds, rate, loss, stops in results:
        print(f"{name:46} {tokens:14d} {seconds:8.1f} {rate:9.0f} {loss:9.3f} {stops:9.0%}")
    ratio = results[1][3] / results[0][3]
    print(f"\nthroughput, ours / research: {ratio:.2f}x (goal: at least 2.5x)")
    print(f"greedy replies stopping on EOS ({len(questions)} validation questions, at most {MAX_NEW_TOKENS} "
          f"new tokens): ours {results[1][5]:.0%} (goal: above 90%), research {results[0][5]:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
