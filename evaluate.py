"""One comparison table for every model of the kit, measured the same way.

Each model folder given to --model (LSTM PyTorch, LSTM Keras, transformers)
answers the same held-out test questions with the same seed, greedy decoding
at batch size one, and the metrics are computed here, once, for all of them:

  corpus BLEU-4 (nltk, SmoothingFunction().method1), unigram F1, distinct-1/2,
  mean reply length in words, share of replies that end on EOS, median and
  95th-percentile ms per reply, tokens per second, answer perplexity and bits
  per character of the reference answers under teacher forcing, and a memory
  probe (data/memory_probe.jsonl): short dialogues whose last question can only
  be answered from a fact given two or more turns earlier.

Transformers folders are loaded here and given their prompts by the kit's one
prompt rule (the code the trainers and the chat share): the persona, the row's
facts exchange (the split's facts column) where the model was trained with it
(chat_config.json "facts": true; the memory probe has none), and the
newest turns within the turn window and token budget the model was trained with
(chat_config.json; --max-turns / --context-tokens change them, with a warning
where the model was not trained on that), as token ids, user text taken as
plain text. The chat's repetition penalty and n-gram blocking apply to the
reply only, never to the prompt, as in the chat. The answer perplexity is
perplexity.py's, row for row. LSTM folders are run through their own script's
prediction interface (`pytorch_chatbot.py eval --questions ...`), and this
script scores what they return.

A bot that talks like one person (create_dataset.py --as WHO): `--as WHO` (a speaker key, a display name
or `me`, repeatable, resolved as create_dataset.py resolves it, from the `speakers` of --dialogues) adds a
style match. A character n-gram classifier (TF-IDF of 2-4-grams within words, case and punctuation kept,
and a balanced logistic regression, seeded) learns that person's turns against everyone else's in the
train split's dialogues (those whose dialogue_id the train split files hold), and the table gets the
share of each model's replies it attributes to the person, with the same share for the person's own
held-out replies (the ceiling) and for the others' held-out turns (the floor). The test rows are the
ones the person answered (with --as data, all of them), so answer PPL is on the person's held-out replies.

Run it:
  python evaluate.py --model rugpt3_50k lstm_pytorch lstm_keras            # CPU
  python evaluate.py --model vadim_bot rugpt3_50k --as "Вадим Петров"     # and how each sounds like Вадим
  python evaluate.py --model rugpt3_medium_CLEAN_model --device cuda --rows 1000

Writes reports/comparison.json, reports/comparison.md and reports/comparison.png.
A model that fails (no model of the kit, no tokenizer, its script failing) is
reported with its error in the table and on stderr; the others are still
evaluated, and the exit code is 1.

In a notebook (Jupyter, Colab): paste this whole file into one cell, set MODELS
and the rest in the defaults block below, and run the cell; the chart shows in
the cell. The LSTM folders are run by pytorch_chatbot.py and tensorflow_chatbot.py,
looked for in the current folder (SCRIPTS_DIR to look elsewhere). `%run
evaluate.py --model rugpt3_50k lstm_pytorch` and `!python evaluate.py --model
rugpt3_50k lstm_pytorch` take flags as above.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import unicodedata
from collections import Counter
from pathlib import Path

# ---------------------------------------------------------------- defaults
MODELS = ["rugpt3_50k", "rugpt3_medium_CLEAN_model", "lstm_pytorch", "lstm_keras"]  # model folders to compare
DATA_DIR = "data"
SPLIT = "test"
ROWS = 300                 # 0 or None = the whole split; otherwise a seeded sample (same rows as perplexity.py)
PROBE_FILE = "data/memory_probe.jsonl"
OUTPUT_DIR = "reports"
SEED = 0
DEVICE = "auto"            # "auto", "cpu" or "cuda"
MAX_NEW_TOKENS = 64
MAX_TURNS = None           # turns before the answer, question included (None: transformers their chat_config.json
                           # window, the one they were trained with; LSTMs every turn)
CONTEXT_TOKENS = None      # prompt budget of transformers models in tokens (None: chat_config.json's)
BATCH_SIZE = 8             # teacher-forced scoring only; replies are always generated one at a time
QUIET = False              # True: no progress bars
AS = None                  # --as: whose voice to measure, a speaker key, display name or "me" (a list: several
                           # keys of one person); None: no style match, the table as always
DIALOGUES = "data/clean_dialogues.parquet"  # --dialogues: the dialogues with speakers the splits were made from
STYLE_TURNS = 50_000       # the style classifier learns from at most this many turns a side (a seeded sample)
SCRIPTS_DIR = None         # folder of pytorch_chatbot.py and tensorflow_chatbot.py (None: beside this file,
                           # or the current folder when pasted into a notebook cell, which has no __file__)

DEVICES = ["auto", "cpu", "cuda"]
REPO_ROOT = Path(SCRIPTS_DIR or (Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()))
LSTM_SCRIPTS = {"lstm_pytorch": REPO_ROOT / "pytorch_chatbot.py",
                "lstm_keras": REPO_ROOT / "tensorflow_chatbot.py"}

# The word-level tokeniser of BLEU, F1, distinct-n and reply length.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
BLEU_SMOOTHING = "method1"

# The seed research's own figures, measured differently from everything here.
RESEARCH = {
    "bleu4": 0.0101, "bleu4_model": "Keras LSTM",
    "ms_median": 6.63, "ms_median_model": "PyTorch LSTM",
    "answer_perplexity": 30.18, "answer_perplexity_model": "ruGPT-3, loss 3.407",
    "note": ("the research write-up's figures: BLEU of the Keras LSTM and latency of the PyTorch LSTM "
             "on the research's own data and settings; ruGPT-3 perplexity 30.18 (loss 3.407) on the "
             "first 100 lines of the TRAINING file, a per-line average of losses, question tokens "
             "included - not comparable with the held-out, token-weighted answer perplexity here"),
}

# (key, column title, format, higher is better) for the table and the chart.
COLUMNS = [
    ("bleu4", "BLEU-4", "{:.4f}", True),
    ("unigram_f1", "F1", "{:.3f}", True),
    ("distinct_1", "dist-1", "{:.3f}", True),
    ("distinct_2", "dist-2", "{:.3f}", True),
    ("mean_words", "words/reply", "{:.1f}", None),
    ("eos_share", "ends on EOS", "{:.0%}", True),
    ("ms_median", "ms median", "{:.1f}", False),
    ("ms_p95", "ms p95", "{:.1f}", False),
    ("tokens_per_s", "tokens/s", "{:.0f}", True),
    ("answer_perplexity", "answer PPL", "{:.2f}", False),
    ("bits_per_char", "bits/char", "{:.3f}", False),
    ("memory_probe", "memory probe", "{:.0%}", True),
]
CHART_KEYS = ["bleu4", "unigram_f1", "distinct_2", "eos_share", "memory_probe", "mean_words",
              "ms_median", "bits_per_char"]


STYLE_COLUMN = ("style_match", "style match", "{:.2f}", True)  # a column of the table with --as only
OWNER_KEY = b"owner"       # the parquet schema metadata of a whole-account Telegram export: {"key", "name"}


class UserError(Exception):
    """A mistake in the user's input: reported as one line naming the file."""


# ---------------------------------------------------------------- metrics
def words(text):
    """A text's word tokens, the lists BLEU, unigram_f1 and distinct_n are computed on."""
    return WORD_PATTERN.findall(text.lower())


def corpus_bleu4(replies, references):
    """Corpus BLEU-4 over word tokens, smoothed so a zero 4-gram count does not zero the corpus."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    smoothing = getattr(SmoothingFunction(), BLEU_SMOOTHING)
    return float(corpus_bleu([[words(r)] for r in references], [words(h) for h in replies],
                             smoothing_function=smoothing))


def percentile(values, q):
    """Linear-interpolation percentile (numpy's default), q in 0..100."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def normalise_fact(text):
    return text.lower().replace("ё", "е")


def probe_hit(reply, forms):
    """Whether a reply names the fact: any accepted form starting a word, case- and ё-insensitive.

    Forms may be stems ("Казан" for Казань/Казани), so only the word start is anchored."""
    reply = normalise_fact(reply)
    return any(re.search(r"(?<!\w)" + re.escape(normalise_fact(form)), reply) for form in forms)


def reply_metrics(records):
    """Figures of the test replies: records with reply, reference, ended_with_eos, ms, reply_tokens,
    reference_nll, reference_tokens, reference_chars (the last three None where not scored)."""
    replies = [r["reply"] for r in records]
    references = [r["reference"] for r in records]
    reply_words = [words(h) for h in replies]
    ms = [r["ms"] for r in records]
    scored = [r for r in records if r.get("reference_nll") is not None]
    nll = sum(r["reference_nll"] for r in scored)
    tokens = sum(r["reference_tokens"] for r in scored)
    chars = sum(r["reference_chars"] for r in scored)
    seconds = sum(ms) / 1000
    return {
        "rows": len(records),
        "bleu4": corpus_bleu4(replies, references),
        "unigram_f1": statistics.fmean(unigram_f1(h, words(r)) for h, r in zip(reply_words, references)),
        "distinct_1": distinct_n(reply_words, 1),
        "distinct_2": distinct_n(reply_words, 2),
        "mean_words": statistics.fmean(len(re.findall(r"\w+", h)) for h in replies),
        "eos_share": statistics.fmean(bool(r["ended_with_eos"]) for r in records),
        "ms_median": statistics.median(ms),
        "ms_p95": percentile(ms, 95),
        "tokens_per_s": sum(r["reply_tokens"] for r in records) / seconds if seconds > 0 else None,
        "answer_perplexity": math.exp(nll / tokens) if tokens else None,
        "bits_per_char": nll / math.log(2) / chars if chars else None,
        "scored_rows": len(scored),
        "scored_tokens": tokens,
    }


def probe_metrics(probe, replies):
    hits = [probe_hit(reply, item["fact"]) for item, reply in zip(probe, replies)]
    return {"memory_probe": statistics.fmean(hits) if hits else None,
            "memory_probe_hits": sum(hits), "memory_probe_dialogues": len(hits),
            "memory_probe_replies": [{"id": item["id"], "reply": reply, "hit": hit}
                                     for item, reply, hit in zip(probe, replies, hits)]}


# ---------------------------------------------------------------- data
def load_probe(path):
    """The memory probe: {"id", "turns": [user, bot, ..., final question], "fact": [accepted forms]}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: memory probe file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8") from None
    probe = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{number}: not valid JSON") from None
        ok = (isinstance(item, dict) and isinstance(item.get("id"), str)
              and isinstance(item.get("turns"), list) and len(item["turns"]) >= 3
              and all(isinstance(t, str) and t.strip() for t in item["turns"])
              and isinstance(item.get("fact"), list) and item["fact"]
              and all(isinstance(f, str) and f.strip() for f in item["fact"]))
        if not ok:
            raise UserError(f"{path}:{number}: needs \"id\", \"turns\" (3+ strings) and \"fact\" (strings)")
        probe.append(item)
    if not probe:
        raise UserError(f"{path}: the memory probe is empty")
    return probe


def fact_distance(item):
    """How many turns before the final question the fact was given (None if no earlier turn names it)."""
    turns = item["turns"]
    for back in range(2, len(turns)):
        if probe_hit(turns[-1 - back], item["fact"]):
            return back
    return None


# ---------------------------------------------------------------- style match (--as)
def entry_key(entry):
    """The key of a speakers entry ("user111|Вадим Петров" -> "user111"; "" unknown)."""
    return str(entry or "").partition("|")[0].strip()


def entry_name(entry):
    return str(entry or "").partition("|")[2].strip()


def read_dialogues(path):
    """The dialogues of a parquet with speakers: ([(dialogue_id, [(turn, key, name), ...])], owner record or None).

    Turns without text are left out; a dialogue whose speakers list is missing or not one a turn
    has every key "" (unknown), as create_dataset.py reads it."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: dialogues file not found (--dialogues: the parquet the splits were made from)")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read parquet ({exc.__class__.__name__})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in ("sample", "dialogue_id") if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    if "speakers" not in names:
        raise UserError(f"{path}: no 'speakers' column, so --as cannot tell whose turns are whose "
                        "(parse a source that names who spoke, e.g. a Telegram export, with parser_dataset.py)")
    owner = None
    record = (parquet.schema_arrow.metadata or {}).get(OWNER_KEY)
    if record:
        with contextlib.suppress(ValueError):
            owner = json.loads(record)
    if not (isinstance(owner, dict) and owner.get("key")):
        owner = None
    dialogues = []
    table = parquet.read(columns=["dialogue_id", "sample", "speakers"]).to_pydict()
    for dialogue_id, turns, speakers in zip(table["dialogue_id"], table["sample"], table["speakers"]):
        turns = list(turns or [])
        speakers = list(speakers or [])
        if len(speakers) != len(turns):
            speakers = [""] * len(turns)
        dialogues.append((int(dialogue_id), [(t, entry_key(s), entry_name(s)) for t, s in zip(turns, speakers) if t]))
    return dialogues, owner


def speaker_counts(dialogues):
    """{key: [display name (the last one seen), turns]} over all dialogues, unknown speakers left out."""
    counts = {}
    for _, turns in dialogues:
        for _, key, name in turns:
            if key:
                known = counts.setdefault(key, ["", 0])
                known[0] = name or known[0]
                known[1] += 1
    return counts


def list_speakers(counts, limit=20):
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0]))
    text = "; ".join(f"{name} ({key}) {n} turns" if name else f"{key} {n} turns" for key, (name, n) in ranked[:limit])
    return text + (f"; and {len(ranked) - limit} more" if len(ranked) > limit else "")


def resolve_as(dialogues, owner, wanted, path):
    """{"keys", "names"} of the person --as names, as create_dataset.py resolves it: "me" (the export's
    owner), a key, a display name, or a first name that is one speaker's; otherwise a UserError listing the
    speakers with their turn counts."""
    counts = speaker_counts(dialogues)
    if not counts:
        raise UserError(f"{path}: the 'speakers' column names nobody, so --as has no one to pick")

    def fold(text):
        return " ".join(text.split()).casefold().replace("ё", "е")

    keys = []
    for who in (w.strip() for w in wanted):
        if who.casefold() == "me":
            if owner is None:
                raise UserError(f"{path}: --as me needs the owner record of a whole-account Telegram export, and "
                                f"this input has none; name the person instead: {list_speakers(counts)}")
            found = [owner["key"]] if owner["key"] in counts else []
        elif who in counts:
            found = [who]
        else:
            found = [k for k, (name, _) in counts.items() if name and fold(name) == fold(who)]
            found = found or [k for k, (name, _) in counts.items() if name and fold(name.split()[0]) == fold(who)]
        if len(found) != 1:
            what = "matches no speaker" if not found else f"matches {len(found)} speakers ({', '.join(sorted(found))})"
            raise UserError(f"{path}: --as {who!r} {what}; speakers: {list_speakers(counts)}")
        keys += [k for k in found if k not in keys]
    return {"keys": keys, "names": [counts[k][0] or k for k in keys]}


def split_dialogue_ids(data_dir, split):
    """The dialogue ids of a split, from context_<split>.parquet or else pairs_<split>.csv."""
    import pandas as pd

    data_dir = Path(data_dir)
    for path, read in ((data_dir / f"context_{split}.parquet", pd.read_parquet),
                       (data_dir / f"pairs_{split}.csv", pd.read_csv)):
        if path.is_file():
            try:
                frame = read(path, columns=["dialogue_id"]) if path.suffix == ".parquet" else read(path, usecols=[
                    "dialogue_id"], encoding="utf-8")
            except Exception as exc:
                raise UserError(f"{path}: cannot read its dialogue_id column ({exc.__class__.__name__})") from None
            return {int(i) for i in frame["dialogue_id"]}
    raise UserError(f"{data_dir / f'context_{split}.parquet'}: not found (nor pairs_{split}.csv); the style match "
                    f"learns from the {split} split")


def turns_by_side(dialogues, ids, keys):
    """(the person's turns, everyone else's) in the dialogues of ids; turns of unknown speakers left out."""
    own, others = [], []
    for dialogue_id, turns in dialogues:
        if dialogue_id in ids:
            for text, key, _ in turns:
                if key:
                    (own if key in keys else others).append(text)
    return own, others


def capped(texts, limit, seed):
    """At most limit texts, a seeded sample kept in order."""
    if len(texts) <= limit:
        return list(texts)
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), limit))]


def train_style_classifier(own, others, seed):
    """A character n-gram classifier of the person's turns (1) against everyone else's (0): TF-IDF over
    2-4-grams of characters within words, case and punctuation kept, and a balanced logistic regression."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise UserError("--as: the style match needs scikit-learn (pip install scikit-learn)") from None

    classifier = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=False, sublinear_tf=True),
        LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000, random_state=seed))
    classifier.fit(list(own) + list(others), [1] * len(own) + [0] * len(others))
    return classifier


def style_share(classifier, texts):
    """The share of texts the classifier attributes to the person; an empty reply is nobody's."""
    texts = [" ".join(str(t).split()) for t in texts]
    if not texts:
        return None
    said = [i for i, t in enumerate(texts) if t]
    votes = classifier.predict([texts[i] for i in said]) if said else []
    return float(sum(int(v) for v in votes) / len(texts))


def prepare_style(args):
    """With --as: the person, the classifier trained on the train split's turns, the floor (others' held-out
    turns) and a keep(dialogue_id, answer) that picks the test rows the person answered; None without --as."""
    if not args.as_who:
        return None
    dialogues, owner = read_dialogues(args.dialogues)
    person = resolve_as(dialogues, owner, args.as_who, args.dialogues)
    keys = set(person["keys"])
    train_ids = split_dialogue_ids(args.data_dir, "train")
    own, others = turns_by_side(dialogues, train_ids, keys)
    if not own or not others:
        side = "the person's" if not own else "anyone else's"
        raise UserError(f"{args.dialogues}: the train split's dialogues ({args.data_dir}) hold none of {side} turns, "
                        f"so no style can be learnt for --as {', '.join(person['names'])}")
    own, others = capped(own, STYLE_TURNS, args.seed), capped(others, STYLE_TURNS, args.seed)
    classifier = train_style_classifier(own, others, args.seed)
    test_ids = split_dialogue_ids(args.data_dir, args.split)
    _, held_out_others = turns_by_side(dialogues, test_ids, keys)
    held_out_others = capped(held_out_others, STYLE_TURNS, args.seed)
    said_by_person = {}
    for dialogue_id, turns in dialogues:
        if dialogue_id in test_ids:
            said_by_person[dialogue_id] = {" ".join(t.split()) for t, key, _ in turns if key in keys}
    return {"person": person, "classifier": classifier, "train_turns": {"person": len(own), "others": len(others)},
            "floor": style_share(classifier, held_out_others), "floor_turns": len(held_out_others), "seed": args.seed,
            "keep": lambda dialogue_id, answer: " ".join(answer.split()) in said_by_person.get(dialogue_id, ())}


def style_report(style, examples, rows):
    """The --as part of the comparison: who, how the classifier was trained, ceiling and floor, and per model
    its style match and answer perplexity on the person's held-out replies."""
    ok = [row for row in rows if row["status"] == "ok"]
    return {"as": style["person"]["names"], "keys": style["person"]["keys"],
            "classifier": "TF-IDF of character 2-4-grams within words (case and punctuation kept) + logistic "
                          f"regression (balanced classes, C=4), seed {style['seed']}",
            "train_turns": style["train_turns"], "held_out_replies": len(examples),
            "ceiling": style_share(style["classifier"], [e["answer"] for e in examples]),
            "floor": style["floor"], "floor_turns": style["floor_turns"],
            "models": {row["model"]: {"style_match": row.get("style_match"),
                                      "answer_perplexity": row.get("answer_perplexity")} for row in ok}}


def style_lines(style):
    """The printed (and written) lines of the style match."""
    who = " / ".join(style["as"])
    figures = style["models"].items()
    ceiling, floor = style["ceiling"], style["floor"]
    blind = [] if ceiling is None or floor is None or ceiling > floor else [
        f"the classifier does not tell {who} from the others on this data (ceiling {ceiling:.2f} is not above "
        f"floor {floor:.2f}: too few turns, or no way of writing of their own): the style match says nothing here"]
    return blind + [
        f"style match (share of replies that read as {who}): "
        + ", ".join(f"{model} {fmt(f['style_match'], '{:.2f}')}" for model, f in figures)
        + f"; ceiling {fmt(style['ceiling'], '{:.2f}')} ({who}'s own held-out replies), "
          f"floor {fmt(style['floor'], '{:.2f}')} (others')",
        f"answer perplexity on {who}'s {style['held_out_replies']} held-out replies: "
        + ", ".join(f"{model} {fmt(f['answer_perplexity'], '{:.2f}')}" for model, f in figures),
    ]


# ---------------------------------------------------------------- model folders
def resolve_weights(folder):
    """The folder itself if it holds weights, else its newest complete checkpoint-N/."""
    weights = newest_weights(folder)
    if weights is None:
        raise UserError(f"{folder}: no model of the kit here (no config.json with kit_model, and no "
                        f"config.json + model.safetensors at the top level or in a checkpoint-N/ folder)")
    return weights


def model_kind(folder):
    """'lstm_pytorch', 'lstm_keras' or 'transformers', told apart by config.json's keys."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder")
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        kind = config.get("kit_model") if isinstance(config, dict) else None
        if kind in LSTM_SCRIPTS:
            return kind
        if kind is not None:
            raise UserError(f"{folder}: config.json names an unknown kit_model {kind!r}")
    config = read_json(resolve_weights(folder) / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{folder}: config.json has neither kit_model nor model_type; not a model of the kit")
    return "transformers"


# ---------------------------------------------------------------- data, prompts and scoring


# ---------------------------------------------------------------- running the models
def generate_reply(model, tokenizer, ids, generation_config, kit_generation, stop, device):
    """One greedy reply at batch size one: (text, ended_with_eos, ms, new tokens without EOS).

    The chat's repetition penalty and n-gram blocking look at the reply only, as in the chat."""
    import torch
    from transformers import LogitsProcessorList

    started = time.perf_counter()
    input_ids = torch.tensor([ids], device=device)
    processors = LogitsProcessorList(reply_processors(kit_generation, len(ids)))
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=generation_config, logits_processor=processors,
                                stopping_criteria=stop)
    if device == "cuda":
        torch.cuda.synchronize()
    new = output[0, len(ids):].tolist()
    ended = tokenizer.eos_token_id in new
    if ended:
        new = new[:new.index(tokenizer.eos_token_id)]
    # As the chat shows it: an echoed answer label dropped, and a model that goes on to write the
    # next turn itself (instead of ending) cut at that label.
    text = cut_at_next_turn(tokenizer.decode(new, skip_special_tokens=True))
    text = " ".join(text.replace("\ufffd", "").split())  # a cut multi-byte piece is noise, not a word
    ms = (time.perf_counter() - started) * 1000
    return text, ended, ms, len(new)


def reply_prompt(tokenizer, turns, settings, budget, facts=None):
    """The prompt ids a reply is generated from: the chat's (system_prompt.chat_prompt_ids)
    for the same conversation, window and budget, and facts (row_facts) as training gave them."""
    return fit_prompt(tokenizer, turns, settings["max_turns"], budget, settings["persona"], facts)


def run_transformers(folder, examples, probe, options):
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

    device = options["device"]
    model, tokenizer, weights_dir, settings = load_model(folder, device, options.get("max_turns"),
                                                         options.get("context_tokens"))
    for note in settings["warnings"] + [facts_column_note(settings, examples, options["data"])]:
        if note:
            print(f"evaluate.py: warning: {folder}: {note}", file=sys.stderr)
    max_new = options["max_new_tokens"]
    budget = min(settings["context_tokens"], settings["n_positions"] - max_new)
    if budget < 2:
        raise UserError(f"{folder}: --max-new-tokens {max_new} leaves no room for a prompt in "
                        f"{settings['n_positions']} positions")
    # Greedy, with the bot's own guards against loops (chat_config.json), on the reply only:
    # transformers' own ones, which would look at the prompt too, stay off.
    generation_config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
        temperature=1.0, top_p=1.0,  # greedy: the folder's sampling defaults would only draw a warning
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer, STOP_STRINGS)])
    torch.manual_seed(options["seed"])
    random.seed(options["seed"])

    def prompt(turns, facts=None):
        ids = reply_prompt(tokenizer, turns, settings, budget, facts)
        if ids is None:
            raise UserError(f"{folder}: the persona alone does not fit the prompt budget of {budget} tokens")
        return ids

    prompts = [prompt(e["turns"], row_facts(e, settings)) for e in examples]
    kit_generation = settings["generation"]
    generate_reply(model, tokenizer, prompts[0], generation_config, kit_generation, stop, device)  # warm-up, untimed
    records = []
    for example, ids in zip(tqdm(examples, desc=f"{Path(folder).name} replies", disable=not options["progress"]),
                            prompts):
        reply, ended, ms, n_tokens = generate_reply(model, tokenizer, ids, generation_config, kit_generation, stop,
                                                    device)
        records.append({"reply": reply, "reference": example["answer"], "ended_with_eos": ended, "ms": ms,
                        "reply_tokens": n_tokens})
    built, _ = build_scoring_examples(tokenizer, examples, settings)
    kept = [b for b in built if b is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = iter(score(model, kept, options["batch_size"], device, pad_id, options["progress"]))
    for record, b in zip(records, built):
        s = next(scores) if b is not None else {"answer_nll": None, "answer_tokens": None, "chars": None}
        record.update(reference_nll=s["answer_nll"], reference_tokens=s["answer_tokens"], reference_chars=s["chars"])
    probe_replies = [generate_reply(model, tokenizer, prompt(item["turns"]), generation_config, kit_generation, stop,
                                    device)[0] for item in probe]
    info = {"weights": str(weights_dir), "persona": bool(settings["persona"]),
            "rows_with_facts": sum(bool(b and b["facts"]) for b in built), "max_turns": settings["max_turns"],
            "context_tokens": budget, "tokens": "model BPE tokens",
            "decoding": "greedy (chat_config repetition_penalty, no_repeat_ngram_size on the reply only)"}
    return records, probe_replies, info


def lstm_questions(examples, probe, max_turns):
    """The JSONL records of the LSTM prediction interface: test rows first, then the probe."""
    lines = []
    for i, example in enumerate(examples):
        turns = example["turns"][-max_turns:] if max_turns else example["turns"]
        lines.append({"id": f"test-{i}", "context": turns[:-1], "question": turns[-1],
                      "reference": example["answer"]})
    for item in probe:
        turns = item["turns"][-max_turns:] if max_turns else item["turns"]
        lines.append({"id": f"probe-{item['id']}", "context": turns[:-1], "question": turns[-1],
                      "reference": None})
    return lines


def read_predictions(path, questions, folder, script):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{folder}: {script.name} eval wrote no predictions file")
    predictions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                predictions.append(json.loads(line))
            except ValueError:
                raise UserError(f"{folder}: {script.name} eval wrote bad JSON on line {number}") from None
    if [p.get("id") if isinstance(p, dict) else None for p in predictions] != [q["id"] for q in questions]:
        raise UserError(f"{folder}: {script.name} eval wrote {len(predictions)} predictions that do not match "
                        f"the {len(questions)} questions in order")
    for p, q in zip(predictions, questions):
        if not (isinstance(p.get("reply"), str) and isinstance(p.get("ms"), (int, float))
                and isinstance(p.get("reply_tokens"), int) and "ended_with_eos" in p):
            raise UserError(f"{folder}: {script.name} eval wrote an incomplete prediction for {q['id']}")
        if q["reference"] is not None and not all(isinstance(p.get(k), (int, float)) for k in
                                                  ("reference_nll", "reference_tokens", "reference_chars")):
            raise UserError(f"{folder}: {script.name} eval gave no reference_nll for {q['id']}")
    return predictions


def run_lstm(folder, kind, examples, probe, options):
    script = Path(options["scripts"][kind])
    if not script.is_file():
        raise UserError(f"{folder}: {script} (the {kind} script) not found")
    max_turns = options.get("max_turns")
    questions = lstm_questions(examples, probe, max_turns)
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        questions_path = Path(tmp) / "questions.jsonl"
        predictions_path = Path(tmp) / "predictions.jsonl"
        questions_path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions),
                                  encoding="utf-8")
        command = [sys.executable, str(script), "eval", "--model", str(folder), "--questions",
                   str(questions_path), "--predictions", str(predictions_path), "--seed", str(options["seed"]),
                   "--device", options["device"]]
        if options["progress"]:
            print(f"{Path(folder).name}: {script.name} eval on {len(questions)} questions", file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise UserError(f"{folder}: {script.name} eval failed (exit {done.returncode}): "
                            f"{lines[-1] if lines else 'no message'}")
        predictions = read_predictions(predictions_path, questions, folder, script)
    records = []
    for example, p in zip(examples, predictions):
        records.append({"reply": p["reply"], "reference": example["answer"],
                        "ended_with_eos": bool(p["ended_with_eos"]), "ms": float(p["ms"]),
                        "reply_tokens": p["reply_tokens"], "reference_nll": p["reference_nll"],
                        "reference_tokens": p["reference_tokens"], "reference_chars": p["reference_chars"]})
    probe_replies = [p["reply"] for p in predictions[len(examples):]]
    info = {"script": script.name, "max_turns": max_turns, "tokens": "LSTM vocabulary words",
            "decoding": "greedy"}
    return records, probe_replies, info


def evaluate_model(folder, examples, probe, options):
    """A table row for one model folder; a failure becomes a row with its error."""
    row = {"model": str(folder).rstrip("/\\") or str(folder), "folder": str(folder), "kind": None,
           "status": "ok", "error": None}
    try:
        row["kind"] = kind = model_kind(folder)
        if kind == "transformers":
            records, probe_replies, info = run_transformers(folder, examples, probe, options)
        else:
            records, probe_replies, info = run_lstm(folder, kind, examples, probe, options)
        row.update(info)
        row.update(reply_metrics(records))
        if options.get("style"):
            row["style_match"] = style_share(options["style"]["classifier"], [r["reply"] for r in records])
        row.update(probe_metrics(probe, probe_replies))
        row["samples"] = [{"question": e["turns"][-1], "reference": r["reference"], "reply": r["reply"]}
                          for e, r in list(zip(examples, records))[:5]]
    except UserError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # a crash inside one model must not cost the others their results
        traceback.print_exc()
        row.update(status="error", error=f"{folder}: {exc.__class__.__name__}: {exc}")
    return row


# ---------------------------------------------------------------- reports
def fmt(value, pattern):
    return "—" if value is None else pattern.format(value)


def table_columns(result):
    """The table's columns: COLUMNS, and the style match where --as asked for one."""
    return COLUMNS + [STYLE_COLUMN] if result.get("style") else COLUMNS


def markdown_table(result):
    settings = result["settings"]
    columns = table_columns(result)
    header = "| model | kind | " + " | ".join(title for _, title, _, _ in columns) + " | status |"
    lines = [
        "# Comparison of the kit's models",
        "",
        f"Data: `{settings['data']}`, {settings['rows']} rows, seed {settings['seed']}, greedy decoding at "
        f"batch size one, at most {settings['max_new_tokens']} new tokens, device {settings['device']}. "
        f"Memory probe: `{settings['probe']}`, {settings['probe_dialogues']} dialogues.",
        "",
        header,
        "|" + "---|" * (len(columns) + 3),
    ]
    for row in result["models"]:
        cells = [fmt(row.get(key), pattern) for key, _, pattern, _ in columns]
        status = "ok" if row["status"] == "ok" else "error: " + row["error"].replace("|", "\\|")
        lines.append(f"| {row['model']} | {row['kind'] or '—'} | " + " | ".join(cells) + f" | {status} |")
    research = result["research"]
    cells = []
    for key, _, pattern, _ in columns:
        cells.append(f"{research[key]} ({research[key + '_model']})" if key in research else "—")
    lines.append("| research write-up † | as published | " + " | ".join(cells) + " | measured differently |")
    lines += [
        "",
        f"† {research['note']}.",
        "",
        "How each figure is measured: BLEU-4 is corpus BLEU (nltk, SmoothingFunction()."
        f"{BLEU_SMOOTHING}), 0..1; BLEU, F1, distinct-n and words/reply use one word tokeniser for all "
        "models (lower-case, `\\w+|[^\\w\\s]`); F1 and words/reply count words only, not "
        "punctuation. Tokens/s counts each model's own tokens (BPE pieces or "
        "LSTM words), so it compares runs of one model better than models. Answer PPL is per model "
        "token (token-weighted: total NLL / total tokens, answer + EOS, prompt excluded); bits/char "
        "(NLL / ln 2 / characters of the references, +1 each for the end) is the figure that compares "
        "across tokenizers. An LSTM maps out-of-vocabulary words to <UNK> and is scored on that token, "
        "which flatters its perplexity and bits/char. Transformers replies are greedy with the model's "
        "chat_config repetition_penalty and no_repeat_ngram_size, which look at the reply only, as in the chat; "
        "LSTM replies are plain greedy.",
        "",
        "The memory probe counts a reply as a hit if it names the fact given two or more turns earlier "
        "(stem match, case-insensitive). Each model gets the conversation as its chat would: "
        "transformers the persona and the newest turns within the turn window and prompt budget they were "
        "trained with (the kit's prompt rule), LSTMs the turns joined and cut to their last max_len tokens. "
        "A model trained on single exchanges (max_turns 1) cannot see the fact.",
        "",
    ]
    by_distance = result.get("probe_by_distance") or {}
    for row in result["models"]:
        if row["status"] != "ok":
            continue
        parts = []
        for distance, ids in sorted(by_distance.items()):
            hits = sum(1 for r in row["memory_probe_replies"] if r["id"] in ids and r["hit"])
            parts.append(f"{hits}/{len(ids)} with the fact {distance} turns back")
        lines.append(f"- {row['model']}: memory probe {row['memory_probe_hits']}/"
                     f"{row['memory_probe_dialogues']} ({', '.join(parts)})")
    lines.append("")
    style = result.get("style")
    if style:
        who = " / ".join(style["as"])
        lines += [
            f"Style match (`--as`): the share of a model's replies to the {style['held_out_replies']} held-out "
            f"questions that {who} answered which a classifier attributes to {who}. The classifier "
            f"({style['classifier']}) learnt {who}'s turns ({style['train_turns']['person']}) against everyone "
            f"else's ({style['train_turns']['others']}) in the train split's dialogues; an empty reply counts as "
            f"nobody's. The ceiling is the same share for {who}'s own held-out replies (the test answers), the "
            f"floor for the other people's held-out turns ({style['floor_turns']}). Answer PPL is measured on "
            f"{who}'s held-out replies.",
            "",
            *(f"- {line}" for line in style_lines(style)),
            "",
        ]
    return "\n".join(lines)


def plot_chart(result, path):
    """A grid of bar charts, one per metric, one bar per model; the research's figures hatched."""
    # The Figure class, not pyplot: no backend to choose, so a notebook keeps its own (Agg would blank its plots).
    import matplotlib
    from matplotlib.figure import Figure

    ok = [row for row in result["models"] if row["status"] == "ok"]
    titles = {key: (title, better) for key, title, _, better in COLUMNS}
    research = result["research"]
    fig = Figure(figsize=(16, 7.5))
    axes = fig.subplots(2, 4)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, CHART_KEYS):
        names = [row["model"] for row in ok]
        values = [row.get(key) for row in ok]
        bar_colors = [colors[i % len(colors)] for i in range(len(ok))]
        bars = list(ax.bar(names, [v or 0.0 for v in values], color=bar_colors))
        if key in research:
            bars += list(ax.bar([f"research†\n{research[key + '_model']}"], [research[key]],
                                color="white", edgecolor="grey", hatch="//"))
            values = values + [research[key]]
        for bar, value in zip(bars, values):
            ax.annotate("n/a" if value is None else f"{value:.3g}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        top = max([v for v in values if v is not None] + [0.0])
        ax.set_ylim(0, 1.1 if key in ("eos_share", "memory_probe") else (top * 1.18 or 1.0))
        title, better = titles[key]
        arrow = {True: " (higher is better)", False: " (lower is better)", None: ""}[better]
        ax.set_title(title + arrow, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle(f"Kit models on {result['settings']['rows']} test rows "
                 f"(seed {result['settings']['seed']}, greedy, batch size 1)")
    fig.text(0.01, 0.01, "† research write-up, measured differently (see comparison.md)", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, format="png", dpi=110)


def show_in_notebook(png_path):
    """Show a saved chart in the notebook cell running this script (pasted or %run); elsewhere the file is all."""
    if "ipykernel" in sys.modules:
        from IPython.display import Image, display

        display(Image(filename=png_path))


def write_reports(result, output_dir):
    """comparison.json, .md and .png, each written beside its target and renamed into place."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    targets = {name: output_dir / f"comparison.{name}" for name in ("json", "md", "png")}
    temps = {name: path.with_name(path.name + suffix) for name, path in targets.items()}
    temps["json"].write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    temps["md"].write_text(markdown_table(result), encoding="utf-8")
    plot_chart(result, temps["png"])
    for name in targets:
        os.replace(temps[name], targets[name])
    return list(targets.values())


def compare(folders, examples, probe, options):
    """Evaluate every folder and assemble the comparison; failures are rows with an error."""
    rows = []
    for folder in folders:
        row = evaluate_model(folder, examples, probe, options)
        if row["status"] != "ok":
            print(f"evaluate.py: error: {row['error']}", file=sys.stderr)
        rows.append(row)
    by_distance = {}
    for item in probe:
        by_distance.setdefault(fact_distance(item), []).append(item["id"])
    result = {
        "settings": {"data": options["data"], "rows": len(examples), "seed": options["seed"],
                     "device": options["device"], "max_new_tokens": options["max_new_tokens"],
                     "probe": options["probe"], "probe_dialogues": len(probe),
                     "bleu": f"nltk corpus_bleu, 4-gram, SmoothingFunction().{BLEU_SMOOTHING}",
                     "word_tokeniser": WORD_PATTERN.pattern + " on lower-cased text"},
        "models": rows,
        "research": RESEARCH,
        "probe_by_distance": {str(k): v for k, v in by_distance.items()},
    }
    if options.get("style"):
        result["style"] = style_report(options["style"], examples, rows)
    return result


# ---------------------------------------------------------------- main
def parse_args(argv):
    # prog: in a notebook cell argparse would name the kernel (ipykernel_launcher.py) in its messages.
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate model folders of the kit on the "
                                                                     "same test questions and write one comparison "
                                                                     "table.")
    parser.add_argument("--model", nargs="+", default=MODELS,
                        help="model folders, LSTM or transformers (default: %(default)s)")
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder of the splits (default: %(default)s)")
    parser.add_argument("--split", default=SPLIT, help="split to read (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=ROWS, help="test rows, 0 = all (default: %(default)s)")
    parser.add_argument("--probe", default=PROBE_FILE, help="memory probe JSONL (default: %(default)s)")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder of the reports (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default=DEVICE, choices=DEVICES)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS,
                        help="keep at most this many turns before the answer, question included (default: "
                             "transformers take their chat_config.json window, the one they were trained with; "
                             "LSTMs get every turn)")
    parser.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS,
                        help="prompt budget of transformers models in tokens (default: chat_config.json)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch of the perplexity scoring")
    parser.add_argument("--quiet", action="store_true", default=QUIET, help="no progress bars")
    parser.add_argument("--as", dest="as_who", action="append", default=None, metavar="WHO",
                        help="also report how much each model's replies read like this person's (a style match): a "
                             "speaker key (user111), a display name, or 'me' (a Telegram account export's owner); "
                             "repeat for several people or one person's several keys; the test rows are the ones they answered")
    parser.add_argument("--dialogues", default=DIALOGUES,
                        help="the dialogues with speakers the splits were made from, for --as (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.as_who is None and AS is not None:
        args.as_who = [AS] if isinstance(AS, str) else list(AS)
    if args.as_who is not None and not all(isinstance(w, str) and w.strip() for w in args.as_who):
        parser.error("--as: give a speaker key, a display name or 'me'")
    if (args.rows or 0) < 0 or args.batch_size < 1 or args.max_new_tokens < 1 \
            or any(value is not None and value < 1 for value in (args.max_turns, args.context_tokens)):
        parser.error("--rows must be >= 0; --batch-size, --max-new-tokens, --max-turns and --context-tokens >= 1")
    # argparse checks choices and nargs on the command line only, never the defaults block's DEVICE and MODELS.
    if args.device not in DEVICES:
        parser.error(f"--device {args.device!r}: must be one of {', '.join(DEVICES)}")
    if isinstance(args.model, (str, Path)):  # MODELS = "rugpt3_50k": one folder, not one a letter
        args.model = [args.model]
    if not args.model:
        parser.error("--model: give at least one model folder (MODELS in the defaults block is empty)")
    return args


def main(argv=None, scripts=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        style = prepare_style(args)
        examples, data_path = load_split(args.data_dir, args.split, args.rows, args.seed,
                                         style["keep"] if style else None)
        probe = load_probe(args.probe)
    except UserError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    options = {"device": device, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
               "max_turns": args.max_turns, "context_tokens": args.context_tokens, "batch_size": args.batch_size,
               "progress": not args.quiet,
               "scripts": scripts or LSTM_SCRIPTS, "data": str(data_path), "probe": str(args.probe), "style": style}
    result = compare(args.model, examples, probe, options)
    failed = [row for row in result["models"] if row["status"] != "ok"]
    if len(failed) == len(result["models"]):
        print("evaluate.py: error: no model could be evaluated; reports left as they were", file=sys.stderr)
        return 1
    paths = write_reports(result, args.output)
    print("\n".join(line for line in markdown_table(result).splitlines() if line.startswith("|")))
    if result.get("style"):
        print("\n".join(style_lines(result["style"])))
    print("wrote " + ", ".join(str(p) for p in paths))
    show_in_notebook(str(next(p for p in paths if p.suffix == ".png")))
    return 1 if failed else 0


# ==================================================================================================
# Generated blocks: shared code that blocks/build.py writes into every script that needs it.
# Do not edit it here: change the block's source in blocks/, then run `make blocks`
# (`python blocks/build.py`); the suite fails while a copy differs from its source.
# ==================================================================================================


# ==== block blocks/prompt_rule.py: generated, edit the source and run `make blocks` ====
"""The one prompt rule: how a conversation becomes token ids, in training, chat, evaluation and serving.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

# One rule for every prompt the model sees, in training, chat, perplexity and evaluation:
#
#     Вопрос: <persona question>          the persona, when there is one
#     Ответ: <persona answer>
#     Вопрос: Что ты обо мне знаешь?      what the bot knows about the user, when it knows something
#     Ответ: <facts>
#     Ответ: <older turn>                 turns labelled counting back from the answer, so
#     Вопрос: <the user's question>       the turn before the answer is always a question
#     Ответ:                              the prompt ends at the colon ...
#      <answer><EOS>                      ... and the answer keeps its first word's space
#
# GPT-2's byte-level BPE spells a word inside a sentence with its space (" Привет"),
# so the space goes with the answer, not with the prompt. No BOS is added anywhere:
# a prompt starts with its first label in training and in chat alike, whatever the
# tokenizer's add_bos_token says. Text is tokenized as plain text: "</s>" typed by
# a user is five characters, never the EOS id.
PROMPT_RULE = 2                # chat_config.json "prompt_rule": the rule a model folder was trained with
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
FACTS_QUESTION = "Что ты обо мне знаешь?"
DEFAULT_MAX_TURNS = 16         # the turn window of a model folder whose chat_config.json records none
FACTS_ROOM_FOR_QUESTION = 16   # tokens the facts exchange leaves the question (its own length, if shorter)
LABEL_PATTERN = re.compile(r"(?i)\b(вопрос|ответ)\s*:")


def prepare_turn(text):
    """A turn as a prompt holds it: Unicode NFC, one line with single spaces (a newline
    separates turns), and a label inside it ("Ответ:") made "Ответ -", so that a user
    cannot start a turn of their own."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return LABEL_PATTERN.sub(lambda m: m.group(1) + " -", text)


def header_text(persona=None, facts=None):
    """The exchanges every prompt starts with: the persona, then what the bot knows about the user."""
    lines = []
    if persona:
        lines += [QUESTION_LABEL + prepare_turn(persona["question"]), ANSWER_LABEL + prepare_turn(persona["answer"])]
    if facts:
        lines += [QUESTION_LABEL + FACTS_QUESTION, ANSWER_LABEL + prepare_turn(facts)]
    return "".join(line + TURN_SEPARATOR for line in lines)


def prompt_text(turns, persona=None, facts=None):
    """The prompt for turns (oldest first, the user's question last), ending at the answer label's colon."""
    count = len(turns)
    lines = [(QUESTION_LABEL if (count - 1 - i) % 2 == 0 else ANSWER_LABEL) + prepare_turn(turn)
             for i, turn in enumerate(turns)]
    return header_text(persona, facts) + "".join(line + TURN_SEPARATOR for line in lines) + ANSWER_LABEL.rstrip()


def encode_text(tokenizer, text):
    """Token ids of text, taken as plain text: nothing added (no BOS, no EOS), and the spelling
    of a special token ("</s>") tokenized as the characters it is."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def answer_ids(tokenizer, answer):
    """The answer as the model learns to write it after a prompt: its first word with its
    leading space, then the tokenizer's own EOS."""
    return encode_text(tokenizer, " " + prepare_turn(answer)) + [tokenizer.eos_token_id]


def first_fitting(starts, fits):
    """The smallest of the sorted starts that fits (a later start leaves less text), else None."""
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return starts[lo] if lo < len(starts) else None


def fit_question(tokenizer, question, budget, persona=None, facts=None):
    """The longest end of the (prepared) question whose prompt fits in budget tokens, cut
    before a word where one fits; None when not even an empty question fits. The end is
    kept: people ask after the material."""
    def fits(start):
        return len(encode_text(tokenizer, prompt_text([question[start:]], persona, facts))) <= budget

    if fits(0):
        return question
    if not fits(len(question)):
        return None
    word_starts = [i for i in range(1, len(question)) if question[i - 1] == " "]
    start = first_fitting(word_starts, fits)
    if start is None:  # not even the last word fits: keep the end of it
        start = first_fitting(list(range((word_starts or [0])[-1] + 1, len(question) + 1)), fits)
    return question[start:]


def facts_that_fit(tokenizer, facts, budget, persona=None, question=""):
    """The facts answer as a prompt of budget tokens holds it beside the persona, leaving the
    question FACTS_ROOM_FOR_QUESTION tokens (or its own length, if shorter): whole, or cut
    clause by clause from its end, where the answer keeps what matters least (it names the
    user first, their plans last); None when not even its first clause fits. Training and
    chat both cut here, so the exchange a model learnt is the one it is sent."""
    bare = len(encode_text(tokenizer, prompt_text([""], persona)))
    room = min(FACTS_ROOM_FOR_QUESTION, len(encode_text(tokenizer, prompt_text([question], persona))) - bare)

    def fits(text):
        return len(encode_text(tokenizer, prompt_text([""], persona, text))) + room <= budget

    if fits(facts):
        return facts
    clauses = facts.rstrip(".").split(", ")
    for count in range(len(clauses) - 1, 0, -1):
        text = ", ".join(clauses[:count]) + "."
        if fits(text):
            return text
    return None


def fit_prompt(tokenizer, turns, max_turns, budget, persona=None, facts=None):
    """Prompt ids for a conversation (turns oldest first, the user's question last): the
    persona, the facts as far as they fit beside it (facts_that_fit), the question (its end, if it alone is too
    long), and the newest earlier turns that fit the turn window (max_turns turns, the
    question included) and budget tokens; the oldest go first. None when not even the
    persona and an empty question fit."""
    turns = [prepare_turn(turn) for turn in turns[-max_turns:]]
    facts = facts_that_fit(tokenizer, facts, budget, persona, turns[-1]) if facts else None
    whole = encode_text(tokenizer, prompt_text(turns, persona, facts))
    if len(whole) <= budget:
        return whole
    question = fit_question(tokenizer, turns[-1], budget, persona, facts)
    if question is None:
        return None
    earlier = turns[:-1]

    def encoded(count):  # the prompt with the newest `count` earlier turns
        return encode_text(tokenizer, prompt_text(earlier[len(earlier) - count:] + [question], persona, facts))

    lo, hi = 0, len(earlier) - 1  # the prompt with lo earlier turns fits (all of them did not)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encoded(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return encoded(lo)


def encode_exchange(tokenizer, turns, answer, max_turns, context_tokens, max_length, persona=None, facts=None):
    """(prompt ids, answer ids) of one exchange, as training learns it and perplexity.py and
    evaluate.py score it; None when the answer leaves no room for a prompt. The answer is
    never cut: the prompt gets context_tokens, or less where a long answer leaves less of
    max_length."""
    target = answer_ids(tokenizer, answer)
    prompt = fit_prompt(tokenizer, turns, max_turns, min(context_tokens, max_length - len(target)), persona, facts)
    return None if prompt is None else (prompt, target)


def prompt_window(chat_config, n_positions, max_new_tokens, max_turns=None, context_tokens=None):
    """(turn window, prompt budget in tokens, warning lines) for a model folder: what training
    recorded in chat_config.json, or what --max-turns / --context-tokens ask for (a warning
    where that is more than the model was trained on). The budget leaves max_new_tokens of
    the model's positions for the reply."""
    config = chat_config or {}
    notes = []
    rule = config.get("prompt_rule")
    if chat_config is not None and rule is None:
        notes.append("chat_config.json records no prompt_rule: the model was trained by an older kit, on "
                        "prompts that end in 'Ответ: ' with a space; retrain it for the prompts it is given now")
    elif chat_config is not None and rule != PROMPT_RULE:
        notes.append(f"chat_config.json has prompt_rule {rule!r}, this kit builds prompts by rule "
                        f"{PROMPT_RULE}: they may differ from the ones the model was trained on")
    trained_turns = int(config.get("max_turns") or DEFAULT_MAX_TURNS)
    trained_tokens = int(config.get("context_tokens") or n_positions - max_new_tokens)
    turns, tokens = int(max_turns or trained_turns), int(context_tokens or trained_tokens)
    if turns > trained_turns:
        notes.append(f"--max-turns {turns}: the model was trained on at most {trained_turns} turns before "
                        f"the answer")
    if tokens > trained_tokens:
        notes.append(f"--context-tokens {tokens}: the model was trained on prompts of at most "
                        f"{trained_tokens} tokens")
    return turns, min(tokens, n_positions - max_new_tokens), notes
# ==== end of block blocks/prompt_rule.py ====


# ==== block blocks/decoding.py: generated, edit the source and run `make blocks` ====
"""Decoding: the sampling settings and the reply-only penalties the chat scripts and evaluate.py use.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

LEADING_LABELS = re.compile(r"^(?:\s*ответ\s*:)+", re.IGNORECASE)
NEXT_TURN = re.compile(r"(?im)^[ \t]*(?:вопрос|ответ)[ \t]*:")
# the model going on to write the next turn itself: a label that starts a line
STOP_STRINGS = [TURN_SEPARATOR + QUESTION_LABEL.strip(), TURN_SEPARATOR + ANSWER_LABEL.strip()]


class OnReplyOnly:
    """A transformers logits processor that sees the reply's tokens only, input_ids[:, prompt_length:].

    transformers' n-gram blocking looks at the whole sequence, prompt included, so it
    bans the question's words and the name a user gave, which an answer on topic and a
    bot that remembers must repeat. Rows of a left-padded batch share prompt_length."""

    def __init__(self, processor, prompt_length):
        self.processor, self.prompt_length = processor, prompt_length

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.prompt_length:], scores)


def reply_processors(generation, prompt_length):
    """Repetition penalty and n-gram blocking of the generation settings (chat_config.json),
    applied to the reply being generated and never to the prompt."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = []
    penalty = float(generation.get("repetition_penalty") or 1.0)
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_length))
    size = int(generation.get("no_repeat_ngram_size") or 0)
    if size > 0:
        processors.append(OnReplyOnly(NoRepeatNGramLogitsProcessor(size), prompt_length))
    return processors


def cut_at_next_turn(text):
    """The reply without an echoed answer label, cut where the model went on to write the
    next turn itself: at a label that starts a line, never at "вопрос:" inside a sentence."""
    text = LEADING_LABELS.sub("", text)
    label = NEXT_TURN.search(text)
    return text[:label.start()] if label else text
# ==== end of block blocks/decoding.py ====


# ==== block blocks/model_folders.py: generated, edit the source and run `make blocks` ====
"""Model folders: finding the weights of a transformers folder of the kit (or its newest complete
checkpoint) and loading its model, tokenizer and prompt settings, for perplexity.py and evaluate.py.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses, and defines UserError and
resolve_weights(folder) (the weights folder, or a UserError in its own words; newest_weights helps)."""

def has_weights(folder):
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def read_json(path):
    """A JSON object from a model folder's file (config.json, chat_config.json); a UserError otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def unfinished_lora_run(folder):
    """Whether a folder with no model is a --lora run that has not finished: its
    checkpoint-N/ folders hold the adapter only, and the merged model comes at the end."""
    return any((path / "adapter_config.json").is_file() for path in Path(folder).glob("checkpoint-*"))


def newest_weights(folder):
    """The folder itself if it holds weights, else its newest complete checkpoint-N/, else None."""
    folder = Path(folder)
    if has_weights(folder):
        return folder
    checkpoints = [p for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit() and has_weights(p)
                   and (p / "trainer_state.json").is_file()]  # written last by Trainer
    if not checkpoints and unfinished_lora_run(folder):
        raise UserError(f"{folder}: a --lora run that has not finished: its checkpoint-N/ folders hold the "
                        f"adapter only, and the merged model is saved when it ends (--resume --lora continues it)")
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


def pick_device(name):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return name


def load_model(folder, device, max_turns=None, context_tokens=None):
    """Model, tokenizer and prompt settings (the chat's generation settings too) of a transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    weights_dir = resolve_weights(folder)
    config = read_json(weights_dir / "config.json")
    if "model_type" not in config:
        raise UserError(f"{folder}: {weights_dir / 'config.json'} has no model_type; not a transformers model")
    tokenizer_dir = next((d for d in (weights_dir, folder) if any(
        (d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))), None)
    if tokenizer_dir is None:
        raise UserError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json) beside the weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # a broken tokenizer file surfaces as many exception types
        raise UserError(f"{tokenizer_dir}: cannot load the tokenizer ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no eos_token")
    try:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"{weights_dir}: cannot load the model ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    model.to(device).eval()
    chat = read_chat_config(folder, weights_dir)
    n_positions = (getattr(model.config, "max_position_embeddings", None)
                   or getattr(model.config, "n_positions", None) or 1024)
    settings = prompt_settings(chat, int(n_positions), max_turns, context_tokens)
    settings["generation"] = (chat or {}).get("generation") or {}
    return model, tokenizer, weights_dir, settings
# ==== end of block blocks/model_folders.py ====


# ==== block blocks/scoring.py: generated, edit the source and run `make blocks` ====
"""Scoring: reading the test data, building prompts and scoring model folders for perplexity.py and evaluate.py.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

DEFAULT_MAX_NEW_TOKENS = 64   # the chat's reply room where a folder's chat_config.json does not say
CONTEXT_COLUMNS = ("dialogue_id", "context", "answer")
FACTS_COLUMN = "facts"  # optional in context_<split>.parquet: what the user side stated earlier (issue 14)
PAIRS_COLUMNS = ("dialogue_id", "question", "answer")


def read_chat_config(folder, weights_dir):
    """chat_config.json beside the weights, in the folder or above a checkpoint; None where there is none."""
    for candidate in (weights_dir, folder, weights_dir.parent):
        path = candidate / "chat_config.json"
        if path.is_file():
            config = read_json(path)
            persona = config.get("persona") if isinstance(config, dict) else None
            if not isinstance(config, dict) or (persona is not None and not (
                    isinstance(persona, dict) and {"question", "answer"} <= persona.keys())):
                raise UserError(f"{path}: not a chat_config of the kit (a JSON object; persona null or "
                                f"{{question, answer}})")
            for key, ours in (("question_label", QUESTION_LABEL), ("answer_label", ANSWER_LABEL),
                              ("turn_separator", TURN_SEPARATOR)):
                if key in config and config[key] != ours:
                    raise UserError(f"{path}: {key} {config[key]!r} differs from the kit's prompt rule {ours!r}")
            return config
    return None


def prompt_settings(chat, n_positions, max_turns=None, context_tokens=None):
    """How prompts are built for a model folder, the way its chat builds them: persona, turn
    window and budget from chat_config.json (--max-turns / --context-tokens may change the
    window, with a warning where the model was not trained on it), and the example length
    training used, which caps the prompt after a long answer as training did."""
    config = chat or {}
    max_new = int((config.get("generation") or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    max_turns, budget, notes = prompt_window(chat, n_positions, max_new, max_turns, context_tokens)
    return {"persona": config.get("persona"), "facts_exchange": config.get("facts") is True,
            "max_turns": max_turns, "context_tokens": budget,
            "max_length": min(int(config.get("max_length") or n_positions), n_positions),
            "n_positions": n_positions, "has_chat_config": chat is not None, "warnings": notes}


def row_facts(example, settings):
    """The facts text of a row's prompt exchange "Что ты обо мне знаешь?": the split's facts column where
    the model was trained with that exchange (chat_config.json "facts": true), else none, as in training."""
    return (example.get("facts") or None) if settings["facts_exchange"] else None


def load_split(data_dir, split, rows, seed, keep=None):
    """Test rows as dicts {dialogue_id, turns (oldest first, the question last), answer}, and
    facts (a text, "" where none) where the split has a facts column; keep (a row's dialogue_id
    and answer to True or False), where given, picks the rows before the sample is drawn.

    context_<split>.parquet is preferred (it carries the earlier turns);
    pairs_<split>.csv is the fallback, with the question as the only turn."""
    import random

    import pandas as pd

    data_dir = Path(data_dir)
    context_path = data_dir / f"context_{split}.parquet"
    pairs_path = data_dir / f"pairs_{split}.csv"
    if context_path.is_file():
        path, columns = context_path, CONTEXT_COLUMNS
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:
            raise UserError(f"{path}: cannot read parquet ({exc.__class__.__name__})") from None
    elif pairs_path.is_file():
        path, columns = pairs_path, PAIRS_COLUMNS
        try:
            frame = pd.read_csv(path, encoding="utf-8", keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise UserError(f"{path}: the {split} split is empty (an empty file)") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8") from None
        except Exception as exc:
            raise UserError(f"{path}: cannot read CSV ({exc.__class__.__name__})") from None
    else:
        raise UserError(f"{context_path}: not found (nor {pairs_path.name}); run create_dataset.py first")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    has_facts = columns is CONTEXT_COLUMNS and FACTS_COLUMN in frame.columns
    examples = []
    for row in frame.itertuples(index=False):
        if columns is CONTEXT_COLUMNS:
            turns = [str(t) for t in (row.context if row.context is not None else [])]
        else:
            turns = [str(row.question)]
        answer = row.answer if isinstance(row.answer, str) else ""
        if turns and turns[-1].strip() and answer.strip() and (keep is None or keep(int(row.dialogue_id), answer)):
            examples.append({"dialogue_id": int(row.dialogue_id), "turns": turns, "answer": answer})
            if has_facts:
                facts = getattr(row, FACTS_COLUMN)
                examples[-1]["facts"] = facts if isinstance(facts, str) else ""
    if not examples:
        which = "no row with a question and an answer" + (" that --as picks" if keep is not None else "")
        raise UserError(f"{path}: the {split} split is empty ({which})")
    if rows and rows < len(examples):
        # A seeded sample kept in file order: the same rows for every script given the same seed.
        picked = sorted(random.Random(seed).sample(range(len(examples)), rows))
        examples = [examples[i] for i in picked]
    return examples, path


def build_scoring_examples(tokenizer, examples, settings):
    """Token ids of prompt + answer + EOS, exactly as training encodes the exchange (the row's
    facts exchange included where the model was trained with it), with the spans to score;
    None for a row whose answer leaves no room (and a count of those)."""
    persona = settings["persona"]
    persona_header = len(encode_text(tokenizer, header_text(persona)))
    built, skipped = [], 0
    for example in examples:
        facts = row_facts(example, settings)
        exchange = encode_exchange(tokenizer, example["turns"], example["answer"], settings["max_turns"],
                                   settings["context_tokens"], settings["max_length"], persona, facts)
        if exchange is None:
            skipped += 1
            built.append(None)
            continue
        prompt, target = exchange
        header, with_facts = persona_header, False
        if facts:  # fit_prompt leaves the exchange out where it does not fit beside the persona
            facts_header = encode_text(tokenizer, header_text(persona, facts))
            with_facts = prompt[:len(facts_header)] == facts_header
            header = len(facts_header) if with_facts else header
        built.append({"ids": prompt + target, "answer_start": len(prompt), "sequence_start": max(1, header),
                      "chars": len(example["answer"]) + 1, "facts": with_facts})
    return built, skipped


def facts_column_note(settings, examples, data_path):
    """A warning where the model was trained with the facts exchange and the split has no facts to give it."""
    if settings["facts_exchange"] and not any("facts" in example for example in examples):
        return (f"chat_config.json says the model was trained with the facts exchange, but {data_path} has no "
                f"{FACTS_COLUMN} column (create_dataset.py writes it): its prompts go without it")
    return None


def score(model, built, batch_size, device, pad_id=0, progress=True):
    """Per-row sums of NLL (nats) over the answer span (answer + EOS) and over the sequence
    span (all but the persona and facts), with their token counts.

    The batch is right-padded; each target token is scored from the logits one position
    earlier, so padding never enters a sum."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    order = sorted(range(len(built)), key=lambda i: -len(built[i]["ids"]))
    results = [None] * len(built)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
            width = max(len(built[i]["ids"]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = built[i]["ids"]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(device),
                                  reduction="none").cpu()  # nll[:, j-1] scores token j
            for row, i in enumerate(batch):
                length = len(built[i]["ids"])
                token_nll = nll[row, :length - 1].double()
                a0, s0 = built[i]["answer_start"], built[i]["sequence_start"]
                results[i] = {"answer_nll": float(token_nll[a0 - 1:].sum()), "answer_tokens": length - a0,
                              "sequence_nll": float(token_nll[s0 - 1:].sum()), "sequence_tokens": length - s0,
                              "chars": built[i]["chars"]}
    return results
# ==== end of block blocks/scoring.py ====


# ==== block blocks/metrics.py: generated, edit the source and run `make blocks` ====
"""Reply metrics: unigram F1 and distinct-n, for evaluate.py and the two LSTM scripts (pytorch_chatbot.py,
tensorflow_chatbot.py), each scoring token lists of its own tokeniser.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (Counter)."""

def is_word(token):
    """Letters, digits or an underscore first: a word, not a punctuation mark."""
    return token[0].isalnum() or token[0] == "_"


def unigram_f1(hypothesis, reference):
    """Bag-of-words overlap of one reply's tokens with its reference's. Words only: a reply of
    bare punctuation would otherwise score on the reference's full stop."""
    hypothesis = [t for t in hypothesis if is_word(t)]
    reference = [t for t in reference if is_word(t)]
    common = sum((Counter(hypothesis) & Counter(reference)).values())
    if common == 0:
        return float(not hypothesis and not reference)
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def distinct_n(replies, n):
    """Unique n-grams over all n-grams of all replies, each a token list (n-grams never span two replies)."""
    ngrams = [tuple(tokens[i:i + n]) for tokens in replies for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0
# ==== end of block blocks/metrics.py ====


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
