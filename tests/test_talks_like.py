"""A bot that talks like you (issue 20): a Telegram account export through parser_dataset.py,
cleaner_text.py and create_dataset.py --as WHO keeps only that person's turns as answers, group
turns of the others carry their first name as tg_bot.py shows them, and a tiny model trained from
scratch on such data writes like the person, where one trained on everyone's turns does not."""
import csv
import inspect
import json
import random
import re
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cleaner_text
import create_dataset as cd
import parser_dataset

FIXTURE = "tests/fixtures/telegram_account_owner.json"


def run_pipeline(export, folder):
    """parser_dataset.py and cleaner_text.py on a Telegram export; the clean parquet."""
    raw, clean = folder / "raw.parquet", folder / "clean.parquet"
    assert parser_dataset.main(["--input", str(export), "--output", str(raw)]) == 0
    assert cleaner_text.main(["--input", str(raw), "--output", str(clean),
                              "--report", str(folder / "clean_report.json")]) == 0
    return clean


def read_pairs(folder, split="train"):
    with open(folder / f"pairs_{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def all_rows(folder):
    """(pairs, context rows) of every split."""
    pairs, contexts = [], []
    for split in cd.SPLITS:
        pairs += read_pairs(folder, split)
        contexts += pq.read_table(folder / f"context_{split}.parquet").to_pylist()
    return pairs, contexts


def messages_by_sender(export):
    """{from_id: [message text, ...]} of a Telegram export, texts as the cleaner leaves them."""
    found = {}
    for chat in export["chats"]["list"]:
        for message in chat["messages"]:
            text = parser_dataset.flatten_telegram_text(message.get("text", ""))  # a string or a list of parts
            if text.strip():
                found.setdefault(message["from_id"], []).append(" ".join(text.split()))
    return found


def made_of(answer, texts):
    """Whether a turn is one or more of these messages (consecutive messages of one sender make one turn)."""
    rest = " ".join(answer.split())
    for text in sorted(texts, key=len, reverse=True):
        rest = rest.replace(text, " ")
    return not rest.strip()


@pytest.fixture(scope="module")
def account(tmp_path_factory):
    folder = tmp_path_factory.mktemp("account")
    with open(FIXTURE, encoding="utf-8") as f:
        export = json.load(f)
    return run_pipeline(FIXTURE, folder), messages_by_sender(export)


def make_dataset(clean, folder, *flags):
    return cd.main(["--input", str(clean), "--output", str(folder), "--val-fraction", "0.25",
                    "--test-fraction", "0.25", *flags])


@pytest.mark.parametrize("who, key", [("Вадим Петров", "user111"), ("user222", "user222"), ("Кирилл", "user333")])
def test_only_the_persons_turns_are_answers(account, tmp_path, capsys, who, key):
    clean, said = account
    out = tmp_path / "data"
    assert make_dataset(clean, out, "--as", who) == 0
    pairs, contexts = all_rows(out)
    assert pairs and len(pairs) == len(contexts)
    others = [text for sender, texts in said.items() if sender != key for text in texts]
    for pair, row in zip(pairs, contexts):
        assert pair["answer"] == row["answer"]
        assert made_of(row["answer"], said[key]), row["answer"]
        assert not made_of(row["answer"], others), row["answer"]
        assert pair["question"] == row["context"][-1]
    # every turn of theirs that follows another turn is there
    table = pq.read_table(clean).to_pylist()
    expected = sum(entry.split("|")[0] == key for d in table for entry in d["speakers"][1:])
    assert len(pairs) == expected
    voice = json.loads((out / "voice.json").read_text(encoding="utf-8"))
    assert voice["keys"] == [key]
    assert json.loads(pq.read_schema(out / "context_train.parquet").metadata[b"voice"]) == voice
    assert f"({key})" in capsys.readouterr().out


def test_as_me_names_the_exports_owner(account, tmp_path, capsys):
    clean, said = account
    out = tmp_path / "data"
    assert make_dataset(clean, out, "--as", "me") == 0
    assert json.loads((out / "voice.json").read_text(encoding="utf-8")) == \
        {"keys": ["user111"], "names": ["Вадим Петров"]}
    assert "voice: Вадим Петров (user111)" in capsys.readouterr().out
    pairs, _ = all_rows(out)
    assert all(made_of(p["answer"], said["user111"]) for p in pairs)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("create_dataset.py: error: ")
    return err[0]


def test_an_unknown_name_lists_the_speakers_with_their_turns(account, tmp_path, capsys):
    clean, _ = account
    assert make_dataset(clean, tmp_path / "data", "--as", "Маша") == 1
    line = one_line_error(capsys)
    assert "'Маша' matches no speaker" in line
    counts = {}
    for dialogue in pq.read_table(clean).to_pylist():
        for entry in dialogue["speakers"]:
            counts[entry] = counts.get(entry, 0) + 1
    for entry, count in counts.items():
        key, name = entry.split("|")
        assert f"{name} ({key}) {count} turns" in line
    assert not (tmp_path / "data" / "pairs_train.csv").exists()


def test_me_without_an_owner_record_and_a_shared_name_are_one_line(account, tmp_path, capsys):
    clean, _ = account
    table = pq.read_table(clean)
    bare = tmp_path / "bare.parquet"
    pq.write_table(table.replace_schema_metadata(None), bare)
    assert make_dataset(bare, tmp_path / "data", "--as", "me") == 1
    assert "--as me needs the owner record" in one_line_error(capsys)
    # two people with one display name: the name is not enough, their keys are
    twins = tmp_path / "twins.parquet"
    pq.write_table(pa.table({"dialogue_id": [1], "sample": [["Привет", "Здорово", "Как жизнь?"]],
                             "speakers": [["user1|Аня Иванова", "user2|Аня Иванова", "user1|Аня Иванова"]]}), twins)
    assert make_dataset(twins, tmp_path / "data", "--as", "Аня Иванова") == 1
    line = one_line_error(capsys)
    assert "matches 2 speakers (user1, user2)" in line and "give a key instead" in line
    assert make_dataset(twins, tmp_path / "data", "--as", "user2", "--test-fraction", "0", "--val-fraction", "0") == 0
    assert [p["answer"] for p in read_pairs(tmp_path / "data")] == ["Здорово"]
    capsys.readouterr()  # the empty splits' warnings
    nobody = tmp_path / "nobody.parquet"
    pq.write_table(pa.table({"dialogue_id": [1], "sample": [["Привет", "Здорово"]]}), nobody)
    assert make_dataset(nobody, tmp_path / "data", "--as", "me") == 1
    assert "no 'speakers' column" in one_line_error(capsys)


def test_group_turns_carry_first_names_as_tg_bot_shows_them(account, tmp_path):
    import tg_bot

    clean, said = account
    out = tmp_path / "data"
    assert make_dataset(clean, out, "--as", "me", "--test-fraction", "0", "--val-fraction", "0") == 0
    contexts = pq.read_table(out / "context_train.parquet").to_pylist()
    dialogues = {d["dialogue_id"]: d for d in pq.read_table(clean).to_pylist()}
    # how tg_bot.py puts a group member's message into the prompt: "<first name>: <text>"
    assert 'f"{who}: {said}" if who else said' in inspect.getsource(tg_bot.Answerer.prompt)
    checked = 0
    for row in contexts:
        dialogue = dialogues[row["dialogue_id"]]
        keys = [e.split("|")[0] for e in dialogue["speakers"]]
        group = len(set(keys)) >= 3
        for turn, entry, shown in zip(dialogue["sample"], dialogue["speakers"], row["context"]):
            key, name = entry.split("|")
            if group and key != "user111":
                user = types.SimpleNamespace(first_name=name.split()[0])
                who = tg_bot.speaker_name(user)
                assert shown == f"{who}: {turn}"
                checked += 1
            else:  # the person's own turns, like the bot's replies, and a private chat's: no name
                assert shown == turn
    assert checked >= 3
    assert any(t.startswith("Кирилл: ") for row in contexts for t in row["context"])
    assert any(t.startswith("Оля: ") for row in contexts for t in row["context"])


def test_without_as_nothing_changes_and_an_old_voice_goes(account, tmp_path):
    clean, _ = account
    out = tmp_path / "data"
    assert make_dataset(clean, out, "--as", "me") == 0
    assert make_dataset(clean, out) == 0
    assert not (out / "voice.json").exists()
    assert b"voice" not in (pq.read_schema(out / "context_train.parquet").metadata or {})
    pairs, _ = all_rows(out)
    table = pq.read_table(clean).to_pylist()
    assert len(pairs) == sum(len(d["sample"]) - 1 for d in table)


# ------------------------------------------------------------------ a model that writes like the person

TOPICS = ["поход", "кино", "ужин", "дача", "футбол", "концерт", "рыбалка", "шашлыки", "ремонт", "отпуск",
          "экзамен", "гараж", "велик", "баня", "озеро", "пицца", "театр", "каток", "музей", "пляж"]
WHEN = ["в субботу", "завтра", "вечером", "утром", "в пятницу", "на выходных", "в среду", "после обеда"]
STYLES = {
    # the person: lowercase, "чё"/"ваще", and ")))" at the end of every message
    "user111": lambda r, t, w, h: f"{r.choice(['чё', 'ну чё', 'ваще'])} {t} {w} к {h} {r.choice(['норм', 'огонь', 'го'])})))",
    "user222": lambda r, t, w, h: f"Здравствуйте. {t.capitalize()} {w}, встречаемся в {h}, как договаривались.",
    "user333": lambda r, t, w, h: f"{t.upper()} {w.upper()} В {h}!!! Я ЗА!!!",
    "user444": lambda r, t, w, h: f"Ой, {t} {w} в {h}? Звучит мило, я подумаю.",
}
NAMES = {"user111": "Вадим Петров", "user222": "Ольга Смирнова", "user333": "Кирилл", "user444": "Марина Орлова"}
MARKER = re.compile(r"\)\)\)|(?<!\w)(чё|ваще)(?!\w)")


def clock(r):
    """A time of day: it makes every message its own, so that the grouping of repeated dialogues
    (shared pairs, long answers, near-duplicates) leaves the splits as their ids draw them."""
    return f"{r.randrange(6, 23)}:{r.randrange(60):02d}"


def generated_export(seed=20, groups=120, private=30):
    """A whole-account export: group chats of four where the owner (user111) says about one turn in six,
    and private chats of the owner with user222. Every message is in its sender's style."""
    r = random.Random(seed)
    chats, stamp = [], 1_700_000_000

    def chat(kind, people, turns, weights):
        nonlocal stamp
        messages, last = [], None
        for i in range(turns):
            sender = r.choices([p for p in people if p != last], [weights[p] for p in people if p != last])[0]
            stamp += 60
            messages.append({"id": i + 1, "type": "message", "date_unixtime": str(stamp), "from": NAMES[sender],
                             "from_id": sender, "text": STYLES[sender](r, r.choice(TOPICS), r.choice(WHEN), clock(r))})
            last = sender
        stamp += 86_400  # a day's silence: the next chat is another dialogue
        chats.append({"name": kind, "type": "private_group" if kind == "group" else "personal_chat",
                      "id": len(chats) + 1, "messages": messages})

    for _ in range(groups):
        chat("group", list(NAMES), 8, {"user111": 1, "user222": 2, "user333": 2, "user444": 2})
    for _ in range(private):
        chat("private", ["user111", "user222"], 6, {"user111": 1, "user222": 1})
    return {"personal_information": {"user_id": 111, "first_name": "Вадим", "last_name": "Петров"},
            "chats": {"list": chats}}


HELD_OUT = random.Random(7)
QUESTIONS = [STYLES[sender](HELD_OUT, topic, when, clock(HELD_OUT))
             for sender, topic, when in zip(["user333", "user444"] * 10, TOPICS, reversed(WHEN * 3))]


@pytest.fixture(scope="module")
def style_models(tmp_path_factory):
    import torch

    import train_transformer as tt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train faster so on a shared CPU
    root = tmp_path_factory.mktemp("voice")
    export = root / "result.json"
    export.write_text(json.dumps(generated_export(), ensure_ascii=False), encoding="utf-8")
    clean = run_pipeline(export, root)
    models = {}
    for name, flags in (("person", ["--as", "me"]), ("everyone", [])):
        data = root / f"data_{name}"
        assert make_dataset(clean, data, "--no-facts", "--val-fraction", "0.1", "--test-fraction", "0", *flags) == 0
        models[name] = root / name
        assert tt.main(["--from-scratch", "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                        "--vocab-size", "400", "--n-positions", "128", "--seed", "0", "--data-dir", str(data),
                        "--output", str(models[name]), "--max-steps", "200", "--eval-steps", "200",
                        "--batch-size", "16", "--lr", "3e-3", "--val-rows", "32"]) == 0
    yield models
    torch.set_num_threads(threads)


def marker_share(model):
    """The share of the console chat's replies (its default sampling, seeded) to the held-out
    questions that carry the person's markers."""
    import torch

    import system_prompt as sp

    chat = sp.open_model_folder(model, "cpu")
    sp.load_weights(chat, "auto", 1)
    settings = sp.resolve_settings(sp.parse_args(["--model", str(model)]), chat)
    replies = []
    for i, question in enumerate(QUESTIONS):
        torch.manual_seed(i)
        replies.append(sp.ConsoleChat(chat, settings).reply(question))
    return sum(bool(MARKER.search(reply)) for reply in replies) / len(replies), replies


def test_a_model_trained_on_one_persons_turns_writes_like_them(style_models, one_thread):
    person, person_replies = marker_share(style_models["person"])
    everyone, everyone_replies = marker_share(style_models["everyone"])
    print(f"marker share: person's model {person:.2f}, everyone's model {everyone:.2f}")
    assert person >= 0.8, person_replies
    assert everyone <= person / 2, everyone_replies
    config = json.loads((style_models["person"] / "chat_config.json").read_text(encoding="utf-8"))
    assert config["voice"] == {"keys": ["user111"], "names": ["Вадим Петров"]}
    assert json.loads((style_models["everyone"] / "chat_config.json").read_text(encoding="utf-8"))["voice"] is None
