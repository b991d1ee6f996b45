"""Learning from ratings: create_dataset.py --feedback (the bot's ratings table as feedback_{train,val}.parquet)
and train_transformer.py --feedback (TRL's KTO and DPO from a model folder): the rows exported, the split by
chat and user, the model filter, the pair rule, the ids TRL trains on against the prompt rule's, the saved
tokenizer byte for byte, a KTO run that moves the liked share, a DPO run on pairs, and the one-line errors."""
import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import create_dataset as cd
import train_transformer as tt
from test_train_transformer import PAIRS, TINY, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

PERSONA = tt.PERSONA


def make_db(path, rows):
    """A bot database holding `rows` (dicts of ratings columns; the rest filled in) in the bot's schema."""
    db = cd.open_ratings(sqlite3.connect(path))
    for i, row in enumerate(rows):
        full = {"chat_id": 1, "user_id": 1, "message_id": i + 1, "prompt_ids": "[]", "prompt_tokens": 0,
                "label": None, "replaces": None, "model": "bot_model", "model_hash": "h1", "created": 1000.0 + i,
                "rated": None, **row}
        db.execute(f"INSERT INTO ratings ({', '.join(full)}) VALUES ({', '.join('?' * len(full))})",
                   list(full.values()))
    db.commit()
    db.close()
    return path


def read_split(folder, split):
    return pq.read_table(Path(folder) / f"feedback_{split}.parquet").to_pylist()


# ---------------------------------------------------------------- the export

def test_export_keeps_one_models_ratings_split_by_chat_and_user_stripped_and_shuffled(tmp_path, capsys):
    rows = []
    for user in range(40):  # 40 conversations of 3 rated replies; the newest model's
        for k in range(3):
            rows.append({"chat_id": 100 + user % 7, "user_id": user, "prompt": f"Вопрос: вопрос {user} {k}\nОтвет:",
                         "reply": f"ответ {user} {k}</s><pad>", "label": cd.LIKED if k else cd.DISLIKED,
                         "model": "new", "model_hash": "h2", "created": 2000.0 + len(rows)})
    rows.append({"prompt": "Вопрос: старое\nОтвет:", "reply": "старый ответ", "label": cd.LIKED,
                 "model": "old", "model_hash": "h1", "created": 10.0})
    rows.append({"prompt": "Вопрос: пусто\nОтвет:", "reply": "<|endoftext|> </s>", "label": cd.LIKED,
                 "model": "new", "model_hash": "h2", "created": 5000.0})
    db = make_db(tmp_path / "bot.sqlite3", rows)
    assert cd.main(["--feedback", str(db), "--output", str(tmp_path / "data"), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    train, val = read_split(tmp_path / "data", "train"), read_split(tmp_path / "data", "val")
    assert len(train) + len(val) == 120 and train and val
    assert all(r["model_hash"] == "h2" for r in train + val)  # the old model's rating stays out
    assert not any("</s>" in r["completion"] or "<pad>" in r["completion"] for r in train + val)
    assert all(r["completion"].startswith(" ответ") and r["prompt"].endswith("Ответ:") for r in train + val)
    by_id = {row_id: row for row_id, row in enumerate(rows, 1)}
    keys = {split: {(by_id[r["rating_id"]]["chat_id"], by_id[r["rating_id"]]["user_id"]) for r in part}
            for split, part in (("train", train), ("val", val))}
    assert not keys["train"] & keys["val"]
    ids = [r["rating_id"] for r in train]
    assert ids != sorted(ids)  # shuffled
    liked = sum(r["label"] for r in train)
    assert f"train  {liked:>8d} {len(train) - liked:>8d}" in out.replace("👍", "").replace("👎", "") or \
        f"{liked:>8d} {len(train) - liked:>8d}" in out
    assert "new (h2)" in out and "--feedback-model any" in out
    # the same seed, the same files; 'any' takes the old model's row too
    assert cd.main(["--feedback", str(db), "--output", str(tmp_path / "all"), "--feedback-model", "any"]) == 0
    everyone = read_split(tmp_path / "all", "train") + read_split(tmp_path / "all", "val")
    assert {r["model_hash"] for r in everyone} == {"h1", "h2"} and len(everyone) == 121
    assert cd.main(["--feedback", str(db), "--output", str(tmp_path / "old"), "--feedback-model", "old"]) == 0
    old = read_split(tmp_path / "old", "train") + read_split(tmp_path / "old", "val")
    assert [r["completion"] for r in old] == [" старый ответ"]


@pytest.mark.parametrize("older, newer, chosen", [
    (None, None, "newer"), (cd.DISLIKED, None, "newer"), (None, cd.LIKED, "newer"),
    (cd.DISLIKED, cd.LIKED, "newer"), (None, cd.DISLIKED, "older"), (cd.LIKED, cd.DISLIKED, "older"),
    (cd.LIKED, None, "older"), (cd.LIKED, cd.LIKED, None), (cd.DISLIKED, cd.DISLIKED, None),
])
def test_a_replaced_reply_and_its_replacement_make_a_pair_by_the_rule(older, newer, chosen):
    rows = [{"id": 1, "prompt": "p", "label": older, "replaces": None},
            {"id": 2, "prompt": "p", "label": newer, "replaces": 1}]
    pairs = cd.preference_pairs(rows)
    if chosen is None:
        assert pairs == []
    else:
        assert [(c["id"], r["id"]) for c, r in pairs] == [(2, 1) if chosen == "newer" else (1, 2)]


def test_export_writes_pairs_with_chosen_and_rejected(tmp_path):
    rows = [{"prompt": "Вопрос: а?\nОтвет:", "reply": "первый", "label": None},
            {"prompt": "Вопрос: а?\nОтвет:", "reply": "второй", "label": cd.DISLIKED, "replaces": 1},
            {"prompt": "Вопрос: б?\nОтвет:", "reply": "третий", "label": cd.LIKED}]
    db = make_db(tmp_path / "bot.sqlite3", rows)
    assert cd.main(["--feedback", str(db), "--output", str(tmp_path), "--val-fraction", "0"]) == 0
    train = read_split(tmp_path, "train")
    pairs = [r for r in train if r["chosen"] is not None]
    assert [(p["chosen"], p["rejected"], p["completion"], p["label"]) for p in pairs] == \
        [(" первый", " второй", None, None)]
    assert sorted((r["completion"], r["label"]) for r in train if r["completion"]) == \
        [(" второй", False), (" третий", True)]


@pytest.mark.parametrize("setup, message", [
    ("missing", "database not found"),
    ("text", "not an SQLite database"),
    ("no table", "no ratings table"),
    ("unrated", "no rated replies"),
])
def test_export_errors_are_one_line(tmp_path, capsys, setup, message):
    db = tmp_path / "bot.sqlite3"
    if setup == "text":
        db.write_text("это не база данных, а просто текст\n" * 50, encoding="utf-8")
    elif setup == "no table":
        sqlite3.connect(db).execute("CREATE TABLE turns (x)").connection.close()
    elif setup == "unrated":
        make_db(db, [{"prompt": "Вопрос: а\nОтвет:", "reply": "б"}])
    assert cd.main(["--feedback", str(db), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "feedback_train.parquet").exists()


# ---------------------------------------------------------------- training from the ratings

@pytest.fixture(scope="module")
def kit_folder(tmp_path_factory):
    """A tiny model trained by train_transformer.py on PAIRS: a folder as the bot serves it, whose
    tokenizer the kit saved (split_special_tokens: a typed "</s>" is text)."""
    work = tmp_path_factory.mktemp("kit")
    data = write_pairs(work / "data", PAIRS)
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(work / "model"), "--max-steps", "80",
                           "--eval-steps", "80", "--batch-size", "20", "--lr", "3e-3"]) == 0
    return work / "model"


def served_prompt(tokenizer, question):
    return tt.prompt_text([question], PERSONA)


def rated_db(path, folder, with_pairs=False):
    """Ratings a synthetic rater gave: 👍 for a reply that asks back (ends with "?"), 👎 for one that does
    not; each conversation its own (chat, user). Replies are the trained answers, and the same with "?"."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for i, (question, answer) in enumerate(PAIRS):
        prompt = served_prompt(tokenizer, question)
        ids = json.dumps(tt.encode_text(tokenizer, prompt))
        asked = answer.rstrip(".!") + "?"
        common = {"chat_id": i, "user_id": 1000 + i, "prompt": prompt, "prompt_ids": ids, "model": folder.name}
        rows.append({**common, "reply": answer, "label": cd.DISLIKED})
        rows.append({**common, "reply": asked, "label": cd.LIKED if not with_pairs else None,
                     **({"replaces": len(rows)} if with_pairs else {})})
    rows.append({"chat_id": 99, "user_id": 99, "prompt": served_prompt(tokenizer, "Напиши </s> пожалуйста"),
                 "prompt_ids": json.dumps(tt.encode_text(tokenizer, served_prompt(tokenizer, "Напиши </s> пожалуйста"))),
                 "reply": "Пишу?", "label": cd.LIKED, "model": folder.name})
    return make_db(path, rows)


def export(tmp_path, db, val_fraction="0.3"):
    data = tmp_path / "data"
    assert cd.main(["--feedback", str(db), "--output", str(data), "--feedback-model", "any", "--val-fraction",
                    val_fraction, "--seed", "1"]) == 0
    return data


def test_trl_trains_on_the_prompt_rule_ids_and_the_new_folder_keeps_the_tokenizer(kit_folder, tmp_path, capsys):
    from transformers import AutoTokenizer

    data = export(tmp_path, rated_db(tmp_path / "bot.sqlite3", kit_folder))
    out = tmp_path / "tuned"
    args = tt.parse_args(["--feedback", str(data / "feedback_train.parquet"), "--model", str(kit_folder),
                          "--output", str(out), "--device", "cpu", "--max-steps", "1", "--batch-size", "4"])
    trainer = tt.run_feedback(args)
    tokenizer = AutoTokenizer.from_pretrained(kit_folder)
    assert tokenizer.split_special_tokens  # the pitfall is there: the kit's tokenizer reads "</s>" as text
    rows = read_split(data, "train")
    by_prompt = {(r["prompt"], r["completion"]): r for r in rows}
    seen = 0
    for row in trainer.train_dataset:
        prompt = tokenizer.decode(row["prompt_ids"])
        match = [r for (p, c), r in by_prompt.items() if p == prompt]
        assert match, prompt
        want = {tuple(tt.encode_text(tokenizer, r["prompt"]) + tt.answer_ids(tokenizer, r["completion"]))
                for r in match}
        got = tuple(row["prompt_ids"] + row["completion_ids"])
        assert got in want
        assert row["completion_ids"][-1] == tokenizer.eos_token_id
        assert row["completion_ids"].count(tokenizer.eos_token_id) == 1
        assert list(row["prompt_ids"]) in [r["prompt_ids"] for r in match]  # the ids the bot served
        seen += 1
    assert seen == len(trainer.train_dataset) > 0
    # TRL's own path with the kit's tokenizer would have trained on "</s>" spelt out, never on the EOS id
    naive = tt.trl_exchange_ids(tokenizer, rows[0]["prompt"], rows[0]["completion"])
    assert naive[1][-1] != tokenizer.eos_token_id
    # a prompt holding a typed "</s>" is left out: TRL's text path would read it as the EOS id
    typed = tt.prompt_text(["Напиши </s> пожалуйста"], PERSONA)
    kept, dropped = tt.feedback_examples(tokenizer, tt.trl_tokenizer(kit_folder),
                                         [{"prompt": typed, "completion": " Пишу", "label": True}], "kto", 256)
    assert kept == [] and dropped["tokenized differently"] == 1
    for path in Path(kit_folder).iterdir():
        if path.is_file() and not tt.MODEL_FILE_RE.match(path.name) and path.name not in tt.FEEDBACK_KEEP:
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert (out / "tokenizer.json").is_file()
    source_config = json.loads((kit_folder / "chat_config.json").read_text(encoding="utf-8"))
    new_config = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))
    record = new_config.pop("feedback")
    assert new_config == source_config
    assert record["loss"] == "kto" and record["rows"] == len(trainer.train_dataset)


def test_kto_moves_the_liked_share_and_dpo_trains_on_pairs(kit_folder, tmp_path, capsys):
    data = export(tmp_path, rated_db(tmp_path / "bot.sqlite3", kit_folder))
    out = tmp_path / "kto"
    assert tt.main(["--feedback", str(data / "feedback_train.parquet"), "--model", str(kit_folder), "--output",
                    str(out), "--device", "cpu", "--batch-size", "8", "--feedback-epochs", "6", "--lr", "1e-3",
                    "--logging-steps", "50"]) == 0
    record = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["feedback"]
    before, after = record["validation_before"], record["validation_after"]
    printed = capsys.readouterr().out
    assert "before, on" in printed and "after: liked share" in printed
    assert record["liked"] and record["disliked"] and \
        record["desirable_weight"] == pytest.approx(record["disliked"] / record["liked"])
    assert after["liked_share"] >= before["liked_share"] + 0.2, (before, after)

    pairs = export(tmp_path / "p", rated_db(tmp_path / "pairs.sqlite3", kit_folder, with_pairs=True), "0")
    out = tmp_path / "dpo"
    assert tt.main(["--feedback", str(pairs / "feedback_train.parquet"), "--model", str(kit_folder), "--output",
                    str(out), "--device", "cpu", "--batch-size", "8", "--feedback-loss", "dpo",
                    "--feedback-epochs", "4", "--lr", "1e-3"]) == 0
    record = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["feedback"]
    assert record["loss"] == "dpo" and record["rows"] == len(PAIRS)
    # the chosen replies (asking back) got likelier against the rejected ones on the pairs it learnt from
    rows = [r for r in read_split(pairs, "train") if r["chosen"]]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(kit_folder)

    def margin(folder):
        model = AutoModelForCausalLM.from_pretrained(folder)
        scored = [dict(r, completion=r[key], label=key == "chosen") for r in rows for key in ("chosen", "rejected")]
        return tt.feedback_figures(model, tokenizer, scored, "cpu")["liked_share"]

    assert margin(out) >= margin(kit_folder) + 0.2


@pytest.mark.parametrize("case, message", [
    ("same folder", "the folder the bot may be serving"),
    ("one label", "KTO needs both"),
    ("no pairs", "no usable pairs"),
    ("missing", "feedback file not found"),
])
def test_feedback_training_errors_are_one_line(kit_folder, tmp_path, capsys, case, message):
    db = make_db(tmp_path / "bot.sqlite3", [{"prompt": "Вопрос: а\nОтвет:", "reply": "б", "label": cd.LIKED}])
    data = export(tmp_path, db, "0")
    capsys.readouterr()
    flags = ["--feedback", str(data / "feedback_train.parquet"), "--model", str(kit_folder), "--device", "cpu",
             "--output", str(tmp_path / "new")]
    if case == "same folder":
        flags[-1] = str(kit_folder)
    elif case == "no pairs":
        flags += ["--feedback-loss", "dpo"]
    elif case == "missing":
        flags[1] = str(tmp_path / "nothing.parquet")
    assert tt.main(flags) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "new" / "config.json").exists()


def test_lora_feedback_run_with_checkpointing_merges_into_a_plain_folder_with_the_same_tokenizer(kit_folder, tmp_path):
    from safetensors.torch import load_file

    data = export(tmp_path, rated_db(tmp_path / "bot.sqlite3", kit_folder))
    out = tmp_path / "lora"
    assert tt.main(["--feedback", str(data / "feedback_train.parquet"), "--model", str(kit_folder), "--output",
                    str(out), "--device", "cpu", "--batch-size", "4", "--max-steps", "3", "--lora",
                    "--gradient-checkpointing", "--lr", "1e-2"]) == 0
    before, after = load_file(kit_folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()  # merged: no adapter weights left
    assert any(not (before[k] == after[k]).all() for k in before)
    assert (out / "tokenizer.json").read_bytes() == (kit_folder / "tokenizer.json").read_bytes()
    assert json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["feedback"]["lora"] is True


def test_the_context_trainer_takes_the_same_feedback_flags(kit_folder, tmp_path):
    import train_medium_context as tm

    data = export(tmp_path, rated_db(tmp_path / "bot.sqlite3", kit_folder))
    out = tmp_path / "medium"
    assert tm.main(["--feedback", str(data / "feedback_train.parquet"), "--model", str(kit_folder), "--output",
                    str(out), "--device", "cpu", "--batch-size", "4", "--max-steps", "2"]) == 0
    record = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["feedback"]
    assert record["loss"] == "kto" and record["learning_rate"] == tm.FEEDBACK_LR
    assert (out / "tokenizer.json").read_bytes() == (kit_folder / "tokenizer.json").read_bytes()
