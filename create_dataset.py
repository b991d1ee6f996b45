"""Stage 3: turn clean dialogues into training files.

Reads data/clean_dialogues.parquet and writes, for each split
(train, val, test):
  data/pairs_<split>.csv        dialogue_id,question,answer
  data/context_<split>.parquet  dialogue_id, context (list<string>), answer
Every turn after the first is an answer: its question is the turn before it,
its context the --max-turns turns before it, oldest first.

Splits go by dialogue_id through a seeded hash, so no dialogue has turns in two
splits and the same dialogue lands in the same split on every run.

Run it:
    python create_dataset.py
    python create_dataset.py --rows 50000 --max-turns 4 --seed 42
    python create_dataset.py --input data/clean_dialogues.parquet --output data/
"""
import argparse
import csv
import hashlib
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------- defaults
DEFAULT_INPUT = "data/clean_dialogues.parquet"
DEFAULT_OUTPUT = "data"
MAX_TURNS = 4           # context turns before each answer
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
SEED = 42
BATCH_ROWS = 10_000
SPLITS = ("train", "val", "test")

CONTEXT_SCHEMA = pa.schema([
    ("dialogue_id", pa.int64()),
    ("context", pa.list_(pa.string())),
    ("answer", pa.string()),
])


class UserError(Exception):
    """A mistake in the input that the user can fix; printed as one line."""


def split_of(dialogue_id, seed, val_fraction, test_fraction):
    """A stable split for a dialogue: a seeded hash mapped onto [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{dialogue_id}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64
    if point < test_fraction:
        return "test"
    if point < test_fraction + val_fraction:
        return "val"
    return "train"


def examples_from_dialogue(turns, max_turns):
    """(context, answer) for every turn after the first."""
    for i in range(1, len(turns)):
        yield turns[max(0, i - max_turns):i], turns[i]


def open_input(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (run cleaner_text.py first)")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    missing = {"sample", "dialogue_id"} - set(parquet.schema_arrow.names)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                        "(expected the output of cleaner_text.py)")
    return parquet


class SplitWriters:
    """One CSV and one parquet writer per split, all on temporary names until
    commit(), so that a failed run leaves the previous files untouched."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self.targets, self.csv_files, self.csv, self.parquet, self.buffers = {}, {}, {}, {}, {}
        for split in SPLITS:
            pairs = self.folder / f"pairs_{split}.csv"
            context = self.folder / f"context_{split}.parquet"
            tmp_pairs = pairs.with_name(f".{pairs.name}{suffix}")
            tmp_context = context.with_name(f".{context.name}{suffix}")
            self.targets[split] = [(tmp_pairs, pairs), (tmp_context, context)]
            self.csv_files[split] = open(tmp_pairs, "w", encoding="utf-8", newline="")
            self.csv[split] = csv.writer(self.csv_files[split])
            self.csv[split].writerow(["dialogue_id", "question", "answer"])
            self.parquet[split] = pq.ParquetWriter(tmp_context, CONTEXT_SCHEMA)
            self.buffers[split] = {"dialogue_id": [], "context": [], "answer": []}

    def add(self, split, dialogue_id, context, answer):
        self.csv[split].writerow([dialogue_id, context[-1], answer])
        buffer = self.buffers[split]
        buffer["dialogue_id"].append(dialogue_id)
        buffer["context"].append(list(context))
        buffer["answer"].append(answer)
        if len(buffer["answer"]) >= BATCH_ROWS:
            self.flush(split)

    def flush(self, split):
        buffer = self.buffers[split]
        if buffer["answer"]:
            self.parquet[split].write_table(pa.table(buffer, schema=CONTEXT_SCHEMA))
            for column in buffer.values():
                column.clear()

    def close(self):
        for split in SPLITS:
            self.flush(split)
            self.csv_files[split].close()
            self.parquet[split].close()

    def commit(self):
        self.close()
        for split in SPLITS:
            for tmp, final in self.targets[split]:
                os.replace(tmp, final)

    def abort(self):
        for split in SPLITS:
            self.csv_files[split].close()
            self.parquet[split].close()
            for tmp, _ in self.targets[split]:
                tmp.unlink(missing_ok=True)


def create_dataset(input_path, output_dir, max_turns=MAX_TURNS, rows=None, seed=SEED,
                   val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION):
    """Write the six split files; return the counts per split."""
    parquet = open_input(input_path)
    counts = {split: {"dialogues": 0, "pairs": 0} for split in SPLITS}
    writers = SplitWriters(output_dir)
    total = 0
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=["sample", "dialogue_id"]):
            data = batch.to_pydict()
            for turns, dialogue_id in zip(data["sample"], data["dialogue_id"]):
                turns = [t for t in (turns or []) if t]
                if len(turns) < 2:
                    continue
                split = split_of(dialogue_id, seed, val_fraction, test_fraction)
                counts[split]["dialogues"] += 1
                for context, answer in examples_from_dialogue(turns, max_turns):
                    writers.add(split, dialogue_id, context, answer)
                    counts[split]["pairs"] += 1
                    total += 1
                    if rows and total >= rows:
                        break
                if rows and total >= rows:
                    break
            if rows and total >= rows:
                break
        if total == 0:
            raise UserError(f"{input_path}: no dialogue with two or more turns")
        writers.commit()
    except BaseException:
        writers.abort()
        raise
    return counts


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT, help="parquet from cleaner_text.py")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="folder for the split files")
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS, help="context turns before an answer")
    parser.add_argument("--rows", type=int, default=None, help="stop after this many pairs in all")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the split hash")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    args = parser.parse_args(argv)
    if args.max_turns < 1:
        parser.error("--max-turns must be at least 1")
    if args.rows is not None and args.rows < 1:
        parser.error("--rows must be positive")
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        parser.error("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        counts = create_dataset(args.input, args.output, args.max_turns, args.rows, args.seed,
                                args.val_fraction, args.test_fraction)
    except UserError as exc:
        print(f"create_dataset.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"{'split':6s} {'dialogues':>10s} {'pairs':>10s}")
    for split in SPLITS:
        print(f"{split:6s} {counts[split]['dialogues']:>10d} {counts[split]['pairs']:>10d}")
        if counts[split]["pairs"] == 0:
            print(f"warning: the {split} split is empty; use more data or a larger fraction",
                  file=sys.stderr)
    print(f"wrote pairs_*.csv and context_*.parquet to {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
