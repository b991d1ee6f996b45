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
