"""Stage 3: turn clean dialogues into training files.

Reads data/clean_dialogues.parquet and writes, for each split
(train, val, test):
  data/pairs_<split>.csv        dialogue_id,question,answer
  data/context_<split>.parquet  dialogue_id, context (list<string>), answer,
                                facts (string)
Every turn after the first is an answer: its question is the turn before it,
its context the --max-turns turns before it, oldest first.

A bot that talks like one person (--as WHO, given once or more): only that
person's turns are answers; the turns before each, whoever wrote them, are its
question and context. WHO is a speaker's key (user111), their display name
("Вадим Петров", or the first name alone where one person has it), or `me`:
the owner that a whole-account Telegram export records (cleaner_text.py keeps
the record). It needs the `speakers` column (parser_dataset.py writes it where
the source says who spoke); a dialogue whose speakers are unknown gives no
answers. In a group (a dialogue with three or more distinct speaker keys) each
context turn of someone else starts with their first name, "Аня: текст", as
tg_bot.py shows a group member's message to the model; the person's own turns,
like the bot's replies, carry none. The output says whose voice it holds:
data/voice.json, {"keys": [...], "names": [...]}, which the trainers copy into
chat_config.json as "voice", and the same JSON under b"voice" in the context
files' schema metadata. A run without --as removes a voice.json it finds, and
writes exactly what it always wrote.

`facts` is what the bot would answer to "Что ты обо мне знаешь?" at that
point, had it been the bot of this dialogue: the facts the user stated about
themselves (name, city, age, work, study, family, pets, likes, dislikes, plans)
in all their earlier turns, not only the window, merged oldest first ("" where
none). The user is the side whose turns the prompt labels "Вопрос:" counting
back from the answer; with --as, everyone but the person (in a group, all the
others' facts merged as one user's). The trainers put it in the prompt as the chat does, so
the model learns to use a memory that outlives its context. It is found with
the user facts block below (yargy grammars over pymorphy3), which most turns
skip after a look at their words; still, it makes this stage about five times
slower (25 s instead of 5 s for the 253,000 turns of the 87,720-dialogue
corpus on a 2-core machine) and adds about 50 MB. --no-facts leaves the column
out, at the old speed.

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
    python create_dataset.py --no-facts        # no facts column: the old speed
    python create_dataset.py --as me           # a Telegram account export's owner's voice
    python create_dataset.py --as "Вадим Петров" --as user222
    python create_dataset.py --feedback bot.sqlite3   # the bot's 👍/👎: feedback_{train,val}.parquet

--feedback BOT.sqlite3 reads the ratings table of tg_bot.py's database instead
(read-only) and writes data/feedback_{train,val}.parquet for train_*.py
--feedback: a row per rated reply (prompt, completion, label) and per 🔄 pair
(prompt, chosen, rejected), one model's ratings (--feedback-model), split by
(chat, user) and shuffled with --seed; preference_pairs says the pair rule.

In a notebook (Jupyter, Colab): paste this whole file into one cell, set the
defaults block below, and run the cell. `%run create_dataset.py --rows 50000`
and `!python create_dataset.py --rows 50000` take flags as above.
"""
import argparse
import contextlib
import csv
import functools
import hashlib
import itertools
import json
import os
import re
import sqlite3
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
FACTS = True            # the facts column (what the user said about themselves earlier); False: left out
AS = None               # whose turns are the answers: "me", a key, a display name, or a list (None: everyone's)
GROUP_SPEAKERS = 3      # a dialogue with this many distinct speaker keys is a group: context turns carry names
MAX_SPEAKER_CHARS = 32  # a first name in a group turn is cut as tg_bot.py cuts it
NO_SPEAKER_NAME = "Участник"  # tg_bot.py's label for a group member without a first name
SPEAKERS_LISTED = 20    # an unknown --as lists this many speakers, the most talkative first
VOICE_FILE = "voice.json"
# --feedback BOT.sqlite3: the bot's 👍/👎 as data/feedback_{train,val}.parquet instead of the dialogue splits
FEEDBACK = None         # the bot's database (tg_bot.py --db); None: the dialogue splits as above
FEEDBACK_MODEL = None   # whose ratings: None: the model of the newest rating; a folder name or model_hash; "any"
FEEDBACK_SPLITS = ("train", "val")
LITERAL_SPECIAL_TOKENS = ("<|endoftext|>", "</s>", "<s>", "<pad>", "<unk>")  # never trained on as text
VOICE_METADATA_KEY = b"voice"
OWNER_METADATA_KEY = b"owner"

CONTEXT_SCHEMA = pa.schema([
    ("dialogue_id", pa.int64()),
    ("context", pa.list_(pa.string())),
    ("answer", pa.string()),
])
FACTS_FIELD = pa.field("facts", pa.string())


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


def facts_before_answers(turns):
    """For every turn after the first, the answer to "Что ты обо мне знаешь?" from what its user side
    said before it: turns k-1, k-3, ... for the answer turns[k], merged oldest first as the
    chat merges them (a later name replaces an earlier one); "" where that side stated
    nothing. Each turn is read once, whichever answers it comes before."""
    stored, answer = [[], []], ["", ""]
    for k in range(1, len(turns)):
        side = (k - 1) % 2
        new = extract_user_facts(turns[k - 1])
        if new:
            stored[side] = merge_user_facts(stored[side], new)
            answer[side] = render_facts_answer(stored[side])
        yield answer[side]


def check_fact_tools():
    try:
        load_fact_tools()
    except ImportError as exc:
        raise UserError(f"the facts column needs yargy and pymorphy3 ({exc}); install them "
                        "(pip install -r requirements.txt) or pass --no-facts") from None


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
    missing = sorted({"sample", "dialogue_id"} - set(schema.names))
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} "
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

    def __init__(self, folder, facts, voice=None):
        self.schema = CONTEXT_SCHEMA.append(FACTS_FIELD) if facts else CONTEXT_SCHEMA
        if voice:
            self.schema = self.schema.with_metadata({VOICE_METADATA_KEY: voice_json(voice).encode("utf-8")})
        self.folder = Path(folder)
        self.voice = voice
        suffix = f".tmp-{os.getpid()}"
        self.targets, self.csv_files, self.csv, self.parquet, self.buffers = {}, {}, {}, {}, {}
        with self.named_on_error():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.voice_file = self.folder / VOICE_FILE
            self.voice_tmp = self.folder / f".{VOICE_FILE}{suffix}"
            if voice:
                self.voice_tmp.write_text(voice_json(voice) + "\n", encoding="utf-8")
            for split in SPLITS:
                pairs = self.folder / f"pairs_{split}.csv"
                context = self.folder / f"context_{split}.parquet"
                tmp_pairs = pairs.with_name(f".{pairs.name}{suffix}")
                tmp_context = context.with_name(f".{context.name}{suffix}")
                self.targets[split] = [(tmp_pairs, pairs), (tmp_context, context)]
                self.csv_files[split] = open(tmp_pairs, "w", encoding="utf-8", newline="")
                self.csv[split] = csv.writer(self.csv_files[split])
                self.csv[split].writerow(["dialogue_id", "question", "answer"])
                self.parquet[split] = pq.ParquetWriter(tmp_context, self.schema)
                self.buffers[split] = {name: [] for name in self.schema.names}

    @contextlib.contextmanager
    def named_on_error(self):
        """A failed write (no such folder, no permission, a full disk) is the --output folder's
        fault, said in one line; what was opened so far is removed."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise UserError(f"{self.folder}: cannot write the --output folder "
                            f"({exc.strerror or exc})") from None

    def add(self, split, dialogue_id, context, answer, facts=None):
        with self.named_on_error():
            self.csv[split].writerow([dialogue_id, context[-1], answer])
            buffer = self.buffers[split]
            buffer["dialogue_id"].append(dialogue_id)
            buffer["context"].append(list(context))
            buffer["answer"].append(answer)
            if "facts" in buffer:
                buffer["facts"].append(facts)
            if len(buffer["answer"]) >= BATCH_ROWS:
                self.flush(split)

    def flush(self, split):
        buffer = self.buffers[split]
        if buffer["answer"]:
            self.parquet[split].write_table(pa.table(buffer, schema=self.schema))
            for column in buffer.values():
                column.clear()

    def close(self):
        for split in SPLITS:
            self.flush(split)
            self.csv_files[split].close()
            self.parquet[split].close()

    def commit(self):
        with self.named_on_error():
            self.close()
            for split in SPLITS:
                for tmp, final in self.targets[split]:
                    os.replace(tmp, final)
            if self.voice:
                os.replace(self.voice_tmp, self.voice_file)
            else:  # a voice.json of an earlier --as run would name a voice these files are not in
                self.voice_file.unlink(missing_ok=True)

    def abort(self):
        for split in SPLITS:
            for opened in (self.csv_files.get(split), self.parquet.get(split)):
                if opened is not None:
                    with contextlib.suppress(OSError):
                        opened.close()
            for tmp, _ in self.targets.get(split, []):
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        if getattr(self, "voice_tmp", None) is not None:
            with contextlib.suppress(OSError):
                self.voice_tmp.unlink(missing_ok=True)


def usable_dialogues(parquet, rows, voice_keys=None):
    """(dialogue_id, turns, speaker keys) of every dialogue with two or more
    turns, up to the one that reaches `rows` pairs; the same sequence on every
    pass. The speaker keys (aligned with the turns, "" unknown) are read with
    --as only (voice_keys: the person's keys, whose turns count as pairs);
    without it they are None and every turn after the first is a pair."""
    total = 0
    columns = ["sample", "dialogue_id"] + (["speakers"] if voice_keys else [])
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        data = batch.to_pydict()
        who = data["speakers"] if voice_keys else itertools.repeat(None)
        for turns, dialogue_id, speakers in zip(data["sample"], data["dialogue_id"], who):
            if voice_keys:
                turns, keys = aligned_speakers(turns, speakers)
            else:
                turns, keys = [t for t in (turns or []) if t], None
            if len(turns) < 2:
                continue
            yield dialogue_id, turns, keys
            total += len(turns) - 1 if keys is None else sum(k in voice_keys for k in keys[1:])
            if rows and total >= rows:
                return


def group_splits(parquet, rows, seed, val_fraction, test_fraction, voice_keys=None):
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

    for index, (dialogue_id, turns, _) in enumerate(usable_dialogues(parquet, rows, voice_keys)):
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


# ---------------------------------------------------------------- --as: one person's voice
def speaker_key(entry):
    """A speakers entry's key, the part before the first "|" ("" unknown)."""
    return (entry or "").split("|", 1)[0]


def speaker_display_name(entry):
    return (entry or "").split("|", 1)[1].strip() if "|" in (entry or "") else ""


def group_label(display_name):
    """The name a group turn starts with, as tg_bot.py's speaker_name makes it from a Telegram
    user's first_name (one line, at most MAX_SPEAKER_CHARS characters, "Участник" for none);
    an export's display name is "first last", so its first word is the first name."""
    first = (display_name or "").split()[:1]
    return " ".join(" ".join(first).split())[:MAX_SPEAKER_CHARS] or NO_SPEAKER_NAME


def group_turn(display_name, text):
    """A group member's turn as the bot's prompt shows it: "Аня: текст"."""
    return f"{group_label(display_name)}: {text}"


def aligned_speakers(turns, speakers):
    """(turns, keys) without the empty turns; keys all "" where the dialogue's speakers are unknown
    (none recorded, or not one a turn)."""
    turns = list(turns or [])
    speakers = list(speakers or [])
    if len(speakers) != len(turns):
        speakers = [""] * len(turns)
    kept = [(t, s or "") for t, s in zip(turns, speakers) if t]
    return [t for t, _ in kept], [s for _, s in kept]


def voice_examples(turns, entries, voice_keys, max_turns):
    """(context, answer) for every turn of the person (keys in voice_keys) after the first. In a group
    (GROUP_SPEAKERS or more distinct keys) the others' turns start with their first name."""
    keys = [speaker_key(e) for e in entries]
    group = len({k for k in keys if k}) >= GROUP_SPEAKERS
    shown = [turn if not group or key in voice_keys else group_turn(speaker_display_name(entry), turn)
             for turn, key, entry in zip(turns, keys, entries)]
    for i in range(1, len(turns)):
        if keys[i] in voice_keys:
            yield shown[max(0, i - max_turns):i], turns[i]


def facts_of_others(turns, entries, voice_keys):
    """For every answer of voice_examples, the facts the others stated before it, merged oldest first."""
    stored, answer = [], ""
    for k in range(1, len(turns)):
        if speaker_key(entries[k - 1]) not in voice_keys:
            new = extract_user_facts(turns[k - 1])
            if new:
                stored = merge_user_facts(stored, new)
                answer = render_facts_answer(stored)
        if speaker_key(entries[k]) in voice_keys:
            yield answer


def input_owner(parquet):
    record = (parquet.schema_arrow.metadata or {}).get(OWNER_METADATA_KEY)
    if not record:
        return None
    try:
        owner = json.loads(record)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and owner.get("key") else None


def speaker_survey(parquet):
    """{key: [display name (the last seen), turns]} over the whole input."""
    found = {}
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=["sample", "speakers"]):
        data = batch.to_pydict()
        for turns, speakers in zip(data["sample"], data["speakers"]):
            for entry in aligned_speakers(turns, speakers)[1]:
                key = speaker_key(entry)
                if key:
                    seen = found.setdefault(key, ["", 0])
                    seen[0] = speaker_display_name(entry) or seen[0]
                    seen[1] += 1
    return found


def speakers_line(found):
    ranked = sorted(found.items(), key=lambda item: (-item[1][1], item[0]))
    listed = [f"{name} ({key}) {turns} turns" if name else f"{key} {turns} turns"
              for key, (name, turns) in ranked[:SPEAKERS_LISTED]]
    more = len(ranked) - SPEAKERS_LISTED
    return "; ".join(listed) + (f"; and {more} more" if more > 0 else "")


def folded(name):
    return " ".join(name.split()).casefold().replace("ё", "е")


def resolve_voice(parquet, path, wanted):
    """{"keys", "names"} of the people --as names: each WHO is "me", a key, a display name or a first name
    that is one person's. No match, or a name two people share, is a UserError that lists the speakers."""
    if "speakers" not in parquet.schema_arrow.names:
        raise UserError(f"{path}: no 'speakers' column, so nobody's turns can be told apart for --as "
                        "(parse a source that names who spoke, e.g. a Telegram export, with parser_dataset.py)")
    found = speaker_survey(parquet)
    if not found:
        raise UserError(f"{path}: the 'speakers' column names nobody, so --as has no one to pick")
    keys = []
    for who in wanted:
        who = who.strip()
        if who.casefold() == "me":
            owner = input_owner(parquet)
            if owner is None:
                raise UserError(f"{path}: --as me needs the owner record of a whole-account Telegram export "
                                "(Settings > Advanced > Export Telegram data, JSON), and this input has none; "
                                f"name the person instead: {speakers_line(found)}")
            matches = [owner["key"]] if owner["key"] in found else []
            if not matches:
                raise UserError(f"{path}: the export's owner {owner.get('name') or ''} ({owner['key']}) wrote none "
                                f"of its turns; speakers: {speakers_line(found)}")
        elif who in found:
            matches = [who]
        else:
            matches = [k for k, (name, _) in found.items() if name and folded(name) == folded(who)] or \
                      [k for k, (name, _) in found.items() if name and folded(group_label(name)) == folded(who)]
        if not matches:
            raise UserError(f"{path}: --as {who!r} matches no speaker; speakers: {speakers_line(found)}")
        if len(matches) > 1:
            raise UserError(f"{path}: --as {who!r} matches {len(matches)} speakers "
                            f"({', '.join(sorted(matches))}); give a key instead; speakers: {speakers_line(found)}")
        keys += [k for k in matches if k not in keys]
    return {"keys": keys, "names": [found[k][0] or k for k in keys]}


def voice_json(voice):
    return json.dumps({"keys": voice["keys"], "names": voice["names"]}, ensure_ascii=False)


def create_dataset(input_path, output_dir, max_turns=MAX_TURNS, rows=None, seed=SEED,
                   val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, facts=FACTS, voice_of=None):
    """Write the six split files (and, with voice_of, the --as names, voice.json); return the
    counts per split (with the rows whose facts are not empty), what the grouping of repeated
    dialogues moved, and the voice ({"keys", "names", "answers"}, or None)."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"{output_dir}: is a file; --output names the folder of the split files")
    parquet = open_input(input_path)
    voice = resolve_voice(parquet, input_path, voice_of) if voice_of else None
    voice_keys = set(voice["keys"]) if voice else None
    if facts:
        check_fact_tools()
    # Grouping reads every usable dialogue, so --as splits the dialogues as a run without it does.
    splits, own, grouped = group_splits(parquet, rows, seed, val_fraction, test_fraction, voice_keys)
    counts = {split: {"dialogues": 0, "pairs": 0, "facts": 0} for split in SPLITS}
    moved = {"grouped": grouped, "dialogues": int(np.count_nonzero(splits != own)) if len(own) else 0,
             "pairs": 0}
    writers = SplitWriters(output_dir, facts, voice and {"keys": voice["keys"], "names": voice["names"]})
    total = 0
    try:
        for index, (dialogue_id, turns, keys) in enumerate(usable_dialogues(parquet, rows, voice_keys)):
            split = SPLITS[splits[index]]
            was_moved = bool(splits[index] != own[index])
            if keys is None:
                examples = examples_from_dialogue(turns, max_turns)
                known = facts_before_answers(turns) if facts else itertools.repeat(None)
            else:
                examples = list(voice_examples(turns, keys, voice_keys, max_turns))
                known = facts_of_others(turns, keys, voice_keys) if facts else itertools.repeat(None)
            counts[split]["dialogues"] += keys is None or bool(examples)
            for (context, answer), known_facts in zip(examples, known):
                writers.add(split, dialogue_id, context, answer, known_facts)
                counts[split]["pairs"] += 1
                counts[split]["facts"] += bool(known_facts)
                moved["pairs"] += was_moved
                total += 1
                if rows and total >= rows:
                    break
            if rows and total >= rows:
                break
        if total == 0:
            if voice:
                raise UserError(f"{input_path}: no turn of {', '.join(voice['names'])} follows another turn")
            raise UserError(f"{input_path}: no dialogue with two or more turns")
        writers.commit()
    except BaseException:
        writers.abort()
        raise
    if voice:
        voice["answers"] = total
    return counts, moved, voice


# ---------------------------------------------------------------- --feedback: the bot's ratings
FEEDBACK_SCHEMA = pa.schema([
    ("prompt", pa.string()), ("completion", pa.string()), ("label", pa.bool_()),
    ("chosen", pa.string()), ("rejected", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
    ("rating_id", pa.int64()), ("model", pa.string()), ("model_hash", pa.string()),
])


def read_ratings(path):
    """The ratings table of the bot's database as dicts, read-only (the bot may be running)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: database not found (tg_bot.py writes its ratings into --db)")
    try:
        db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise UserError(f"{path}: cannot open it as an SQLite database ({exc})")
    try:
        db.row_factory = sqlite3.Row
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if RATINGS_TABLE not in tables:
            raise UserError(f"{path}: no {RATINGS_TABLE} table: the bot has not sent a reply with rating buttons yet")
        rows = [dict(row) for row in db.execute(f"SELECT * FROM {RATINGS_TABLE} ORDER BY id")]
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not an SQLite database ({exc})")
    finally:
        db.close()
    return rows


def strip_special_tokens(text):
    """A reply without literal special tokens ("</s>" written out by a model with another tokenizer, or
    typed), as one line: a reply trained on with them would teach the model to write them."""
    for token in LITERAL_SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return " ".join(text.split())


def pick_feedback_model(rows, wanted):
    """(rows of the one model whose ratings train, a line saying whose): by default the model of the
    newest rating (its folder name and weights hash: a retrained folder of the same name is another
    model); wanted: a folder name or a model_hash, or "any"."""
    if not rows:
        return rows, "no ratings"
    if wanted == "any":
        return rows, f"all models ({len({r['model_hash'] for r in rows})})"
    if wanted is None:
        newest = max(rows, key=lambda r: (r["rated"] or r["created"] or 0, r["id"]))
        kept = [r for r in rows if r["model_hash"] == newest["model_hash"]]
        how = f"{newest['model']} ({newest['model_hash']}), the model of the newest rating"
    else:
        kept = [r for r in rows if wanted in (r["model"], r["model_hash"])]
        how = f"{wanted}"
        if not kept:
            known = sorted({f"{r['model']} ({r['model_hash']})" for r in rows})
            raise UserError(f"--feedback-model {wanted}: no ratings of that model; the database has {', '.join(known)} "
                            f"(or --feedback-model any)")
    return kept, f"{how}: {len(kept)} of {len(rows)} rows; --feedback-model any takes every model's"


def preference_pairs(rows):
    """(chosen, rejected) rows from the replies 🔄 replaced. The rule: 👍 counts +1, no rating 0, 👎 -1,
    and the newer reply gets +0.5 for the 🔄 press itself (the person asked for another); the higher
    score is chosen. So the newer wins unless the ratings say otherwise (newer 👎 and older not 👎, or
    older 👍 and newer unrated: the older wins); two replies rated alike (both 👍, both 👎) say nothing
    of which is better and make no pair."""
    by_id = {row["id"]: row for row in rows}
    score = {LIKED: 1.0, DISLIKED: -1.0, None: 0.0}
    pairs = []
    for newer in rows:
        older = by_id.get(newer["replaces"])
        if older is None or older["prompt"] != newer["prompt"]:
            continue
        if newer["label"] is not None and newer["label"] == older["label"]:
            continue
        newer_wins = score[newer["label"]] + 0.5 > score[older["label"]]
        pairs.append((newer, older) if newer_wins else (older, newer))
    return pairs


def feedback_record(row, **fields):
    record = {name: None for name in FEEDBACK_SCHEMA.names}
    try:
        prompt_ids = json.loads(row["prompt_ids"])
    except (TypeError, ValueError):
        prompt_ids = None
    record.update(prompt=row["prompt"], prompt_ids=prompt_ids, rating_id=row["id"], model=row["model"],
                  model_hash=row["model_hash"], **fields)
    return record


def export_feedback(db_path, output_dir, model=FEEDBACK_MODEL, seed=SEED, val_fraction=VAL_FRACTION):
    """Write feedback_{train,val}.parquet: a row per rated reply (prompt, completion, label) and a row
    per pair (prompt, chosen, rejected), split by (chat, user), so that no conversation is in both,
    and shuffled with the seed (KTO reads its rows in order: unshuffled, a batch would hold one label).
    Returns the counts per split and the lines that say what was kept."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"{output_dir}: is a file; --output names the folder of the feedback files")
    every = read_ratings(db_path)
    rows, whose = pick_feedback_model(every, model)
    for row in rows:
        row["reply"] = strip_special_tokens(row["reply"] or "")
    usable = [row for row in rows if row["reply"]]
    rated = [row for row in usable if row["label"] in (LIKED, DISLIKED)]
    pairs = preference_pairs(usable)
    if not rated and not pairs:
        raise UserError(f"{db_path}: no rated replies{' of ' + whose.split(':')[0] if model != 'any' else ''} "
                        f"({len(every)} replies in the table, none with 👍 or 👎)")
    records = {split: [] for split in FEEDBACK_SPLITS}
    counts = {split: {"liked": 0, "disliked": 0, "pairs": 0} for split in FEEDBACK_SPLITS}

    def split_for(row):
        return "val" if split_of(f"{row['chat_id']}:{row['user_id']}", seed, val_fraction, 0.0) == "val" else "train"

    for row in rated:
        split = split_for(row)
        records[split].append(feedback_record(row, completion=" " + row["reply"], label=row["label"] == LIKED))
        counts[split]["liked" if row["label"] == LIKED else "disliked"] += 1
    for chosen, rejected in pairs:
        split = split_for(chosen)
        records[split].append(feedback_record(chosen, chosen=" " + chosen["reply"], rejected=" " + rejected["reply"]))
        counts[split]["pairs"] += 1
    rng = np.random.default_rng(seed)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for split in FEEDBACK_SPLITS:
            ordered = [records[split][i] for i in rng.permutation(len(records[split]))]
            final = folder / f"feedback_{split}.parquet"
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            pq.write_table(pa.Table.from_pylist(ordered, schema=FEEDBACK_SCHEMA), tmp)
            written.append((tmp, final))
        for tmp, final in written:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise UserError(f"{output_dir}: cannot write the feedback files ({exc.strerror or exc})")
    notes = [f"ratings of {whose}",
             f"left out: {len(rows) - len(usable)} replies empty without special tokens, "
             f"{sum(r['label'] is None for r in usable)} not rated (in pairs only)"]
    return counts, notes


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
    parser.add_argument("--as", dest="as_who", action="append", default=None, metavar="WHO",
                        help="only this person's turns are answers: a speaker key (user111), a display name, or "
                             "'me' (a Telegram account export's owner); repeat for several people (their turns are all answers) or one person's several keys")
    parser.add_argument("--facts", action=argparse.BooleanOptionalAction, default=FACTS,
                        help="write the facts column: what the user said about themselves earlier "
                             "(--no-facts: leave it out, several times faster)")
    parser.add_argument("--feedback", default=FEEDBACK, metavar="BOT_DB",
                        help="the bot's SQLite database: write feedback_{train,val}.parquet from its 👍/👎 "
                             "(for train_*.py --feedback) instead of the dialogue splits")
    parser.add_argument("--feedback-model", default=FEEDBACK_MODEL, metavar="MODEL",
                        help="whose ratings: a model folder name or its hash (default: the model of the newest "
                             "rating), or 'any'")
    args = parser.parse_args(argv)
    if args.as_who is None and AS is not None:
        args.as_who = [AS] if isinstance(AS, str) else list(AS)
    if args.as_who is not None and not all(isinstance(w, str) and w.strip() for w in args.as_who):
        parser.error("--as names a person: a key, a display name or 'me'")
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
    if args.feedback:
        return feedback_main(args)
    try:
        counts, moved, voice = create_dataset(args.input, args.output, args.max_turns, args.rows, args.seed,
                                              args.val_fraction, args.test_fraction, args.facts, args.as_who)
    except UserError as exc:
        print(f"create_dataset.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"{'split':6s} {'dialogues':>10s} {'pairs':>10s}" + (f" {'with facts':>11s}" if args.facts else ""))
    for split in SPLITS:
        print(f"{split:6s} {counts[split]['dialogues']:>10d} {counts[split]['pairs']:>10d}"
              + (f" {counts[split]['facts']:>11d}" if args.facts else ""))
        if counts[split]["pairs"] == 0:
            print(f"warning: the {split} split is empty; use more data or a larger fraction",
                  file=sys.stderr)
    print(f"repeated dialogues: {moved['grouped']} share a pair's text or are near-duplicates of "
          f"another; {moved['dialogues']} dialogues ({moved['pairs']} pairs) moved to their group's split")
    if voice:
        print(f"voice: {', '.join(f'{n} ({k})' for k, n in zip(voice['keys'], voice['names']))}: "
              f"{voice['answers']} answers are theirs; recorded in {Path(args.output) / VOICE_FILE}")
    print(f"wrote pairs_*.csv and context_*.parquet to {args.output}/")
    return 0


def feedback_main(args):
    try:
        counts, notes = export_feedback(args.feedback, args.output, args.feedback_model, args.seed, args.val_fraction)
    except UserError as exc:
        print(f"create_dataset.py: error: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(note)
    print(f"{'split':6s} {'👍':>8s} {'👎':>8s} {'pairs':>8s}")
    for split in FEEDBACK_SPLITS:
        print(f"{split:6s} {counts[split]['liked']:>8d} {counts[split]['disliked']:>8d} {counts[split]['pairs']:>8d}")
        if not any(counts[split].values()):
            print(f"warning: the {split} split is empty; more ratings or another --val-fraction", file=sys.stderr)
    print(f"wrote feedback_train.parquet and feedback_val.parquet to {args.output}/")
    return 0


# ==================================================================================================
# Generated blocks: shared code that blocks/build.py writes into every script that needs it.
# Do not edit it here: change the block's source in blocks/, then run `make blocks`
# (`python blocks/build.py`); the suite fails while a copy differs from its source.
# ==================================================================================================


# ==== block blocks/user_facts.py: generated, edit the source and run `make blocks` ====
"""User facts: what people say about themselves (name, city, family, ...), read with yargy over pymorphy3.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

# What a user says about themselves (name, city, age, work, study, family, pets, likes,
# dislikes, plans with dates), found with yargy grammars over pymorphy3's analyses, kept
# in normal forms ("в Казани" is stored as Казань) and shown back inflected.
# A fact is a (kind, value) pair of strings; a user's facts are a list of them, oldest first.
FACT_KINDS = ("name", "city", "age", "occupation", "study", "family", "pet", "like", "dislike", "plan")
SINGLE_VALUE_KINDS = ("name", "city", "age", "occupation", "study")  # a later statement replaces the earlier one
MAX_VALUES_PER_KIND = 8       # likes, family, plans...: the oldest goes when a kind is full
NO_FACTS_ANSWER = "Пока ничего. Расскажи о себе, и я запомню."
# The answer to "Что ты обо мне знаешь?": a clause about "ты" for each kind, in FACT_KINDS order.
FACT_CLAUSES = {
    "name": "тебя зовут {}",
    "city": "ты живёшь {}",              # в Казани: place_in()
    "age": "тебе {}",                    # 25 лет: years_phrase()
    "occupation": "ты {}",               # ты учитель, ты на пенсии
    "workplace": "ты работаешь {}",      # an occupation that is a place: в школе
    "study": "ты учишься {}",
    "marital": "ты {}",                  # ты замужем
    "relatives": "у тебя есть {}",       # family, then pets, each kind listed with "и"
    "like": "ты любишь {}",
    "dislike": "ты не любишь {}",
    "plan": "{when} ты {what}",          # завтра ты поедешь в Казань: the verb in the second person
    "plan_thing": "{when} у тебя {what}",  # в субботу у тебя концерт
}
CITY_ABBREVIATIONS = {"мск": "Москва", "спб": "Санкт-Петербург", "питер": "Питер", "екб": "Екатеринбург",
                      "нск": "Новосибирск", "нн": "Нижний Новгород"}
# No library marks kinship or pet nouns, so these few lemmas are listed here.
KIN_LEMMAS = {"мама", "мать", "папа", "отец", "брат", "сестра", "муж", "жена", "сын", "дочь", "дочка", "сынок",
              "бабушка", "дедушка", "ребёнок", "дети", "внук", "внучка", "тётя", "дядя", "племянник",
              "племянница", "братишка", "сестрёнка", "супруг", "супруга", "девушка", "парень", "мамочка"}
PARTNER_LEMMAS = {"девушка", "парень"}  # kin only with "мой"/"у меня": "я девушка" says nothing of family
PET_LEMMAS = {"кот", "кошка", "котик", "котёнок", "собака", "пёс", "щенок", "собачка", "попугай", "хомяк",
              "хомячок", "черепаха", "кролик", "рыбка", "шиншилла", "крыса", "ящерица", "змея", "хорёк",
              "лошадь", "морская свинка", "свинка", "попугайчик"}
MARITAL_WORDS = {"замужем", "женат", "разведена", "разведён", "разведен", "помолвлена", "помолвлен"}
STATUS_PHRASES = {"на пенсии", "в декрете", "в отпуске по уходу"}
# "я человек", "я фанатка X": animate nouns that are not an occupation.
NOT_OCCUPATIONS = {"человек", "девушка", "парень", "мужчина", "женщина", "девочка", "мальчик", "ребёнок",
                   "фанат", "фанатка", "любитель", "любительница", "поклонник", "поклонница", "бот", "друг",
                   "подруга", "дурак", "дура", "идиот", "хозяин", "хозяйка", "гость", "новичок", "сам",
                   "робот", "пользователь"} | KIN_LEMMAS | PET_LEMMAS
MINE_LEMMAS = {"мой", "свой"}
POSSESSIVE_LEMMAS = MINE_LEMMAS | {"наш"}   # the user's own: no part of the relative kept ("у меня мой брат")
MODAL_VERBS = {"собираться", "планировать", "хотеть", "думать", "мечтать", "быть"}
WEEKDAYS = {"понедельник", "вторник", "среда", "четверг", "пятница", "суббота", "воскресенье"}
MONTHS = {"январь", "февраль", "март", "апрель", "май", "июнь", "июль", "август", "сентябрь", "октябрь",
          "ноябрь", "декабрь"}
# pymorphy3 knows numerals but not their values.
NUMBER_WORDS = {"один": 1, "два": 2, "три": 3, "четыре": 4, "пять": 5, "шесть": 6, "семь": 7, "восемь": 8,
                "девять": 9, "десять": 10, "одиннадцать": 11, "двенадцать": 12, "тринадцать": 13,
                "четырнадцать": 14, "пятнадцать": 15, "шестнадцать": 16, "семнадцать": 17,
                "восемнадцать": 18, "девятнадцать": 19, "двадцать": 20, "тридцать": 30, "сорок": 40,
                "пятьдесят": 50, "шестьдесат": 60, "шестьдесят": 60, "семьдесят": 70, "восемьдесят": 80,
                "девяносто": 90}
FILLER_WORDS = {"просто", "вообще", "кстати", "короче", "ну", "тоже", "уже", "сейчас", "щас", "теперь", "сам",
                "сама", "вот", "типа", "же", "лично", "пока", "ещё", "еще", "всё", "все", "тут", "здесь"}
QUESTION_WORDS = {"как", "где", "откуда", "сколько", "кто", "что", "чем", "зачем", "почему", "какой", "какая",
                  "какие", "ли", "помнишь", "знаешь", "угадай", "скажи"}
OTHER_PEOPLE = {"он", "она", "они", "ты", "вы", "его", "её", "ее", "их", "тебя", "тебе", "ей", "ему", "им",
                "друг", "подруга", "знакомый", "знакомая", "коллега", "сосед", "соседка"} | KIN_LEMMAS
# Words the grammars below are built on; every rule of a grammar holds one of them (or a
# pair), which is how sentences_worth_parsing() skips most messages without parsing them.
ME_WORDS = ("меня", "миня", "мене")
CALLED_WORDS = ("зовут", "завут", "звать", "зовите", "зови")
LIVE_WORDS = ("живу", "живём", "живем", "проживаю", "обитаю")
MOVED_WORDS = ("переехал", "переехала", "переехали", "перебрался", "перебралась")
WORK_VERBS = ("работаю", "тружусь", "подрабатываю", "работаем")
STUDY_VERBS = ("учусь", "обучаюсь", "учимся")
LOVE_VERBS = ("люблю", "обожаю", "любим", "обожаем")
PLEASE_VERBS = ("нравится", "нравятся", "нравиться", "нравяться")
FAN_WORDS = ("фанат", "фанатка", "поклонник", "поклонница", "любитель", "любительница")
FAVOURITE_WORDS = ("любимая", "любимый", "любимое", "любимые")
IRRITATE_VERBS = ("бесит", "бесят", "раздражает", "раздражают")   # the thing is the subject: nominative
HATE_VERBS = ("ненавижу", *IRRITATE_VERBS, "переношу")
DAY_WORDS = ("завтра", "послезавтра", "сегодня")
SEASON_WORDS = ("летом", "зимой", "весной", "осенью")
DATE_WORDS = (*DAY_WORDS, "выходных", "выходные", *SEASON_WORDS, "через", "неделе", "месяце", "году")
NAME_WORDS = ("имя", "имечко")
MY_NEUTER_WORDS = ("мое", "моё")          # "моё имя"
AGE_UNITS = ("лет", "год", "года")        # "мне 25 лет"; the grammar also takes "годик", "годика"
IN_WORDS = ("в", "во")                    # "живу в Казани", "во Владивостоке"
FROM_WORDS = ("из", "с", "со")            # "я из Казани", "с Питера"
NOW_WORDS = ("теперь", "сейчас")          # "жила в Омске, теперь в Томске"
PLACE_PREPOSITIONS = ("в", "во", "на")    # where one works or studies: "в школе", "на заводе"
CLASS_WORDS = ("классе", "класе")         # "я в 5 классе"
OWNER_WORDS = ("меня", "нас")             # "у меня", "у нас"
OWNER_VERBS = ("есть", "живет", "живёт", "живут")   # "у меня есть кот"
WITH_WORDS = ("с", "со")                  # "мы с мужем"
COLLECTIVE_NUMERALS = ("двое", "трое", "четверо", "пятеро")   # "у меня двое детей"
NAMING_WORDS = ("зовут", "кличке", "кличка", "назвала", "назвал", "назвали", "зову")
# What may stand between the last relative of a list and its name: "... и сестра, которую зовут оля".
BEFORE_NAMING = {"и", "по", "его", "её", "ее", "их", "которого", "которую", "которых", "которая", "который"}
CLAUSE_BREAKS = {",", ".", "!", "?", ";", ":", ")", "(", "а", "но", "однако", "зато", "\n"}
SENTENCE_ENDS = {".", "!", "?", "\n"}
QUOTE_MARKS = {'"', "«", "»", "„", "“", "”"}   # kept out of a plan's words: 'у меня через месяц "аида"'


@functools.lru_cache(maxsize=None)
def load_fact_tools():
    """pymorphy3's analyzer and the yargy parsers, built once on first use.
    The imports live here so that a chat with memory turned off starts without them.
    yargy's own default analyzer is pymorphy2 (which needs pkg_resources); handing it
    pymorphy3 keeps setuptools out of the requirements."""
    import pymorphy3
    from yargy import Parser, and_, not_, or_, rule
    from yargy.morph import MorphAnalyzer
    from yargy.predicates import custom, eq, in_caseless, type as token_type
    from yargy.tokenizer import MorphTokenizer

    class CachedAnalyzer(MorphAnalyzer):
        __call__ = functools.lru_cache(maxsize=20000)(MorphAnalyzer.__call__)

    class SharedTokenizer(MorphTokenizer):
        # Each Parser tokenizes the text it is given, and analysing the words is most of
        # that cost: the grammars and MessageTokens share a message's tokens.
        @functools.lru_cache(maxsize=64)
        def tokens(self, text):
            return tuple(MorphTokenizer.__call__(self, text))

        def __call__(self, text):
            return iter(self.tokens(text))

    morph = pymorphy3.MorphAnalyzer()
    tokenizer = SharedTokenizer(morph=CachedAnalyzer(raw=morph))
    parses = functools.lru_cache(maxsize=20000)(morph.parse)

    def forms_of(lemmas):
        # Every dictionary word has_lemma(lemmas) can match, as tokens are written (е for ё too).
        forms = {form.word for lemma in lemmas if " " not in lemma for p in morph.parse(lemma) for form in p.lexeme}
        return frozenset(forms | {form.replace("ё", "е") for form in forms})

    @functools.lru_cache(maxsize=50000)
    def guessed_lemmas(word):
        # The lemmas pymorphy3 guesses for a word its dictionary lacks: "свого" is свой to has_lemma.
        return frozenset() if morph.word_is_known(word) else frozenset(p.normal_form for p in parses(word))

    def has_form(*grammemes):
        wanted = set(grammemes)
        return custom(lambda word: any(wanted <= p.tag.grammemes for p in parses(word)))

    def likely(*grammemes):
        # The most probable analysis only: "мгу" is also a form of the village Мга.
        wanted = set(grammemes)
        return custom(lambda word: wanted <= parses(word)[0].tag.grammemes)

    def has_lemma(lemmas):
        return custom(lambda word: any(p.normal_form in lemmas for p in parses(word)))

    words = lambda *values: in_caseless(set(values))
    filler = in_caseless(FILLER_WORDS).repeatable(max=3).optional()
    me = words(*ME_WORDS)
    called = words(*CALLED_WORDS)
    # A word pymorphy3 does not know may be a rare name, but it must be a word (not ",").
    unknown_word = custom(lambda w: w.isalpha() and not morph.word_is_known(w.lower()))
    name_nomn = or_(has_form("Name", "nomn"), and_(unknown_word, custom(lambda w: w[:1].isupper())))
    name_any = or_(has_form("Name"), unknown_word)
    name_rules = or_(
        rule(me, filler, called, filler, name_any),                      # меня зовут аня
        rule(called, me, filler, name_any),                              # зовут меня настей
        rule(me, filler, name_any, called),                              # меня кстати дашей зовут
        rule(me, called, eq("не"), name_any, words("а"), name_any),      # меня зовут не аня а катя
        rule(words(*NAME_WORDS), words(*MY_NEUTER_WORDS), name_nomn),
        rule(words(*MY_NEUTER_WORDS), words("имя"), name_nomn),
        rule(words("я", "это"), filler, and_(name_nomn, not_(has_form("VERB")))),  # я саня
        rule(name_nomn, words("я")),                                     # саня я, с питера
        rule(words("а"), me, name_nomn),                                 # ..., а меня маша
    )
    geo = or_(has_form("Geox"), in_caseless(set(CITY_ABBREVIATIONS)))
    place = or_(
        rule(has_form("ADJF").optional(), geo),                          # нижнем новгороде
        rule(custom(str.isalpha), eq("-"), geo),                         # санкт-петербурге
        rule(geo, eq("-"), words("на"), eq("-"), custom(str.isalpha)),   # ростове-на-дону
    )
    geo_gent = or_(has_form("Geox", "gent"), in_caseless(set(CITY_ABBREVIATIONS)))
    place_from = or_(
        rule(has_form("ADJF", "gent").optional(), geo_gent),
        rule(custom(str.isalpha), eq("-"), geo_gent),
    )
    live = words(*LIVE_WORDS)
    moved = words(*MOVED_WORDS)
    other_place = rule(words(*PLACE_PREPOSITIONS), and_(has_form("NOUN"), not_(has_form("Geox"))))
    city_rules = or_(
        rule(live, filler, other_place.optional(), words(*IN_WORDS), place),   # живу в общаге в москве
        rule(live, filler, eq("не"), words(*IN_WORDS), place, eq(",").optional(),
             words("а"), words(*IN_WORDS), place),                             # живу не в москве а в казани
        rule(words(*NOW_WORDS), words(*IN_WORDS), place),                      # жила в омске, теперь в томске
        rule(words(*IN_WORDS), place, filler, live),
        rule(moved, filler, words(*IN_WORDS), place),
        rule(words(*FROM_WORDS), place_from),
    )
    number = or_(
        rule(token_type("INT")),
        rule(has_lemma(set(NUMBER_WORDS)), has_lemma(set(NUMBER_WORDS)).optional()),
    )
    age_rules = rule(words("мне"), filler, number, words(*AGE_UNITS, "годик", "годика").optional())
    work = in_caseless(set(WORK_VERBS))
    # A city is where one lives, not a workplace: "живу в екатеринбурге работаю инженером".
    noun_phrase = rule(or_(has_form("ADJF"), has_form("NUMR"), token_type("INT")).repeatable(max=2).optional(),
                       and_(has_form("NOUN"), not_(likely("Geox"))))
    prepositional = rule(words(*PLACE_PREPOSITIONS), noun_phrase)
    profession_ablt = has_form("NOUN", "anim", "ablt")
    occupation_rules = or_(
        rule(work, filler, prepositional.optional(), profession_ablt, prepositional.optional()),
        rule(work, filler, prepositional),
        rule(prepositional, filler, work),
        rule(words("я"), filler, words("по"), words("профессии"), has_form("NOUN", "anim", "nomn")),
        rule(words("я"), filler, has_form("ADJF", "nomn").optional(),
             and_(has_form("NOUN", "anim", "nomn"), likely("NOUN")),
             rule(has_form("ADJF", "gent").optional(),
                  and_(has_form("NOUN", "gent"), not_(likely("PREP")))).optional()),
        rule(words("на"), words("пенсии")),
        rule(words("в"), words("декрете")),
    )
    study = words(*STUDY_VERBS)
    study_rules = or_(
        rule(study, filler, prepositional.repeatable(max=3)),
        rule(prepositional, filler, study),
        rule(words("я"), filler, words("в"), token_type("INT"), words(*CLASS_WORDS)),
    )
    kin = has_lemma(KIN_LEMMAS)
    pet = has_lemma(PET_LEMMAS)
    relative = or_(kin, pet)
    mine = has_lemma(MINE_LEMMAS)
    count = or_(token_type("INT"), has_form("NUMR"), has_lemma(set(COLLECTIVE_NUMERALS)))
    owner = rule(words("у"), words(*OWNER_WORDS), words(*OWNER_VERBS).optional())
    pet_name = and_(or_(has_form("Name", "nomn"), has_form("NOUN", "nomn"), unknown_word),
                    not_(has_form("ADJF")), not_(has_form("PREP")), not_(has_form("CONJ")), not_(has_form("PRCL")))
    relative_phrase = or_(
        rule(has_form("ADJF").optional(), kin, has_form("Name", "nomn").optional()),
        rule(has_form("ADJF").optional(), pet, pet_name.optional()),
    )
    family_rules = or_(
        rule(mine, relative_phrase),
        rule(relative, mine),
        rule(owner, count, relative),
        rule(owner, relative_phrase,
             rule(in_caseless({"и", ","}).optional(), count.optional(), relative_phrase)
             .repeatable(max=3).optional()),
        rule(relative, words("у"), words("меня")),
        rule(words("мы"), words(*WITH_WORDS), relative),
        rule(and_(kin, has_form("datv")), token_type("INT")),             # сыну 3 года
        rule(words("я"), filler, in_caseless(MARITAL_WORDS)),
        rule(words("а"), and_(kin, has_form("nomn"))),                    # "..., а муж водитель"
    )
    infinitive_phrase = rule(has_form("ADVB").optional(), has_form("INFN"),
                             custom(lambda w: w.isalnum() and w.lower() not in CLAUSE_BREAKS and w.lower() != "и"
                                    and w.lower() not in QUESTION_WORDS)
                             .repeatable(max=4).optional())
    # "с", "и", "в" are also abbreviations that pymorphy3 calls nouns; the likeliest reading decides.
    noun = and_(has_form("NOUN"), not_(likely("PREP")), not_(likely("CONJ")), not_(likely("PRCL")))
    object_np = rule(has_form("ADJF").repeatable(max=2).optional(), noun,
                     and_(noun, has_form("gent")).optional())
    liked_item = or_(infinitive_phrase, object_np)
    objects = rule(liked_item, rule(in_caseless({"и", ","}).optional(), liked_item).repeatable(max=4).optional())
    like_rules = or_(
        rule(words(*LOVE_VERBS), objects),
        rule(words(*PLEASE_VERBS), objects),
        rule(words("увлекаюсь"), objects),
        rule(words("я").optional(), filler, words(*FAN_WORDS), objects),
        rule(words(*FAVOURITE_WORDS), has_form("NOUN"), objects),
        rule(words("терпеть"), words("не"), words("могу"), objects),
        rule(words(*HATE_VERBS), objects),
    )
    date = or_(
        rule(words(*DAY_WORDS), words("вечером", "утром", "днём", "днем").optional()),
        rule(words(*IN_WORDS), has_lemma(WEEKDAYS)),
        rule(words("в"), has_lemma(MONTHS)),
        rule(token_type("INT"), has_lemma(MONTHS)),
        rule(words("на"), words("выходных")),
        rule(words("в"), words("выходные")),
        rule(words(*SEASON_WORDS)),
        rule(words("через"), count.optional(), has_lemma({"день", "неделя", "месяц", "год", "час"})),
        rule(words("на"), words("следующей", "этой"), words("неделе")),
        rule(words("в"), words("следующем", "этом"), words("месяце", "году")),
    )
    parser = lambda grammar: Parser(grammar, tokenizer=tokenizer)
    return {"morph": morph, "parse": parses, "tokenizer": tokenizer, "guessed_lemmas": guessed_lemmas,
            "mine_forms": forms_of(MINE_LEMMAS), "relative_forms": forms_of(KIN_LEMMAS | PET_LEMMAS),
            "number_forms": forms_of(set(NUMBER_WORDS)), "date_forms": forms_of(WEEKDAYS | MONTHS),
            "name": parser(name_rules), "city": parser(city_rules), "age": parser(age_rules),
            "occupation": parser(occupation_rules), "study": parser(study_rules),
            "family": parser(family_rules), "like": parser(like_rules), "date": parser(date)}


def fold(text):
    # One spelling for comparing values: case and ё do not make a fact different.
    return " ".join(text.casefold().replace("ё", "е").split())


def best_parse(word, *grammemes):
    """pymorphy3's most likely analysis of `word` that has all `grammemes`, else its most likely one."""
    parses = load_fact_tools()["parse"](word.lower())
    wanted = set(grammemes)
    return next((p for p in parses if wanted <= p.tag.grammemes), parses[0])


def capitalized(word):
    return "-".join(part[:1].upper() + part[1:] for part in word.split("-"))


def inflect_word(parse, grammemes, fallback):
    inflected = parse.inflect(set(grammemes)) if parse is not None else None
    return inflected.word if inflected else fallback


class MessageTokens:
    """One message's tokens with what the checks need: where clauses and sentences end."""

    def __init__(self, text, sentences):
        self.sentences = sentences  # grammar: the (start, stop) character spans to parse
        self.tokens = list(load_fact_tools()["tokenizer"](text))
        self.words = [token.value.lower() for token in self.tokens]

    def index_at(self, offset):
        return next(i for i, token in enumerate(self.tokens) if token.span.start >= offset)

    def clause_bounds(self, start, stop):
        """Token indices [first, last) of the clause around tokens start..stop."""
        first = start
        while first > 0 and self.words[first - 1] not in CLAUSE_BREAKS:
            first -= 1
        last = stop
        while last < len(self.words) and self.words[last] not in CLAUSE_BREAKS:
            last += 1
        return first, last

    def is_question(self, start, stop):
        # A question that names the user's facts ("а где я живу?") states none of them.
        first, last = self.clause_bounds(start, stop)
        if any(word in QUESTION_WORDS for word in self.words[first:start]):
            return True
        return last < len(self.words) and self.words[last] == "?"

    def is_negated(self, start, stop):
        # "не" inside the match or right before it: "меня зовут не аня", "я не из москвы".
        before = self.words[max(0, start - 2):start]
        return "не" in self.words[start:stop] or "нет" in self.words[start:stop] or "не" in before

    def has_other_subject(self, start):
        """Someone else is the clause's subject before `start` ("моя мама живёт в сочи")."""
        first, _ = self.clause_bounds(start, start)
        for i in range(start - 1, first - 1, -1):
            word = self.words[i]
            if word in ("я", "мы", "меня", "мне"):
                return False
            person = best_parse(word, "nomn")
            if "nomn" in person.tag.grammemes and (word in OTHER_PEOPLE or person.normal_form in OTHER_PEOPLE):
                return True  # only a nominative can be the subject: "мы с мужем живём" is still us
        return False

    def said_by_me_earlier(self, start):
        """An "я" earlier in the same sentence, with nobody else named in between."""
        i = start - 1
        while i >= 0 and self.words[i] not in SENTENCE_ENDS:
            word = self.words[i]
            if word == "я":
                return True
            if word in OTHER_PEOPLE or best_parse(word).normal_form in OTHER_PEOPLE:
                return False
            i -= 1
        return False


def matches_of(kind, text, message):
    """(start, stop, tokens) of each match of the `kind` grammar, as token indices. No rule
    matches across the end of a sentence, so only the sentences worth it are parsed."""
    found = []
    for first, last in message.sentences.get(kind, ()):
        for match in load_fact_tools()[kind].findall(text[first:last]):
            start = message.index_at(first + match.span.start)
            found.append((start, start + len(match.tokens), [token.value for token in match.tokens]))
    return found


def normal_name(word):
    """The name in the nominative; a word that can be nominative stays as typed, since
    pymorphy3 guesses rare diminutives wrongly ("настюша" is not a form of "настюш")."""
    word = word.lower()
    if any("nomn" in p.tag.grammemes for p in load_fact_tools()["parse"](word)):
        return capitalized(word)
    parse = best_parse(word, "Name")
    return capitalized(inflect_word(parse, {"nomn"}, parse.normal_form))


def place_parse(word, cases):
    """The likeliest analysis of a place name in one of the `cases` its preposition governs:
    "в самару" is Самара, though "самару" is likelier the dative of Самар."""
    parses = load_fact_tools()["parse"](word)
    return next((p for p in parses if "Geox" in p.tag.grammemes and p.tag.case in cases), best_parse(word, "Geox"))


def normal_place(words, cases):
    """The place in the nominative, each part capitalized: "нижнем новгороде" -> Нижний Новгород."""
    text = " ".join(words).replace(" - ", "-").lower()
    if text in CITY_ABBREVIATIONS:
        return CITY_ABBREVIATIONS[text]
    if "-" in text:
        parts = text.split("-")
        head = 0 if "на" in parts else len(parts) - 1   # ростове-на-дону: the first part declines
        parse = place_parse(parts[head], cases)
        parts[head] = inflect_word(parse, {"nomn"}, parse.normal_form)
        return "-".join(part if part == "на" else capitalized(part) for part in parts)
    noun = place_parse(words[-1].lower(), cases)
    result = [inflect_word(noun, {"nomn"}, noun.normal_form)]
    if len(words) > 1:
        adjective = best_parse(words[0].lower(), "ADJF")
        agree = {"nomn", "plur"} if "plur" in noun.tag.grammemes else {"nomn", noun.tag.gender or "masc"}
        result.insert(0, inflect_word(adjective, agree, words[0].lower()))
    return " ".join(capitalized(word) for word in result)


def normal_noun_phrase(words, case=None):
    """A noun phrase in the nominative, number kept, adjectives agreeing:
    "корейских дорам" -> корейские дорамы; a genitive tail stays as said ("запах сигарет")."""
    words = [word.lower() for word in words]
    head = next(i for i, word in enumerate(words) if "NOUN" in best_parse(word, "NOUN").tag.grammemes)
    grammemes = ("NOUN", case) if case else ("NOUN",)
    noun = best_parse(words[head], *grammemes)
    if "Fixd" in noun.tag.grammemes:
        nominative = words[head]
    else:
        number = "plur" if "plur" in noun.tag.grammemes else "sing"
        nominative = inflect_word(noun, {"nomn", number}, noun.normal_form)
    result = []
    for word in words[:head]:
        adjective = best_parse(word, "ADJF")
        if "plur" in noun.tag.grammemes:
            agree = {"nomn", "plur"}
        else:
            agree = {"nomn", "sing", noun.tag.gender or "masc"}
        result.append(inflect_word(adjective, agree, word))
    return " ".join(result + [nominative] + words[head + 1:])


def extract_names(text, message):
    names = []
    for start, stop, words in matches_of("name", text, message):
        contrast = "не" in [word.lower() for word in words]
        if (not contrast and message.is_negated(start, stop)) or message.is_question(start, stop):
            continue
        lowered = [word.lower() for word in words]
        if lowered[0] in ("я", "это") and stop < len(message.words) and message.words[stop] in ("зовут", "звать"):
            continue
        if lowered[-1] == "я" and stop < len(message.words) and message.words[stop] not in CLAUSE_BREAKS:
            continue  # "вика я тебя люблю" speaks to Vika; "саня я, с питера" introduces Sanya
        if lowered[0] == "а" and "зовут" not in message.words[:start]:
            continue
        if lowered[0] == "это" and start > 1:
            continue
        name_word = next(w for w in reversed(words)
                         if w.lower() not in ("я", "зовут", "звать", "зови", "зовите", "а", "меня")
                         and w.lower() not in FILLER_WORDS)
        names.append(("name", normal_name(name_word)))
    return names[-1:]


def extract_city(text, message):
    cities = []
    for start, stop, words in matches_of("city", text, message):
        lowered = [w.lower() for w in words]
        # "живу не в москве а в казани": the "не" inside corrects the place; one before still negates.
        contrast = "не" in lowered and "а" in lowered
        negated = "не" in message.words[max(0, start - 2):start] if contrast else message.is_negated(start, stop)
        if negated or message.is_question(start, stop):
            continue
        if words[0].lower() in FROM_WORDS:
            if not message.said_by_me_earlier(start):
                continue
            if start > 0 and message.words[start - 1] in ("родом", "родилась", "родился", "привет", "приехал",
                                                          "приехала", "вернулся", "вернулась"):
                continue
        elif message.has_other_subject(start):
            continue
        if words[0].lower() in NOW_WORDS and not any(
                best_parse(word).normal_form in ("жить", "переехать", "проживать") for word in message.words[:start]):
            continue  # "теперь в томске" moves house only after talk of living somewhere
        while lowered[-1] in FILLER_WORDS or best_parse(lowered[-1]).tag.POS == "VERB":
            lowered.pop()  # "в казани живу"
        last_preposition = max(i for i, w in enumerate(lowered) if w in IN_WORDS + FROM_WORDS
                               and (i == 0 or lowered[i - 1] != "-"))
        cases = ("gent",) if lowered[last_preposition] in FROM_WORDS else ("loct", "accs")
        cities.append(("city", normal_place(lowered[last_preposition + 1:], cases)))
    return cities[-1:]


def number_value(words):
    digits = [word for word in words if word.isdigit()]
    if digits:
        return int(digits[0])
    return sum(NUMBER_WORDS.get(best_parse(word).normal_form, 0) for word in words)


def extract_age(text, message):
    ages = []
    for start, stop, words in matches_of("age", text, message):
        if message.is_question(start, stop) or message.is_negated(start, stop):
            continue
        if start > 0 and message.words[start - 1] in ("во", "в", "ко", "обо", "при"):
            continue  # "во мне 56": not "мне" the dative of age
        after = message.words[stop:stop + 2]
        if after[:1] and after[0] not in AGE_UNITS and (
                {"NOUN", "INFN"} & best_parse(after[0]).tag.grammemes):
            continue  # "мне 2 часа ехать", "мне 3 кг": a number of something else
        if "не" in after or "было" in after or "было" in message.words[max(0, start - 2):start]:
            continue  # an age in the past
        value = number_value([w.lower() for w in words[1:] if w.lower() not in FILLER_WORDS])
        if 3 <= value <= 110:
            ages.append(("age", str(value)))
    return ages[:1]



def is_animate_noun(word, case):
    return {"NOUN", "anim", case} <= best_parse(word, "NOUN", "anim", case).tag.grammemes


def extract_occupation(text, message):
    found = []
    for start, stop, words in matches_of("occupation", text, message):
        if message.is_negated(start, stop) or message.is_question(start, stop):
            continue
        lowered = [w.lower() for w in words]
        phrase = " ".join(lowered)
        if phrase in STATUS_PHRASES:
            if not message.has_other_subject(start):
                found.append(("occupation", phrase))
            continue
        professions = [w for w in lowered if is_animate_noun(w, "ablt")]
        if professions and lowered[0] in WORK_VERBS:   # "работаю учителем (в школе)"
            found.append(("occupation", normal_noun_phrase(professions[:1], "ablt")))
            continue
        if lowered[0] == "я":
            noun = best_parse(next(w for w in lowered[1:] if is_animate_noun(w, "nomn")), "NOUN", "anim", "nomn")
            if noun.normal_form in NOT_OCCUPATIONS or "Name" in noun.tag.grammemes:
                continue
            tail = [w for w in lowered[1:] if w not in FILLER_WORDS and w not in ("по", "профессии")]
            found.append(("occupation", normal_noun_phrase(tail, "nomn")))  # "учительница начальных классов"
            continue
        if message.has_other_subject(start):
            continue
        place = [w for w in lowered if w not in WORK_VERBS and w not in FILLER_WORDS]
        if "Name" in best_parse(place[-1]).tag.grammemes:
            continue  # "работаю с олей": a person, not a workplace
        found.append(("occupation", " ".join(place)))
    return found[-1:]


def extract_study(text, message):
    found = []
    for start, stop, words in matches_of("study", text, message):
        if message.is_negated(start, stop) or message.is_question(start, stop) or message.has_other_subject(start):
            continue
        phrase = [w.lower() for w in words if w.lower() not in (*STUDY_VERBS, "я")
                  and w.lower() not in FILLER_WORDS]
        found.append(("study", " ".join(phrase)))
    return found[-1:]


def relative_value(words, named_later=None):
    """"сестру" -> сестра, "старший брат миша" -> старший брат Миша, "двое детей" as said;
    None where the kin reading is not the word's likeliest noun ("мой внучек")."""
    lowered = [w.lower() for w in words if best_parse(w).normal_form not in POSSESSIVE_LEMMAS]
    if not lowered:
        return None
    if lowered[0].isdigit() or "NUMR" in best_parse(lowered[0]).tag.grammemes or \
            best_parse(lowered[0]).normal_form in COLLECTIVE_NUMERALS:
        return " ".join(lowered)
    head = next((i for i, w in enumerate(lowered) if best_parse(w, "NOUN").normal_form in KIN_LEMMAS | PET_LEMMAS
                 and "NOUN" in best_parse(w, "NOUN").tag.grammemes), None)
    if head is None:
        return None
    phrase = normal_noun_phrase(lowered[:head + 1])
    noun = phrase.split()[-1]
    if noun in ("ребёнок", "ребенок") and "plur" in best_parse(lowered[head], "NOUN").tag.grammemes:
        phrase = phrase[:-len(noun)] + "дети"
    name = lowered[head + 1:] or ([named_later] if named_later else [])
    return phrase + (" " + normal_name(name[0]) if name else "")


def split_relatives(words):
    """The relatives listed after "у меня": "кошка и собака" -> [кошка], [собака]."""
    groups, current = [], []
    for word in words:
        if word.lower() in ("и", ","):
            groups.append(current)
            current = []
        else:
            current.append(word)
    groups.append(current)
    return [group for group in groups if group]


def name_given_after(message, start, stop, listed=False):
    """The name in "... зовут X", "по кличке X", "я назвала X" in the same clause; after a
    list of relatives (`listed`), only right after it, where it names the last one.
    "меня зовут X" names the user, not a relative."""
    first, last = message.clause_bounds(start, stop)
    for i in range(stop if listed else first, last - 1):
        word = message.words[i]
        if word in NAMING_WORDS and (i > 0 and message.words[i - 1] in ME_WORDS or message.words[i + 1] in ME_WORDS):
            if listed:
                return None
            continue
        if word in NAMING_WORDS:
            return message.words[i + 1]
        if listed and word not in BEFORE_NAMING:
            return None
    return None


def extract_family_and_pets(text, message):
    found = []
    for start, stop, words in matches_of("family", text, message):
        if message.is_negated(start, stop) or message.is_question(start, stop):
            continue
        lowered = [w.lower() for w in words]
        if lowered[-1] in MARITAL_WORDS:
            found.append(("family", lowered[-1]))
            continue
        after = message.words[stop:stop + 1]
        if lowered[0] == "а" or best_parse(lowered[-1]).normal_form in MINE_LEMMAS:
            if after == [] or after[0] in CLAUSE_BREAKS or after[0] in ("ты", "вы"):
                continue  # someone spoken to: "сын мой, ...", "а мама?"
            if lowered[0] == "а" and best_parse(lowered[-1]).normal_form in PARTNER_LEMMAS:
                continue
            lowered = [w for w in lowered if w != "а"]
        owned = lowered[:1] == ["у"]
        if owned:
            rest = lowered[2:]
            if rest[0] in OWNER_VERBS:
                rest = rest[1:]
            groups = split_relatives(rest)
        else:
            groups = [[w for w in lowered if w not in ("у", "меня", "мы", *WITH_WORDS) and not w.isdigit()
                       and best_parse(w).normal_form not in MINE_LEMMAS]]
        named_later = name_given_after(message, start, stop, listed=len(groups) > 1)
        for number, group in enumerate(groups, 1):
            lemma = {best_parse(w, "NOUN").normal_form for w in group}
            if lemma & PARTNER_LEMMAS and not (owned or best_parse(lowered[0]).normal_form == "мой" or
                                              best_parse(lowered[-1]).normal_form == "мой"):
                continue
            kind = "pet" if lemma & PET_LEMMAS else "family"
            value = relative_value(group, named_later if number == len(groups) else None)
            if value:
                found.append((kind, value))
    return found


def object_case(trigger):
    # The case the verb governs picks the right analysis: "люблю суши" is not "суша".
    if trigger in PLEASE_VERBS + IRRITATE_VERBS or trigger.startswith("любим"):
        return "nomn"
    if trigger == "увлекаюсь":
        return "ablt"
    if trigger == "я":
        return "gent"
    return "accs"


def is_infinitive_phrase(words):
    first = best_parse(words[0]).tag.grammemes
    return "INFN" in first or (len(words) > 1 and "ADVB" in first and "INFN" in best_parse(words[1]).tag.grammemes)


def split_noun_list(words):
    """"суши роллы" -> [суши], [роллы]; a genitive keeps to its noun ("запах сигарет")."""
    groups, current = [], []
    for word in words:
        after_noun = current and "NOUN" in best_parse(current[-1], "NOUN").tag.grammemes
        if after_noun and ("ADJF" in best_parse(word).tag.grammemes
                           or best_parse(word, "NOUN", "gent").tag.case != "gent"):
            groups.append(current)
            current = []
        current.append(word)
    return groups + [current]


def split_objects(words, case):
    """What follows "люблю": infinitive phrases and nouns listed with "и" and commas, one fact each."""
    values, group = [], []
    for word in words + [","]:
        if word not in ("и", ","):
            group.append(word)
            continue
        if group and is_infinitive_phrase(group):
            values.append(" ".join(group))
        elif group:
            values += [normal_noun_phrase(nouns, case) for nouns in split_noun_list(group)
                       if any("NOUN" in best_parse(word, "NOUN").tag.grammemes for word in nouns)]
        group = []
    return values


def extract_likes(text, message):
    found = []
    for start, stop, words in matches_of("like", text, message):
        lowered = [w.lower() for w in words]
        if message.is_question(start, stop):
            continue
        trigger = lowered[0]
        before = message.words[max(0, start - 3):start]
        if trigger in PLEASE_VERBS:
            experiencer = [w for w in before if w not in ("не", "очень", "тоже", "так", "уже", "сильно", "сейчас")]
            if experiencer and experiencer[-1] not in ("мне", ",", "а", "и", "но") and \
                    "datv" in best_parse(experiencer[-1]).tag.grammemes:
                continue  # "ей нравится рок": someone else's taste
        if trigger in IRRITATE_VERBS and any(
                w in ("тебя", "его", "её", "ее", "их") for w in before):
            continue
        if trigger == "я" or trigger in FAN_WORDS:
            if message.has_other_subject(start):
                continue  # "он фанат металлики"
            trigger = "я"
            objects = lowered[next(i for i, w in enumerate(lowered) if w not in FILLER_WORDS and w != "я") + 1:]
        elif trigger.startswith("любим"):
            objects = lowered[2:]
        elif trigger == "терпеть":
            objects = lowered[3:]
        else:
            objects = lowered[1:]
        negated = "не" in before[-2:] or trigger == "терпеть" or trigger in HATE_VERBS
        if trigger == "переношу" and "не" not in before[-2:]:
            continue
        if any(best_parse(word).normal_form in ("ты", "вы", "твой", "ваш") for word in objects):
            continue  # "люблю тебя", "нравится твоя улыбка": about the one spoken to
        kind = "dislike" if negated else "like"
        found.extend((kind, value) for value in split_objects(objects, object_case(trigger)))
    return found


def verb_for_plan(message, first, last, date_span):
    """The user's verb in the clause: 1st person, present or future; "собираюсь поехать" -> поехать."""
    for i in range(first, last):
        if date_span[0] <= i < date_span[1]:
            continue
        word = message.words[i]
        follows_motion = i + 1 < last and message.words[i + 1] in (*PLACE_PREPOSITIONS, "к", "ко")
        candidates = [p for p in load_fact_tools()["parse"](word)
                      if {"VERB", "1per", "indc"} <= p.tag.grammemes and "past" not in p.tag.grammemes]
        if not candidates:
            continue
        if i > first and message.words[i - 1] == "не":
            return None  # "сегодня не могу"
        if follows_motion and any("intr" in p.tag.grammemes for p in candidates):
            candidates = [p for p in candidates if "intr" in p.tag.grammemes]  # "лечу в сочи": лететь
        verb = candidates[0]
        if verb.normal_form in MODAL_VERBS and i + 1 < last and \
                "INFN" in best_parse(message.words[i + 1]).tag.grammemes:
            return i + 1, message.words[i + 1]
        return i, verb.normal_form
    return None


def extract_plans(text, message):
    plans = []
    for start, stop, words in matches_of("date", text, message):
        if message.is_question(start, stop):
            continue
        first, last = message.clause_bounds(start, stop)
        when = " ".join(w.lower() for w in words)
        found_verb = verb_for_plan(message, first, last, (start, stop))
        if found_verb:
            index, lemma = found_verb
            rest = [message.words[i] for i in range(index + 1, last) if not start <= i < stop
                    and message.words[i] not in QUOTE_MARKS]
            plans.append(("plan", f"{' '.join([lemma] + rest)} ({when})"))
            continue
        clause = message.words[first:last]
        if "меня" in clause and "у" in clause:
            rest = [message.words[i] for i in range(first, last) if not start <= i < stop
                    and message.words[i] not in ("у", "меня", "есть") and message.words[i] not in QUOTE_MARKS]
            nouns = [w for w in rest if "NOUN" in best_parse(w, "NOUN").tag.grammemes]
            if nouns:
                plans.append(("plan", f"{normal_noun_phrase(rest[rest.index(nouns[0]):])} ({when})"))
    return plans


EXTRACTORS = {"name": extract_names, "city": extract_city, "age": extract_age, "occupation": extract_occupation,
              "study": extract_study, "family": extract_family_and_pets, "like": extract_likes, "date": extract_plans}
WORD_TOKEN = re.compile(r"[а-яё]+|[a-z]+|\d+", re.IGNORECASE)   # the words of yargy's tokenizer
SENTENCE = re.compile(r"[^.!?]+")   # yargy makes each of . ! ? a token, which no rule matches


def next_words(written, words, i):
    """The words that can follow words[i] in a rule, up to three filler words skipped
    (the grammars' `filler`), as written."""
    for j in range(i + 1, min(i + 5, len(words))):
        yield written[j]
        if words[j] not in FILLER_WORDS:
            break


def grammars_for_sentence(written):
    """The grammars that could find a fact in a sentence of these words (without punctuation),
    told by what each rule needs: one of a few words, or a pair, or a word of some kind beside
    "я" or "мне"; and what the checks after a match ask for ("из казани" is the user's city
    only after "я" in the same sentence). The word lists are the grammars'. Analyses are of
    the words as written, as in the grammars: "И" is an initial, "и" is not."""
    words = [word.lower() for word in written]
    seen = set(words)
    tools = load_fact_tools()
    has = lambda *options: not seen.isdisjoint(options)
    guessed = []

    def has_lemma(lemmas, forms):
        # The grammars' has_lemma: a dictionary form, or a word pymorphy3 guesses to be one.
        if not seen.isdisjoint(forms):
            return True
        if not guessed:
            guessed.append(frozenset().union(*map(tools["guessed_lemmas"], seen)))
        return not guessed[0].isdisjoint(lemmas)

    grammemes = lambda word: [p.tag.grammemes for p in tools["parse"](word)]
    name_like = lambda word: any("Name" in g for g in grammemes(word)) or not tools["morph"].word_is_known(word.lower())
    person_like = lambda word: word == "по" or any({"NOUN", "anim", "nomn"} <= g or {"ADJF", "nomn"} <= g
                                                   for g in grammemes(word))
    number_like = lambda word: word.isdigit() or word.lower() in tools["number_forms"] or \
        not tools["guessed_lemmas"](word.lower()).isdisjoint(NUMBER_WORDS)
    after = lambda trigger, like: any(like(word) for i, w in enumerate(words) if w == trigger
                                      for word in next_words(written, words, i))
    worth = {
        "name": (has(*ME_WORDS) and (has(*CALLED_WORDS) or "а" in seen)) or has(*NAME_WORDS)
                or after("я", name_like) or ("это" in words[:2] and after("это", name_like))
                or any(name_like(written[i - 1]) for i, w in enumerate(words) if w == "я" and i > 0),
        "city": has(*LIVE_WORDS, *MOVED_WORDS) or (has(*NOW_WORDS) and has(*IN_WORDS))
                or ("я" in seen and has(*FROM_WORDS)),
        "age": "мне" in seen and after("мне", number_like),
        "occupation": has(*WORK_VERBS, "пенсии", "декрете") or after("я", person_like),
        "study": has(*STUDY_VERBS) or ("я" in seen and has(*CLASS_WORDS)),
        "family": ("я" in seen and has(*MARITAL_WORDS)) or (
            ("а" in seen or ("у" in seen and has(*OWNER_WORDS)) or ("мы" in seen and has(*WITH_WORDS))
             or any(word.isdigit() for word in words) or has_lemma(MINE_LEMMAS, tools["mine_forms"]))
            and has_lemma(KIN_LEMMAS | PET_LEMMAS, tools["relative_forms"])),
        "like": has(*LOVE_VERBS, *PLEASE_VERBS, "увлекаюсь", *FAN_WORDS, *FAVOURITE_WORDS, "терпеть", *HATE_VERBS),
        "date": has(*DATE_WORDS) or has_lemma(WEEKDAYS | MONTHS, tools["date_forms"]),
    }
    return [grammar for grammar in EXTRACTORS if worth[grammar]]


def sentences_worth_parsing(text):
    """{grammar: [(start, stop), ...]}: the sentences of `text` where each grammar could find
    a fact. Most messages state nothing about their writer and get {}: a regular expression
    instead of eight parses."""
    worth = {}
    for sentence in SENTENCE.finditer(text):
        words = WORD_TOKEN.findall(sentence.group())
        for grammar in grammars_for_sentence(words) if words else ():
            worth.setdefault(grammar, []).append(sentence.span())
    return worth


def facts_in_message(text, sentences):
    """What the grammars find in the `sentences` of `text` (whitespace normalized; see
    sentences_worth_parsing), checked and made unique."""
    if not any(ch.isalpha() for ch in text):
        return []
    message = MessageTokens(text, sentences)
    facts = []
    for grammar in EXTRACTORS:
        if grammar in sentences:
            facts.extend(EXTRACTORS[grammar](text, message))
    unique = []
    for fact in facts:
        if (fact[0], fold(fact[1])) not in {(k, fold(v)) for k, v in unique}:
            unique.append(fact)
    return unique


def extract_user_facts(text):
    """The facts a user states about themselves in one message, as (kind, value) pairs
    in normal forms; questions, negations and other people's facts give none."""
    text = " ".join(text.split())
    sentences = sentences_worth_parsing(text)
    return facts_in_message(text, sentences) if sentences else []


def relation_of(value):
    # "сестра Оля" and "сестра" are the same relative; the name makes the newer one better.
    return fold(" ".join(word for word in value.split() if not word[:1].isupper()))


def name_of(value):
    return " ".join(word for word in value.split() if word[:1].isupper())


def same_relative(old, new):
    """One relative said of twice ("младшая сестра", then "сестра Оля"): the same head
    noun, and not two different names."""
    old_words, new_words = relation_of(old).split(), relation_of(new).split()
    if not old_words or not new_words or old_words[-1] != new_words[-1]:
        return False
    if not (set(old_words) <= set(new_words) or set(new_words) <= set(old_words)):
        return False
    return not (name_of(old) and name_of(new) and fold(name_of(old)) != fold(name_of(new)))


def combined_relative(old, new):
    # The fuller description and whichever name was given: "младшая сестра Оля".
    relation = max(relation_of(old), relation_of(new), key=len)
    name = name_of(new) or name_of(old)
    return f"{relation} {name}".strip()


def merge_user_facts(stored, new):
    """The stored facts updated with `new` (both lists of (kind, value)): a single-value kind
    is replaced, a list kind grows up to MAX_VALUES_PER_KIND, liking a thing cancels disliking it."""
    facts = [tuple(fact) for fact in stored]
    for kind, value in new:
        if kind in SINGLE_VALUE_KINDS:
            facts = [fact for fact in facts if fact[0] != kind]
        else:
            opposite = {"like": "dislike", "dislike": "like"}.get(kind)
            facts = [fact for fact in facts if not (fact[0] in (kind, opposite) and fold(fact[1]) == fold(value))]
            if kind in ("family", "pet") and value not in MARITAL_WORDS:
                known = [fact for fact in facts if fact[0] == kind and same_relative(fact[1], value)]
                if known:
                    value = combined_relative(known[-1][1], value)
                    facts = [fact for fact in facts if fact not in known]
            same_kind = [fact for fact in facts if fact[0] == kind]
            if len(same_kind) >= MAX_VALUES_PER_KIND:
                facts.remove(same_kind[0])
        facts.append((kind, value))
    return facts


def inflect_phrase(value, case):
    """A stored nominative phrase put in `case`, adjectives agreeing: "итальянская кухня" -> итальянскую кухню."""
    words = value.split()
    head = next((i for i, word in enumerate(words) if "NOUN" in best_parse(word, "NOUN", "nomn").tag.grammemes), None)
    if head is None or "INFN" in best_parse(words[0]).tag.grammemes:
        return value
    noun = best_parse(words[head], "NOUN", "nomn")
    number = "plur" if "plur" in noun.tag.grammemes else "sing"
    result = list(words)
    result[head] = inflect_word(noun, {case, number}, words[head])
    for i in range(head):
        adjective = best_parse(words[i], "ADJF", "nomn")
        if "ADJF" in adjective.tag.grammemes:
            agree = {case, number} | ({noun.tag.gender} if number == "sing" and noun.tag.gender else set())
            if case == "accs" and "anim" in noun.tag.grammemes:
                agree |= {"anim"}
            result[i] = inflect_word(adjective, agree, words[i])
    for i in range(head + 1, len(words)):
        if words[i][:1].isupper():   # a name after the noun agrees with it: "сестру Олю"
            result[i] = capitalized(inflect_word(best_parse(words[i].lower(), "Name"), {case}, words[i]))
    if words[head][:1].isupper():
        result[head] = capitalized(result[head])
    return " ".join(result)


def place_in(value):
    """"Казань" -> "в Казани", with "во" where Russian wants it (во Владивостоке)."""
    parts = value.split()
    inflected = []
    for i, part in enumerate(parts):
        pieces = part.split("-")
        head = 0 if "на" in [p.lower() for p in pieces] else len(pieces) - 1
        parse = best_parse(pieces[head].lower(), "Geox" if i == len(parts) - 1 else "ADJF")
        if "Fixd" not in parse.tag.grammemes:
            number = {"plur"} if "plur" in parse.tag.grammemes else set()
            pieces[head] = capitalized(inflect_word(parse, {"loct"} | number, pieces[head]))
        inflected.append("-".join(pieces))
    phrase = " ".join(inflected)
    first = phrase[:2].lower()
    preposition = "во" if first[:1] in "вф" and first[1:2] not in "аеёиоуыэюя" else "в"
    return f"{preposition} {phrase}"


def years_phrase(age):
    number = int(age)
    year = load_fact_tools()["morph"].parse("год")[0].make_agree_with_number(number).word
    # After a number Russian counts years with "лет", which pymorphy3 spells "годов".
    return f"{number} {'лет' if year == 'годов' else year}"


def second_person(lemma):
    """The infinitive as "ты ..." would say it: ехать -> едешь, поехать -> поедешь."""
    parse = best_parse(lemma, "INFN")
    tense = "futr" if "perf" in parse.tag.grammemes else "pres"
    return inflect_word(parse, {"2per", "sing", tense, "indc"}, lemma)


def plan_clause(value):
    what, _, when = value.rpartition(" (")
    when = when.rstrip(")")
    words = what.split()
    if "INFN" in best_parse(words[0]).tag.grammemes:
        return FACT_CLAUSES["plan"].format(when=when, what=" ".join([second_person(words[0])] + words[1:]))
    return FACT_CLAUSES["plan_thing"].format(when=when, what=what)


def join_russian(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " и " + items[-1]


def fact_clauses(facts):
    """Each kind's facts as one Russian clause about "ты"."""
    by_kind = {}
    for kind, value in facts:
        by_kind.setdefault(kind, []).append(value)
    clauses = []
    for kind in FACT_KINDS:
        values = by_kind.get(kind)
        if not values:
            continue
        if kind in ("name", "study"):
            clauses.append(FACT_CLAUSES[kind].format(values[-1]))
        elif kind == "city":
            clauses.append(FACT_CLAUSES["city"].format(place_in(values[-1])))
        elif kind == "age":
            clauses.append(FACT_CLAUSES["age"].format(years_phrase(values[-1])))
        elif kind == "occupation":
            value = values[-1]
            workplace = value not in STATUS_PHRASES and value.split()[0] in PLACE_PREPOSITIONS
            clauses.append(FACT_CLAUSES["workplace" if workplace else "occupation"].format(value))
        elif kind in ("family", "pet"):
            others = [v for v in values if v not in MARITAL_WORDS]
            clauses += [FACT_CLAUSES["marital"].format(v) for v in values if v in MARITAL_WORDS]
            if others:
                clauses.append(FACT_CLAUSES["relatives"].format(join_russian(others)))
        elif kind in ("like", "dislike"):
            clauses.append(FACT_CLAUSES[kind].format(join_russian([inflect_phrase(v, "accs") for v in values])))
        elif kind == "plan":
            clauses += [plan_clause(v) for v in values]
    return clauses


def render_facts_answer(facts):
    """The bot's answer to "Что ты обо мне знаешь?": "Тебя зовут Аня, ты живёшь в Казани, ..." """
    clauses = fact_clauses(facts)
    if not clauses:
        return NO_FACTS_ANSWER
    text = ", ".join(clauses) + "."
    return text[:1].upper() + text[1:]
# ==== end of block blocks/user_facts.py ====


# ==== block blocks/ratings.py: generated, edit the source and run `make blocks` ====
"""Ratings of the bot's replies (👍 / 👎 / 🔄 другой ответ): the table tg_bot.py writes into its
SQLite database and create_dataset.py --feedback reads back, defined once for both.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (sqlite3, json, hashlib, os).

One row per reply the bot sent with rating buttons. `prompt` is the prompt rule's text exactly as
the model was given it, and `prompt_ids` its token ids (a JSON list), so a training run can check
that it trains on what was served. `label` is LIKED, DISLIKED or NULL (not rated yet; a second
press overwrites the first). A reply written by 🔄 names the reply it replaces in `replaces`: the
two are a pair, the newer one preferred unless the ratings say otherwise. `model` is the model
folder's name and `model_hash` a hash of its weights (model_fingerprint), so that ratings of one
model never silently train another.
"""
LIKED = 1
DISLIKED = 0
RATINGS_TABLE = "ratings"
RATINGS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ratings ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "chat_id INTEGER NOT NULL, "
    "user_id INTEGER NOT NULL, "
    "message_id INTEGER, "          # the bot's message carrying the reply and its buttons
    "prompt TEXT NOT NULL, "
    "prompt_ids TEXT NOT NULL, "    # JSON list of token ids
    "prompt_tokens INTEGER NOT NULL, "
    "reply TEXT NOT NULL, "
    "label INTEGER, "               # LIKED, DISLIKED or NULL
    "replaces INTEGER, "            # id of the reply 🔄 replaced, or NULL
    "model TEXT NOT NULL, "
    "model_hash TEXT NOT NULL, "
    "created REAL NOT NULL, "
    "rated REAL)"
)
RATINGS_INDEX = "CREATE INDEX IF NOT EXISTS ratings_message ON ratings (chat_id, message_id)"
FINGERPRINT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")
FINGERPRINT_CHUNK = 1 << 20


def model_fingerprint(folder):
    """A short hash of a model folder's weights (sha256 over the weight files, in name order,
    first 16 hex digits); of config.json where the folder has no weights (a --server bot), so a
    ratings row always says which model wrote the reply."""
    folder = os.fspath(folder)
    names = sorted(name for name in os.listdir(folder)
                   if name in FINGERPRINT_FILES or (name.startswith("model-") and name.endswith(".safetensors")))
    if not names:
        names = [name for name in ("config.json",) if os.path.isfile(os.path.join(folder, name))]
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8"))
        with open(os.path.join(folder, name), "rb") as handle:
            for chunk in iter(lambda: handle.read(FINGERPRINT_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def open_ratings(db):
    """Make sure the ratings table exists in an open sqlite3 connection."""
    db.execute(RATINGS_SCHEMA)
    db.execute(RATINGS_INDEX)
    return db


def open_ratings_file(path):
    """An SQLite file holding the ratings table (made if new), for a script that keeps no other table
    (system_prompt.py --web --db): readable by its owner only, the file and its -wal and -shm files
    (regular files only: os.chmod follows a link), and deleted rows overwritten (secure_delete), so
    that a /forget leaves no words behind. One connection, shared by the caller's threads under its lock."""
    path = os.fspath(path)

    def owner_only():
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.isfile(name) and not os.path.islink(name):
                os.chmod(name, 0o600)

    owner_only()
    previous = os.umask(0o077)  # new files (the database, -wal, -shm) come out 0600
    try:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA secure_delete=ON")
        open_ratings(db)
        db.commit()
    finally:
        os.umask(previous)
    owner_only()
    return db
# ==== end of block blocks/ratings.py ====


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
