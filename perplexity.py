"""Perplexity of a transformers chat model on the held-out test split.

Reads a model folder of the kit (or any of its checkpoint-N/ folders) and scores
each test row as training encoded it and as the chat shows it, by the kit's one
prompt rule (the same code in the trainers, system_prompt.py and tg_bot.py): the
chat_config persona, the row's facts exchange ("Что ты обо мне знаешь?", from
the split's facts column) where the model was trained with it (chat_config.json
"facts": true), then the newest context turns within the turn window and the
token budget the model was trained with (chat_config.json max_turns and
context_tokens; --max-turns / --context-tokens change them, with a warning where
the model was not trained on that), ending at "Ответ:". The reference answer
(its first word with its space) and EOS are scored under teacher forcing, from
the token ids a training example of that row has. The rows come from
context_<split>.parquet, or pairs_<split>.csv when it is absent (the question
alone). --no-persona leaves the persona out. Three figures come out, all
weighted by tokens (the total negative log-likelihood over the total count, never
a mean of per-row or per-batch means), so that the answer figure on the
validation split is the one the trainers print at the end:

  answer perplexity   - over the answer tokens and EOS only: what a chatbot is
                        judged on, given the prompt it will really see;
  sequence perplexity - over the whole dialogue text (labels, context turns,
                        answer, EOS), the persona excluded;
  bits per character  - answer NLL / ln 2 / characters of the answers (+1 each
                        for the end): unlike perplexity per token it compares
                        models with different tokenizers, LSTMs included.

A folder trained by an older kit (no "prompt_rule" in chat_config.json) is
scored all the same, with a warning: its prompts had a space after "Ответ:".

Run it:
  python perplexity.py --model rugpt3_50k                       # CPU or GPU, whichever is there
  python perplexity.py --model rugpt3_medium_CLEAN_model --device cuda --batch-size 16 --rows 0
  python perplexity.py --model rugpt3_50k/checkpoint-500 --rows 500
  python perplexity.py --model rugpt3_50k --split val --rows 0  # the trainer's closing figure

Writes reports/perplexity_<model>.json and .md, and prints the figures with a
one-line reading.

In a notebook (Jupyter, Colab): paste this whole file into one cell, set MODEL
and the rest in the defaults block below, and run the cell. `%run perplexity.py
--model rugpt3_50k` and `!python perplexity.py --model rugpt3_50k` take flags
as above.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import unicodedata
from pathlib import Path

# ---------------------------------------------------------------- defaults
MODEL = "rugpt3_50k"   # model folder or checkpoint-N/ folder
DATA_DIR = "data"
SPLIT = "test"
OUTPUT_DIR = "reports"
ROWS = 2000            # 0 or None = the whole split; otherwise a seeded sample of this many rows
BATCH_SIZE = 8
DEVICE = "auto"        # "auto", "cpu" or "cuda"
SEED = 0
NO_PERSONA = False     # True: leave the chat_config persona out of prompts
MAX_TURNS = None       # turns in a prompt, the question included (None: chat_config.json's, as trained)
CONTEXT_TOKENS = None  # prompt budget in tokens (None: chat_config.json's, as trained)

DEVICES = ["auto", "cpu", "cuda"]

# Where answer perplexity usually sits for a small Russian chat model; the
# reading is a rule of thumb, not a verdict.
READINGS = [
    (8.0, "suspiciously low: check that test dialogues did not leak into training"),
    (25.0, "good for conversational replies; watch validation loss for overfitting"),
    (60.0, "usable but still learning: keep training if validation loss is falling"),
    (200.0, "weak: keep training (more data or epochs)"),
    (math.inf, "far from a chat model: the weights are barely trained or the prompt format does not match"),
]


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


# ---------------------------------------------------------------- model folders
def resolve_weights(folder):
    """The folder itself if it holds weights, else its newest complete checkpoint-N/."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder")
    if (folder / "config.json").is_file() and "kit_model" in read_json(folder / "config.json"):
        raise UserError(f"{folder}: an LSTM folder of the kit; perplexity.py reads transformers folders "
                        f"(evaluate.py scores LSTMs)")
    weights = newest_weights(folder)
    if weights is None:
        raise UserError(f"{folder}: no model here (config.json + model.safetensors at the top level "
                        f"or in a checkpoint-N/ folder)")
    return weights


def model_name(folder):
    folder = Path(folder).resolve()
    if folder.name.startswith("checkpoint-") and folder.parent.name:
        return f"{folder.parent.name}-{folder.name}"
    return folder.name


# ---------------------------------------------------------------- data, prompts and scoring


# ---------------------------------------------------------------- figures
def summarise(results):
    answer_nll = sum(r["answer_nll"] for r in results)
    answer_tokens = sum(r["answer_tokens"] for r in results)
    sequence_nll = sum(r["sequence_nll"] for r in results)
    sequence_tokens = sum(r["sequence_tokens"] for r in results)
    chars = sum(r["chars"] for r in results)
    return {
        "answer_perplexity": math.exp(answer_nll / answer_tokens) if answer_tokens else None,
        "answer_nll_per_token": answer_nll / answer_tokens if answer_tokens else None,
        "answer_tokens": answer_tokens,
        "bits_per_char": answer_nll / math.log(2) / chars if chars else None,
        "answer_chars": chars,
        "sequence_perplexity": math.exp(sequence_nll / sequence_tokens) if sequence_tokens else None,
        "sequence_nll_per_token": sequence_nll / sequence_tokens if sequence_tokens else None,
        "sequence_tokens": sequence_tokens,
    }


def reading(answer_perplexity):
    return next(text for limit, text in READINGS if answer_perplexity < limit)


def evaluate_perplexity(folder, data_dir=DATA_DIR, split=SPLIT, rows=ROWS, batch_size=BATCH_SIZE,
                        device="cpu", seed=SEED, use_persona=True, progress=True, max_turns=None,
                        context_tokens=None, warn=None):
    examples, data_path = load_split(data_dir, split, rows, seed)
    model, tokenizer, weights_dir, settings = load_model(folder, device, max_turns, context_tokens)
    for note in settings["warnings"] + [facts_column_note(settings, examples, data_path)]:
        if note:
            (warn or (lambda line: None))(note)
    if not use_persona:
        settings["persona"] = None
    built, skipped = build_scoring_examples(tokenizer, examples, settings)
    built = [b for b in built if b is not None]
    if not built:
        raise UserError(f"{data_path}: no row fits the model's {settings['n_positions']}-token window")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    figures = summarise(score(model, built, batch_size, device, pad_id, progress))
    return {
        "model": model_name(folder),
        "folder": str(folder),
        "weights": str(weights_dir),
        "data": str(data_path),
        "rows_scored": len(built),
        "rows_skipped_too_long": skipped,
        "seed": seed,
        "persona": bool(settings["persona"]),
        "rows_with_facts": sum(b["facts"] for b in built),
        "max_turns": settings["max_turns"],
        "context_tokens": settings["context_tokens"],
        "chat_config_found": settings["has_chat_config"],
        **figures,
        "reading": reading(figures["answer_perplexity"]),
    }


# ---------------------------------------------------------------- reports
def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown_report(report):
    return "\n".join([
        f"# Perplexity of {report['model']}",
        "",
        f"Weights: `{report['weights']}`; data: `{report['data']}`, {report['rows_scored']} rows "
        f"({report['rows_skipped_too_long']} skipped as too long), seed {report['seed']}, "
        f"persona {'on' if report['persona'] else 'off'}"
        + (f", the facts exchange in {report['rows_with_facts']} prompts." if report["rows_with_facts"] else "."),
        "",
        "| figure | value | tokens / chars |",
        "|---|---|---|",
        f"| answer perplexity (answer + EOS) | {report['answer_perplexity']:.2f} | {report['answer_tokens']} tokens |",
        f"| sequence perplexity (dialogue, persona excluded) | {report['sequence_perplexity']:.2f} "
        f"| {report['sequence_tokens']} tokens |",
        f"| bits per character (answers) | {report['bits_per_char']:.3f} | {report['answer_chars']} chars |",
        "",
        "All figures are weighted by tokens: total negative log-likelihood over the total count.",
        "Bits per character compare across tokenizers; perplexity per token does not.",
        "",
        f"Reading: {report['reading']}.",
        "",
    ])


def write_reports(report, output_dir):
    stem = re.sub(r"[^\w.-]+", "_", report["model"])
    json_path = Path(output_dir) / f"perplexity_{stem}.json"
    md_path = Path(output_dir) / f"perplexity_{stem}.md"
    atomic_write_text(json_path, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(md_path, markdown_report(report))
    return json_path, md_path


# ---------------------------------------------------------------- main
def parse_args(argv):
    # prog: in a notebook cell argparse would name the kernel (ipykernel_launcher.py) in its messages.
    parser = argparse.ArgumentParser(prog="perplexity.py", description="Token-weighted perplexity of a "
                                                                       "transformers model folder on the test split.")
    parser.add_argument("--model", default=MODEL, help="model folder or checkpoint-N/ folder (default: %(default)s)")
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder of the splits (default: %(default)s)")
    parser.add_argument("--split", default=SPLIT, help="split to read (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows to score, 0 = all (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--device", default=DEVICE, choices=DEVICES)
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the row sample")
    parser.add_argument("--no-persona", action="store_true", default=NO_PERSONA,
                        help="leave the chat_config persona out of prompts")
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS,
                        help="turns in a prompt, the question included (default: chat_config.json, what the "
                             "model was trained with)")
    parser.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS,
                        help="prompt budget in tokens (default: chat_config.json, what the model was trained with)")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder of the reports (default: %(default)s)")
    args = parser.parse_args(argv)
    if (args.rows or 0) < 0 or args.batch_size < 1 \
            or any(value is not None and value < 1 for value in (args.max_turns, args.context_tokens)):
        parser.error("--rows must be >= 0; --batch-size, --max-turns and --context-tokens >= 1")
    if args.device not in DEVICES:  # argparse checks choices on the command line only, never DEVICE in the block
        parser.error(f"--device {args.device!r}: must be one of {', '.join(DEVICES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        report = evaluate_perplexity(args.model, args.data_dir, args.split, args.rows, args.batch_size,
                                     device, args.seed, use_persona=not args.no_persona, max_turns=args.max_turns,
                                     context_tokens=args.context_tokens,
                                     warn=lambda line: print(f"perplexity.py: warning: {line}", file=sys.stderr))
    except UserError as exc:
        print(f"perplexity.py: error: {exc}", file=sys.stderr)
        return 1
    json_path, md_path = write_reports(report, args.output)
    print(f"{report['model']}: answer perplexity {report['answer_perplexity']:.2f} "
          f"({report['answer_tokens']} tokens), sequence perplexity {report['sequence_perplexity']:.2f}, "
          f"{report['bits_per_char']:.3f} bits/char over {report['rows_scored']} rows")
    print(f"reading: {report['reading']}")
    print(f"wrote {json_path} and {md_path}")
    return 0


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


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
