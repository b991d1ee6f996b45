"""tg_bot.py's long-term memory (issue 14): what a user says about themselves outlives the
context window, /reset and a restart; /memory shows it, /forget deletes it from the
database files; a group keeps its members' facts apart; --no-memory turns it off.

The end-to-end test runs the real bot process (a tiny random model whose chat_config.json
says it was trained with the facts exchange) against the fake Bot API; the others run
ChatBot in this process with the stub model of tests/test_tg_bot_production.py."""
import contextlib
import json
import re
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402
from fake_bot_api import FakeBotApi, LiveBot  # noqa: E402
from test_tg_bot_production import TOKEN, Harness, StubModel  # noqa: E402  (the in-process bot of issue 12's tests)

import tg_bot  # noqa: E402


def turns(store, chat_id):
    """The chat's stored texts, oldest first, as the bot reads them for a prompt."""
    return [text for _, text in store.history(chat_id)[0]]

torch.set_num_threads(1)
PERSONA = tiny_model.CHAT_CONFIG["persona"]
MAX_NEW_TOKENS = 4
INTRODUCTION = "Привет, меня зовут Аня, я из Казани"
ANYA, KAZAN = ("Аня", "Ани", "Ане", "Аню", "Аней"), ("Казан",)
# The tokenizer learns no piece of the name or the city, so the random model cannot write them
# into a reply by chance: what the files hold of them comes from what the user said.
MODEL_LINES = [line for line in tiny_model.TRAINING_LINES if "Аня" not in line and "Казан" not in line] + [
    "Вопрос: Что ты обо мне знаешь?", "Ответ: Тебя зовут, ты живёшь в городе."]


def file_bytes(db):
    """The database and its write-ahead log, as a disk would give them to anyone who reads it."""
    return b"".join(Path(str(db) + suffix).read_bytes() for suffix in ("", "-wal")
                    if Path(str(db) + suffix).exists())


def holds_any(db, words):
    """Which of `words` (any case) the database files hold."""
    data = file_bytes(db)
    return [word for word in words if any(form.encode() in data for form in (word, word.lower(), word.upper()))]


def query(db, sql, parameters=()):
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return connection.execute(sql, parameters).fetchall()


# --- the store: forgetting reaches the files
def test_forget_deletes_the_facts_and_every_exchange_holding_their_words_from_the_files(tmp_path):
    db = tmp_path / "history.sqlite3"
    store = tg_bot.HistoryStore(str(db))
    parse = tg_bot.load_fact_tools()["parse"]
    store.add_exchange(1, "я живу в Казани", "Хороший город")
    store.add_exchange(1, "как дела", "Казань красивая, правда?")      # the bot's turn holds it
    store.add_exchange(1, "поеду в Самару летом", "Отличный план")
    store.add_exchange(2, "в Казани тепло", "Да")                      # another chat: not this user's
    store.set_user_facts(1, 10, [("city", "Казань"), ("name", "Аня")])
    store.take([(500, 1, json.dumps({"text": "мне нравится казанский кремль, в Казани"}, ensure_ascii=False)),
                (502, 1, json.dumps({"text": "/forget казань"}, ensure_ascii=False))], offset=503)
    assert holds_any(db, KAZAN)  # the check below can see the bytes
    kept, removed = tg_bot.forget_user_facts(store.user_facts(1, 10), "казань")
    assert removed == [("city", "Казань")]
    holds = tg_bot.any_form_matcher(tg_bot.content_words("Казань"), parse)
    assert store.forget(1, 10, kept, holds, done=502)
    assert store.user_facts(1, 10) == [("name", "Аня")]
    assert turns(store, 1) == ["поеду в Самару летом", "Отличный план"]  # whole exchanges go, the rest stays
    assert turns(store, 2) == ["в Казани тепло", "Да"]
    assert store.pending() == []  # the inbox's older message holding the word, and the command itself
    store.close()
    store = tg_bot.HistoryStore(str(db))
    assert store.user_facts(1, 10) == [("name", "Аня")] and turns(store, 1) == ["поеду в Самару летом", "Отличный план"]
    store.forget(1, 10, [], tg_bot.any_form_matcher(["казань"], parse))
    store.clear(2)
    store.close()
    assert holds_any(db, KAZAN) == [] and holds_any(db, ("Аня",)) == []


def test_any_form_of_a_forgotten_word_is_found_and_function_words_are_not_taken():
    parse = tg_bot.load_fact_tools()["parse"]
    assert tg_bot.content_words("поехать в Сочи летом") == ["поехать", "сочи", "летом"]
    holds = tg_bot.any_form_matcher(tg_bot.content_words("Аня"), parse)
    assert all(holds(text) for text in ("меня зовут Аня", "спроси у ани", "передай АНЕ привет", "с Аней"))
    assert not any(holds(text) for text in ("меня зовут Оля", "планы на неделю", "анализ"))


# --- the bot process: 40 exchanges, /reset, a restart
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = dict(tiny_model.CHAT_CONFIG, facts=True)
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("model") / "facts_model", lines=MODEL_LINES,
                                       chat_config=config)


def settings_of(tokenizer):
    budget = min(tiny_model.CHAT_CONFIG["context_tokens"], 256 - MAX_NEW_TOKENS)
    return {"persona": PERSONA, "facts_exchange": True, "max_turns": tiny_model.CHAT_CONFIG["max_turns"],
            "budget": budget}


def say(bot, chat_id, text, **kwargs):
    """Send a message, wait for its reply (the chat's next message) and return it."""
    count = len(bot.api.messages_to(chat_id)) + 1
    bot.api.push_text(chat_id, text, **kwargs)
    return bot.api.wait_for_messages(chat_id, count)[count - 1]["text"]


def test_name_and_city_outlive_40_exchanges_a_reset_and_a_restart_and_forget_clears_the_files(model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = settings_of(tokenizer)
    db = tmp_path / "history.sqlite3"
    chat = 201
    facts = [("name", "Аня"), ("city", "Казань")]
    told = tg_bot.render_facts_answer(facts)
    assert "Аня" in told and "Казани" in told
    args = ["--model", str(model_dir), "--db", str(db), "--max-new-tokens", str(MAX_NEW_TOKENS), "--poll-seconds",
            "1", "--rate-limit", "0", "--no-stream", "--log-prompts", "--threads", "1"]
    with FakeBotApi(TOKEN) as api:
        bot = LiveBot(api, TOKEN, tmp_path, args)
        bot.start()
        try:
            assert "not trained with the facts exchange" not in bot.log_text()
            history = []
            for text in [INTRODUCTION] + [f"Сообщение {i}: что нового?" for i in range(40)]:
                reply = say(bot, chat, text)
                history.append(text)
                prompt = bot.prompts(chat)[-1]
                # The message's own facts count for its answer; the turns are the ones stored so far.
                assert prompt == tokenizer.decode(tg_bot.chat_prompt_ids(history, settings, tokenizer, facts))
                if reply == tg_bot.FALLBACK_REPLY:
                    history.pop()  # the bot does not store an exchange it had no answer for
                else:
                    history.append(reply)
            last = bot.prompts(chat)[-1]
            assert INTRODUCTION not in last and f"Вопрос: {tg_bot.FACTS_QUESTION}\nОтвет: {told}\n" in last
            assert say(bot, chat, "/reset") == tg_bot.RESET_TEXT
        finally:
            assert bot.stop() == 0
        bot.start()  # a restart on the same database
        try:
            assert say(bot, chat, "/memory") == "имя: Аня\nгород: Казань"
            question = "Что ты обо мне помнишь?"
            say(bot, chat, question)
            assert bot.prompts(chat)[-1] == tokenizer.decode(tg_bot.chat_prompt_ids([question], settings, tokenizer,
                                                                                    facts))
            say(bot, chat, "Я всё ещё живу в Казани, кстати")  # stored in the history with the city's word
            assert holds_any(db, KAZAN + ANYA)
            assert say(bot, chat, "/forget казань") == tg_bot.FORGOT_SOME_REPLY + "\nгород: Казань"
            assert holds_any(db, KAZAN) == [], "the city is still in the database files"
            assert holds_any(db, ("Аня",)) == ["Аня"]  # the name stays until it is forgotten
            assert say(bot, chat, "/memory") == "имя: Аня"
            assert say(bot, chat, "/forget казань") == tg_bot.NOTHING_TO_FORGET_REPLY
            assert say(bot, chat, "/forget") == tg_bot.FORGOT_ALL_REPLY
            assert holds_any(db, ANYA + KAZAN) == [], "the name is still in the database files"
            assert say(bot, chat, "/memory") == tg_bot.NO_FACTS_ANSWER
            assert query(db, "SELECT COUNT(*) FROM user_facts") == [(0,)]
            assert query(db, "SELECT COUNT(*) FROM messages WHERE chat_id = ?", (chat,))[0][0] >= 2  # the rest stays
            help_text = say(bot, chat, "/help")
            assert "/memory" in help_text and "/forget" in help_text
            commands = [r for r in api.requests if r["method"] == "setMyCommands"]
            assert commands, "the command list was not registered"
        finally:
            assert bot.stop() == 0


# --- in this process: a group, and memory off
@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model.build_tiny_tokenizer()


@pytest.fixture
def api():
    with FakeBotApi(TOKEN) as api:
        yield api


@pytest.fixture
def harness(api, tokenizer, tmp_path, monkeypatch):
    from telebot import apihelper

    monkeypatch.setattr(apihelper, "API_URL", None)
    started = []

    def make(flags=(), db=None):
        settings = {"persona": PERSONA, "budget": 192, "max_turns": 8, "facts_exchange": True, "generation": {}}
        bot = Harness(api, tokenizer, db or tmp_path / "history.sqlite3", ["--no-stream", *flags], StubModel(),
                      settings=settings).start()
        started.append(bot)
        return bot

    yield make
    for bot in started:
        bot.stop()


def ask(api, chat_id, text, **kwargs):
    count = len(api.messages_to(chat_id)) + 1
    api.push_text(chat_id, text, **kwargs)
    return api.wait_for_messages(chat_id, count)[count - 1]["text"]


def test_in_a_group_each_member_has_their_own_facts_and_they_stay_in_that_group(api, harness):
    bot = harness()
    group, peter, olga = -300, 31, 32
    ask(api, group, "@tiny_test_bot меня зовут Петя, я из Омска", user_id=peter, chat_type="group", first_name="Петя")
    ask(api, group, "@tiny_test_bot а меня зовут Оля, живу в Туле", user_id=olga, chat_type="group", first_name="Оля")
    ask(api, group, "@tiny_test_bot как дела?", user_id=olga, chat_type="group", first_name="Оля")
    prompt = bot.model.prompts[-1]
    assert "Тебя зовут Оля, ты живёшь в Туле." in prompt and "Тебя зовут Петя" not in prompt
    assert ask(api, group, "/memory", user_id=peter, chat_type="group") == "имя: Петя\nгород: Омск"
    assert ask(api, group, "/memory", user_id=olga, chat_type="group") == "имя: Оля\nгород: Тула"
    assert ask(api, peter, "/memory") == tg_bot.NO_FACTS_ANSWER  # his private chat knows nothing of the group
    assert ask(api, group, "/forget", user_id=olga, chat_type="group") == tg_bot.FORGOT_ALL_REPLY
    assert ask(api, group, "/memory", user_id=peter, chat_type="group") == "имя: Петя\nгород: Омск"
    assert ask(api, group, "/memory", user_id=olga, chat_type="group") == tg_bot.NO_FACTS_ANSWER
    assert query(bot.db, "SELECT DISTINCT chat_id, user_id FROM user_facts") == [(group, peter)]


def test_forget_takes_each_word_without_its_punctuation(api, harness):
    harness()
    ask(api, 61, INTRODUCTION)
    assert ask(api, 61, "/forget , …") == tg_bot.NOTHING_TO_FORGET_REPLY  # punctuation alone forgets nothing
    assert ask(api, 61, "/memory") == "имя: Аня\nгород: Казань"
    assert ask(api, 61, "/forget Аня,") == tg_bot.FORGOT_SOME_REPLY + "\nимя: Аня"
    assert ask(api, 61, "/memory") == "город: Казань"


def test_facts_outlive_an_idle_reset(api, harness):
    bot = harness(["--idle-minutes", "0.002"])  # 0.12 s
    ask(api, 51, INTRODUCTION)
    time.sleep(0.3)
    ask(api, 51, "как дела?")
    prompt = bot.model.prompts[-1]
    assert INTRODUCTION not in prompt  # the conversation started afresh...
    assert "Тебя зовут Аня, ты живёшь в Казани." in prompt  # ...and the facts stayed
    bot.wait_until(lambda: turns(bot.chat_bot.store, 51) == ["как дела?", "ответ на «как дела?»"],
                   "only the new exchange is in the history")


def test_no_memory_stores_nothing_and_the_commands_say_so(api, harness, tmp_path):
    on = harness(db=tmp_path / "on.sqlite3")
    ask(api, 41, INTRODUCTION)
    assert f"Вопрос: {tg_bot.FACTS_QUESTION}\nОтвет: Тебя зовут Аня" in on.model.prompts[-1]  # the control
    on.stop()
    off = harness(["--no-memory"], db=tmp_path / "off.sqlite3")
    ask(api, 42, INTRODUCTION)
    assert tg_bot.FACTS_QUESTION not in off.model.prompts[-1]
    assert ask(api, 42, "/memory") == tg_bot.MEMORY_OFF_REPLY
    assert ask(api, 42, "/forget") == tg_bot.MEMORY_OFF_REPLY
    assert ask(api, 42, "/help") == tg_bot.bot_help_text(memory=False)
    assert query(off.db, "SELECT COUNT(*) FROM user_facts") == [(0,)]


def test_memory_without_its_packages_is_one_line_naming_no_memory(monkeypatch, capsys):
    def missing():
        raise ImportError("No module named 'yargy'")

    monkeypatch.setattr(tg_bot, "load_fact_tools", missing)
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    for name in [name for name in list(__import__("os").environ) if name.startswith("TG_BOT_")]:
        monkeypatch.delenv(name)
    assert tg_bot.main(["--model", "no_such_folder"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tg_bot.py: error: ") and "yargy" in err[0] and "--no-memory" in err[0]
    assert tg_bot.main(["--model", "no_such_folder", "--no-memory"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-memory" not in err[0] and "token" in err[0]  # past the memory check
    assert tg_bot.parse_args([], environ={"TG_BOT_NO_MEMORY": "1"}).no_memory is True
    assert tg_bot.parse_args([], environ={}).no_memory is tg_bot.NO_MEMORY is False


def test_forget_a_word_while_the_facts_cannot_be_read_writes_nothing_over_them(api, harness, monkeypatch):
    """An unreadable facts table says nothing of which facts hold the word: forgetting from an empty
    list would delete all of them, so the bot says it cannot read them and keeps them."""
    bot = harness()
    ask(api, 71, INTRODUCTION)
    store = bot.chat_bot.store
    readable = store.user_facts
    monkeypatch.setattr(store, "user_facts", lambda chat_id, user_id: None)
    assert ask(api, 71, "/forget Аня") == tg_bot.FACTS_UNREADABLE_TEXT
    monkeypatch.setattr(store, "user_facts", readable)
    assert ask(api, 71, "/memory") == "имя: Аня\nгород: Казань"
