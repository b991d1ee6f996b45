"""Stage 3: turn clean dialogues into training files.

Reads data/clean_dialogues.parquet and writes, for each split
(train, val, test):
  data/pairs_<split>.csv        dialogue_id,question,answer
  data/context_<split>.parquet  dialogue_id, context (list<string>), answer
Every turn after the first is an answer: its question is the turn before it,
its context the --max-turns turns before it, oldest first.

Splits go by dialogue_id through a seeded hash, so no dialogue has turns in two
splits and the same dialogue lands in the same split on every run. Corpora
repeat themselves (the same joke told twice, a common exchange in many
dialogues), so dialogues that share a question/answer pair or an answer of 40
characters or more (compared lowercased, without punctuation), or that are
near-duplicates (MinHash over word shingles, datasketch), form a group, and a
group goes to one split: the split of its first dialogue. No pair's text is
then in two splits, and the test split does not hold retellings of training
dialogues. The run says how many dialogues and pairs the grouping moved.

Run it:
    python create_dataset.py
    python create_dataset.py --rows 50000 --max-turns 4 --seed 42
    python create_dataset.py --input data/clean_dialogues.parquet --output data/

In a notebook (Jupyter, Colab): paste this whole file into one cell, set the
defaults block below, and run the cell. `%run create_dataset.py --rows 50000`
and `!python create_dataset.py --rows 50000` take flags as above.
"""
import argparse
import contextlib
import csv
import hashlib
import itertools
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHash

# ---------------------------------------------------------------- defaults
DEFAULT_INPUT = "data/clean_dialogues.parquet"
DEFAULT_OUTPUT = "data"
MAX_TURNS = 16          # context turns before each answer; the trainers cut by tokens
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
ROWS = None             # stop after this many pairs in all (None: all)
SEED = 42
BATCH_ROWS = 10_000
SPLITS = ("train", "val", "test")
SHINGLE_WORDS = 3       # near-duplicates: Jaccard similarity of word 3-grams...
NUM_PERM = 64           # ...estimated with 64 MinHash permutations,
BANDS = 8               # in 8 bands of 8 rows: candidates from about 0.7 similarity up
LONG_ANSWER_CHARS = 40  # an answer this long said after two different questions is one joke

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


WORD = re.compile(r"\w+")


def normalized_words(text):
    return WORD.findall(text.lower().replace("ё", "е"))


def text_key(*parts):
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def dialogue_fingerprint(turns):
    """64-bit keys of every pair's text and of every long answer on its own,
    and the word shingles of the whole dialogue. Text is compared lowercased,
    without punctuation ("Нет." and "нет!" are one answer); a turn of marks
    only keeps its marks."""
    words = [normalized_words(turn) for turn in turns]
    texts = [" ".join(w) or turn.strip() for w, turn in zip(words, turns)]
    keys = []
    for i in range(1, len(turns)):
        keys.append(text_key(texts[i - 1], texts[i]))
        if len(turns[i]) >= LONG_ANSWER_CHARS:
            keys.append(text_key("", texts[i]))
    flat = [w for turn_words in words for w in turn_words]
    if len(flat) < SHINGLE_WORDS:
        shingles = [" ".join(texts).encode("utf-8")]
    else:
        shingles = [" ".join(flat[i:i + SHINGLE_WORDS]).encode("utf-8")
                    for i in range(len(flat) - SHINGLE_WORDS + 1)]
    return keys, shingles


# Odd 64-bit multipliers that fold a band's 8 MinHash values into one key.
BAND_MIX = (np.random.default_rng(20240516).integers(1, 2**62, NUM_PERM // BANDS, dtype=np.uint64) * 2 + 1)


def band_keys(shingle_sets):
    """LSH band keys (len(shingle_sets) x BANDS): two dialogues share a key in
    a band when their MinHash signatures agree on all of that band's rows,
    which happens mostly for near-duplicates. One array per band, grouped by
    sorting, holds what a dict-based index (datasketch's MinHashLSH, about 3 GB
    for 900,000 dialogues) would, in 64 bytes a dialogue."""
    signatures = np.stack([m.hashvalues for m in MinHash.generator(shingle_sets, num_perm=NUM_PERM)])
    rows = signatures.astype(np.uint64).reshape(len(shingle_sets), BANDS, NUM_PERM // BANDS)
    with np.errstate(over="ignore"):
        return (rows * BAND_MIX).sum(axis=2, dtype=np.uint64).view(np.int64)


def same_key_edges(keys, owners):
    """(a, b) index pairs linking every owner of a key to the key's first owner."""
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    owners = owners[order]
    del order
    starts = np.empty(len(keys), dtype=bool)
    starts[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    del keys
    first = owners[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    linked = first != owners
    return first[linked], owners[linked]


def connected_groups(count, edge_sets):
    """For each of `count` nodes, the smallest node of its connected component.
    Edge sets, (a, b) arrays, are merged one at a time, so that only one is in
    memory: each edge lowers the larger root of its two ends to the smaller,
    and pointer jumping carries the new roots to every node."""
    label = np.arange(count)
    for a, b in edge_sets:
        while True:
            root_a, root_b = label[a], label[b]
            if np.array_equal(root_a, root_b):
                break
            low = np.minimum(root_a, root_b)
            np.minimum.at(label, root_a, low)
            np.minimum.at(label, root_b, low)
            while True:
                jumped = label[label]  # every label is a node of the same group, no larger
                if np.array_equal(jumped, label):
                    break
                label = jumped
    return label


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
    schema = parquet.schema_arrow
    missing = {"sample", "dialogue_id"} - set(schema.names)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                        "(expected the output of cleaner_text.py)")
    sample_type = schema.field("sample").type
    if not (pa.types.is_list(sample_type) or pa.types.is_large_list(sample_type)):
        # A string would be read letter by letter, each letter a "turn".
        raise UserError(f"{path}: column 'sample' holds {sample_type}, not a list of turns "
                        "(run parser_dataset.py and cleaner_text.py on it first)")
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


def usable_dialogues(parquet, rows):
    """(dialogue_id, turns) of every dialogue with two or more turns, up to the
    one that reaches `rows` pairs; the same sequence on every pass."""
    total = 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=["sample", "dialogue_id"]):
        data = batch.to_pydict()
        for turns, dialogue_id in zip(data["sample"], data["dialogue_id"]):
            turns = [t for t in (turns or []) if t]
            if len(turns) < 2:
                continue
            yield dialogue_id, turns
            total += len(turns) - 1
            if rows and total >= rows:
                return


def group_splits(parquet, rows, seed, val_fraction, test_fraction):
    """For each usable dialogue (in reading order): its split after grouping,
    and the split its own id would give. Also how many dialogues are in a
    group of two or more. Keys are kept in numpy arrays a batch at a time,
    so that the state stays near 100 bytes a dialogue."""
    ids, pair_keys, pair_owners, bands = [], [], [], []
    batch_ids, batch_keys, batch_owners, batch_shingles = [], [], [], []

    def flush():
        ids.append(np.array(batch_ids, dtype=np.int64))
        pair_keys.append(np.array(batch_keys, dtype=np.int64))
        pair_owners.append(np.array(batch_owners, dtype=np.int32))
        bands.append(band_keys(batch_shingles))
        for batch in (batch_ids, batch_keys, batch_owners, batch_shingles):
            batch.clear()

    for index, (dialogue_id, turns) in enumerate(usable_dialogues(parquet, rows)):
        keys, shingles = dialogue_fingerprint(turns)
        batch_ids.append(dialogue_id)
        batch_keys.extend(keys)
        batch_owners.extend([index] * len(keys))
        batch_shingles.append(shingles)
        if len(batch_ids) >= BATCH_ROWS:
            flush()
    if batch_ids:
        flush()
    if not ids:
        return [], [], 0
    ids = np.concatenate(ids)
    count = len(ids)
    pair_edges = same_key_edges(np.concatenate(pair_keys), np.concatenate(pair_owners))
    del pair_keys, pair_owners
    band_matrix = np.concatenate(bands)
    del bands
    owners = np.arange(count, dtype=np.int32)
    band_edges = (same_key_edges(band_matrix[:, band], owners) for band in range(BANDS))
    group = connected_groups(count, itertools.chain([pair_edges], band_edges))
    del band_matrix, pair_edges
    grouped = count - int(np.count_nonzero(np.bincount(group, minlength=count) == 1))
    own = np.array([SPLITS.index(split_of(int(i), seed, val_fraction, test_fraction)) for i in ids],
                   dtype=np.int8)
    return own[group], own, grouped


def create_dataset(input_path, output_dir, max_turns=MAX_TURNS, rows=None, seed=SEED,
                   val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION):
    """Write the six split files; return the counts per split and what the
    grouping of repeated dialogues moved."""
    parquet = open_input(input_path)
    splits, own, grouped = group_splits(parquet, rows, seed, val_fraction, test_fraction)
    counts = {split: {"dialogues": 0, "pairs": 0} for split in SPLITS}
    moved = {"grouped": grouped, "dialogues": int(np.count_nonzero(splits != own)) if len(own) else 0,
             "pairs": 0}
    writers = SplitWriters(output_dir)
    total = 0
    try:
        for index, (dialogue_id, turns) in enumerate(usable_dialogues(parquet, rows)):
            split = SPLITS[splits[index]]
            was_moved = bool(splits[index] != own[index])
            counts[split]["dialogues"] += 1
            for context, answer in examples_from_dialogue(turns, max_turns):
                writers.add(split, dialogue_id, context, answer)
                counts[split]["pairs"] += 1
                moved["pairs"] += was_moved
                total += 1
                if rows and total >= rows:
                    break
        if total == 0:
            raise UserError(f"{input_path}: no dialogue with two or more turns")
        writers.commit()
    except BaseException:
        writers.abort()
        raise
    return counts, moved


def parse_args(argv):
    # prog: in a notebook cell argparse would name the kernel (ipykernel_launcher.py) in its messages.
    parser = argparse.ArgumentParser(prog="create_dataset.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT, help="parquet from cleaner_text.py")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="folder for the split files")
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS, help="context turns before an answer")
    parser.add_argument("--rows", type=int, default=ROWS, help="stop after this many pairs in all")
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
        counts, moved = create_dataset(args.input, args.output, args.max_turns, args.rows, args.seed,
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
    print(f"repeated dialogues: {moved['grouped']} share a pair's text or are near-duplicates of "
          f"another; {moved['dialogues']} dialogues ({moved['pairs']} pairs) moved to their group's split")
    print(f"wrote pairs_*.csv and context_*.parquet to {args.output}/")
    return 0


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
