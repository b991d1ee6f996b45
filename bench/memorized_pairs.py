"""Twenty answers learnt by heart: does the chat give them back, with its decoding and with the old one?

A tiny GPT-2 is trained from scratch by train_transformer.py on the 20 question/answer
pairs of tests/test_train_transformer.py, whose answers repeat their question's words
("Сколько будет два плюс три?" / "Два плюс три будет пять."). Each question is then asked
through system_prompt.py --script, one at a time with /reset between them, with the folder's
default settings (sampling, repetition penalty, n-gram blocking, int8 on a CPU), and a reply
counts when it is the answer exactly. Then the same, in the same process, with the old
decoding: transformers' own penalty and blocking, which look at the prompt too and so ban
the question's words (bench/recall.py's whole_sequence_processors).

Run it (about a minute on two cores):
    python bench/memorized_pairs.py
    python bench/memorized_pairs.py --steps 300 --keep /tmp/pairs-model
"""
import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import system_prompt as sp  # noqa: E402
import test_train_transformer as pairs_test  # noqa: E402
import train_transformer as tt  # noqa: E402
from bench.recall import whole_sequence_processors  # noqa: E402

STEPS = 150
SEED = 0


def train(folder, steps):
    data = pairs_test.write_pairs(folder / "data", pairs_test.PAIRS)
    model = folder / "model"
    with contextlib.redirect_stdout(io.StringIO()):
        code = tt.main(pairs_test.TINY + ["--data-dir", str(data), "--output", str(model), "--max-steps", str(steps),
                                          "--eval-steps", str(steps // 2), "--logging-steps", "25",
                                          "--batch-size", "20", "--lr", "3e-3"])
    if code != 0:
        sys.exit("training failed")
    return model


def exact_replies(model, script, seed):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sp.main(["--model", str(model), "--script", str(script), "--threads", "1", "--seed", str(seed)])
    replies = [line[len(sp.BOT_PREFIX):] for line in out.getvalue().splitlines()
               if line.startswith(sp.BOT_PREFIX) and line != sp.BOT_PREFIX + sp.RESET_NOTICE]
    return sum(reply == answer for reply, (_, answer) in zip(replies, pairs_test.PAIRS))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="memorized_pairs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--keep", help="train into this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="memorized-pairs-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model = train(folder, args.steps)
        script = folder / "questions.txt"
        script.write_text(f"\n{sp.RESET_COMMAND}\n".join(q for q, _ in pairs_test.PAIRS) + "\n", encoding="utf-8")
        now = exact_replies(model, script, args.seed)
        kit_processors = sp.reply_processors
        sp.reply_processors = whole_sequence_processors
        try:
            old = exact_replies(model, script, args.seed)
        finally:
            sp.reply_processors = kit_processors
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    total = len(pairs_test.PAIRS)
    print(f"exact replies, the kit's decoding (penalties on the reply only): {now}/{total}")
    print(f"exact replies, the old decoding (penalties over the prompt too):  {old}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
