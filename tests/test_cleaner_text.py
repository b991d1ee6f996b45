"""cleaner_text.py: each rule changes what it must and keeps its near-miss;
on the 100-row sample it removes exactly the dirty lines it should."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cleaner_text as ct
import parser_dataset


def clean_turn(text):
    """One turn through every repair rule, as the cleaner applies them."""
    report = ct.Report({})
    return ct.repair_turns([text], report)[0]


@pytest.mark.parametrize("dirty, expected", [
    ("Смотри: <b>сырники</b>&nbsp;за 15 минут", "Смотри: сырники за 15 минут"),
    ("Включи &quot;Не беспокоить&quot;<br>Помоги", 'Включи "Не беспокоить" Помоги'),
    ("Читай тут: https://example.ru/a?b=1, там всё", "Читай тут:, там всё"),
    ("Канал t.me/gory_vmeste и www.example.ru/x.", "Канал и."),
    ("[quote]Кто идёт?[/quote] Я иду", "Я иду"),
    ("[b]Какой клей?[/b] [url=http://x.example.ru]форум[/url]", "Какой клей? форум"),
    ("[12:45] На улице ливень", "На улице ливень"),
    ("15:40:12 Ты где?", "Ты где?"),
    ("12.05.2023 15:43 Давай быстрее", "Давай быстрее"),
    ("Иван Петров, [12.05.2023 15:40]\nСовещание в десять", "Совещание в десять"),
    ("[id123456|Катя], привет!", "Катя, привет!"),
    ("@olga_knit привет!", "привет!"),
    ("Видела!!!!! Цены??????", "Видела! Цены?"),
    ("Ну ладно......", "Ну ладно..."),
    ("Пользователь: Привет", "Привет"),
    ("  много   пробелов\u200b ", "много пробелов"),
])
def test_rule_repairs_dirty_turn(dirty, expected):
    assert clean_turn(dirty) == expected


@pytest.mark.parametrize("natural", [
    "Встретимся в 10:30 у метро",
    "10:30 тебе удобно?",
    "Поезд в 7:15, не опоздай.",
    "Счёт 2:1 в нашу пользу!",
    "Ответ простой: купи новый.",
    "Как пишется: в течение или в течении?",
    "Посмотри на сайте Госуслуг",
    "Пиши на ivan@mail.ru, отвечу",
    "Ну не знаю... Может, завтра?",
    "Стоит 1 500 ₽, недорого",
    "Если a<b и b>c, то что?",
    "Это [обычный] текст в скобках",
])
def test_near_miss_is_kept(natural):
    assert clean_turn(natural) == natural


def test_name_prefix_needs_a_chat_log_or_a_role_word():
    report = ct.Report({})
    assert ct.repair_turns(["Маша: Привет", "Петя: Здорово"], report) == ["Привет", "Здорово"]
    assert ct.repair_turns(["Смотри: вот он", "Где?"], report) == ["Смотри: вот он", "Где?"]
    assert ct.repair_turns(["Бот: Чем помочь?", "Ничем"], report) == ["Чем помочь?", "Ничем"]


def test_cut_keeps_longest_clean_run_and_drops_short_leftovers():
    report = ct.Report({})
    long_turn = "слово " * 200
    kept = ct.clean_dialogue(["а1", "б2", long_turn, "в3", "г4", "д5"], report, 2, 500, 2)
    assert kept == ["в3", "г4", "д5"]
    assert ct.clean_dialogue(["а1", long_turn, "в3"], report, 2, 500, 2) is None
    assert report.dialogues_cut["too_long"] == 1 and report.dialogues_dropped["too_long"] == 1
    # A turn that was only a link is empty after cleaning: the dialogue is cut there.
    kept = ct.clean_dialogue(["https://example.ru/x", "Что это?", "Ссылка"], report, 2, 500, 2)
    assert kept == ["Что это?", "Ссылка"]
    assert report.dialogues_cut["empty_after_cleaning"] == 1


def test_thresholds_are_flags(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"sample": [["Привет, как дела?", "Отлично"], ["Да", "Нет"]],
                             "dialogue_id": pa.array([0, 1], pa.int64())}), src)
    out = tmp_path / "out.parquet"
    assert ct.main(["--input", str(src), "--output", str(out), "--max-chars", "10"]) == 0
    assert pq.read_table(out).to_pydict()["sample"] == [["Да", "Нет"]]
    report = json.loads((tmp_path / "clean_report.json").read_text(encoding="utf-8"))
    assert report["cut_rules"]["too_long"]["dialogues_dropped"] == 1
    assert report["thresholds"]["max_chars"] == 10


@pytest.fixture(scope="module")
def cleaned_sample(tmp_path_factory, sample_path):
    folder = tmp_path_factory.mktemp("clean")
    raw = folder / "raw.parquet"
    assert parser_dataset.main(["--input", str(sample_path), "--output", str(raw), "--limit", "100"]) == 0
    out = folder / "clean.parquet"
    assert ct.main(["--input", str(raw), "--output", str(out)]) == 0
    raw_rows = pq.read_table(raw).to_pydict()
    clean_rows = pq.read_table(out).to_pydict()
    report = json.loads((folder / "clean_report.json").read_text(encoding="utf-8"))
    return (dict(zip(raw_rows["dialogue_id"], raw_rows["sample"])),
            dict(zip(clean_rows["dialogue_id"], clean_rows["sample"])), report)


def looks_dirty(turn):
    markers = ["<", "&nbsp;", "&quot;", "&amp;", "http", "www.", "t.me/", "[quote", "[b]", "[url",
               "[id", "@", "!!", "??", "....", "Пользователь:", "Админ:"]
    return any(m in turn for m in markers) or turn[:1] == "[" or len(turn) > ct.MAX_CHARS


def test_sample_slice_loses_exactly_the_dirt(cleaned_sample):
    raw, clean, report = cleaned_sample
    for turns in clean.values():
        for turn in turns:
            assert not looks_dirty(turn), turn
            assert turn == turn.strip() and "  " not in turn
    # Dialogues with no dirt at all come through untouched.
    untouched = [i for i, turns in raw.items() if not any(looks_dirty(t) for t in turns)
                 and not any(t[:1].isdigit() or ", [" in t or ": " in t[:15] for t in turns)]
    for i in untouched:
        if i in clean:
            assert clean[i] == raw[i]
    # Exact duplicates: only the first copy of each survives.
    seen = set()
    for turns in clean.values():
        assert tuple(turns) not in seen
        seen.add(tuple(turns))
    dupes = len(raw) - len({tuple(t) for t in raw.values()})
    assert report["duplicates_dropped"] == dupes >= 1
    assert report["dialogues_in"] == 100
    assert report["dialogues_out"] == len(clean)


def test_sample_slice_repairs_and_cuts_counted(cleaned_sample):
    raw, clean, report = cleaned_sample
    for rule in ("html", "link", "timestamp", "forwarded_header", "mention", "forum_markup",
                 "repeated_punctuation", "name_prefix"):
        assert report["repair_rules"][rule]["turns_changed"] > 0, rule
    # A forwarded header that was a whole turn leaves the rest of the dialogue.
    headed = [i for i, turns in raw.items() if ct.FORWARD_HEADER.fullmatch(turns[0])]
    assert headed and all(clean[i] == raw[i][1:] for i in headed)
    # A dialogue with a monologue turn and one clean turn either side is dropped.
    dropped_long = [i for i, turns in raw.items() if any(len(t) > ct.MAX_CHARS for t in turns)]
    assert dropped_long and all(i not in clean for i in dropped_long)


def test_bad_input(tmp_path, capsys):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"text": ["a"]}), wrong)
    out = tmp_path / "out.parquet"
    assert ct.main(["--input", str(wrong), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.parquet" in err[0] and "sample" in err[0]
    assert not out.exists()
    assert ct.main(["--input", str(tmp_path / "none.parquet"), "--output", str(out)]) == 1
    assert "no such file" in capsys.readouterr().err
