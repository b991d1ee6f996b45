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

Transformers folders are loaded here. LSTM folders are run through their own
script's prediction interface (`pytorch_chatbot.py eval --questions ...`), and
this script scores what they return.

Run it:
  python evaluate.py --model rugpt3_50k lstm_pytorch lstm_keras            # CPU
  python evaluate.py --model rugpt3_medium_CLEAN_model --device cuda --rows 1000

Writes reports/comparison.json, reports/comparison.md and reports/comparison.png.
A model that fails (no model of the kit, no tokenizer, its script failing) is
reported with its error in the table and on stderr; the others are still
evaluated, and the exit code is 1.
"""
import argparse
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
from collections import Counter
from pathlib import Path

# ---------------------------------------------------------------- defaults
DATA_DIR = "data"
SPLIT = "test"
ROWS = 300                 # 0 = the whole split; otherwise a seeded sample (same rows as perplexity.py)
PROBE_FILE = "data/memory_probe.jsonl"
OUTPUT_DIR = "reports"
SEED = 0
DEVICE = "auto"
MAX_NEW_TOKENS = 64
BATCH_SIZE = 8             # teacher-forced scoring only; replies are always generated one at a time

REPO_ROOT = Path(__file__).resolve().parent
LSTM_SCRIPTS = {"lstm_pytorch": REPO_ROOT / "pytorch_chatbot.py",
                "lstm_keras": REPO_ROOT / "tensorflow_chatbot.py"}

# The prompt format of the kit (DESIGN.md); every script spells it out.
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
DEFAULT_GEN_MAX_NEW_TOKENS = 64
LABEL_PATTERN = re.compile(r"(?i)\b(вопрос|ответ)\s*:")
LEADING_LABELS = re.compile(r"^(?:\s*ответ\s*:)+", re.IGNORECASE)

CONTEXT_COLUMNS = ("dialogue_id", "context", "answer")
PAIRS_COLUMNS = ("dialogue_id", "question", "answer")

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


class UserError(Exception):
    """A mistake in the user's input: reported as one line naming the file."""


# ---------------------------------------------------------------- metrics
def words(text):
    return WORD_PATTERN.findall(text.lower())


def corpus_bleu4(replies, references):
    """Corpus BLEU-4 over word tokens, smoothed so a zero 4-gram count does not zero the corpus."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    smoothing = getattr(SmoothingFunction(), BLEU_SMOOTHING)
    return float(corpus_bleu([[words(r)] for r in references], [words(h) for h in replies],
                             smoothing_function=smoothing))


def unigram_f1(reply, reference):
    """Bag-of-words overlap of one reply with its reference. Words only: a reply of
    bare punctuation would otherwise score on the reference's full stop."""
    hyp = [w for w in words(reply) if w[0].isalnum() or w[0] == "_"]
    ref = [w for w in words(reference) if w[0].isalnum() or w[0] == "_"]
    common = sum((Counter(hyp) & Counter(ref)).values())
    if common == 0:
        return float(not hyp and not ref)
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(replies, n):
    """Unique n-grams over all n-grams of all replies (n-grams never span two replies)."""
    grams = [tuple(tokens[i:i + n]) for tokens in map(words, replies) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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
    ms = [r["ms"] for r in records]
    scored = [r for r in records if r.get("reference_nll") is not None]
    nll = sum(r["reference_nll"] for r in scored)
    tokens = sum(r["reference_tokens"] for r in scored)
    chars = sum(r["reference_chars"] for r in scored)
    seconds = sum(ms) / 1000
    return {
        "rows": len(records),
        "bleu4": corpus_bleu4(replies, references),
        "unigram_f1": statistics.fmean(unigram_f1(h, r) for h, r in zip(replies, references)),
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
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
def load_split(data_dir, split, rows, seed):
    """Test rows as dicts {dialogue_id, turns (oldest first, the question last), answer}.

    context_<split>.parquet is preferred (it carries the earlier turns);
    pairs_<split>.csv is the fallback, with the question as the only turn."""
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
    examples = []
    for row in frame.itertuples(index=False):
        if columns is CONTEXT_COLUMNS:
            turns = [str(t) for t in (row.context if row.context is not None else [])]
        else:
            turns = [str(row.question)]
        answer = row.answer if isinstance(row.answer, str) else ""
        if turns and turns[-1].strip() and answer.strip():
            examples.append({"dialogue_id": int(row.dialogue_id), "turns": turns, "answer": answer})
    if not examples:
        raise UserError(f"{path}: the {split} split is empty (no row with a question and an answer)")
    if rows and rows < len(examples):
        # A seeded sample kept in file order: the same rows for every script given the same seed.
        picked = sorted(random.Random(seed).sample(range(len(examples)), rows))
        examples = [examples[i] for i in picked]
    return examples, path


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


# ---------------------------------------------------------------- model folders
def has_weights(folder):
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read JSON ({exc.__class__.__name__})") from None


def resolve_weights(folder):
    """The folder itself if it holds weights, else its newest complete checkpoint-N/."""
    folder = Path(folder)
    if has_weights(folder):
        return folder
    checkpoints = [p for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit() and has_weights(p)
                   and (p / "trainer_state.json").is_file()]  # written last by Trainer
    if not checkpoints:
        raise UserError(f"{folder}: no model of the kit here (no config.json with kit_model, and no "
                        f"config.json + model.safetensors at the top level or in a checkpoint-N/ folder)")
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]))


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


def read_chat_config(folder, weights_dir):
    for candidate in (weights_dir, folder, weights_dir.parent):
        path = candidate / "chat_config.json"
        if path.is_file():
            config = read_json(path)
            persona = config.get("persona") if isinstance(config, dict) else None
            if not isinstance(config, dict) or (persona is not None and not (
                    isinstance(persona, dict) and {"question", "answer"} <= persona.keys())):
                raise UserError(f"{path}: not a chat_config of the kit (a JSON object; persona null or "
                                f"{{question, answer}})")
            return config
    return None


def pick_device(name):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return name


def load_model(folder, device):
    """Model, tokenizer and prompt settings of a transformers folder of the kit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    weights_dir = resolve_weights(folder)
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
    chat = read_chat_config(folder, weights_dir) or {}
    n_positions = (getattr(model.config, "max_position_embeddings", None)
                   or getattr(model.config, "n_positions", None) or 1024)
    generation = chat.get("generation") or {}
    max_new = int(generation.get("max_new_tokens", DEFAULT_GEN_MAX_NEW_TOKENS))
    settings = {
        "question_label": chat.get("question_label", QUESTION_LABEL),
        "answer_label": chat.get("answer_label", ANSWER_LABEL),
        "turn_separator": chat.get("turn_separator", TURN_SEPARATOR),
        "persona": chat.get("persona"),
        "context_tokens": int(chat.get("context_tokens") or n_positions - max_new),
        "max_turns": None,  # like the chat: the budget alone decides how many turns fit
        "n_positions": int(n_positions),
        "has_chat_config": bool(chat),
        "generation": generation,
    }
    return model, tokenizer, weights_dir, settings


# ---------------------------------------------------------------- prompts (as system_prompt.py builds them)
# --- mirrored in evaluate.py and perplexity.py (tests/test_evaluate.py checks they agree)
def neutralise(text):
    """'Ответ:' inside a user's text would fake a turn; it becomes 'Ответ -'."""
    return LABEL_PATTERN.sub(lambda m: m.group(1) + " -", text)


def prepare_turn(text):
    # The separator between turns is a newline, so a turn must be a single line.
    return " ".join(neutralise(text).split())


def render_prompt(turns, settings):
    """Persona exchange, then prepared turns labelled counting back from the answer (the last
    turn is always a question), then the answer label the model continues from."""
    q, a, sep = settings["question_label"], settings["answer_label"], settings["turn_separator"]
    lines = []
    if settings.get("persona"):
        lines += [q + prepare_turn(settings["persona"]["question"]), a + prepare_turn(settings["persona"]["answer"])]
    n = len(turns)
    lines += [(q if (n - 1 - i) % 2 == 0 else a) + turn for i, turn in enumerate(turns)]
    return sep.join(lines) + sep + a


def persona_block(settings):
    """The persona's lines with their separator: the prefix every prompt starts with."""
    return render_prompt([], settings)[:-len(settings["answer_label"])] if settings.get("persona") else ""


def fit_question(tokenizer, question, settings, budget):
    """The end of the question that fits beside the persona (people ask after the material)."""
    def fits(text):
        return len(tokenizer(render_prompt([text], settings))["input_ids"]) <= budget

    if fits(question):
        return question
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    room = budget - len(tokenizer(render_prompt([""], settings))["input_ids"])
    while room > 0:
        # A cut can split a multi-byte character; the broken piece is dropped.
        text = tokenizer.decode(ids[-room:], skip_special_tokens=True).replace("\ufffd", "").strip()
        if fits(text):
            return text
        room -= 1
    return ""


def prompt_ids(tokenizer, turns, settings, budget):
    """Token ids of the prompt system_prompt.py would build: the persona and as many of the
    newest turns as fit in `budget` tokens, starting at a question where turns were dropped.

    Returns (ids, persona_tokens)."""
    turns = [prepare_turn(t) for t in turns]
    if settings.get("max_turns"):
        turns = turns[-settings["max_turns"]:]
    turns[-1] = fit_question(tokenizer, turns[-1], settings, budget)

    def encode(start):
        return tokenizer(render_prompt(turns[start:], settings))["input_ids"]

    start, ids = 0, encode(0)
    while len(ids) > budget and start < len(turns) - 1:
        start += 1
        ids = encode(start)
    if 0 < start < len(turns) - 1 and (len(turns) - start) % 2 == 0:
        start += 1  # after the persona's answer a question must follow
        ids = encode(start)
    if len(ids) > budget:  # not even the persona fits: keep the newest tokens
        return ids[-budget:] if budget > 0 else [], 0
    persona = persona_block(settings)
    return ids, (len(tokenizer(persona)["input_ids"]) if persona else 0)


def answer_ids(tokenizer, answer):
    return tokenizer(neutralise(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# --- end of the mirrored part


def build_scoring_examples(tokenizer, examples, settings):
    """Token ids of prompt + answer + EOS with the spans to score; rows that cannot fit are skipped."""
    built, skipped = [], 0
    for example in examples:
        target = answer_ids(tokenizer, example["answer"])
        budget = min(settings["context_tokens"], settings["n_positions"] - len(target))
        if budget < 2:
            skipped += 1
            built.append(None)
            continue
        prompt, persona_tokens = prompt_ids(tokenizer, example["turns"], settings, budget)
        built.append({"ids": prompt + target, "answer_start": len(prompt),
                      "sequence_start": max(1, persona_tokens), "chars": len(example["answer"]) + 1})
    return built, skipped


def score(model, built, batch_size, device, pad_id=0, progress=True):
    """Per-row sums of NLL (nats) over the answer span (the same computation as perplexity.py)."""
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
                a0 = built[i]["answer_start"]
                results[i] = {"nll": float(nll[row, a0 - 1:length - 1].double().sum()),
                              "tokens": length - a0, "chars": built[i]["chars"]}
    return results


# ---------------------------------------------------------------- running the models
def generate_reply(model, tokenizer, ids, generation_config, settings, device):
    """One greedy reply at batch size one: (text, ended_with_eos, ms, new tokens without EOS)."""
    import torch

    started = time.perf_counter()
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=generation_config)
    if device == "cuda":
        torch.cuda.synchronize()
    new = output[0, len(ids):].tolist()
    ended = tokenizer.eos_token_id in new
    if ended:
        new = new[:new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    # As the chat shows it: an echoed answer label dropped, and a model that goes on to write the
    # next turn itself (instead of ending) cut at that label.
    text = LEADING_LABELS.sub("", text)
    label = LABEL_PATTERN.search(text)
    if label:
        text = text[:label.start()]
    text = " ".join(text.replace("\ufffd", "").split())  # a cut multi-byte piece is noise, not a word
    ms = (time.perf_counter() - started) * 1000
    return text, ended, ms, len(new)


def run_transformers(folder, examples, probe, options):
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = options["device"]
    model, tokenizer, weights_dir, settings = load_model(folder, device)
    if options.get("max_turns"):
        settings["max_turns"] = options["max_turns"]
    max_new = options["max_new_tokens"]
    budget = min(settings["context_tokens"], settings["n_positions"] - max_new)
    if budget < 2:
        raise UserError(f"{folder}: --max-new-tokens {max_new} leaves no room for a prompt in "
                        f"{settings['n_positions']} positions")
    kit_generation = settings["generation"]
    # Greedy, but with the bot's own deterministic guards against loops (chat_config.json).
    generation_config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, num_beams=1,
        repetition_penalty=float(kit_generation.get("repetition_penalty", 1.0)),
        no_repeat_ngram_size=int(kit_generation.get("no_repeat_ngram_size", 0)),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    torch.manual_seed(options["seed"])
    random.seed(options["seed"])

    prompts = [prompt_ids(tokenizer, e["turns"], settings, budget)[0] for e in examples]
    generate_reply(model, tokenizer, prompts[0], generation_config, settings, device)  # warm-up, not timed
    records = []
    for example, ids in zip(tqdm(examples, desc=f"{Path(folder).name} replies", disable=not options["progress"]),
                            prompts):
        reply, ended, ms, n_tokens = generate_reply(model, tokenizer, ids, generation_config, settings, device)
        records.append({"reply": reply, "reference": example["answer"], "ended_with_eos": ended, "ms": ms,
                        "reply_tokens": n_tokens})
    built, _ = build_scoring_examples(tokenizer, examples, settings)
    kept = [b for b in built if b is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = iter(score(model, kept, options["batch_size"], device, pad_id, options["progress"]))
    for record, b in zip(records, built):
        s = next(scores) if b is not None else {"nll": None, "tokens": None, "chars": None}
        record.update(reference_nll=s["nll"], reference_tokens=s["tokens"], reference_chars=s["chars"])
    probe_replies = [generate_reply(model, tokenizer, prompt_ids(tokenizer, item["turns"], settings, budget)[0],
                                    generation_config, settings, device)[0] for item in probe]
    info = {"weights": str(weights_dir), "persona": bool(settings["persona"]), "max_turns": settings["max_turns"],
            "tokens": "model BPE tokens", "decoding": "greedy (chat_config repetition_penalty, "
                                                      "no_repeat_ngram_size kept)"}
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


def markdown_table(result):
    settings = result["settings"]
    header = "| model | kind | " + " | ".join(title for _, title, _, _ in COLUMNS) + " | status |"
    lines = [
        "# Comparison of the kit's models",
        "",
        f"Data: `{settings['data']}`, {settings['rows']} rows, seed {settings['seed']}, greedy decoding at "
        f"batch size one, at most {settings['max_new_tokens']} new tokens, device {settings['device']}. "
        f"Memory probe: `{settings['probe']}`, {settings['probe_dialogues']} dialogues.",
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 3),
    ]
    for row in result["models"]:
        cells = [fmt(row.get(key), pattern) for key, _, pattern, _ in COLUMNS]
        status = "ok" if row["status"] == "ok" else "error: " + row["error"].replace("|", "\\|")
        lines.append(f"| {row['model']} | {row['kind'] or '—'} | " + " | ".join(cells) + f" | {status} |")
    research = result["research"]
    cells = []
    for key, _, pattern, _ in COLUMNS:
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
        "chat_config repetition_penalty and no_repeat_ngram_size; LSTM replies are plain greedy.",
        "",
        "The memory probe counts a reply as a hit if it names the fact given two or more turns earlier "
        "(stem match, case-insensitive). Each model gets the conversation as its chat would: "
        "transformers the persona and the newest turns that fit the prompt budget (as system_prompt.py "
        "builds it), LSTMs the turns joined and cut to their last max_len tokens.",
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
    return "\n".join(lines)


def plot_chart(result, path):
    """A grid of bar charts, one per metric, one bar per model; the research's figures hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in result["models"] if row["status"] == "ok"]
    titles = {key: (title, better) for key, title, _, better in COLUMNS}
    research = result["research"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
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
    plt.close(fig)


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
    return {
        "settings": {"data": options["data"], "rows": len(examples), "seed": options["seed"],
                     "device": options["device"], "max_new_tokens": options["max_new_tokens"],
                     "probe": options["probe"], "probe_dialogues": len(probe),
                     "bleu": f"nltk corpus_bleu, 4-gram, SmoothingFunction().{BLEU_SMOOTHING}",
                     "word_tokeniser": WORD_PATTERN.pattern + " on lower-cased text"},
        "models": rows,
        "research": RESEARCH,
        "probe_by_distance": {str(k): v for k, v in by_distance.items()},
    }


# ---------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description="Evaluate model folders of the kit on the same test "
                                                 "questions and write one comparison table.")
    parser.add_argument("--model", nargs="+", required=True, help="model folders (LSTM or transformers)")
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder of the splits (default: %(default)s)")
    parser.add_argument("--split", default=SPLIT, help="split to read (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=ROWS, help="test rows, 0 = all (default: %(default)s)")
    parser.add_argument("--probe", default=PROBE_FILE, help="memory probe JSONL (default: %(default)s)")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder of the reports (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default=DEVICE, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--max-turns", type=int, default=None,
                        help="keep at most this many turns before the answer, question included (default: all "
                             "that fit, as the chat does)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch of the perplexity scoring")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.rows < 0 or args.batch_size < 1 or args.max_new_tokens < 1 or (args.max_turns or 1) < 1:
        parser.error("--rows must be >= 0; --batch-size, --max-new-tokens and --max-turns >= 1")
    return args


def main(argv=None, scripts=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        examples, data_path = load_split(args.data_dir, args.split, args.rows, args.seed)
        probe = load_probe(args.probe)
    except UserError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    options = {"device": device, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
               "max_turns": args.max_turns, "batch_size": args.batch_size, "progress": not args.quiet,
               "scripts": scripts or LSTM_SCRIPTS, "data": str(data_path), "probe": str(args.probe)}
    result = compare(args.model, examples, probe, options)
    failed = [row for row in result["models"] if row["status"] != "ok"]
    if len(failed) == len(result["models"]):
        print("evaluate.py: error: no model could be evaluated; reports left as they were", file=sys.stderr)
        return 1
    paths = write_reports(result, args.output)
    print("\n".join(line for line in markdown_table(result).splitlines() if line.startswith("|")))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
