"""Does learning from 👍/👎 make the bot's replies liked more, without wrecking the model? The README's
"Learning from ratings" figures, end to end through the kit's own scripts:

  the shared corpus (../shared/data/anekdot_dialogues.parquet, its first --dialogues dialogues)
  -> parser_dataset.py -> cleaner_text.py -> create_dataset.py --max-turns 1 --no-facts
  -> train_transformer.py --from-scratch on --pairs training pairs: the model "the bot serves"
  -> its replies to --rate-questions held-out questions (pairs_val.csv), --rate-samples each, sampled as
     the bot samples (system_prompt.py's chat code: chat_config.json's settings, the penalties on the
     reply only), rated by a synthetic rater: 👍 when the reply ends with "?", 👎 otherwise; the second
     sample of a question is stored as the 🔄 replacement of the first, in the bot's ratings table
  -> create_dataset.py --feedback BOT.sqlite3
  -> train_transformer.py --feedback (KTO, the defaults), the same with the 👍/👎 labels shuffled (the
     control: it must not move), and --feedback-loss dpo (the pairs with one 👍 and one 👎)
  -> on --eval-questions other questions (pairs_test.csv), --eval-samples replies each with the bot's
     sampling: the liked share (the rater's rule) and the distinct-reply ratio; perplexity.py's answer
     perplexity on the real answers of the test split.

The rater is a rule, so the figures say whether the training learns what the ratings say, not how good
the replies are; real ratings are noisier than a rule.

    python bench/feedback.py                       # small sizes: about 15 minutes on 2 shared cores
    python bench/feedback.py --pairs 5000 --n-layer 4 --n-embd 256 --steps 1500 --rate-questions 1000 \\
        --eval-questions 1000                       # the issue's sizes: about 40 minutes on 2 cores
"""
import argparse
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
CORPUS = REPO.parent / "shared" / "data" / "anekdot_dialogues.parquet"

DIALOGUES = 12000
PAIRS = 5000
STEPS = 1200
N_LAYER = 2
N_EMBD = 128
RATE_QUESTIONS = 500
RATE_SAMPLES = 2
EVAL_QUESTIONS = 150
EVAL_SAMPLES = 4
SEED = 0
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def run(*args, cwd):
    started = time.time()
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV)
    if done.returncode:
        sys.exit(f"{Path(str(args[0])).name} failed:\n{done.stderr[-3000:]}")
    print(f"  {Path(str(args[0])).name} {' '.join(map(str, args[1:3]))} ... {time.time() - started:.0f} s",
          flush=True)
    return done.stdout


def liked(reply):
    """The synthetic rater: a reply that asks back is liked. The chat's fallback for an empty reply
    ("Простите, не понял вопрос. ...?") is the bot's text, not the model's: never liked."""
    import system_prompt as sp

    return reply != sp.FALLBACK_REPLY and reply.rstrip().endswith("?")


def read_questions(path, count, seed):
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        rows = [row["question"] for row in csv.DictReader(f) if row["question"].strip()]
    rows = sorted(set(rows))
    random.Random(seed).shuffle(rows)
    return rows[:count]


class Bot:
    """A model folder sampled as the bot samples it (system_prompt.py's chat code, the folder's settings)."""

    def __init__(self, folder, device, seed):
        import system_prompt as sp

        self.sp = sp
        self.args = sp.parse_args(["--model", str(folder), "--device", device])
        self.chat = sp.load_weights(sp.open_model_folder(folder, device), quantize="none", threads=2)
        self.settings = sp.resolve_settings(self.args, self.chat)
        self.seed = seed

    def prompt(self, question):
        """(the prompt's text by the prompt rule, its ids as the bot builds them)."""
        ids = self.sp.chat_prompt_ids([question], self.settings, self.chat["tokenizer"])
        text = self.sp.prompt_text([question], self.settings["persona"])
        return text, ids

    def replies(self, questions, samples, batch=32):
        import torch

        torch.manual_seed(self.seed)
        prompts = [self.prompt(q)[1] for q in questions for _ in range(samples)]
        out = []
        for start in range(0, len(prompts), batch):
            out += self.sp.generate_replies(self.chat, self.settings, prompts[start:start + batch])
        return out


def rate_into_db(bot, questions, samples, db_path, model_name):
    """The bot's ratings table as the rater filled it; each question a conversation of its own."""
    import create_dataset as cd

    db = cd.open_ratings(sqlite3.connect(db_path))
    replies = bot.replies(questions, samples)
    tokenizer = bot.chat["tokenizer"]
    row_id = 0
    for i, question in enumerate(questions):
        text, ids = bot.prompt(question)
        if ids != bot.sp.encode_text(tokenizer, text):  # a prompt the budget cut: its text is not what was served
            continue
        previous = None
        for k in range(samples):
            reply = replies[i * samples + k]
            if reply == bot.sp.FALLBACK_REPLY:  # the model wrote nothing: no buttons, nothing to learn from
                continue
            db.execute("INSERT INTO ratings (chat_id, user_id, message_id, prompt, prompt_ids, prompt_tokens, reply, "
                       "label, replaces, model, model_hash, created, rated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (i, i, k + 1, text, json.dumps(ids), len(ids), reply, int(liked(reply)), previous, model_name,
                        "bench", 1000.0 + row_id, 1000.0 + row_id))
            row_id += 1
            previous = db.execute("SELECT last_insert_rowid()").fetchone()[0]
    db.commit()
    db.close()
    return replies


def shuffled_labels(src, dest, seed):
    """The control: the same rows with their 👍/👎 labels permuted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    rows = table.to_pylist()
    labels = [r["label"] for r in rows if r["label"] is not None]
    random.Random(seed).shuffle(labels)
    it = iter(labels)
    for r in rows:
        if r["label"] is not None:
            r["label"] = next(it)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), dest)


def measure(folder, questions, samples, device, seed, work):
    bot = Bot(folder, device, seed)
    replies = bot.replies(questions, samples)
    run(REPO / "perplexity.py", "--model", Path(folder).name, "--rows", 0, "--device", device, "--output", "reports",
        cwd=work)
    stem = Path(folder).name
    report = json.loads((work / "reports" / f"perplexity_{stem}.json").read_text(encoding="utf-8"))
    return {"liked_share": sum(map(liked, replies)) / len(replies),
            "distinct": len(set(replies)) / len(replies),
            "answer_perplexity": report["answer_perplexity"],
            "example": replies[:3]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="feedback.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialogues", type=int, default=DIALOGUES)
    parser.add_argument("--pairs", type=int, default=PAIRS, help="training pairs of the served model")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--n-layer", type=int, default=N_LAYER)
    parser.add_argument("--n-embd", type=int, default=N_EMBD)
    parser.add_argument("--rate-questions", type=int, default=RATE_QUESTIONS)
    parser.add_argument("--rate-samples", type=int, default=RATE_SAMPLES)
    parser.add_argument("--eval-questions", type=int, default=EVAL_QUESTIONS)
    parser.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one); run again "
                        "with the same folder, it goes on from the first stage whose output is missing")
    parser.add_argument("--feedback-flags", default="", help="extra flags for the --feedback runs (quoted)")
    args = parser.parse_args(argv)
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS}: the shared corpus is absent; this benchmark needs it")
    import pyarrow.parquet as pq

    holder = None if args.keep else tempfile.TemporaryDirectory(prefix="bench-feedback-")
    work = Path(args.keep or holder.name)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("the served model:", flush=True)
    done = lambda path: args.keep and (work / path).exists()  # noqa: E731  (--keep: a stage already run)
    if not done("data/pairs_test.csv"):
        pq.write_table(pq.read_table(CORPUS).slice(0, args.dialogues), work / "corpus.parquet")
        run(REPO / "parser_dataset.py", "--input", "corpus.parquet", cwd=work)
        run(REPO / "cleaner_text.py", cwd=work)
        run(REPO / "create_dataset.py", "--max-turns", 1, "--no-facts", "--seed", args.seed, cwd=work)
    if not done("served/config.json"):
        run(REPO / "train_transformer.py", "--from-scratch", "--device", args.device, "--n-layer", args.n_layer,
            "--n-head", 4, "--n-embd", args.n_embd, "--vocab-size", 4000, "--n-positions", 128, "--rows", args.pairs,
            "--val-rows", 300, "--max-steps", args.steps, "--eval-steps", max(args.steps // 3, 1), "--batch-size", 32,
            "--lr", "2e-3", "--seed", args.seed, "--output", "served", cwd=work)
    rate = read_questions(work / "data" / "pairs_val.csv", args.rate_questions, args.seed)
    held = read_questions(work / "data" / "pairs_test.csv", args.eval_questions, args.seed)
    print(f"ratings: {len(rate)} questions x {args.rate_samples} replies, sampled as the bot does ...", flush=True)
    if done("bot.sqlite3"):
        with sqlite3.connect(work / "bot.sqlite3") as db:
            replies = [row[0] for row in db.execute("SELECT reply FROM ratings")]
    else:
        replies = rate_into_db(Bot(work / "served", args.device, args.seed), rate, args.rate_samples,
                               work / "bot.sqlite3", "served")
    print(f"  {sum(map(liked, replies))} of {len(replies)} replies liked by the rater", flush=True)
    print(run(REPO / "create_dataset.py", "--feedback", "bot.sqlite3", "--output", "feedback", "--seed", args.seed,
              cwd=work).rstrip(), flush=True)
    shuffled_labels(work / "feedback" / "feedback_train.parquet", work / "feedback" / "shuffled_train.parquet",
                    args.seed)
    extra = args.feedback_flags.split()
    runs = {"KTO": ("feedback_train.parquet", []), "KTO, labels shuffled": ("shuffled_train.parquet", []),
            "DPO on the pairs": ("feedback_train.parquet", ["--feedback-loss", "dpo"])}
    folders = {"served": "served"}
    for name, (data, flags) in runs.items():
        folder = {"KTO": "kto", "KTO, labels shuffled": "kto_shuffled", "DPO on the pairs": "dpo"}[name]
        folders[name] = folder
        if done(f"{folder}/config.json"):
            continue
        out = run(REPO / "train_transformer.py", "--feedback", f"feedback/{data}", "--model", "served", "--output",
                  folder, "--device", args.device, "--seed", args.seed,
                  "--feedback-val", "feedback/feedback_val.parquet", *flags, *extra, cwd=work)
        for line in out.splitlines():
            if line.startswith(("feedback:", "before", "after")):
                print("    " + line, flush=True)
    print(f"measuring on {len(held)} test questions x {args.eval_samples} replies ...", flush=True)
    results = {name: measure(work / folder, held, args.eval_samples, args.device, args.seed, work)
               for name, folder in folders.items()}
    base = results["served"]
    print(f"\n{'model':22s} {'liked share':>12s} {'answer ppl':>11s} {'distinct':>9s}")
    for name, r in results.items():
        change = "" if name == "served" else \
            f"  ({100 * (r['liked_share'] - base['liked_share']):+.1f} pts, perplexity " \
            f"{100 * (r['answer_perplexity'] / base['answer_perplexity'] - 1):+.1f}%, distinct " \
            f"x{r['distinct'] / base['distinct']:.2f})"
        print(f"{name:22s} {r['liked_share']:>12.3f} {r['answer_perplexity']:>11.2f} {r['distinct']:>9.3f}{change}")
    for name, r in results.items():
        print(f"  {name}: {r['example']}")
    print(f"total {time.time() - started:.0f} s")
    if holder:
        holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
