"""The one command table (issue 19): a command added to it once is in /help, in the menu
(setMyCommands) and answered; /forget follows one rule in the console chat and the bot; in a
group /forget deletes only what the asking member said. The bot runs in this process against
the fake Bot API (tests/fake_bot_api.py) with the stub model of tests/test_tg_bot_production.py."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_bot_api import FakeBotApi  # noqa: E402
from test_tg_bot_production import TOKEN, Harness, StubModel, turns  # noqa: E402

import system_prompt as sp  # noqa: E402
import tg_bot  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    import tiny_model
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

    def make(flags=()):
        settings = {"persona": {"question": "Кто ты?", "answer": "Я бот."}, "budget": 192, "max_turns": 8, "facts_exchange": True, "generation": {}}
        bot = Harness(api, tokenizer, tmp_path / "history.sqlite3", ["--no-stream", *flags], StubModel(),
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


def test_a_command_added_to_the_table_once_is_in_help_in_the_menu_and_answered(api, harness, monkeypatch):
    def ping(chat_bot, item, argument):
        chat_bot.send(item.message, f"понг {argument}".strip())

    row = tg_bot.Command("ping", "проверить, что я на связи", handler=ping)
    monkeypatch.setattr(tg_bot, "COMMANDS", tg_bot.COMMANDS + [row])
    bot = harness()
    tg_bot.register_commands(bot.bot, memory=True)
    assert {"command": "ping", "description": "проверить, что я на связи"} in api.my_commands
    assert [c["command"] for c in api.my_commands] == ["start", "help", "reset", "memory", "forget", "ping"]
    assert "/ping — проверить, что я на связи" in ask(api, 1, "/help").split("\n")
    assert ask(api, 1, "/ping раз") == "понг раз"
    # in a group too: triage takes it as one of the bot's own commands, not another bot's
    assert ask(api, -5, "/ping", user_id=3, chat_type="group") == "понг"
    assert bot.model.prompts == []  # no command reached the model


def test_with_memory_off_the_menu_and_help_leave_the_memory_commands_out(api, harness):
    bot = harness(["--no-memory"])
    tg_bot.register_commands(bot.bot, memory=False)
    assert [c["command"] for c in api.my_commands] == ["start", "help", "reset"]
    help_text = ask(api, 2, "/help")
    assert "/reset" in help_text and "/memory" not in help_text and "/forget" not in help_text
    assert ask(api, 2, "/memory") == tg_bot.MEMORY_OFF_REPLY


def test_the_console_takes_its_commands_from_the_same_table(capsys):
    session = sp.ConsoleChat(None, {}, memory=True)
    session.handle("/help")
    out = capsys.readouterr().out
    for row in sp.COMMANDS:
        if row.name in ("reset", "memory", "forget"):
            assert row.usage.split("\n")[0] in out
    assert "/start" not in out  # a bot's command: the console has no handler for it


# --- one /forget rule: the console and the bot keep the same facts and the same messages
FACTS = [("name", "Аня"), ("city", "Казань"), ("plan", "поехать в Сочи летом"), ("like", "кошки")]
MESSAGES = ["меня зовут Аня", "привет, Аня", "я из Казани", "в Казани тепло", "я был в Сочи", "хорошо",
            "люблю кошек", "мяу", "летом жарко", "да", "как дела", "отлично"]
CASES = [  # (the /forget argument, the facts kept)
    ("Сочи", [("name", "Аня"), ("city", "Казань"), ("like", "кошки")]),
    ("казань", [("name", "Аня"), ("plan", "поехать в Сочи летом"), ("like", "кошки")]),
    ("город", [("name", "Аня"), ("plan", "поехать в Сочи летом"), ("like", "кошки")]),
    ("жарко", FACTS),                              # no fact, but the word asked about goes from the messages
    ("в", FACTS),                                  # a function word forgets nothing
    ("", []),
]


def console_forget(argument):
    session = sp.ConsoleChat(None, {}, memory=True)
    session.facts, session.history = list(FACTS), list(MESSAGES)
    session.forget(argument)
    return session.facts, session.history


def bot_forget(argument, db):
    store = tg_bot.HistoryStore(str(db))
    for question, answer in zip(MESSAGES[::2], MESSAGES[1::2]):
        store.add_exchange(1, question, answer, user_id=10)
    store.set_user_facts(1, 10, FACTS)
    kept, _, holds = tg_bot.forget_facts(store.user_facts(1, 10), argument)
    store.forget(1, 10, kept, holds)
    result = store.user_facts(1, 10), turns(store, 1)
    store.close()
    return result


@pytest.mark.parametrize("argument,facts_kept", CASES)
def test_the_console_and_the_bot_forget_alike(argument, facts_kept, tmp_path):
    console = console_forget(argument)
    assert console == bot_forget(argument, tmp_path / "h.sqlite3")
    assert console[0] == facts_kept
    if argument == "Сочи":  # any content word of the fact, in any form, takes a message: not all of its words
        assert "я был в Сочи" not in console[1] and "летом жарко" not in console[1]
        assert "как дела" in console[1]


# --- in a group, /forget deletes only what the asking member said
def test_in_a_group_forget_deletes_the_askers_turns_and_keeps_the_others(api, harness):
    bot = harness()
    group, anya, boris = -900, 71, 72
    ask(api, group, "@tiny_test_bot я живу в Казани", user_id=anya, chat_type="group", first_name="Аня")
    ask(api, group, "@tiny_test_bot а я учился в Казани", user_id=boris, chat_type="group", first_name="Боря")
    ask(api, group, "@tiny_test_bot как погода?", user_id=anya, chat_type="group", first_name="Аня")
    bot.wait_until(lambda: len(bot.rows(group)) == 6, "three exchanges stored")
    ask(api, group, "/forget казань", user_id=anya, chat_type="group")
    texts = [text for _, text, _ in bot.rows(group)]
    assert not any("живу в Казани" in text for text in texts)  # Anya's words, and the answer to them, go
    assert "Боря: а я учился в Казани" in texts or "а я учился в Казани" in texts  # Boris's stay
    assert any("учился в Казани" in text for role, text, _ in bot.rows(group) if role == "bot")
    assert "как погода?" in texts  # Anya's turn without the word stays
