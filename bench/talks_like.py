"""How much like one person does a model trained with `create_dataset.py --as` write?
The README's "A bot that talks like you" figures, end to end through the kit's own scripts
as a user runs them (each a subprocess, its flags as on a command line):

  a seeded Telegram account export written for the kit (tests/test_talks_like.py's
  generated_export: group chats of four and private chats; the owner, Вадим, writes
  "чё"/"ваще" and ends with ")))", the others each in a way of their own)
  -> parser_dataset.py -> cleaner_text.py
  -> create_dataset.py --as me   and   create_dataset.py (everyone's turns)
  -> train_transformer.py --from-scratch on each
  -> evaluate.py --as me on both models, on the test questions Вадим answered

It prints the style match of both models with its ceiling and floor, and the answer
perplexity on Вадим's held-out replies.

    python bench/talks_like.py                 # about 3 minutes on 2 cores
    python bench/talks_like.py --steps 600 --n-embd 128
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_talks_like import generated_export  # noqa: E402  (the export the tests train on)

STEPS = 300
N_EMBD = 64
TEST_FRACTION = 0.2


def run(*args, cwd):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{Path(str(args[0])).name} failed:\n{done.stderr[-2000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--n-embd", type=int, default=N_EMBD)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "result.json").write_text(json.dumps(generated_export(), ensure_ascii=False), encoding="utf-8")
        run(REPO / "parser_dataset.py", "--input", "result.json", cwd=work)
        run(REPO / "cleaner_text.py", cwd=work)
        for name, flags in (("person", ["--as", "me"]), ("everyone", [])):
            run(REPO / "create_dataset.py", "--output", f"data_{name}", "--test-fraction", TEST_FRACTION,
                "--no-facts", *flags, cwd=work)
            run(REPO / "train_transformer.py", "--from-scratch", "--device", "cpu", "--n-layer", 2, "--n-head", 2,
                "--n-embd", args.n_embd, "--vocab-size", 400, "--n-positions", 128, "--data-dir", f"data_{name}",
                "--output", name, "--max-steps", args.steps, "--eval-steps", args.steps, "--batch-size", 16,
                "--lr", "3e-3", "--seed", 0, cwd=work)
        # the test questions Вадим answered, from the --as split; both models answer the same ones
        run(REPO / "evaluate.py", "--model", "person", "everyone", "--data-dir", "data_person", "--as", "me",
            "--probe", REPO / "data" / "memory_probe.jsonl", "--rows", 0, "--device", "cpu", "--quiet", cwd=work)
        report = json.loads((work / "reports" / "comparison.json").read_text(encoding="utf-8"))
    style = report["style"]
    who = ", ".join(style["as"])
    print(f"classifier: {style['classifier']}; learnt from {style['train_turns']['person']} of {who}'s train turns "
          f"and {style['train_turns']['others']} of others'")
    print(f"style match (share of replies that read as {who}), on {style['held_out_replies']} held-out questions:")
    for name, row in style["models"].items():
        print(f"  {name:9s} {row['style_match']:.2f}   answer perplexity on {who}'s held-out replies "
              f"{row['answer_perplexity']:.2f}")
    print(f"  ceiling   {style['ceiling']:.2f}   ({who}'s own held-out replies)")
    print(f"  floor     {style['floor']:.2f}   (others' held-out turns, {style['floor_turns']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
