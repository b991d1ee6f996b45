"""create_dataset.py: pairs and contexts from dialogues, split by dialogue."""
import csv

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cleaner_text
import create_dataset as cd
import parser_dataset


@pytest.fixture(scope="module")
def splits(tmp_path_factory, sample_path):
    folder = tmp_path_factory.mktemp("splits")
    raw, clean = folder / "raw.parquet", folder / "clean.parquet"
    assert parser_dataset.main(["--input", str(sample_path), "--output", str(raw), "--limit", "100"]) == 0
    assert cleaner_text.main(["--input", str(raw), "--output", str(clean)]) == 0
    assert cd.main(["--input", str(clean), "--output", str(folder)]) == 0
    return folder, clean


def test_no_dialogue_in_two_splits_and_every_pair_accounted(splits):
    folder, clean = splits
    ids = {}
    total = 0
    for split in cd.SPLITS:
        pairs = pd.read_csv(folder / f"pairs_{split}.csv")
        assert list(pairs.columns) == ["dialogue_id", "question", "answer"]
        ids[split] = set(pairs["dialogue_id"])
        total += len(pairs)
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    dialogues = pq.read_table(clean).to_pydict()["sample"]
    assert total == sum(len(d) - 1 for d in dialogues)
    assert all(ids[s] for s in cd.SPLITS)


def test_pairs_and_context_follow_the_dialogue(splits):
    folder, clean = splits
    table = pq.read_table(clean).to_pydict()
    by_id = dict(zip(table["dialogue_id"], table["sample"]))
    context = pd.read_parquet(folder / "context_train.parquet")
    pairs = pd.read_csv(folder / "pairs_train.csv")
    assert pq.read_schema(folder / "context_train.parquet").field("dialogue_id").type == pa.int64()
    assert len(context) == len(pairs)
    for (_, c), (_, p) in zip(context.iterrows(), pairs.iterrows()):
        turns = by_id[c["dialogue_id"]]
        i = turns.index(c["answer"])
        assert list(c["context"]) == turns[max(0, i - cd.MAX_TURNS):i]
        assert p["question"] == turns[i - 1] and p["answer"] == turns[i]
    longest = max(len(by_id[i]) for i in set(context["dialogue_id"]))
    assert context["context"].map(len).max() == min(cd.MAX_TURNS, longest - 1) > 4


def test_context_window_defaults_to_16_turns_and_stays_a_flag():
    # The context model cuts by tokens, so the files carry a long window.
    assert cd.MAX_TURNS == 16 and cd.parse_args([]).max_turns == 16
    assert cd.parse_args(["--max-turns", "4"]).max_turns == 4


def ids_in(split, count, start=0, seed=cd.SEED):
    """The first `count` dialogue ids from `start` that the seeded hash puts in `split`."""
    found, i = [], start
    while len(found) < count:
        if cd.split_of(i, seed, cd.VAL_FRACTION, cd.TEST_FRACTION) == split:
            found.append(i)
        i += 1
    return found


def write_dialogues(path, rows):
    pq.write_table(pa.table({"sample": [turns for _, turns in rows],
                             "dialogue_id": pa.array([i for i, _ in rows], pa.int64())}), path)


def splits_of_ids(folder):
    found = {}
    for split in cd.SPLITS:
        for i in pd.read_csv(folder / f"pairs_{split}.csv")["dialogue_id"]:
            assert found.setdefault(int(i), split) == split
    return found


def test_repeated_pairs_and_near_duplicates_stay_in_one_split(tmp_path, capsys):
    train_ids, test_ids, val_ids = ids_in("train", 6), ids_in("test", 4), ids_in("val", 2)
    setup = ("Доктор, у меня в последнее время такие провалы в памяти, что я выхожу из дома, "
             "иду в магазин за хлебом и уже у самой кассы не помню, зачем пришёл и что хотел купить, "
             "а вчера вообще позвонил жене спросить, где я живу, и она тоже не вспомнила, "
             "так что мы теперь оба стоим у подъезда и ждём, пока кто-нибудь из соседей нас узнает.")
    joke, retold = [setup, "А давно это у вас?"], [setup, "И давно это у вас?"]
    # no pair's text and no long answer in common: only the words tie them
    assert not set(cd.dialogue_fingerprint(joke)[0]) & set(cd.dialogue_fingerprint(retold)[0])
    rows = [
        (train_ids[0], ["Как дела?", "Нормально, а у тебя?", "Тоже."]),
        # the same pair of turns, other case and punctuation: must follow train_ids[0]
        (test_ids[0], ["Привет!", "как дела", "нормально а у тебя", "Отлично."]),
        (train_ids[1], joke),
        (test_ids[1], retold),
        (train_ids[2], ["Что сказала тёща?", "Что зять у неё золотой, только проба не та."]),
        (val_ids[0], ["А соседка что?", "Что зять у неё золотой, только проба не та!"]),  # a long answer
        (test_ids[2], ["Куда едем?", "На дачу, копать картошку."]),  # unrelated: keeps its split
        (train_ids[3], ["Где ключи?", "На полке."]),
    ]
    src = tmp_path / "c.parquet"
    write_dialogues(src, rows)
    assert cd.main(["--input", str(src), "--output", str(tmp_path)]) == 0
    where = splits_of_ids(tmp_path)
    assert where[test_ids[0]] == where[test_ids[1]] == where[val_ids[0]] == "train"
    assert where[test_ids[2]] == "test" and where[train_ids[3]] == "train"
    out = capsys.readouterr().out
    assert "3 dialogues (5 pairs) moved" in out and "6 share" in out


def test_split_is_deterministic_and_seeded():
    a = [cd.split_of(i, 42, 0.1, 0.1) for i in range(2000)]
    assert a == [cd.split_of(i, 42, 0.1, 0.1) for i in range(2000)]
    assert a != [cd.split_of(i, 7, 0.1, 0.1) for i in range(2000)]
    assert 120 < a.count("test") < 280 and 120 < a.count("val") < 280


def test_rows_and_max_turns(tmp_path):
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"sample": [["1", "2", "3", "4", "5", "6"]] * 10,
                             "dialogue_id": pa.array(range(10), pa.int64())}), src)
    assert cd.main(["--input", str(src), "--output", str(tmp_path), "--rows", "7", "--max-turns", "2"]) == 0
    frames = [pd.read_parquet(tmp_path / f"context_{s}.parquet") for s in cd.SPLITS]
    rows = pd.concat(frames)
    assert len(rows) == 7
    assert rows["context"].map(len).max() == 2
    assert sum(1 for s in cd.SPLITS for _ in csv.reader(open(tmp_path / f"pairs_{s}.csv"))) == 7 + 3


def test_bad_input_leaves_previous_files(tmp_path, capsys):
    keep = tmp_path / "pairs_train.csv"
    keep.write_text("old", encoding="utf-8")
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"turns": [["a", "b"]]}), wrong)
    assert cd.main(["--input", str(wrong), "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.parquet" in err[0] and "missing column" in err[0]
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"sample": ["Привет\nПока"], "dialogue_id": pa.array([0], pa.int64())}), strings)
    assert cd.main(["--input", str(strings), "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strings.parquet" in err[0] and "'sample'" in err[0] and "list" in err[0]
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert cd.main(["--input", str(empty), "--output", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err
    assert keep.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_bad_output_is_one_line_and_leaves_previous_files(splits, tmp_path, capsys, monkeypatch):
    _, clean = splits
    a_file = tmp_path / "a_file.csv"
    a_file.write_text("old", encoding="utf-8")
    assert cd.main(["--input", str(clean), "--output", str(a_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a_file.csv" in err[0] and "--output" in err[0]
    assert a_file.read_text(encoding="utf-8") == "old"
    assert cd.main(["--input", str(clean), "--output", "/proc/no_such_folder"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/proc/no_such_folder" in err[0] and "cannot write" in err[0]
    # the last rename fails (a full disk, a folder gone): the previous files stay, no temporary is left
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "context_test.parquet").write_text("old", encoding="utf-8")
    real_replace = cd.os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("context_test.parquet"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(cd.os, "replace", failing_replace)
    assert cd.main(["--input", str(clean), "--output", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert (folder / "context_test.parquet").read_text(encoding="utf-8") == "old"
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


INTRODUCTIONS = [
    "Привет! Меня зовут Аня, я из Казани.",            # 0: the side asking before answers 1, 3, 5, 7
    "Привет, Аня! А меня зовут Борис, я из Москвы.",   # 1: the other side, asking before 2, 4, 6, 8
    "Как дела?",
    "Хорошо, работаю.",
    "Кстати, я недавно переехала в Самару.",           # 4: a later city replaces Казань
    "Ого, и как там?",
    "Нравится, только жарко.",
    "Понимаю.",
    "А что ты любишь?",
]


def context_rows(folder):
    return pd.concat([pd.read_parquet(folder / f"context_{split}.parquet") for split in cd.SPLITS])


def test_facts_are_what_the_asking_side_said_before_beyond_the_window(tmp_path):
    src = tmp_path / "c.parquet"
    write_dialogues(src, [(ids_in("train", 1)[0], INTRODUCTIONS)])
    assert cd.main(["--input", str(src), "--output", str(tmp_path), "--max-turns", "2"]) == 0
    rows = context_rows(tmp_path)
    assert list(rows.columns) == ["dialogue_id", "context", "answer", "facts"]
    facts = dict(zip(rows["answer"], rows["facts"]))
    anya_kazan, anya_samara = "Тебя зовут Аня, ты живёшь в Казани.", "Тебя зовут Аня, ты живёшь в Самаре."
    boris = "Тебя зовут Борис, ты живёшь в Москве."
    assert [facts[turn] for turn in INTRODUCTIONS[1:]] == [anya_kazan, boris, anya_kazan, boris,
                                                           anya_samara, boris, anya_samara, boris]
    # six turns after the introduction, far outside a two-turn window
    last_of_anya = rows[rows["answer"] == INTRODUCTIONS[7]].iloc[0]
    assert list(last_of_anya["context"]) == INTRODUCTIONS[5:7]
    assert last_of_anya["facts"] == anya_samara


def test_facts_are_empty_where_nothing_was_said_and_absent_with_no_facts(tmp_path):
    src = tmp_path / "c.parquet"
    write_dialogues(src, [(i, ["Как дела?", "Хорошо.", "А у тебя?"]) for i in range(5)]
                    + [(5, INTRODUCTIONS[:3])])
    with_facts, without = tmp_path / "with", tmp_path / "without"
    assert cd.main(["--input", str(src), "--output", str(with_facts)]) == 0
    assert cd.main(["--input", str(src), "--output", str(without), "--no-facts"]) == 0
    rows = context_rows(with_facts)
    assert sorted(rows["facts"]) == [""] * 10 + ["Тебя зовут Аня, ты живёшь в Казани.",
                                                 "Тебя зовут Борис, ты живёшь в Москве."]
    assert list(context_rows(without).columns) == ["dialogue_id", "context", "answer"]
    for split in cd.SPLITS:
        name = f"pairs_{split}.csv"
        assert (with_facts / name).read_bytes() == (without / name).read_bytes()
    assert cd.parse_args([]).facts is cd.FACTS is True and cd.parse_args(["--no-facts"]).facts is False


def test_facts_without_their_packages_are_one_line_naming_the_way_out(tmp_path, capsys, monkeypatch):
    src = tmp_path / "c.parquet"
    write_dialogues(src, [(0, INTRODUCTIONS)])

    def missing():
        raise ImportError("No module named 'yargy'")
    monkeypatch.setattr(cd, "load_fact_tools", missing)
    assert cd.main(["--input", str(src), "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "yargy" in err[0] and "--no-facts" in err[0]
    assert not list(tmp_path.glob("pairs_*.csv"))
    assert cd.main(["--input", str(src), "--output", str(tmp_path), "--no-facts"]) == 0


def test_facts_are_read_once_per_turn(monkeypatch):
    seen = []
    real = cd.extract_user_facts
    monkeypatch.setattr(cd, "extract_user_facts", lambda text: seen.append(text) or real(text))
    assert len(list(cd.facts_before_answers(INTRODUCTIONS))) == len(INTRODUCTIONS) - 1
    assert seen == INTRODUCTIONS[:-1]


@pytest.mark.shared_data
def test_real_corpus_has_no_pair_in_train_and_test(tmp_path, shared_data):
    raw = tmp_path / "raw.parquet"
    assert parser_dataset.main(["--input", str(shared_data / "anekdot_dialogues.parquet"),
                                "--output", str(raw)]) == 0
    # facts=False: the grouping is under test here, and facts would add a minute
    counts, moved, voice = cd.create_dataset(raw, tmp_path, max_turns=1, facts=False)
    assert voice is None and not (tmp_path / "voice.json").exists()
    pairs = {split: pd.read_csv(tmp_path / f"pairs_{split}.csv", keep_default_na=False)
             for split in cd.SPLITS}
    text = {split: set(zip(frame["question"], frame["answer"])) for split, frame in pairs.items()}
    assert len(pairs["test"]) > 10_000 and moved["dialogues"] > 0
    assert not text["train"] & text["test"]
    assert not text["train"] & text["val"] and not text["val"] & text["test"]


def test_as_takes_its_default_from_the_defaults_block(monkeypatch):
    assert cd.AS is None and cd.parse_args([]).as_who is None
    assert cd.parse_args(["--as", "me", "--as", "user2"]).as_who == ["me", "user2"]
    monkeypatch.setattr(cd, "AS", "Вадим Петров")
    assert cd.parse_args([]).as_who == ["Вадим Петров"]
    monkeypatch.setattr(cd, "AS", ["me", "user2"])
    assert cd.parse_args([]).as_who == ["me", "user2"]
    assert cd.parse_args(["--as", "user3"]).as_who == ["user3"]  # a flag overrides the block


def test_as_names_group_turns_only_in_a_group(tmp_path):
    """Two speakers: a private chat, turns as they are. Three or more: the others' turns carry their
    first name; unknown speakers are "Участник"; the person's own turns carry none."""
    clean = tmp_path / "clean.parquet"
    pq.write_table(pa.table({
        "dialogue_id": [1, 2],
        "sample": [["Привет", "Здорово", "Как жизнь?", "Норм"], ["Кто идёт?", "Я", "А я нет", "?", "Я иду"]],
        "speakers": [["u2|Аня Иванова", "u1|Вадим", "u2|Аня Иванова", "u1|Вадим"],
                     ["u2|Аня Иванова", "u1|Вадим", "u3|Кирилл", "", "u1|Вадим"]]}), clean)
    out = tmp_path / "data"
    assert cd.main(["--input", str(clean), "--output", str(out), "--as", "u1", "--no-facts",
                    "--val-fraction", "0", "--test-fraction", "0"]) == 0
    rows = pq.read_table(out / "context_train.parquet").to_pylist()
    assert [(r["context"], r["answer"]) for r in rows] == [
        (["Привет"], "Здорово"), (["Привет", "Здорово", "Как жизнь?"], "Норм"),
        (["Аня: Кто идёт?"], "Я"), (["Аня: Кто идёт?", "Я", "Кирилл: А я нет", "Участник: ?"], "Я иду")]
    assert [r["question"] for r in csv.DictReader(open(out / "pairs_train.csv", encoding="utf-8"))] == \
        ["Привет", "Как жизнь?", "Аня: Кто идёт?", "Участник: ?"]
