"""Perplexity of a transformers chat model on the held-out test split.

Reads a model folder of the kit (or any of its checkpoint-N/ folders), builds
each test row into the prompt the chat would give the model (system_prompt.py:
the chat_config persona + the newest context turns that fit the budget +
"Ответ: "), and scores the reference answer plus EOS under teacher forcing.
The trainers' validation loss is measured without the persona; --no-persona
gives that setting here (from context_<split>.parquet, or pairs_<split>.csv
when it is absent). Three figures come out, all weighted by tokens (the total
negative log-likelihood over the total count, never a mean of per-row means):

  answer perplexity   - over the answer tokens and EOS only: what a chatbot is
                        judged on, given the prompt it will really see;
  sequence perplexity - over the whole dialogue text (labels, context turns,
                        answer, EOS), the persona excluded;
  bits per character  - answer NLL / ln 2 / characters of the answers (+1 each
                        for the end): unlike perplexity per token it compares
                        models with different tokenizers, LSTMs included.

Run it:
  python perplexity.py --model rugpt3_50k                       # CPU or GPU, whichever is there
  python perplexity.py --model rugpt3_medium_CLEAN_model --device cuda --batch-size 16 --rows 0
  python perplexity.py --model rugpt3_50k/checkpoint-500 --rows 500

Writes reports/perplexity_<model>.json and .md, and prints the figures with a
one-line reading.
"""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

# ---------------------------------------------------------------- defaults
DATA_DIR = "data"
SPLIT = "test"
OUTPUT_DIR = "reports"
ROWS = 2000            # 0 = the whole split; otherwise a seeded sample of this many rows
BATCH_SIZE = 8
DEVICE = "auto"
SEED = 0

# The prompt format of the kit (DESIGN.md); every script spells it out.
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
DEFAULT_MAX_NEW_TOKENS = 64
LABEL_PATTERN = re.compile(r"(?i)\b(вопрос|ответ)\s*:")

CONTEXT_COLUMNS = ("dialogue_id", "context", "answer")
PAIRS_COLUMNS = ("dialogue_id", "question", "answer")

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
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder")
    if (folder / "config.json").is_file() and "kit_model" in read_json(folder / "config.json"):
        raise UserError(f"{folder}: an LSTM folder of the kit; perplexity.py reads transformers folders "
                        f"(evaluate.py scores LSTMs)")
    if has_weights(folder):
        return folder
    checkpoints = [p for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit() and has_weights(p)
                   and (p / "trainer_state.json").is_file()]  # written last by Trainer
    if not checkpoints:
        raise UserError(f"{folder}: no model here (config.json + model.safetensors at the top level "
                        f"or in a checkpoint-N/ folder)")
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]))


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


def model_name(folder):
    folder = Path(folder).resolve()
    if folder.name.startswith("checkpoint-") and folder.parent.name:
        return f"{folder.parent.name}-{folder.name}"
    return folder.name


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
    chat = read_chat_config(folder, weights_dir) or {}
    n_positions = (getattr(model.config, "max_position_embeddings", None)
                   or getattr(model.config, "n_positions", None) or 1024)
    max_new = int((chat.get("generation") or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    settings = {
        "question_label": chat.get("question_label", QUESTION_LABEL),
        "answer_label": chat.get("answer_label", ANSWER_LABEL),
        "turn_separator": chat.get("turn_separator", TURN_SEPARATOR),
        "persona": chat.get("persona"),
        "context_tokens": int(chat.get("context_tokens") or n_positions - max_new),
        "max_turns": None,  # like the chat: the budget alone decides how many turns fit
        "n_positions": int(n_positions),
        "has_chat_config": bool(chat),
    }
    return model, tokenizer, weights_dir, settings


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
        import random

        picked = sorted(random.Random(seed).sample(range(len(examples)), rows))
        examples = [examples[i] for i in picked]
    return examples, path


# ---------------------------------------------------------------- prompts
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
            continue
        prompt, persona_tokens = prompt_ids(tokenizer, example["turns"], settings, budget)
        built.append({"ids": prompt + target, "answer_start": len(prompt),
                      "sequence_start": max(1, persona_tokens), "chars": len(example["answer"]) + 1})
    return built, skipped


# ---------------------------------------------------------------- scoring
def score(model, built, batch_size, device, pad_id=0, progress=True):
    """Per-row sums of NLL (nats) over the answer span and over the sequence span.

    The batch is right-padded; each target token is scored from the logits one
    position earlier, so padding never enters a sum."""
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
                        device="cpu", seed=SEED, use_persona=True, progress=True):
    examples, data_path = load_split(data_dir, split, rows, seed)
    model, tokenizer, weights_dir, settings = load_model(folder, device)
    if not use_persona:
        settings["persona"] = None
    built, skipped = build_scoring_examples(tokenizer, examples, settings)
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
        f"persona {'on' if report['persona'] else 'off'}.",
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
    parser = argparse.ArgumentParser(description="Token-weighted perplexity of a transformers model "
                                                 "folder on the test split.")
    parser.add_argument("--model", required=True, help="model folder or checkpoint-N/ folder")
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder of the splits (default: %(default)s)")
    parser.add_argument("--split", default=SPLIT, help="split to read (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows to score, 0 = all (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--device", default=DEVICE, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the row sample")
    parser.add_argument("--no-persona", action="store_true", help="leave the chat_config persona out of prompts")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder of the reports (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rows < 0 or args.batch_size < 1:
        parser.error("--rows must be >= 0 and --batch-size >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        report = evaluate_perplexity(args.model, args.data_dir, args.split, args.rows, args.batch_size,
                                     device, args.seed, use_persona=not args.no_persona)
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


if __name__ == "__main__":
    sys.exit(main())
