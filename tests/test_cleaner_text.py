"""cleaner_text.py: each rule changes what it must and keeps its near-miss
(emoticons, dialogue dashes, emphasis, emoji sequences, a one-letter answer, a
label that is the answer); a second pass changes nothing; the report counts
every change; on the 100-row sample it removes exactly the dirty lines it
should."""
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


def clean_turns(*turns):
    return ct.repair_turns(list(turns), ct.Report({}))


@pytest.mark.parametrize("dirty, expected", [
    ("Смотри: <b>сырники</b>&nbsp;за 15 минут", "Смотри: сырники за 15 минут"),
    ("Включи &quot;Не беспокоить&quot;<br>Помоги", 'Включи "Не беспокоить" Помоги'),
    ("Вот &amp;lt;b&amp;gt;жирный&amp;lt;/b&amp;gt; шрифт", "Вот жирный шрифт"),
    ("https://kino.example.ru вот список", "вот список"),
    ("Смотри, что нашёл: https://example.ru/a?b=1", "Смотри, что нашёл:"),
    ("Смотри https://example.ru/x. Классно?", "Смотри. Классно?"),
    ("[quote]Кто идёт?[/quote] Я иду", "Я иду"),
    ("[b]Какой клей?[/b] [url=http://x.example.ru]форум[/url]", "Какой клей? форум"),
    ("[12:45] На улице ливень", "На улице ливень"),
    ("[12:45] [12:46] Ты где?", "Ты где?"),
    ("15:40:12 Ты где?", "Ты где?"),
    ("12.05.2023 15:43 Давай быстрее", "Давай быстрее"),
    ("[12:45] Маша: привет", "привет"),
    ("Иван Петров, [12.05.2023 15:40]\nСовещание в десять", "Совещание в десять"),
    ("[id123456|Катя], привет!", "Катя, привет!"),
    ("@olga_knit привет!", "привет!"),
    ("@olga_knit, привет!", "привет!"),
    ("Видела!!!!! Цены??????", "Видела!!! Цены???"),
    ("Ну ладно......", "Ну ладно..."),
    ("Ну,,, ладно", "Ну, ладно"),
    ("Пользователь: Привет", "Привет"),
    ("Циле: - Туфли у тебя от кого?", "Туфли у тебя от кого?"),
    ("Подтвердил Виторган: - Она тоже собралась!", "Она тоже собралась!"),
    ("  много   пробелов\u200b ", "много пробелов"),
    ("Озеро в области\u200d!", "Озеро в области!"),
    ("Спишите долги !", "Спишите долги!"),
    ("Как похудеть ?", "Как похудеть?"),
    ("Ну , батенька, вы даёте", "Ну, батенька, вы даёте"),
    ("Это и т. д. , и т. п.", "Это и т. д., и т. п."),
    ("Нормально ...", "Нормально..."),
    ("Маша протянула ноги ... в хорошие руки.", "Маша протянула ноги... в хорошие руки."),
    ("Ответ : да", "Ответ: да"),
    ("Нет,просто так", "Нет, просто так"),
    ("Да,Лена,я думаю", "Да, Лена, я думаю"),
    ("Когда у вас выпускной ,все оденут чёрное", "Когда у вас выпускной, все оденут чёрное"),
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
    "Ну не знаю... Может, завтра?",
    "Стоит 1 500 ₽, недорого",
    "Если a<b и b>c, то что?",
    "Это [обычный] текст в скобках",
    # emoticons: the space before them and a leading ":" are part of them
    "Привет :)",
    "Ну ты даёшь ;-)",
    ":) ну ты даёшь",
    ":D",
    ";)",
    "Опять дождь :(",
    "Спасибо! :)",
    # emphasis: up to three marks are what the person meant
    "а как же я???!!!",
    "Ну!!!",
    "Что?!",
    "ГДЕ?!?!?!",
    # emoji sequences joined by U+200D stay one picture
    "👨\u200d👩\u200d👧",
    "Бегу 🏃\u200d♀️ уже",
    "🏳️\u200d🌈 флаг",
    # dashes: a reply of a dash and a mark, author's words, a silence
    "А ты - ?",
    "Ну ! ...",
    "Иди сюда, - сказал он. - Быстро!",
    "Нет! - Отвечает девушка, целуя его в ушко.",
    "Да срал я на ваши законы! - Сбрасывается с моста.",
    "Бегал. - ...",
    "Черт! - Муж начинает нервничать. - Люб, ну ладно тебе...",
    "Ни слова больше! - *звонит по телефону* - Зая, я нашёл тамаду!",
    "Топ, топ . . и заблудился.",
    # a label that is the answer, a remark opened by a word and a colon
    "Минусы: 5",
    "Смотри: вот он",
    "Вопрос: как называется столица Перу?",
    # the speaker's own words before a colon and a dash
    "Скажи честно: - я красивая?",
    "Бабушка: - не бегай, говорит, по грядкам",
    "Пиши: -Подлец. Не ищи меня.",
    # digits after a comma, a comma after a question
    "Это 3,5 литра",
    "Я",
])
def test_near_miss_is_kept(natural):
    assert clean_turn(natural) == natural


def test_two_speakers_in_one_turn_become_two_turns():
    report = ct.Report({})
    turns = ct.repair_turns(["У вас есть белая?", "Есть. - А черная?", "Нет."], report)
    assert turns == ["У вас есть белая?", "Есть.", "А черная?", "Нет."]
    assert report.turns_changed["merged_turns"] == 1 and report.counts["turns_added"] == 1
    assert clean_turns("Три! - Нет! - Три!") == ["Три!", "Нет!", "Три!"]
    assert clean_turns("Сколько стоит?- 700 рублей.") == ["Сколько стоит?", "700 рублей."]
    # a hyphen inside a word is no dash of author's words
    assert clean_turns("Наконец-то наступил новый год! - ?") == ["Наконец-то наступил новый год!", "?"]
    # the bewildered reply of marks only is a turn of its own, shortened to three
    assert clean_turns("Спать!!!!! - ??????") == ["Спать!!!", "???"]


@pytest.mark.parametrize("turns, expected", [
    # a chat log: a label heads two or more turns
    (["Маша: Привет", "Петя: Здорово", "Маша: Как дела?"], ["Привет", "Здорово", "Как дела?"]),
    # every label a word for a speaker
    (["Жена: Ты где был?", "Муж: На работе."], ["Ты где был?", "На работе."]),
    (["Бот: Чем помочь?", "Ничем"], ["Чем помочь?", "Ничем"]),
    (["Первый: Убили.", "Второй: Не успели."], ["Убили.", "Не успели."]),
    # chat-log timestamps prove a log line, whatever the name
    (["[12:45] Маша: привет", "[12:46] Петя: здорово"], ["привет", "здорово"]),
    # labels that carry the meaning stay
    (["Минусы: 5", "Плюсы: 2"], ["Минусы: 5", "Плюсы: 2"]),
    (["Кто самые глупые?", "Шофер: весь день людей возит, а сам пешком.", "Учитель: все знает, а спрашивает."],
     ["Кто самые глупые?", "Шофер: весь день людей возит, а сам пешком.", "Учитель: все знает, а спрашивает."]),
    (["Слышали: он вернулся?", "Правильно: давно пора."], ["Слышали: он вернулся?", "Правильно: давно пора."]),
    (["США: День Сурка", "Россия: Выборы Сурка"], ["США: День Сурка", "Россия: Выборы Сурка"]),
    (["Давай вопросы.", "Первый: у тебя есть юрист?"], ["Давай вопросы.", "Первый: у тебя есть юрист?"]),
    (["Смотри: вот он", "Где?"], ["Смотри: вот он", "Где?"]),
])
def test_name_prefix_goes_only_where_it_names_a_speaker(turns, expected):
    assert clean_turns(*turns) == expected


def test_one_letter_answer_and_a_reaction_are_kept():
    report = ct.Report({})
    assert ct.clean_dialogue(["Кто забил?", "Я"], report, ct.MIN_CHARS, ct.MAX_CHARS, ct.MIN_TURNS) == \
        ["Кто забил?", "Я"]
    assert ct.clean_dialogue(["Я женюсь!", "???", "Шучу"], report, ct.MIN_CHARS, ct.MAX_CHARS, 2) == \
        ["Я женюсь!", "???", "Шучу"]
    assert ct.clean_dialogue(["Как тебе?", "👍"], report, ct.MIN_CHARS, ct.MAX_CHARS, 2) == ["Как тебе?", "👍"]
    assert not report.dialogues_cut and not report.dialogues_dropped


def test_a_link_inside_a_sentence_takes_the_turn_with_it():
    # "Читай тут:, там всё" and "Канал и." are what removing the link alone leaves.
    assert clean_turn("Читай тут: https://example.ru/a?b=1, там всё") == ""
    assert clean_turn("Канал t.me/gory_vmeste и www.example.ru/x.") == ""
    report = ct.Report({})
    kept = ct.clean_dialogue(["Где искать?", "Посмотри на www.example.ru/x, там много.", "Спасибо", "Пожалуйста"],
                             report, 1, 500, 2)
    assert kept == ["Спасибо", "Пожалуйста"]
    assert report.dialogues_cut["empty_after_cleaning"] == 1


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
    # --min-chars still cuts where a user asks for it
    assert ct.clean_dialogue(["Кто?", "Я", "Молодец"], report, 2, 500, 2) is None
    assert report.dialogues_dropped["too_short"] == 1


def test_report_counts_every_changed_turn(tmp_path):
    """Two dirty turns in one dialogue count twice, and white space counts even
    where another rule changed the same dialogue."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "sample": [["Привет  ,  как дела ?", "Нормально   ,  а у тебя ?", "[12:45] Тоже  ."],
                   ["Ты  где?", "Дома"]],
        "dialogue_id": pa.array([0, 1], pa.int64())}), src)
    out = tmp_path / "out.parquet"
    assert ct.main(["--input", str(src), "--output", str(out)]) == 0
    report = json.loads((tmp_path / "clean_report.json").read_text(encoding="utf-8"))
    rules = report["repair_rules"]
    assert rules["whitespace"] == {"turns_changed": 4, "dialogues_changed": 2}
    assert rules["timestamp"] == {"turns_changed": 1, "dialogues_changed": 1}
    assert rules["space_before_punctuation"] == {"turns_changed": 3, "dialogues_changed": 1}
    assert pq.read_table(out).to_pydict()["sample"] == [
        ["Привет, как дела?", "Нормально, а у тебя?", "Тоже."], ["Ты где?", "Дома"]]


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


def clean_twice(folder, raw):
    once, twice = folder / "once.parquet", folder / "twice.parquet"
    assert ct.main(["--input", str(raw), "--output", str(once), "--report", str(folder / "r1.json")]) == 0
    assert ct.main(["--input", str(once), "--output", str(twice), "--report", str(folder / "r2.json")]) == 0
    first = pq.read_table(once).to_pydict()
    second = pq.read_table(twice).to_pydict()
    report = json.loads((folder / "r2.json").read_text(encoding="utf-8"))
    return first, second, report


def test_second_pass_changes_nothing(tmp_path, sample_path):
    raw = tmp_path / "raw.parquet"
    dirty = [["[12:45] Маша: Привет  !!!!", "[12:46] Петя: Есть. - А черная ?", "Маша: Нет,дорогая :)"],
             ["Видела!!!!!", "Вот &amp;lt;b&amp;gt;это&amp;lt;/b&amp;gt;", "[12:45] [12:46] Ну ...."],
             ["@olga, привет", "Иван, [12.05.2023 15:40]\nЖена: Ты где?", "Муж: Тут."]]
    pq.write_table(pa.table({"sample": dirty, "dialogue_id": pa.array([0, 1, 2], pa.int64())}), raw)
    first, second, report = clean_twice(tmp_path, raw)
    assert first == second
    assert all(row["turns_changed"] == 0 for row in report["repair_rules"].values())
    assert first["sample"][0] == ["Привет!!!", "Есть.", "А черная?", "Нет, дорогая :)"]
    raw_sample = tmp_path / "sample.parquet"
    assert parser_dataset.main(["--input", str(sample_path), "--output", str(raw_sample)]) == 0
    first, second, report = clean_twice(tmp_path, raw_sample)
    assert first == second and report["dialogues_in"] == report["dialogues_out"]


@pytest.mark.shared_data
def test_second_pass_over_the_real_corpus_changes_nothing(tmp_path, shared_data):
    raw = tmp_path / "raw.parquet"
    assert parser_dataset.main(["--input", str(shared_data / "anekdot_dialogues.parquet"),
                                "--output", str(raw)]) == 0
    first, second, report = clean_twice(tmp_path, raw)
    assert len(first["sample"]) > 80_000
    assert first == second
    assert all(row["turns_changed"] == 0 for row in report["repair_rules"].values())
    assert report["duplicates_dropped"] == 0


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
               "[id", "@", "!!!!", "????", "....", "Пользователь:", "Админ:", " ,", " ?", " !"]
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
    kept = [i for i in untouched if i in clean]  # the rest are later copies of a duplicate
    assert len(kept) > 50
    for i in kept:
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
    # a `sample` of strings would be cleaned letter by letter
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"sample": ["Привет\nПока"], "dialogue_id": pa.array([0], pa.int64())}), strings)
    assert ct.main(["--input", str(strings), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strings.parquet" in err[0] and "'sample'" in err[0] and "list" in err[0]
    assert not out.exists()


def write_raw(path, dialogues):
    pq.write_table(pa.table({"sample": dialogues,
                             "dialogue_id": pa.array(range(len(dialogues)), pa.int64())}), path)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cleaner_text.py: error: "), err
    return err[0]


def temp_files(*folders):
    return [p.name for folder in folders for p in folder.iterdir() if ".tmp-" in p.name]


def test_output_or_report_that_is_a_folder_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw.parquet"
    write_raw(raw, [["Привет", "Привет"]])
    folder = tmp_path / "adir"
    folder.mkdir()
    assert ct.main(["--input", str(raw), "--output", str(folder), "--report", str(tmp_path / "r.json")]) == 1
    err = one_error_line(capsys)
    assert "adir" in err and "--output" in err and "folder" in err
    assert list(folder.iterdir()) == [] and not (tmp_path / "r.json").exists()
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous result")
    assert ct.main(["--input", str(raw), "--output", str(out), "--report", str(folder)]) == 1
    err = one_error_line(capsys)
    assert "adir" in err and "--report" in err and "folder" in err
    assert out.read_bytes() == b"previous result"
    assert temp_files(tmp_path, folder) == []


def test_output_or_report_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw.parquet"
    write_raw(raw, [["Привет", "Привет"]])
    # /proc takes no new files, even for root.
    assert ct.main(["--input", str(raw), "--output", "/proc/c.parquet", "--report", str(tmp_path / "r.json")]) == 1
    err = one_error_line(capsys)
    assert "/proc/c.parquet" in err and "cannot write" in err and ".tmp-" not in err
    assert not (tmp_path / "r.json").exists()
    # The report cannot be written: the previous output stays too, so the two never disagree.
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous result")
    assert ct.main(["--input", str(raw), "--output", str(out), "--report", "/proc/r.json"]) == 1
    err = one_error_line(capsys)
    assert "/proc/r.json" in err and "cannot write" in err and ".tmp-" not in err
    assert out.read_bytes() == b"previous result"
    assert temp_files(tmp_path) == []
    # A failure at the last step (a full disk, a read-only target): the same.
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(ct.os, "replace", refuse)
    assert ct.main(["--input", str(raw), "--output", str(out)]) == 1
    err = one_error_line(capsys)
    assert "out.parquet" in err and "Permission denied" in err
    assert out.read_bytes() == b"previous result" and not (tmp_path / "clean_report.json").exists()
    assert temp_files(tmp_path) == []


def test_min_turns_drops_short_dialogues_cut_or_not(tmp_path):
    raw = tmp_path / "raw.parquet"
    write_raw(raw, [["Привет", "Привет"],                        # 2 turns, clean
                    ["Кто?", "Я", "Молодец"],                    # 3 turns, clean
                    ["Как дела?", None],                         # a missing turn leaves one
                    [],                                          # nothing at all
                    ["Ты где?", "Дома", "https://example.ru/x"],  # cut to 2
                    ["А", "Б", "В", "Г"]])
    out = tmp_path / "out.parquet"
    assert ct.main(["--input", str(raw), "--output", str(out), "--min-turns", "3"]) == 0
    assert pq.read_table(out).to_pydict()["sample"] == [["Кто?", "Я", "Молодец"], ["А", "Б", "В", "Г"]]
    report = json.loads((tmp_path / "clean_report.json").read_text(encoding="utf-8"))
    # Uncut ones count on their own; a cut one is dropped under the rule that cut it.
    assert report["too_few_turns_dropped"] == 3
    assert report["cut_rules"]["empty_after_cleaning"] == {"dialogues_cut": 0, "dialogues_dropped": 1}
    assert report["dialogues_in"] == 6 and report["dialogues_out"] == 2
    # At the default of 2, the dialogue with a missing turn is not kept as a one-turn dialogue.
    assert ct.main(["--input", str(raw), "--output", str(out)]) == 0
    kept = pq.read_table(out).to_pydict()["sample"]
    assert all(len(turns) >= 2 for turns in kept) and len(kept) == 4
    report = json.loads((tmp_path / "clean_report.json").read_text(encoding="utf-8"))
    assert report["too_few_turns_dropped"] == 2


# ---- who said each turn ------------------------------------------------------------------------------
def clean_with_speakers(turns, speakers, min_chars=1, max_chars=500, min_turns=2):
    return ct.clean_dialogue_with_speakers(turns, speakers, ct.Report({}), min_chars, max_chars, min_turns)


def test_speakers_stay_aligned_through_splits_cuts_and_drops():
    # a known speaker's turn is one person's message: never split as two speakers' lines
    assert clean_with_speakers(["У вас есть белая?", "Есть. - А черная?", "Нет."],
                               ["user1|Аня", "user2|Олег", "user1|Аня"]) == \
        (["У вас есть белая?", "Есть. - А черная?", "Нет."], ["user1|Аня", "user2|Олег", "user1|Аня"])
    # an unknown one is split as before, its pieces unknown, the known turns around it in place
    assert clean_with_speakers(["У вас есть белая?", "Есть. - А черная?", "Нет."], ["user1|Аня", "", "user1|Аня"]) == \
        (["У вас есть белая?", "Есть.", "А черная?", "Нет."], ["user1|Аня", "", "", "user1|Аня"])
    # a cut keeps the speakers of the run it keeps
    long_turn = "слово " * 200
    turns = ["а1", "б2", long_turn, "в3", "г4", "д5"]
    speakers = ["user1|А", "user2|Б", "user1|А", "user2|Б", "user3|В", "user1|А"]
    assert clean_with_speakers(turns, speakers, min_chars=2) == (["в3", "г4", "д5"], ["user2|Б", "user3|В", "user1|А"])
    # a link inside a sentence empties its turn and cuts there
    assert clean_with_speakers(["Где?", "Посмотри на www.example.ru/x, там много.", "Спасибо", "Пожалуйста"],
                               ["q", "a", "q", "a"]) == (["Спасибо", "Пожалуйста"], ["q", "a"])
    assert clean_with_speakers(["а1", long_turn, "в3"], ["x", "y", "x"], min_chars=2) is None
    # unknown speakers come out as they went in: an empty list
    assert clean_with_speakers(["Три! - Нет! - Три!"], []) == (["Три!", "Нет!", "Три!"], [])


def write_rows(path, rows, speakers=None, metadata=None):
    columns = {"sample": rows, "dialogue_id": pa.array(range(len(rows)), pa.int64()),
               "source": ["chat"] * len(rows)}
    if speakers is not None:
        columns["speakers"] = pa.array(speakers, pa.list_(pa.string()))
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)


def test_clean_file_keeps_speakers_aligned_and_the_owner(tmp_path):
    raw, out = tmp_path / "raw.parquet", tmp_path / "out.parquet"
    owner = json.dumps({"key": "user111", "name": "Вадим Петров"}, ensure_ascii=False).encode()
    rows = [["Привет  !!!!", None, "Есть. - А черная?", "https://example.ru/x", "Нет,дорогая", "Ну ладно"],
            ["Ты где?", "Дома"],
            ["Ты где?", "Дома"],      # the same words from other people: not a duplicate
            ["Ты где?", "Дома"],      # the same words and people, renamed: a duplicate
            ["Как дела?", "Норм"]]
    speakers = [["user1|Аня", "user3|Гость", "user2|Олег", "user1|Аня", "user111|Вадим", "user1|Аня"],
                ["user1|Аня", "user111|Вадим"],
                ["user2|Олег", "user111|Вадим"],
                ["user1|Анна", "user111|Вадим П."],
                []]
    write_rows(raw, rows, speakers, {b"owner": owner})
    assert ct.main(["--input", str(raw), "--output", str(out)]) == 0
    table = pq.read_table(out).to_pydict()
    # the missing turn goes with its speaker; the link cuts; of two runs of two the first stays, unsplit
    assert table["sample"] == [["Привет!!!", "Есть. - А черная?"], ["Ты где?", "Дома"], ["Ты где?", "Дома"],
                               ["Как дела?", "Норм"]]
    assert table["speakers"] == [["user1|Аня", "user2|Олег"], ["user1|Аня", "user111|Вадим"],
                                 ["user2|Олег", "user111|Вадим"], []]
    assert table["dialogue_id"] == [0, 1, 2, 4]
    assert pq.read_schema(out).metadata[b"owner"] == owner
    report = json.loads((tmp_path / "clean_report.json").read_text(encoding="utf-8"))
    assert report["duplicates_dropped"] == 1 and report["repair_rules"]["merged_turns"]["turns_changed"] == 0


def test_speakers_that_do_not_match_the_turns_are_refused(tmp_path, capsys):
    raw, out = tmp_path / "raw.parquet", tmp_path / "out.parquet"
    write_rows(raw, [["Привет", "Пока"], ["Да", "Нет"]], [["a", "b"], ["a"]])
    assert ct.main(["--input", str(raw), "--output", str(out)]) == 1
    err = one_error_line(capsys)
    assert "raw.parquet" in err and "dialogue_id 1" in err and "speakers" in err
    assert not out.exists()


def test_without_speakers_the_output_is_what_it_was(tmp_path, sample_path):
    """A file without the speakers column, and one whose speakers are all empty lists, clean to the
    same turns; the first stays without the column."""
    raw = tmp_path / "raw.parquet"
    assert parser_dataset.main(["--input", str(sample_path), "--output", str(raw)]) == 0
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(raw).drop_columns(["speakers"]), bare)
    outputs = []
    for name in ("raw", "bare"):
        out = tmp_path / f"{name}_clean.parquet"
        assert ct.main(["--input", str(tmp_path / f"{name}.parquet"), "--output", str(out),
                        "--report", str(tmp_path / f"{name}.json")]) == 0
        outputs.append(pq.read_table(out))
    with_column, without = outputs
    assert "speakers" not in without.column_names and with_column["speakers"].to_pylist() == [[]] * len(without)
    assert with_column.select(["sample", "dialogue_id", "source"]).equals(without)
    # the dirty dialogues of the sample are repaired as before this column existed
    first = dict(zip(without["dialogue_id"].to_pylist(), without["sample"].to_pylist()))
    assert len(first) == 166


# ---- personal data -----------------------------------------------------------------------------------
def personal_data_lines(repo_root):
    import csv
    with open(repo_root / "tests" / "fixtures" / "personal_data_chat.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_personal_data_is_masked_and_near_misses_stay(repo_root):
    rows = personal_data_lines(repo_root)
    assert len(rows) > 100 and {r["kind"] for r in rows} == {"phone", "email", "card", "mixed", "near_miss"}
    for row in rows:
        want = row["text"] if row["rule_misses"] else row["expected"]  # a known miss is pinned, to be noticed
        assert ct.mask_personal_data(row["text"]) == want, row["text"]
        # through all the rules the placeholders are there, and only where the rule is on
        placeholders = [p for p in ct.PLACEHOLDERS.values() for _ in range(want.count(p))]
        assert sorted(p for p in ct.PLACEHOLDERS.values() for _ in range(clean_turn(row["text"]).count(p))) == \
            sorted(placeholders), row["text"]
        kept = ct.repair_turns([row["text"]], ct.Report({}), keep_personal_data=True)[0]
        assert not any(p in kept for p in ct.PLACEHOLDERS.values()), row["text"]
    masked = [r for r in rows if r["expected"] != r["text"] and not r["rule_misses"]]
    assert len(masked) > 60
    assert ct.mask_personal_data("Пиши на ivan@mail.ru, отвечу") == "Пиши на <почта>, отвечу"


def test_keep_personal_data_keeps_them_and_the_report_counts_replacements(tmp_path):
    raw = tmp_path / "raw.parquet"
    rows = [["Как с тобой связаться?", "Звони 8 (912) 345-67-89 или пиши на ivan.petrov@mail.ru"],
            ["Куда перевести?", "На карту 4276 1234 5678 9014, а заказ 123456789 заберу 12.05 в 12:30"],
            ["Сколько стоит?", "1 500 руб"]]
    write_rows(raw, rows)
    out, kept = tmp_path / "out.parquet", tmp_path / "kept.parquet"
    assert ct.main(["--input", str(raw), "--output", str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert pq.read_table(out).to_pydict()["sample"] == [
        ["Как с тобой связаться?", "Звони <телефон> или пиши на <почта>"],
        ["Куда перевести?", "На карту <карта>, а заказ 123456789 заберу 12.05 в 12:30"],
        ["Сколько стоит?", "1 500 руб"]]
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["repair_rules"]["personal_data"] == {
        "turns_changed": 2, "dialogues_changed": 2, "replaced": {"phone": 1, "email": 1, "card": 1}}
    assert report["thresholds"]["keep_personal_data"] is False
    assert ct.main(["--input", str(raw), "--output", str(kept), "--report", str(tmp_path / "k.json"),
                    "--keep-personal-data"]) == 0
    assert pq.read_table(kept).to_pydict()["sample"] == rows
    report = json.loads((tmp_path / "k.json").read_text(encoding="utf-8"))
    assert report["repair_rules"]["personal_data"]["turns_changed"] == 0
    assert report["thresholds"]["keep_personal_data"] is True
    assert ct.KEEP_PERSONAL_DATA is False and ct.parse_args([]).keep_personal_data is False
    # a second pass over masked turns changes nothing
    first, second, again = clean_twice(tmp_path, raw)
    assert first == second and again["repair_rules"]["personal_data"]["turns_changed"] == 0
