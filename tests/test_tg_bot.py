"""tg_bot.py: its parts in-process (token handling, redaction, splitting, typing,
per-chat order, history), then the real bot process end to end with the real
telebot client against a fake Bot API server (tests/fake_bot_api.py) and a tiny
random model."""
import logging
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import telebot
import torch
from telebot import apihelper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)
from fake_bot_api import BOT_USER, FakeBotApi, LiveBot  # noqa: E402

import tg_bot  # noqa: E402


def turns(store, chat_id):
    """The chat's stored texts, oldest first, as the bot reads them for a prompt."""
    return [text for _, text in store.history(chat_id)[0]]

torch.set_num_threads(1)
TOKEN = "987654:TEST-s3cret_token-value"
PERSONA = tiny_model.CHAT_CONFIG["persona"]
ALLOWED_USERS = list(range(100, 200))
STRANGER = 555
MAX_NEW_TOKENS = 8
MAX_INPUT_CHARS = 300


# --- parts, in-process
def test_missing_token_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv(tg_bot.TOKEN_ENV, raising=False)
    assert tg_bot.main(["--model", "nowhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tg_bot.py: error: no bot token: set {tg_bot.TOKEN_ENV} or pass --token-file FILE "
                   f"(get one from @BotFather)"]


def test_bad_server_settings_are_one_line_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    assert tg_bot.main(["--server", "localhost:8000"]) == 1
    assert tg_bot.main(["--server", "http://127.0.0.1:8000", "--server-timeout", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("tg_bot.py: error: --server") for line in err)
    assert "localhost:8000" in err[0] and "--server-timeout" in err[1]


BLOCK_SETTINGS = [  # (defaults-block name, flag's dest, a value other than the default): what a notebook cell sets
    ("DEFAULT_MODEL", "model", "my_model"), ("DEFAULT_DEVICE", "device", "cpu"), ("PERSONA", "persona", "Я бот."),
    ("NO_PERSONA", "no_persona", True), ("MAX_NEW_TOKENS", "max_new_tokens", 8), ("TEMPERATURE", "temperature", 0.5),
    ("TOP_P", "top_p", 0.5), ("REPETITION_PENALTY", "repetition_penalty", 1.3),
    ("CONTEXT_TOKENS", "context_tokens", 99),
    ("MAX_TURNS", "max_turns", 3), ("DEFAULT_SEED", "seed", 7), ("TOKEN_FILE", "token_file", "/tmp/t"),
    ("API_URL", "api_url", "http://127.0.0.1:1"), ("DEFAULT_DB", "db", "x.sqlite3"),
    ("DEFAULT_IDLE_MINUTES", "idle_minutes", 5.0), ("ALLOWED_USERS", "allowed_users", "1,2"),
    ("DEFAULT_RATE_LIMIT", "rate_limit", 3), ("DEFAULT_MAX_QUEUE", "max_queue", 4),
    ("DEFAULT_MAX_AGE_MINUTES", "max_age_minutes", 1.0), ("DEFAULT_OLD_MESSAGES", "old_messages", "skip"),
    ("DEFAULT_MAX_BATCH", "max_batch", 2), ("DEFAULT_MAX_BATCH_TOKENS", "max_batch_tokens", 100),
    ("DEFAULT_BATCH_WAIT_MS", "batch_wait_ms", 5.0), ("DEFAULT_QUANTIZE", "quantize", "none"),
    ("THREADS", "threads", 1), ("WORKERS", "workers", 2), ("SERVER", "server", "http://127.0.0.1:2"),
    ("SERVER_TIMEOUT", "server_timeout", 9.0), ("SERVER_KEY", "server_key", "k3y"), ("NO_STREAM", "no_stream", True),
    ("DEFAULT_MAX_INPUT_CHARS", "max_input_chars", 50), ("DEFAULT_POLL_SECONDS", "poll_seconds", 2),
    ("NO_MEMORY", "no_memory", True), ("FEEDBACK", "feedback", "on"), ("LOG_PROMPTS", "log_prompts", True),
    ("LOG_LEVEL", "log_level", "DEBUG"),
]


def test_every_flag_takes_its_default_from_the_defaults_block(monkeypatch):
    # Pasted into a notebook cell, the block is the only way to set anything (issue 10).
    dests = {action.dest for action in tg_bot.build_parser()._actions if action.dest != "help"}
    assert dests == {dest for _, dest, _ in BLOCK_SETTINGS}
    for name, dest, value in BLOCK_SETTINGS:
        monkeypatch.setattr(tg_bot, name, value)
    args = tg_bot.parse_args([], environ={})
    assert {dest: getattr(args, dest) for _, dest, _ in BLOCK_SETTINGS} == {dest: v for _, dest, v in BLOCK_SETTINGS}
    assert tg_bot.build_parser().prog == "tg_bot.py"


@pytest.mark.parametrize("name,value,flag", [("DEFAULT_DEVICE", "tpu", "--device"),
                                             ("DEFAULT_QUANTIZE", "int4", "--quantize"),
                                             ("DEFAULT_OLD_MESSAGES", "answer", "--old-messages"),
                                             ("LOG_LEVEL", "LOUD", "--log-level")])
def test_a_wrong_choice_in_the_defaults_block_is_one_line(monkeypatch, capsys, name, value, flag):
    # argparse checks choices only for values given as flags, never for a default.
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    monkeypatch.setattr(tg_bot, name, value)
    assert tg_bot.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tg_bot.py: error: {flag} {value!r}: must be one of "), err


@pytest.mark.parametrize("name,value,expected", [
    ("DEFAULT_MODEL", None, "--model None: must be set"),
    ("NO_MEMORY", "no", "--no-memory 'no': must be True or False"),
    ("LOG_PROMPTS", 1, "--log-prompts 1: must be True or False"),
    ("DEFAULT_DB", ["history.sqlite3"], "--db ['history.sqlite3']: must be text (a str), not list"),
    ("DEFAULT_MAX_BATCH", 4.5, "--max-batch 4.5: must be a whole number, not float"),
    ("DEFAULT_MAX_BATCH", True, "--max-batch True: must be a whole number, not bool"),
    ("TEMPERATURE", [0.7], "--temperature [0.7]: must be a number, not list"),
    ("DEFAULT_POLL_SECONDS", None, "--poll-seconds None: must be set"),
])
def test_a_wrong_typed_default_in_the_defaults_block_is_one_line(monkeypatch, capsys, name, value, expected):
    # argparse converts only strings, so these came through as they were: a traceback or a silent "on".
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    monkeypatch.setattr(tg_bot, name, value)
    assert tg_bot.main(["--api-url", "http://127.0.0.1:9"]) == 1
    assert capsys.readouterr().err == f"tg_bot.py: error: {expected}\n"


def test_right_typed_defaults_pass_the_type_check(monkeypatch):
    for name, value in (("TEMPERATURE", 1), ("PERSONA", None), ("WORKERS", None), ("NO_MEMORY", True)):
        monkeypatch.setattr(tg_bot, name, value)  # an int where a float goes, None where the flag may be unset
    args = tg_bot.parse_args([], environ={})
    tg_bot.check_args(args)
    assert args.temperature == 1 and args.no_memory is True and args.workers is None


def test_malformed_token_file_is_not_echoed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(tg_bot.TOKEN_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("not-a-token secret-part\n", encoding="utf-8")
    assert tg_bot.main(["--token-file", str(token_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tg_bot.py: error: ") and str(token_file) in err[0]
    assert "secret-part" not in err[0]


def test_bad_allowed_users_and_penalty_are_user_errors(monkeypatch, capsys):
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    assert tg_bot.main(["--allowed-users", "12,abc"]) == 1
    assert tg_bot.main(["--repetition-penalty", "0.9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("tg_bot.py: error: ") for line in err)
    assert "--allowed-users" in err[0] and "repetition" in err[1]


def test_unreachable_api_fails_without_showing_the_token(monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(apihelper, "API_URL", None)
    with pytest.raises(tg_bot.UserError) as error:
        tg_bot.connect(TOKEN, f"http://127.0.0.1:{port}")
    assert "cannot reach the Bot API" in str(error.value) and TOKEN not in str(error.value)
    assert apihelper.API_URL == f"http://127.0.0.1:{port}/bot{{0}}/{{1}}"


def test_log_records_have_the_token_blanked():
    formatter = tg_bot.RedactingFormatter("%(message)s", [TOKEN])
    try:
        raise ConnectionError(f"Max retries exceeded with url: /bot{TOKEN}/getUpdates ({quote(TOKEN, safe='')})")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", (f"/bot{TOKEN}/getMe",),
                                   sys.exc_info())
    text = formatter.format(record)
    assert TOKEN not in text and quote(TOKEN, safe="") not in text
    assert text.count("<token>") == 3 and "Traceback" in text


def test_a_5000_character_reply_is_sent_as_two_messages(monkeypatch):
    text = " ".join(f"слово{i}" for i in range(1000))[:5000]
    assert len(text) == 5000
    with FakeBotApi(TOKEN) as api:
        monkeypatch.setattr(apihelper, "API_URL", tg_bot.api_url_template(api.url))
        bot = telebot.TeleBot(TOKEN, threaded=False)
        tg_bot.send_reply(bot, 77, text)
        sent = api.messages_to(77)
    assert len(sent) == 2
    assert all(len(m["text"]) <= 4096 for m in sent)
    assert sent[0]["text"] + sent[1]["text"] == text


def test_typing_is_refreshed_until_the_work_ends():
    calls = []
    enough = threading.Event()

    def action():
        calls.append(time.monotonic())
        if len(calls) >= 3:
            enough.set()

    with tg_bot.keep_typing(action, every=0.02):
        assert enough.wait(10), "typing was not refreshed"
    count = len(calls)
    time.sleep(0.1)
    assert len(calls) == count  # and it stops with the work


def test_dispatcher_keeps_each_chat_in_order_and_chats_in_parallel():
    b_done = threading.Event()
    running, order, overlap = {}, [], []
    lock = threading.Lock()

    def handle(item):
        chat, number = item
        with lock:
            running[chat] = running.get(chat, 0) + 1
            if running[chat] > 1:
                overlap.append(item)
        if item == ("a", 1):
            # A slow reply in chat a: chat b must still get through meanwhile.
            order.append(("a1 saw b", b_done.wait(10)))
        if chat == "b":
            b_done.set()
        with lock:
            order.append(item)
            running[chat] -= 1

    dispatcher = tg_bot.ChatDispatcher(2, handle, max_pending=3)
    assert dispatcher.submit("a", ("a", 1))
    assert dispatcher.submit("a", ("a", 2))
    assert dispatcher.submit("a", ("a", 3))
    assert not dispatcher.submit("a", ("a", 4))  # a's queue is full
    assert dispatcher.submit("b", ("b", 1))
    dispatcher.close()
    assert ("a1 saw b", True) in order
    assert [item for item in order if item[0] == "a"] == [("a", 1), ("a", 2), ("a", 3)]
    assert overlap == []


def test_history_survives_reopening(tmp_path):
    db = tmp_path / "h.sqlite3"
    store = tg_bot.HistoryStore(str(db))
    store.add_exchange(1, "Привет", "Здравствуйте", now=100.0)
    store.add_exchange(2, "Другой чат", "Да", now=100.0)
    store.add_exchange(1, "Как дела?", "Хорошо", now=200.0)
    store.close()
    store = tg_bot.HistoryStore(str(db))
    assert turns(store, 1) == ["Привет", "Здравствуйте", "Как дела?", "Хорошо"]
    assert store.history(1)[1] == 200.0
    store.clear(1)
    assert turns(store, 1) == [] and turns(store, 2) == ["Другой чат", "Да"]
    store.close()
    (tmp_path / "not_a_db").write_text("hello" * 1000)
    with pytest.raises(tg_bot.UserError):
        tg_bot.HistoryStore(str(tmp_path / "not_a_db"))


# --- the real bot process against the fake server
def bot_args(model_dir, db):
    return ["--model", str(model_dir), "--db", str(db), "--max-new-tokens", str(MAX_NEW_TOKENS), "--poll-seconds", "1",
            "--workers", "3", "--max-input-chars", str(MAX_INPUT_CHARS), "--log-prompts", "--log-level", "DEBUG",
            "--allowed-users", ",".join(map(str, ALLOWED_USERS))]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bot")
    model_dir = tiny_model.build_tiny_model(workdir / "model")
    api = FakeBotApi(TOKEN).start()
    bot = LiveBot(api, TOKEN, workdir, bot_args(model_dir, workdir / "history.sqlite3"))
    bot.model_dir, bot.db = model_dir, workdir / "history.sqlite3"
    try:
        bot.start()
        yield bot
    finally:
        bot.stop()
        api.stop()


@pytest.fixture(scope="module")
def tokenizer(live):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(live.model_dir)


def budget():
    return min(tiny_model.CHAT_CONFIG["context_tokens"], 256 - MAX_NEW_TOKENS)


def say(live, chat_id, text, count, **kwargs):
    """Send a message and wait until the chat has `count` replies; the last one."""
    live.api.push_text(chat_id, text, **kwargs)
    return live.api.wait_for_messages(chat_id, count)[-1]["text"]


def test_start_and_help(live):
    assert say(live, 101, "/start", 1) == tg_bot.START_TEXT
    assert say(live, 101, "/help", 2) == tg_bot.bot_help_text(memory=True)
    assert live.prompts(101) == []  # commands never reach the model


def test_three_turns_the_prompt_holds_the_earlier_ones(live, tokenizer):
    first = say(live, 102, "Привет! Меня зовут Аня.", 1)
    second = say(live, 102, "Я живу в Казани.", 2)
    third = say(live, 102, "Ответ: как меня зовут?", 3)
    assert all(reply.strip() for reply in (first, second, third))
    prompts = live.prompts(102)
    assert len(prompts) == 3
    history = ["Привет! Меня зовут Аня.", first, "Я живу в Казани.", second, "Ответ: как меня зовут?"]
    settings = {"persona": PERSONA, "facts": None, "max_turns": tiny_model.CHAT_CONFIG["max_turns"], "budget": budget()}
    assert prompts[2] == tokenizer.decode(tg_bot.chat_prompt_ids(history, settings, tokenizer))
    assert f"Вопрос: Привет! Меня зовут Аня.\nОтвет: {first}\nВопрос: Я живу в Казани.\nОтвет: {second}\n" \
        in prompts[2]
    assert prompts[2].endswith("\nВопрос: Ответ - как меня зовут?\nОтвет:")
    assert any(action["chat_id"] == 102 and action["action"] == "typing" for action in live.api.actions)


def test_a_model_without_the_facts_exchange_still_remembers_for_memory(live):
    # The tiny model's chat_config.json has no "facts": true: one line at the start says the prompt goes
    # without the facts (test_three_turns compares its prompts), and /memory still shows what chat 102 said.
    assert live.log_text().count("was not trained with the facts exchange") == 1
    assert say(live, 102, "/memory", 4) == "имя: Аня\nгород: Казань"


def test_reset_empties_the_history(live):
    say(live, 102, "/reset", 5)
    assert live.api.messages_to(102)[4]["text"] == tg_bot.RESET_TEXT
    say(live, 102, "Что ты помнишь?", 6)
    assert live.prompts(102)[-1] == tg_bot.prompt_text(["Что ты помнишь?"], PERSONA)


def test_messages_of_one_chat_wait_their_turn(live):
    for text in ("Первое сообщение", "Второе сообщение", "Третье сообщение"):
        live.api.push_text(103, text)
    replies = [m["text"] for m in live.api.wait_for_messages(103, 3)]
    prompts = live.prompts(103)
    assert len(prompts) == 3
    # Had they run at once, the third prompt would not hold the first two exchanges.
    assert prompts[2].endswith(f"Вопрос: Первое сообщение\nОтвет: {replies[0]}\nВопрос: Второе сообщение\n"
                               f"Ответ: {replies[1]}\nВопрос: Третье сообщение\nОтвет:")


def test_twenty_chats_at_once_all_get_their_replies(live):
    chats = list(range(170, 190))
    for chat_id in chats:
        live.api.push_text(chat_id, f"Вопрос из чата {chat_id}")
    live.api.wait_for(lambda: all(any(m["chat_id"] == c for m in live.api.sent) for c in chats), timeout=60)
    for chat_id in chats:
        assert len(live.api.messages_to(chat_id)) == 1
        [prompt] = live.prompts(chat_id)
        assert prompt.endswith(f"\nВопрос: Вопрос из чата {chat_id}\nОтвет:")


def test_sticker_and_empty_message_get_a_polite_line(live):
    live.api.push_sticker(104)
    live.api.push_text(104, "")
    live.api.push_text(104, "   ")
    live.api.push_text(104, "А теперь словами")
    replies = [m["text"] for m in live.api.wait_for_messages(104, 4)]
    assert replies[:3] == [tg_bot.NON_TEXT_TEXT, tg_bot.EMPTY_TEXT, tg_bot.EMPTY_TEXT]
    assert replies[3] not in (tg_bot.NON_TEXT_TEXT, tg_bot.EMPTY_TEXT, tg_bot.APOLOGY_TEXT)
    assert len(live.prompts(104)) == 1


def test_an_overlong_message_is_cut(live, tokenizer):
    text = " ".join(f"слово{i}" for i in range(400))
    say(live, 105, text, 1)
    [prompt] = live.prompts(105)
    assert len(tg_bot.encode_text(tokenizer, prompt)) <= budget()
    question = prompt.split("\n")[-2]
    assert question.startswith("Вопрос: ") and question.endswith("слово399")
    assert len(question) <= len("Вопрос: ") + MAX_INPUT_CHARS and "слово0 " not in question


def test_in_a_group_only_mentions_and_replies_are_answered(live):
    group = -500
    ignored = live.api.push_text(group, "просто болтаем между собой", user_id=150, chat_type="supergroup")
    mentioned = live.api.push_text(group, f"@{BOT_USER['username']} привет, бот", user_id=150,
                                   chat_type="supergroup")
    [first] = live.api.wait_for_messages(group, 1)
    # One chat is served in order, so an answer to the first message would have come first.
    assert first["reply_to"] == mentioned != ignored
    replied = live.api.push_text(group, "а поподробнее?", user_id=151, chat_type="supergroup", reply_to=first)
    second = live.api.wait_for_messages(group, 2)[1]
    assert second["reply_to"] == replied
    prompts = live.prompts(group)
    assert len(prompts) == 2 and "болтаем" not in prompts[1]
    # Each group turn says whose words it holds.
    assert prompts[0].endswith("Вопрос: user150: привет, бот\nОтвет:")
    assert prompts[1].endswith(f"Вопрос: user150: привет, бот\nОтвет: {first['text']}\n"
                               f"Вопрос: user151: а поподробнее?\nОтвет:")


def test_an_idle_conversation_starts_afresh(live):
    two_hours_ago = time.time() - 2 * 3600  # the bot runs with the default --idle-minutes 60
    with sqlite3.connect(live.db) as db:
        db.executemany("INSERT INTO messages (chat_id, role, text, created) VALUES (109, ?, ?, ?)",
                       [("user", "Давний вопрос", two_hours_ago), ("bot", "Давний ответ", two_hours_ago)])
    reply = say(live, 109, "Новый разговор", 1)
    assert live.prompts(109) == [tg_bot.prompt_text(["Новый разговор"], PERSONA)]

    def stored():  # the exchange is written right after the reply is sent
        with sqlite3.connect(live.db) as db:
            rows = db.execute("SELECT text FROM messages WHERE chat_id = 109 ORDER BY id").fetchall()
        return rows if len(rows) == 2 and rows[0][0] != "Давний вопрос" else None

    deadline = time.monotonic() + 10
    while not stored() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored() == [("Новый разговор",), (reply,)]


def test_a_user_not_on_the_allow_list_is_refused(live):
    assert say(live, STRANGER, "Привет, пусти меня", 1, user_id=STRANGER) == tg_bot.NOT_ALLOWED_TEXT
    assert live.prompts(STRANGER) == []


def test_a_429_is_retried_after_retry_after(live):
    live.api.fail_next("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    reply = say(live, 106, "Ответь, пожалуйста", 1)
    assert reply not in (tg_bot.APOLOGY_TEXT, "")
    sends = [(t, status) for method, t, status in live.api.calls if method == "sendMessage"]
    refused = [t for t, status in sends if status == 429]
    assert len(refused) == 1
    delivered = live.api.messages_to(106)[0]["time"]
    assert delivered - refused[0] >= 0.9  # it waited out retry_after before trying again
    assert "429" in live.log_text()


def test_another_send_error_is_logged_and_answered_with_an_apology(live):
    live.api.fail_next("sendMessage", 400, "Bad Request: something went wrong")
    assert say(live, 107, "Привет", 1) == tg_bot.APOLOGY_TEXT
    live.wait_for_log("chat 107: reply failed")
    reply = say(live, 107, "Ещё раз привет", 2)  # and the bot keeps running
    assert reply != tg_bot.APOLOGY_TEXT
    # the failed exchange was not stored: the new prompt does not hold it
    assert "Вопрос: Привет\n" not in live.prompts(107)[-1]


def test_sigterm_finishes_the_reply_in_flight_and_a_restart_keeps_the_history(live):
    first = say(live, 108, "Запомни слово арбуз.", 1)
    live.api.delay_next("sendMessage", 1.5)
    live.api.push_text(108, "А ещё слово дыня.")
    live.api.wait_for(lambda: sum(method == "sendMessage" and chat == 108 for method, chat, _ in
                                  live.api.arrivals) == 2)
    assert live.stop() == 0  # SIGTERM while the reply is still on its way
    assert "stopped cleanly" in live.logs[-1].read_text(encoding="utf-8")
    second = live.api.messages_to(108)[1]["text"]
    with sqlite3.connect(live.db) as db:
        rows = db.execute("SELECT role, text FROM messages WHERE chat_id = 108 ORDER BY id").fetchall()
    assert rows == [("user", "Запомни слово арбуз."), ("bot", first), ("user", "А ещё слово дыня."), ("bot", second)]

    live.start()
    say(live, 108, "Какие слова я просил запомнить?", 3)
    prompt = live.prompts(108)[-1]
    assert f"Вопрос: Запомни слово арбуз.\nОтвет: {first}\nВопрос: А ещё слово дыня.\nОтвет: {second}\n" in prompt
    assert len(live.api.messages_to(108)) == 3  # nothing answered twice after the restart


def test_the_token_never_appears_in_the_log(live):
    assert live.stop() == 0
    text = live.log_text()
    assert "prompt chat=" in text and "<token>" in text  # the log is real, and URLs in it were blanked
    assert TOKEN not in text and quote(TOKEN, safe="") not in text and TOKEN.split(":")[1] not in text
    assert live.api.bad_tokens == 0 and live.exit_codes and set(live.exit_codes) == {0}
