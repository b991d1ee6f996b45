"""parser_dataset.py: every input kind, the Telegram export, and bad input."""
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
