"""train_medium_context.py: the same prompt as train_transformer.py, context cut
from the oldest turn with the answer kept, the window the chat keeps, the
parquet input, a tiny run."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import train_medium_context as tm
import train_transformer as tt


# Tiny models run faster on one thread, above all on a CPU shared with other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")

DIALOGUES = [
    ["Привет! Как дела?", "Привет, нормально. Только с работы пришёл.", "Устал, наверное?",
     "Есть немного. А ты чем занимаешься?", "Да ничего особенного, сериал смотрю."],
    ["Какая завтра погода, не знаешь?", "Обещают дождь.", "Значит, зонт брать."],
    ["Что приготовить на ужин?", "Может, макароны? Быстро и сытно.", "Фарш есть, давай."],
    ["Ты сделал домашку по алгебре?", "Почти. Последняя задача не получается.", "Там надо через дискриминант.",
     "А, точно. Спасибо!"],
    ["Завтра едем к бабушке, не забудь.", "Помню. Во сколько выезжаем?", "Поезд в 7:15, не опоздай.",
     "Поставлю два будильника."],
    ["Кажется, я заболел.", "Температура есть?", "Тридцать семь и пять.", "Лежи и пей чай с лимоном."],
]

TINY = ["--from-scratch", "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--vocab-size", "400", "--n-positions", "128", "--seed", "0"]


def context_rows(dialogues, max_turns=4):
    ids, contexts, answers = [], [], []
    for i, turns in enumerate(dialogues):
        for k in range(1, len(turns)):
            ids.append(i)
            contexts.append(turns[max(0, k - max_turns):k])
            answers.append(turns[k])
    return pa.table({"dialogue_id": pa.array(ids, pa.int64()),
                     "context": pa.array(contexts, pa.list_(pa.string())),
                     "answer": pa.array(answers, pa.string())})


def write_context(folder, dialogues=DIALOGUES):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        pq.write_table(context_rows(dialogues), folder / f"context_{split}.parquet")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    texts = tm.tokenizer_texts([(t[:-1], t[-1]) for t in DIALOGUES], 16)
    return tm.train_tokenizer(texts, vocab_size=400, model_max_length=128)


def window(max_length, max_turns=16, context_tokens=None):
    return {"max_turns": max_turns, "context_tokens": context_tokens or max_length, "max_length": max_length}


def test_both_scripts_spell_the_prompt_the_same(tokenizer):
    for name in ("QUESTION_LABEL", "ANSWER_LABEL", "TURN_SEPARATOR", "IGNORE_INDEX", "SPECIAL_TOKENS", "PROMPT_RULE"):
        assert getattr(tm, name) == getattr(tt, name), name
    assert (tm.QUESTION_LABEL, tm.ANSWER_LABEL, tm.TURN_SEPARATOR) == ("Вопрос: ", "Ответ: ", "\n")
    for turns in (["Как дела?"], ["Ответ: да", "вопрос: нет"], DIALOGUES[0][:4]):
        assert tm.prompt_text(turns) == tt.prompt_text(turns)
        assert tm.prompt_text(turns, tm.PERSONA) == tt.prompt_text(turns, tt.PERSONA)
    single = tt.encode_example(tokenizer, ["Как дела?"], "Хорошо.", window(64))
    assert tm.encode_example(tokenizer, ["Как дела?"], "Хорошо.", window(64)) == single
    assert tokenizer.decode(single["input_ids"]) == "Вопрос: Как дела?\nОтвет: Хорошо.</s>"


def test_multi_turn_prompt_ends_with_a_question_before_the_answer(tokenizer):
    example = tm.encode_example(tokenizer, DIALOGUES[3][:3], DIALOGUES[3][3], window(128))
    assert tokenizer.decode(example["input_ids"]) == (
        "Вопрос: Ты сделал домашку по алгебре?\nОтвет: Почти. Последняя задача не получается.\n"
        "Вопрос: Там надо через дискриминант.\nОтвет: А, точно. Спасибо!</s>")


def answer_part(tokenizer, example):
    return tokenizer.decode([x for x in example["labels"] if x != -100])


def test_cut_context_loses_the_oldest_turns_and_keeps_the_answer(tokenizer):
    turns = ["Первая реплика, очень длинная, " * 4, "Вторая реплика.", "Третья реплика.", "Где ключи?"]
    answer = "На полке у двери, рядом с зонтом."
    full = tm.encode_example(tokenizer, turns, answer, window(512))
    limit = len(full["input_ids"]) - 5
    cut = tm.encode_example(tokenizer, turns, answer, window(limit))
    assert len(cut["input_ids"]) <= limit
    prompt = tokenizer.decode([t for t, x in zip(cut["input_ids"], cut["labels"]) if x == -100])
    assert prompt == tm.prompt_text(turns[1:])             # only the oldest turn went
    assert answer_part(tokenizer, cut) == " " + answer + "</s>"
    # the turn window cuts the same way, whatever the budget
    windowed = tm.encode_example(tokenizer, turns, answer, window(512, max_turns=2))
    assert tokenizer.decode(windowed["input_ids"]).startswith("Ответ: Третья реплика.\nВопрос: Где ключи?\n")


def test_the_default_window_keeps_a_name_given_many_turns_back(tokenizer):
    """The chat keeps a long conversation; training must show the model one, or it learns to
    guess the name instead of reading it (the 4-turn window cut it away)."""
    dialogue = ["Привет! Меня зовут Илья, я живу в Мурманске.", "Привет, Илья!", "Как дела?", "Хорошо.",
                "Что делаешь?", "Сериал смотрю.", "Как меня зовут?"]
    example = tm.encode_example(tokenizer, dialogue, "Тебя зовут Илья.", window(384, max_turns=tm.MAX_TURNS))
    assert tm.MAX_TURNS >= 16
    assert "Меня зовут Илья" in tokenizer.decode(example["input_ids"])
    old_window = tm.encode_example(tokenizer, dialogue, "Тебя зовут Илья.", window(384, max_turns=4))
    assert "Меня зовут Илья" not in tokenizer.decode(old_window["input_ids"])


def test_when_only_the_question_is_left_its_start_is_cut_not_the_answer(tokenizer):
    turns = ["Раньше было так.", "Потом иначе.", "Слушай, " * 30 + "а где ключи?"]
    answer = "На полке у двери."
    cut = tm.encode_example(tokenizer, turns, answer, window(48))
    assert len(cut["input_ids"]) <= 48
    prompt = tokenizer.decode([t for t, x in zip(cut["input_ids"], cut["labels"]) if x == -100])
    assert prompt.startswith("Вопрос: ") and prompt.endswith("а где ключи?\nОтвет:")
    assert "Раньше" not in prompt and "Потом" not in prompt
    assert answer_part(tokenizer, cut) == " " + answer + "</s>"


def test_reads_the_last_max_turns_and_skips_rows_without_context(tmp_path):
    table = pa.table({"dialogue_id": pa.array([1, 2], pa.int64()),
                      "context": pa.array([["a", "b", "c", "d", "e"], []], pa.list_(pa.string())),
                      "answer": ["f", "first turn"]})
    pq.write_table(table, tmp_path / "c.parquet")
    assert tm.read_context(str(tmp_path / "c.parquet"), max_turns=2) == [(["d", "e"], "f", None)]


FACTS = "Тебя зовут Илья, ты живёшь в Мурманске."


def with_facts(table, facts):
    return table.append_column("facts", pa.array(facts, pa.string()))


def test_the_facts_column_is_read_where_there_is_one(tmp_path):
    table = with_facts(pa.table({"context": pa.array([["a"], ["b"], ["c"]], pa.list_(pa.string())),
                                 "answer": ["x", "y", "z"]}), [FACTS, "", None])
    pq.write_table(table, tmp_path / "c.parquet")
    assert [row[2] for row in tm.read_context(str(tmp_path / "c.parquet"), max_turns=4)] == [FACTS, None, None]
    pq.write_table(table.set_column(2, "facts", pa.array([1, 2, 3])), tmp_path / "bad.parquet")
    with pytest.raises(tm.UserError, match="column facts is int64, expected string"):
        tm.read_context(str(tmp_path / "bad.parquet"), max_turns=4)


def test_a_context_file_with_facts_trains_the_facts_exchange_and_says_so(tmp_path, capsys):
    """Where the data has facts (issue 14), the training prompts carry the exchange the chat will send, and
    chat_config.json says the model knows it; without facts (today's files, or an empty column) it says not."""
    data = tmp_path / "data"
    data.mkdir()
    rows = context_rows(DIALOGUES)
    facts = [FACTS if i % 2 else "" for i in range(rows.num_rows)]
    for split in ("train", "val"):
        pq.write_table(with_facts(rows, facts), data / f"context_{split}.parquet")
    out = tmp_path / "model"
    args = tm.parse_args(TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "2",
                                 "--eval-steps", "2", "--batch-size", "4"])
    train_rows, val_rows = tm.load_splits(args.data_dir, args.rows, args.val_rows, args.max_turns)
    trainer = tm.run(args, train_rows, val_rows, 4, tm.PERSONA)
    config = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))
    assert config["facts"] is True
    printed = capsys.readouterr().out
    assert f"facts exchange (the data's facts column): in {sum(map(bool, facts))} of {rows.num_rows} training " \
        "prompts" in printed, printed
    tokenizer = trainer.processing_class
    exchange = "\nВопрос: Что ты обо мне знаешь?\nОтвет: " + FACTS + "\n"
    texts = [tokenizer.decode(example["input_ids"]) for example in trainer.train_dataset]
    assert [exchange in text for text in texts] == [bool(f) for f in facts]
    # the same rows without facts
    for split in ("train", "val"):
        pq.write_table(with_facts(rows, [""] * rows.num_rows), data / f"context_{split}.parquet")
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "2", "--eval-steps", "2",
                           "--batch-size", "4"]) == 0
    assert json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["facts"] is False


def test_tiny_run_writes_a_context_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_context(tmp_path / "data")
    out = tmp_path / "model"
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "6",
                           "--eval-steps", "3", "--batch-size", "4", "--max-turns", "3"]) == 0
    config = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))
    assert config["max_turns"] == 3 and config["context_tokens"] == 64 and config["prompt_rule"] == tm.PROMPT_RULE
    assert config["facts"] is False  # a file without the facts column
    assert config["voice"] is None  # no voice.json: everyone's turns
    assert (out / "training_curves.png").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == model.generation_config.eos_token_id
    # the chat template keeps the trained window of 3 turns, as the chat does, with and without a persona
    for turns in (DIALOGUES[0], DIALOGUES[3][:3], ["Ответ: да?"]):
        messages = [{"role": "user" if (len(turns) - 1 - i) % 2 == 0 else "assistant", "content": turn}
                    for i, turn in enumerate(turns)]
        for persona in (config["persona"], None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False, persona=persona)
            assert ids == tm.fit_prompt(tokenizer, turns, 3, 10_000, persona)


def test_the_recorded_window_is_what_the_data_held(tmp_path, capsys):
    """A context file cut to 4 turns (create_dataset.py --max-turns 4) trains a model on 4
    turns at most: chat_config.json says 4, so the chat does not show it 16."""
    data = write_context(tmp_path / "data")  # context_rows keeps at most 4 turns
    # create_dataset.py --as: whose turns the answers are, which chat_config.json records as "voice"
    voice = {"keys": ["user111"], "names": ["Вадим Петров"]}
    (data / "voice.json").write_text(json.dumps(voice, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "model"
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "2", "--eval-steps", "2",
                           "--batch-size", "4"]) == 0
    config = json.loads((out / "chat_config.json").read_text(encoding="utf-8"))
    assert config["max_turns"] == 4 and config["voice"] == voice
    assert "at most 4 turns" in capsys.readouterr().out
    assert tm.trained_turns([(["a"] * 20, "b")], 16) == 16


def one_line_error(capfd):
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("train_medium_context.py: error: ")
    return err[0]


def test_bad_data_files_give_one_line_and_exit_1(tmp_path, capfd):
    out = tmp_path / "m"
    assert tm.main(TINY + ["--data-dir", str(tmp_path / "none"), "--output", str(out)]) == 1
    assert "context_train.parquet: data file not found" in one_line_error(capfd)
    data = write_context(tmp_path / "data")
    (data / "context_train.parquet").write_text("dialogue_id,question,answer\n1,a,b\n", encoding="utf-8")
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out)]) == 1
    assert "context_train.parquet: not a parquet file" in one_line_error(capfd)
    pq.write_table(pa.table({"sample": [["a", "b"]]}), data / "context_train.parquet")
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out)]) == 1
    assert "no column answer, context" in one_line_error(capfd)
    pq.write_table(pa.table({"context": ["a"], "answer": ["b"]}), data / "context_train.parquet")
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out)]) == 1
    assert "column context is string, expected list<string>" in one_line_error(capfd)
    assert not out.exists()


def test_unreachable_hub_and_resume_with_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_context(tmp_path / "data")
    out = tmp_path / "m"
    assert tm.main(["--data-dir", str(data), "--output", str(out), "--device", "cpu"]) == 1
    line = one_line_error(capfd)
    assert "ai-forever/rugpt3medium_based_on_gpt2" in line and "unreachable" in line and "--from-scratch" in line
    assert tm.main(TINY + ["--data-dir", str(data), "--output", str(out), "--resume"]) == 1
    assert "--resume found no complete checkpoint" in one_line_error(capfd)
    assert not out.exists()

