"""parser_dataset.py: every input kind, the Telegram export, and bad input."""
import gzip
import json
import lzma
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import parser_dataset as pd_stage


def run(argv, capsys=None):
    code = pd_stage.main([str(a) for a in argv])
    return code


def read(path):
    return pq.read_table(path).to_pydict()


def test_jsonl_sample_with_limit_keeps_order_and_ids(tmp_path, sample_path):
    out = tmp_path / "d.parquet"
    assert run(["--input", sample_path, "--output", out, "--limit", 100]) == 0
    table = read(out)
    first = json.loads(sample_path.read_text(encoding="utf-8").splitlines()[0])["sample"]
    assert len(table["sample"]) == 100
    assert table["sample"][0] == [t.strip() for t in first]
    assert table["dialogue_id"] == list(range(100))
    assert set(table["source"]) == {"sample_dialogues.jsonl"}
    assert pq.read_schema(out).field("dialogue_id").type == pa.int64()


def test_dash_text_xz_blank_lines_and_continuations(tmp_path):
    text = "- Привет\n- Привет, как дела?\n\n\n\n- Одна реплика\n\n- Где ключи?\n  На полке,\nкажется\n- Спасибо\n"
    src = tmp_path / "d.txt.xz"
    with lzma.open(src, "wt", encoding="utf-8") as f:
        f.write(text)
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [["Привет", "Привет, как дела?"],
                                   ["Где ключи? На полке, кажется", "Спасибо"]]


def test_csv_question_answer_columns(tmp_path):
    src = tmp_path / "qa.csv"
    src.write_text('question,answer\nКак дела?,"Хорошо, спасибо"\n, пусто\n', encoding="utf-8")
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [["Как дела?", "Хорошо, спасибо"]]


def test_parquet_list_column_under_another_name(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"turns": [["а", "б", "в"], ["г", "д"]]}), src)
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [["а", "б", "в"], ["г", "д"]]


def test_telegram_export_joins_senders_splits_on_silence_skips_media(tmp_path, repo_root):
    out = tmp_path / "d.parquet"
    src = repo_root / "tests" / "fixtures" / "telegram_result.json"
    assert run(["--input", src, "--output", out, "--max-gap-minutes", 60]) == 0
    assert read(out)["sample"] == [
        ["Привет!\nТы завтра свободен?", "Да, после обеда свободен.", "Отлично, тогда в кино?"],
        ["Какой фильм выберем?", "https://kino.example.ru вот список", "Давай комедию."],
    ]


def test_telegram_gap_flag_changes_the_split(tmp_path, repo_root):
    out = tmp_path / "d.parquet"
    src = repo_root / "tests" / "fixtures" / "telegram_result.json"
    assert run(["--input", src, "--output", out, "--max-gap-minutes", 24 * 60]) == 0
    dialogues = read(out)["sample"]
    assert len(dialogues) == 1 and dialogues[0][-1] == "Давай комедию.\nДоброе утро"


@pytest.mark.parametrize("name, content, fault", [
    ("missing.jsonl", None, "no such file"),
    ("empty.csv", b"", "empty"),
    ("broken.parquet", b"PAR1 this is not parquet", "parquet"),
    ("cols.csv", "name,age\nИван,3\n".encode(), "column"),
    ("latin.txt", "- привет\n- пока\n".encode("cp1251"), "UTF-8"),
    ("notext.json", json.dumps({"name": "x", "messages": [
        {"id": 1, "type": "message", "from_id": "u", "text": "", "media_type": "sticker"},
        {"id": 2, "type": "service", "text": "", "action": "pin_message"}]}).encode(), "no text messages"),
    ("bad.jsonl", b'{"sample": ["a", "b"]}\n{oops\n', "not valid JSON"),
])
def test_bad_input_one_line_exit_1_and_nothing_overwritten(tmp_path, capsys, name, content, fault):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous result")
    assert run(["--input", src, "--output", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parser_dataset.py: error: ")
    assert fault.lower() in err[0].lower() and name in err[0]
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_unreachable_hub_says_so_without_traceback(tmp_path, repo_root):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "parser_dataset.py", "--input", "someone/russian_dialogues",
                           "--output", str(tmp_path / "d.parquet")],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "hub is unreachable" in proc.stderr and "someone/russian_dialogues" in proc.stderr
    assert not (tmp_path / "d.parquet").exists()


@pytest.mark.shared_data
def test_real_corpus_text_and_parquet_give_the_same_dialogues(tmp_path, shared_data):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert run(["--input", shared_data / "anekdot_dialogues.txt.xz", "--output", a, "--limit", 3000]) == 0
    assert run(["--input", shared_data / "anekdot_dialogues.parquet", "--output", b, "--limit", 3000]) == 0
    assert read(a)["sample"] == read(b)["sample"]


def test_telegram_account_export_reads_every_chat_and_tells_namesakes_apart(tmp_path, repo_root):
    """A whole account's export keeps its chats under chats.list; two people
    both called Саша are two speakers because their from_id differs."""
    out = tmp_path / "d.parquet"
    src = repo_root / "tests" / "fixtures" / "telegram_account_export.json"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [
        ["Ты дома?", "Дома, заходи.", "Бегу!"],
        ["Кто едет в субботу?", "Я, с рассадой", "Отлично, тогда я возьму лопаты."],
    ]


BOM = "\ufeff"


@pytest.mark.parametrize("name, text", [
    ("bom.csv", BOM + 'question,answer\nКак дела?,"Хорошо, спасибо"\n'),
    ("bom.jsonl", BOM + json.dumps({"sample": ["Как дела?", "Хорошо, спасибо"]}, ensure_ascii=False) + "\n"),
    ("bom.txt", BOM + "- Как дела?\n- Хорошо, спасибо\n"),
    ("bom.json", BOM + json.dumps([{"sample": ["Как дела?", "Хорошо, спасибо"]}], ensure_ascii=False)),
])
def test_byte_order_mark_is_not_text(tmp_path, name, text):
    src = tmp_path / name
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [["Как дела?", "Хорошо, спасибо"]]


def test_messages_column_of_role_and_content(tmp_path):
    """Chat-format data: a system message is not a turn, consecutive messages
    of one side make one turn, content may be a list of parts."""
    conversations = [
        [{"role": "system", "content": "Ты вежливый помощник."},
         {"role": "user", "content": "Привет!"},
         {"role": "user", "content": "Подскажи рецепт блинов."},
         {"role": "assistant", "content": [{"type": "text", "text": "Мука, молоко, яйца "},
                                           {"type": "text", "text": "и щепотка соли."}]},
         {"role": "tool", "content": "{}"},
         {"role": "user", "content": "Спасибо"}],
        [{"from": "human", "value": "Который час?"}, {"from": "gpt", "value": "Около пяти."}],
    ]
    expected = [["Привет!\nПодскажи рецепт блинов.", "Мука, молоко, яйца и щепотка соли.", "Спасибо"],
                ["Который час?", "Около пяти."]]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations),
                     encoding="utf-8")
    csv_file = tmp_path / "chat.csv"
    with open(csv_file, "w", encoding="utf-8", newline="") as handle:
        writer = __import__("csv").writer(handle)
        writer.writerow(["messages"])
        for m in conversations:
            writer.writerow([json.dumps(m, ensure_ascii=False)])
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "system", "content": "Будь краток."},
                                           {"role": "user", "content": "Который час?"},
                                           {"role": "assistant", "content": "Около пяти."}]]}), parquet)
    for src, want in ((jsonl, expected), (csv_file, expected), (parquet, [["Который час?", "Около пяти."]])):
        out = tmp_path / f"{src.suffix[1:]}.parquet"
        assert run(["--input", src, "--output", out]) == 0
        assert read(out)["sample"] == want, src.name


def test_csv_turn_over_128_kb(tmp_path):
    long_turn = "очень длинная реплика " * 8000  # about 180 KB
    src = tmp_path / "long.csv"
    with open(src, "w", encoding="utf-8", newline="") as handle:
        writer = __import__("csv").writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerow(["Что там в логе?", long_turn])
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [["Что там в логе?", long_turn.strip()]]


def test_sample_column_of_strings_is_split_when_known_and_refused_otherwise(tmp_path, capsys):
    known = tmp_path / "dash.csv"
    known.write_text('sample\n"- Привет\n- Привет, как ты?\n- Нормально"\n', encoding="utf-8")
    out = tmp_path / "d.parquet"
    assert run(["--input", known, "--output", out]) == 0
    assert read(out)["sample"] == [["Привет", "Привет, как ты?", "Нормально"]]
    for name, write in (
            ("plain.parquet", lambda p: pq.write_table(pa.table({"sample": ["Привет, как ты? Нормально"]}), p)),
            ("plain.jsonl", lambda p: p.write_text(json.dumps({"sample": "Привет, как ты?"}, ensure_ascii=False),
                                                   encoding="utf-8"))):
        src = tmp_path / name
        write(src)
        out.write_bytes(b"previous result")
        assert run(["--input", src, "--output", out]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "column 'sample' holds text" in err[0]
        assert out.read_bytes() == b"previous result"


def test_russian_dialogues_keeps_relevance_1_only(tmp_path, repo_root, capsys):
    out = tmp_path / "d.parquet"
    src = repo_root / "tests" / "fixtures" / "russian_dialogues.jsonl"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [
        ["Привет, ты тут?", "Тут, что случилось?"],
        ["Во сколько завтра собираемся?", "Давай к семи у входа в парк."],
        ["Посоветуй, что почитать в дороге", "Возьми рассказы Чехова, они короткие."],
    ]
    assert "2 rows skipped whose relevance is not 1" in capsys.readouterr().out
    # the preset says the same of a copy whose relevance column is text (CSV)
    copy = tmp_path / "copy.csv"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
    copy.write_text("question,answer,relevance\n" + "".join(
        f'"{r["question"]}","{r["answer"]}",{r["relevance"]}\n' for r in rows), encoding="utf-8")
    assert run(["--input", copy, "--output", out, "--preset", "russian_dialogues"]) == 0
    assert len(read(out)["sample"]) == 3


def test_russian_dialogues_2_sample_lists(tmp_path, repo_root):
    out = tmp_path / "d.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "russian_dialogues_2.jsonl", "--output", out]) == 0
    assert read(out)["sample"] == [["Доброе утро!", "Доброе. Ты уже встал?", "Давно, уже кофе пью."],
                                   ["Скинь адрес, пожалуйста", "Садовая, двенадцать, третий подъезд"]]


def test_siberian_persona_chat_turns_without_the_persona(tmp_path, repo_root):
    out = tmp_path / "d.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "siberian_persona_chat.json", "--output", out]) == 0
    assert read(out)["sample"] == [
        ["Привет! Чем занимаешься?", "Привет, только что с работы, лечила котёнка.",
         "Ого, а что с ним было?", "Лапу поранил, но уже всё хорошо."],
        ["Добрый вечер\nВы сегодня на каком маршруте?", "Добрый! На сорок втором, как обычно."],
        ["Как думаешь, пойдёт завтра снег?", "Обещали, так что бери шарф."],
    ]
    # the second version labels the turns "Ты:" / "Я:" and has no "Продолжи диалог:"
    assert run(["--input", repo_root / "tests" / "fixtures" / "siberian_persona_chat_2.jsonl",
                "--output", out, "--preset", "siberian_persona_chat"]) == 0
    assert read(out)["sample"] == [["Здравствуй, Миша!", "Привет! Рад тебя слышать.",
                                    "Сыграешь что-нибудь вечером?", "Конечно, только струну поменяю."]]


def test_toloka_persona_chat_tsv(tmp_path, repo_root):
    out = tmp_path / "d.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "toloka_dialogues.tsv", "--output", out]) == 0
    assert read(out)["sample"] == [
        ["Привет! Как настроение?", "Привет, отличное!\nТолько вернулась с пары по выпечке.",
         "Здорово, а что пекли?", 'Пирог "Зебра", получился кривой, но вкусный.'],
        ["Добрый вечер.", "Добрый! Откуда вы?"],
    ]


def test_preset_names_the_columns_it_misses(tmp_path, capsys):
    src = tmp_path / "qa.csv"
    src.write_text("question,answer\nКак дела?,Хорошо\n", encoding="utf-8")
    assert run(["--input", src, "--output", tmp_path / "d.parquet", "--preset", "russian_dialogues"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qa.csv" in err[0] and "relevance" in err[0]
    assert pd_stage.parse_args(["--input", "Den4ikAI/russian_dialogues"]).preset == "russian_dialogues"
    assert pd_stage.parse_args(["--input", "SiberiaSoft/SiberianPersonaChat"]).preset == "siberian_persona_chat"


def write_dialogue_text(path, text):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


@pytest.mark.parametrize("name", ["bom.txt.xz", "bom.txt.gz", "bom.csv.gz"])
def test_byte_order_mark_in_compressed_text_is_not_text(tmp_path, name):
    """The compressed branch opens its text on its own, so it needs its own check."""
    text = ('question,answer\nКак дела?,"Хорошо, спасибо"\n' if ".csv" in name
            else "- Как дела?\n- Хорошо, спасибо\n")
    src = tmp_path / name
    write_dialogue_text(src, BOM + text)
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["sample"] == [["Как дела?", "Хорошо, спасибо"]]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parser_dataset.py: error: "), err
    return err[0]


def test_output_that_is_a_folder_is_named_as_the_fault(tmp_path, capsys, sample_path):
    folder = tmp_path / "adir"
    folder.mkdir()
    (folder / "keep.txt").write_text("x", encoding="utf-8")
    assert run(["--input", sample_path, "--output", folder]) == 1
    err = one_error_line(capsys)
    assert "adir" in err and "--output" in err and "folder" in err
    assert "sample_dialogues" not in err and "cannot read" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_output_that_cannot_be_written_is_named_not_the_input(tmp_path, capsys, sample_path, monkeypatch):
    # /proc takes no new files, even for root.
    assert run(["--input", sample_path, "--output", "/proc/d.parquet"]) == 1
    err = one_error_line(capsys)
    assert "/proc/d.parquet" in err and "cannot write" in err
    assert "sample_dialogues" not in err and ".tmp-" not in err
    # A failure at the last step (a full disk, a read-only target) leaves the previous output and no temp file.
    out = tmp_path / "d.parquet"
    out.write_bytes(b"previous result")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(pd_stage.os, "replace", refuse)
    assert run(["--input", sample_path, "--output", out]) == 1
    err = one_error_line(capsys)
    assert "d.parquet" in err and "cannot write" in err and "Permission denied" in err
    assert "sample_dialogues" not in err
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("value", ["0", "1", "-3"])
def test_min_turns_below_two_is_refused(tmp_path, capsys, sample_path, value):
    out = tmp_path / "d.parquet"
    with pytest.raises(SystemExit) as stop:
        run(["--input", sample_path, "--output", out, "--min-turns", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("parser_dataset.py: error: ") and "--min-turns" in err[-1] and "2" in err[-1]
    assert not out.exists()
    assert pd_stage.parse_args(["--min-turns", "2"]).min_turns == 2


# ---- who said each turn ------------------------------------------------------------------------------
def read_speakers(path):
    table = read(path)
    assert all(len(who) == len(turns) for who, turns in zip(table["speakers"], table["sample"]) if who)
    return [list(zip(who, turns)) for who, turns in zip(table["speakers"], table["sample"])]


def test_whole_account_export_keeps_who_said_each_turn_and_its_owner(tmp_path, repo_root):
    """A private chat and a group of three: every turn names its sender by from_id and the latest
    display name (Ольга renamed herself Оля Смирнова and stays user222), consecutive messages of one
    sender are one turn, and the owner of the account is recorded without the phone number."""
    out = tmp_path / "d.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "telegram_account_owner.json", "--output", out]) == 0
    vadim, olga, kirill = "user111|Вадим Петров", "user222|Оля Смирнова", "user333|Кирилл"
    assert read_speakers(out) == [
        [(olga, "Добрый вечер, Вадим! Вы не забыли, что в субботу мы едем за город?"),
         (vadim, "привет\nне забыл конечно)\nво сколько выезжаем"),
         (olga, "Предлагаю в восемь утра, чтобы успеть до пробок. Вам удобно?"),
         (vadim, "ок"),  # the sticker after it is no turn and no new turn of his
         (olga, "Отлично. Я возьму термос и бутерброды."),
         (vadim, "а я палатку")],
        [(vadim, "ты дома"), (olga, "Да, дома. Что-то случилось?"),
         (vadim, "ключи от гаража у тебя остались\nщас зайду"),
         (olga, "Да, они у меня. Заходите, я никуда не ухожу.")],
        [(kirill, "ВСЕМ ПРИВЕТ!!! 🔥🔥 кто в поход в субботу???"),
         (olga, "Здравствуйте, Кирилл. Мы с Вадимом едем, выезжаем в восемь."),
         (vadim, "я еду\nпалатка моя"),
         (kirill, "ОГОНЬ 🔥 бро, а котелок есть?\nЯ могу взять гитару!!!"),
         (vadim, "котелок есть"),
         (olga, "Напоминаю: возьмите, пожалуйста, тёплые вещи, ночью обещают до пяти градусов."),
         (kirill, "ОК 👍 СПАСИБО ОЛЬГА!!!")],
        [(olga, "Доброе утро! Кирилл, вы успеваете к восьми?"),
         (kirill, "ДА!!! 🚗 уже еду, буду через 10 мин"),
         (vadim, "мы у подъезда"),
         (kirill, "ВИЖУ ВАС 😎")],
    ]
    metadata = pq.read_schema(out).metadata
    assert json.loads(metadata[b"owner"]) == {"key": "user111", "name": "Вадим Петров"}
    assert b"+7 900" not in metadata[b"owner"] and b"vadim_petrov" not in metadata[b"owner"]
    # the owner's key is the key of the owner's own turns
    keys = {who.split("|")[0] for who in sum(read(out)["speakers"], [])}
    assert keys == {"user111", "user222", "user333"}


def test_namesakes_are_two_speakers_and_a_one_chat_export_has_no_owner(tmp_path, repo_root):
    out = tmp_path / "d.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "telegram_account_export.json", "--output", out]) == 0
    assert read(out)["speakers"] == [["user501|Саша", "user777|Саша", "user501|Саша"],
                                     ["user12|Вера", "user13|Коля", "user12|Вера"]]
    assert b"owner" not in (pq.read_schema(out).metadata or {})
    assert run(["--input", repo_root / "tests" / "fixtures" / "telegram_result.json", "--output", out]) == 0
    assert read(out)["speakers"][0] == ["user1|Аня", "user2|Олег", "user1|Аня"]
    assert b"owner" not in (pq.read_schema(out).metadata or {})


def test_telegram_messages_of_different_or_unknown_senders_are_never_one_turn(tmp_path):
    """A renamed sender stays one speaker (one key, the latest name); two messages without any sender are
    two turns, since nothing says they are one person's."""
    messages = [
        {"id": 1, "type": "message", "date_unixtime": "1000", "from": "Лёша", "from_id": "user7", "text": "Ты где?"},
        {"id": 2, "type": "message", "date_unixtime": "1010", "from": "Алексей К.", "from_id": "user7",
         "text": "Ау"},
        {"id": 3, "type": "message", "date_unixtime": "1020", "from": "Лёша", "from_id": "user8", "text": "Тут"},
        {"id": 4, "type": "message", "date_unixtime": "1030", "text": "Кто-то"},
        {"id": 5, "type": "message", "date_unixtime": "1040", "text": "Кто-то ещё"},
        {"id": 6, "type": "message", "date_unixtime": "1050", "from": "Группа | Новости", "text": "Пост"},
    ]
    src = tmp_path / "result.json"
    src.write_text(json.dumps({"name": "x", "type": "private_group", "id": 1, "messages": messages},
                              ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "d.parquet"
    assert run(["--input", src, "--output", out]) == 0
    assert read_speakers(out) == [[("user7|Алексей К.", "Ты где?\nАу"), ("user8|Лёша", "Тут"), ("", "Кто-то"),
                                   ("", "Кто-то ещё"), ("Группа / Новости|Группа | Новости", "Пост")]]


def test_chat_messages_toloka_persona_and_question_answer_name_their_speakers(tmp_path, repo_root):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Будь краток."}, {"role": "user", "content": "Привет"},
        {"role": "human", "content": "Как дела?"}, {"role": "assistant", "content": "Хорошо"},
        {"role": "user", "content": "Пока"}]}, ensure_ascii=False) + "\n", encoding="utf-8")
    cases = [
        (chat, [[("user", "Привет\nКак дела?"), ("assistant", "Хорошо"), ("user", "Пока")]]),
        (repo_root / "tests" / "fixtures" / "toloka_dialogues.tsv",
         [[("participant_1", "Привет! Как настроение?"),
           ("participant_2", "Привет, отличное!\nТолько вернулась с пары по выпечке."),
           ("participant_1", "Здорово, а что пекли?"),
           ("participant_2", 'Пирог "Зебра", получился кривой, но вкусный.')],
          [("participant_2", "Добрый вечер."), ("participant_1", "Добрый! Откуда вы?")]]),
        (repo_root / "tests" / "fixtures" / "siberian_persona_chat_2.jsonl",
         [[("user", "Здравствуй, Миша!"), ("persona", "Привет! Рад тебя слышать."),
           ("user", "Сыграешь что-нибудь вечером?"), ("persona", "Конечно, только струну поменяю.")]]),
    ]
    for src, want in cases:
        out = tmp_path / f"{src.stem}.parquet"
        assert run(["--input", src, "--output", out]) == 0
        assert read_speakers(out) == want, src.name
    out = tmp_path / "persona.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "siberian_persona_chat.json", "--output", out]) == 0
    assert read(out)["speakers"] == [["user", "persona", "user", "persona"], ["user", "persona"], ["user", "persona"]]
    out = tmp_path / "qa.parquet"
    assert run(["--input", repo_root / "tests" / "fixtures" / "russian_dialogues.jsonl", "--output", out]) == 0
    assert read(out)["speakers"] == [["question", "answer"]] * 3


def test_sources_that_do_not_say_who_spoke_give_empty_lists(tmp_path, sample_path):
    out = tmp_path / "d.parquet"
    assert run(["--input", sample_path, "--output", out, "--limit", 20]) == 0
    table = read(out)
    assert table["speakers"] == [[]] * 20 and len(table["sample"]) == 20
    assert pq.read_schema(out).field("speakers").type == pa.list_(pa.string())
    # a list of strings beside a list of messages: the strings' turns are unknown, the messages' known
    src = tmp_path / "mixed.json"
    src.write_text(json.dumps([["Привет", "Привет"], [{"role": "user", "content": "Ку"}, "Ку-ку"]],
                              ensure_ascii=False), encoding="utf-8")
    assert run(["--input", src, "--output", out]) == 0
    assert read(out)["speakers"] == [[], ["user", ""]]
