"""tg_bot.py in production (issue 12): nothing lost, no chat stalls another, no one
reads what is not theirs.

Most tests run the bot's own ChatBot and serve() in this process, with the real
telebot client against the fake Bot API (tests/fake_bot_api.py) and a stub model
that answers at once or when told; the crash test kills a real bot process
(tiny random model) with SIGKILL and starts it again."""
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from telebot import apihelper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)
from fake_bot_api import BOT_USER, DROP, FakeBotApi, LiveBot  # noqa: E402

import tg_bot  # noqa: E402

torch.set_num_threads(1)
TOKEN = "987654:TEST-s3cret_token-value"
PERSONA = tiny_model.CHAT_CONFIG["persona"]
BOT = "@" + BOT_USER["username"]
WAIT = 30.0


def turns(store, chat_id):
    """The chat's stored texts, oldest first, as the bot reads them for a prompt."""
    return [text for _, text in store.history(chat_id)[0]]


# --- the bot in this process
class StubModel:
    """The model thread's generate(prompts): "ответ на «question»" for each prompt,
    FALLBACK_REPLY for a question holding "непонятно"; while held, it waits. Prompts
    given as token ids are decoded, so `prompts` is text either way."""

    def __init__(self, held=False):
        self.prompts = []
        self.tokenizer = None  # set by the harness
        self.free = threading.Event()
        if not held:
            self.free.set()

    def __call__(self, prompts, on_text=None):
        prompts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        self.prompts += prompts
        assert self.free.wait(WAIT), "the stub model was never released"
        return [tg_bot.FALLBACK_REPLY if "непонятно" in prompt else f"ответ на «{question_of(prompt)}»"
                for prompt in prompts]

    def release(self):
        self.free.set()


def question_of(prompt):
    """The user's new message, as the prompt's last question holds it."""
    return re.sub(r"\nОтвет: ?$", "", prompt.rsplit("\nВопрос: ", 1)[1])


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model.build_tiny_tokenizer()


@pytest.fixture
def api():
    with FakeBotApi(TOKEN) as api:
        yield api


class Harness:
    """tg_bot's ChatBot and serve() on a thread of this process, with `flags` as on
    the command line; the database is `db`. The replies come from `model` (a StubModel
    by default) through the model thread's batcher, or from `batcher` itself (a real
    model's, an inference server's) with its `settings`."""

    def __init__(self, api, tokenizer, db, flags=(), model=None, batcher=None, settings=None):
        self.api, self.db = api, Path(db)
        self.args = tg_bot.parse_args(["--db", str(db), "--poll-seconds", "1", "--workers", "4", "--max-batch", "4",
                                       "--batch-wait-ms", "0", *flags], environ={})
        tg_bot.check_args(self.args)
        self.bot, self.me = tg_bot.connect(TOKEN, api.url)
        self.store = tg_bot.HistoryStore(str(db))
        self.model = None if batcher is not None else model or StubModel()
        if self.model is not None:
            self.model.tokenizer = tokenizer
        self.batcher = batcher or tg_bot.ReplyBatcher(self.model, 4, 0.0)
        self.stopping = threading.Event()
        settings = settings or {"persona": PERSONA, "budget": 192, "max_turns": 8, "facts": None, "generation": {}}
        self.chat_bot = tg_bot.ChatBot(self.bot, self.me, self.store, {"tokenizer": tokenizer}, settings, self.args,
                                       self.batcher, self.stopping)
        self.error, self.stopped = None, False
        self.thread = threading.Thread(target=self._serve, name="serve", daemon=True)

    def _serve(self):
        try:
            tg_bot.serve(self.bot, self.chat_bot, self.stopping, 1)
        except Exception as error:  # the test looks at it
            self.error = error

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """As SIGTERM does; then the model thread and the database are closed."""
        if self.stopped:
            return
        self.stopped = True
        self.stopping.set()
        self.api.end_long_polls()
        if self.model is not None:
            self.model.release()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "serve() did not return"
        self.batcher.close()
        self.store.close()
        self.api.hurry = False

    def rows(self, chat_id):
        return query(self.db, "SELECT role, text, speaker FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,))

    def inbox(self):
        return [row[0] for row in query(self.db, "SELECT update_id FROM inbox ORDER BY update_id")]

    def wait_until(self, condition, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            time.sleep(0.02)


def query(path, sql, parameters=()):
    """Rows read through a connection of its own, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, parameters).fetchall()


@pytest.fixture
def harness(api, tokenizer, tmp_path, monkeypatch):
    """harness(flags=..., model=..., db=...) -> a started Harness; all stopped at the end."""
    monkeypatch.setattr(apihelper, "API_URL", None)  # connect() sets it; restored after the test
    monkeypatch.setattr(tg_bot, "SEND_BACKOFF_SECONDS", 0.01)  # retries after a 5xx come quickly here
    started = []

    def make(flags=(), model=None, db=None, batcher=None, settings=None, tokenizer=tokenizer):
        bot = Harness(api, tokenizer, db or tmp_path / "history.sqlite3", flags, model, batcher, settings).start()
        started.append(bot)
        return bot

    yield make
    for bot in started:
        bot.stop()


def polls_at(api, offset):
    """getUpdates calls made with this offset (called under the fake API's lock)."""
    return sum(r["method"] == "getUpdates" and str(r["offset"]) == str(offset) for r in api.requests)


def texts(api, chat_id):
    return [m["text"] for m in api.messages_to(chat_id)]


# --- nothing lost
def test_an_update_is_confirmed_only_once_its_message_is_on_disk(api, harness, tmp_path):
    db = tmp_path / "history.sqlite3"
    seen = {}

    def on_confirm(update_id):  # the moment Telegram may forget the update
        seen[update_id] = query(db, "SELECT message FROM inbox WHERE update_id = ?", (update_id,))

    api.on_confirm = on_confirm
    bot = harness(model=StubModel(held=True), db=db)
    first = api.push_text(1, "Первое сообщение")
    api.push_text(2, "Второе сообщение")
    api.wait_for(lambda: len(api.confirmed) == 2)
    assert len(seen) == 2 and all(len(rows) == 1 for rows in seen.values())
    assert any(f'"message_id": {first}' in rows[0][0] and "Первое сообщение" in rows[0][0] for rows in seen.values())
    bot.model.release()
    api.wait_for_messages(1, 1)
    api.wait_for_messages(2, 1)
    bot.wait_until(lambda: bot.inbox() == [], "the answered messages leave the inbox")


def test_a_clean_stop_confirms_every_update_it_took(api, harness):
    bot = harness()
    take = bot.chat_bot.intake.take_updates

    def take_then_stop(updates):  # SIGTERM comes while a batch is being taken
        offset = take(updates)
        bot.stopping.set()
        return offset

    bot.chat_bot.intake.take_updates = take_then_stop
    update = api.next_update_id
    api.push_text(3, "Последнее перед остановкой")
    bot.thread.join(WAIT)
    assert bot.error is None and not bot.thread.is_alive()
    assert api.unconfirmed() == [] and api.confirmed == [update]  # so nothing polling next gets it again


def test_a_stop_leaves_the_messages_not_started_for_the_next_start_in_order(api, harness, tmp_path):
    bot = harness(model=StubModel(held=True))
    for text in ("раз", "два", "три"):
        api.push_text(4, text)
    api.wait_for(lambda: len(api.confirmed) == 3)
    bot.wait_until(lambda: bot.model.prompts, "the first message reaches the model")
    bot.stop()  # SIGTERM: "раз" is in progress and is answered; the others wait on disk
    assert texts(api, 4) == ["ответ на «раз»"]
    assert len(bot.inbox()) == 2
    again = harness()
    api.wait_for_messages(4, 3)
    assert texts(api, 4) == ["ответ на «раз»", "ответ на «два»", "ответ на «три»"]
    again.wait_until(lambda: again.inbox() == [], "every message answered")
    assert [text for role, text, _ in again.rows(4) if role == "user"] == ["раз", "два", "три"]


def test_a_5xx_or_a_broken_connection_is_retried(api, harness):
    bot = harness()
    api.fail_next("sendMessage", 502, "Bad Gateway", chat_id=5)
    api.fail_next("sendMessage", 503, chat_id=5, html=True)  # a proxy's HTML page, not Telegram's JSON
    api.fail_next("sendMessage", DROP, chat_id=5)  # the connection breaks without an answer
    api.push_text(5, "Ответь, несмотря на сбои")
    [reply] = api.wait_for_messages(5, 1)
    assert reply["text"] == "ответ на «Ответь, несмотря на сбои»"
    assert [r["status"] for r in api.requests if r["method"] == "sendMessage" and r["chat_id"] == 5] == \
        [502, 503, DROP, 200]
    bot.wait_until(lambda: len(bot.rows(5)) == 2, "the exchange is stored")


def test_a_send_that_keeps_failing_is_given_up_and_the_user_told(api, harness):
    bot = harness()
    for _ in range(tg_bot.SEND_ATTEMPTS):
        api.fail_next("sendMessage", 502, "Bad Gateway", chat_id=6)
    api.push_text(6, "Привет")
    [notice] = api.wait_for_messages(6, 1)
    assert notice["text"] == tg_bot.SEND_FAILED_TEXT
    bot.wait_until(lambda: bot.inbox() == [], "the message is done with")
    assert bot.rows(6) == []  # no exchange the user never saw


def test_a_full_disk_is_told_once_answered_from_memory_and_caught_up(api, harness, caplog):
    bot = harness(flags=["--max-input-chars", "30"])
    with bot.store.lock:  # the database may not grow by a page: what a full disk does to SQLite
        pages = bot.store.db.execute("PRAGMA page_count").fetchone()[0]
        bot.store.db.execute(f"PRAGMA max_page_count = {pages}")
    updates = [api.next_update_id]
    api.push_text(7, "бла " * 2000 + "Меня зовут Аня.")  # the inbox needs new pages for this one
    first, notice = [m["text"] for m in api.wait_for_messages(7, 2)]
    assert first.startswith("ответ на «") and notice == tg_bot.UNSAVED_TEXT
    updates.append(api.next_update_id)
    api.push_text(7, "А что я рассказывал?")
    second = api.wait_for_messages(7, 3)[2]["text"]
    assert second == "ответ на «А что я рассказывал?»"
    assert f"\nОтвет: {first}\nВопрос: А что я рассказывал?\nОтвет:" in bot.model.prompts[-1]  # from memory
    bot.wait_until(lambda: bot.chat_bot.dispatcher.total == 0, "the second message is handled, its write tried")
    api.wait_for(lambda: api.confirmed or polls_at(api, updates[0]) >= 2)  # confirmed, or asked for again
    # Telegram still holds both (each getUpdates sends them again), and neither is answered twice.
    assert not set(updates) & set(api.confirmed) and set(updates) <= set(api.unconfirmed())
    assert bot.rows(7) == [] and texts(api, 7) == [first, notice, second]  # told once, not again
    with bot.store.lock:
        bot.store.db.execute("PRAGMA max_page_count = 1073741823")  # room again
    api.push_text(7, "Ещё вопрос")
    api.wait_for_messages(7, 4)
    bot.wait_until(lambda: len(bot.rows(7)) == 6, "the three exchanges saved once there is room")
    assert [text for _, text, _ in bot.rows(7)][2:] == ["А что я рассказывал?", second, "Ещё вопрос",
                                                      "ответ на «Ещё вопрос»"]
    assert texts(api, 7).count(tg_bot.UNSAVED_TEXT) == 1 and len(texts(api, 7)) == 4
    assert bot.inbox() == []
    api.wait_for(lambda: len(api.confirmed) == 3)  # once on disk, all three are confirmed, each once
    assert api.confirmed == updates + [updates[1] + 1]
    log = [r.getMessage() for r in caplog.records if r.name == "tg_bot"]
    assert sum("cannot write" in line for line in log) == 1
    assert sum("writable again" in line for line in log) == 1


def test_during_a_disk_fault_an_update_is_confirmed_only_once_it_is_on_disk(api, harness, tmp_path):
    db = tmp_path / "history.sqlite3"
    seen = {}

    def on_confirm(update_id):  # the moment Telegram may forget the update
        seen[update_id] = query(db, "SELECT update_id FROM inbox WHERE update_id = ?", (update_id,))

    api.on_confirm = on_confirm
    bot = harness(model=StubModel(held=True), db=db)
    with bot.store.lock:  # the database may not grow by a page: what a full disk does to SQLite
        pages = bot.store.db.execute("PRAGMA page_count").fetchone()[0]
        bot.store.db.execute(f"PRAGMA max_page_count = {pages}")
    update = api.next_update_id
    api.push_text(4, "бла " * 2000 + "Что нового?")  # taken, not on disk, not answered (the model is held)
    api.wait_for(lambda: api.confirmed or polls_at(api, update) >= 2)  # confirmed, or asked for again
    assert api.confirmed == [] and api.unconfirmed() == [update] and bot.inbox() == []
    with bot.store.lock:
        bot.store.db.execute("PRAGMA max_page_count = 1073741823")  # room again
    api.wait_for(lambda: api.confirmed == [update])
    assert seen == {update: [(update,)]}  # on disk when Telegram forgot it
    bot.model.release()
    api.wait_for_messages(4, 1)
    bot.wait_until(lambda: bot.inbox() == [], "the answered message leaves the inbox")
    replies = texts(api, 4)
    assert len(replies) == 1 and replies[0].startswith("ответ на «") and replies[0].endswith("Что нового?»")


def test_a_stop_during_a_disk_fault_leaves_the_unsaved_updates_to_telegram(api, harness, tmp_path):
    bot = harness(model=StubModel(held=True))
    with bot.store.lock:
        pages = bot.store.db.execute("PRAGMA page_count").fetchone()[0]
        bot.store.db.execute(f"PRAGMA max_page_count = {pages}")
    update = api.next_update_id
    api.push_text(5, "бла " * 2000 + "Ты здесь?")
    api.wait_for(lambda: api.confirmed or polls_at(api, update) >= 2)
    bot.stop()  # SIGTERM: the disk is still full, so the update cannot be confirmed
    assert api.confirmed == [] and api.unconfirmed() == [update]  # the next start gets it from Telegram


def test_the_fallback_reply_is_sent_but_not_remembered(api, harness):
    bot = harness()
    api.push_text(8, "непонятно что")
    assert api.wait_for_messages(8, 1)[0]["text"] == tg_bot.FALLBACK_REPLY
    api.push_text(8, "Второй вопрос")
    api.wait_for_messages(8, 2)
    bot.wait_until(lambda: len(bot.rows(8)) == 2, "the second exchange is stored")
    assert [text for _, text, _ in bot.rows(8)] == ["Второй вопрос", "ответ на «Второй вопрос»"]
    assert "непонятно" not in bot.model.prompts[-1] and tg_bot.FALLBACK_REPLY not in bot.model.prompts[-1]
    assert question_of(bot.model.prompts[-1]) == "Второй вопрос"
    assert bot.inbox() == []


# --- no chat stalls another
def test_a_flooding_chat_that_telegram_throttles_does_not_stall_another(api, harness):
    harness()
    throttled_until = time.monotonic() + 20
    api.throttle(10, 20)  # every send to chat 10 gets a 429 "retry after" for 20 s
    for number in range(10):
        api.push_text(10, f"флуд {number}")
    api.wait_for(lambda: any(r["chat_id"] == 10 and r["text"] == tg_bot.BUSY_TEXT for r in api.requests))
    api.push_text(11, "Я просто спрошу")
    [reply] = api.wait_for_messages(11, 1, timeout=15)  # not after the 429 wait
    assert reply["text"] == "ответ на «Я просто спрошу»" and reply["time"] < throttled_until
    busy = [r for r in api.requests if r["chat_id"] == 10 and r["text"] == tg_bot.BUSY_TEXT]
    assert len(busy) == 1 and busy[0]["status"] == 429  # the notice waits, somewhere else


def test_a_user_over_the_rate_limit_is_told_once_and_the_rest_dropped(api, harness):
    bot = harness(flags=["--rate-limit", "3"])
    for number in range(7):
        api.push_text(12, f"сообщение {number}")
    api.wait_for(lambda: len(api.confirmed) == 7)  # all taken or dropped by the polling thread
    api.wait_for_messages(12, 4)
    bot.wait_until(lambda: bot.inbox() == [] and bot.chat_bot.dispatcher.total == 0, "the chat is idle")
    replies = texts(api, 12)
    assert replies.count(tg_bot.RATE_LIMIT_TEXT) == 1 and len(replies) == 4
    assert sorted(question_of(prompt) for prompt in bot.model.prompts) == ["сообщение 0", "сообщение 1",
                                                                          "сообщение 2"]


def test_past_max_queue_the_bot_says_it_is_busy(api, harness):
    bot = harness(flags=["--max-queue", "2"], model=StubModel(held=True))
    for chat_id in (21, 22, 23):
        api.push_text(chat_id, f"вопрос из чата {chat_id}")
    api.wait_for_messages(23, 1)
    assert texts(api, 23) == [tg_bot.OVERLOADED_TEXT]
    bot.model.release()
    api.wait_for_messages(21, 1)
    api.wait_for_messages(22, 1)
    assert sorted(question_of(prompt) for prompt in bot.model.prompts) == ["вопрос из чата 21", "вопрос из чата 22"]


def test_a_slow_typing_action_does_not_delay_the_reply(api, harness):
    harness()
    api.delay_next("sendChatAction", 3.0)
    api.push_text(13, "Быстро ответь")
    [reply] = api.wait_for_messages(13, 1)
    [action] = api.wait_for(lambda: [a for a in api.actions if a["chat_id"] == 13])
    assert reply["time"] < action["time"]  # sent while "typing…" was still on its way


def test_a_revoked_token_ends_polling_with_a_clear_error(api, harness):
    bot = harness()
    api.push_text(14, "Привет")
    api.wait_for_messages(14, 1)
    api.revoked = True
    bot.thread.join(WAIT)
    assert not bot.thread.is_alive()
    assert isinstance(bot.error, tg_bot.UserError) and "401" in str(bot.error) and "revoked" in str(bot.error)


def test_another_copy_polling_ends_with_a_clear_error(api, harness):
    bot = harness()
    api.conflict = True  # 409 "terminated by other getUpdates request"
    bot.thread.join(WAIT)
    assert not bot.thread.is_alive()
    assert isinstance(bot.error, tg_bot.UserError) and "another copy" in str(bot.error)
    assert sum(r["method"] == "getUpdates" and r["status"] == 409 for r in api.requests) == tg_bot.CONFLICT_LIMIT


def test_a_webhook_left_set_is_removed_at_start(api, harness, caplog):
    api.webhook_url = "https://hooks.example.org/very-secret-path/hook"
    harness()
    api.push_text(15, "Ты меня слышишь?")
    assert api.wait_for_messages(15, 1)[0]["text"] == "ответ на «Ты меня слышишь?»"
    assert api.webhook_url == ""
    log = "\n".join(r.getMessage() for r in caplog.records if r.name == "tg_bot")
    assert "a webhook was set (to hooks.example.org)" in log and "deleteWebhook" in log
    assert "very-secret-path" not in log


@pytest.mark.parametrize("choice", ["note", "skip"])
def test_messages_from_before_the_downtime_get_one_note_or_nothing(api, harness, choice):
    # --rate-limit 1: the backlog of a downtime must not count as a flood
    bot = harness(flags=["--old-messages", choice, "--max-age-minutes", "5", "--rate-limit", "1"])
    an_hour_ago = time.time() - 3600
    api.push_text(16, "Вы тут?", date=an_hour_ago)
    api.push_text(16, "Ау!", date=an_hour_ago + 60)
    api.push_text(17, "Здравствуйте", date=an_hour_ago)
    api.wait_for(lambda: len(api.confirmed) == 3)  # triaged: the polling thread took or dropped them
    api.push_text(16, "А сейчас?")  # a fresh message is answered as usual
    api.wait_for(lambda: "ответ на «А сейчас?»" in texts(api, 16))
    if choice == "note":  # notes come from their own thread, in no set order with the replies
        api.wait_for(lambda: tg_bot.OFFLINE_TEXT in texts(api, 16) and texts(api, 17))
        assert sorted(texts(api, 16)) == sorted([tg_bot.OFFLINE_TEXT, "ответ на «А сейчас?»"])
        assert texts(api, 17) == [tg_bot.OFFLINE_TEXT]
    else:
        assert texts(api, 16) == ["ответ на «А сейчас?»"] and texts(api, 17) == []
    assert [question_of(prompt) for prompt in bot.model.prompts] == ["А сейчас?"]


def test_an_old_message_left_by_a_crash_gets_the_note_not_an_answer(api, harness, tmp_path):
    db = tmp_path / "history.sqlite3"
    store = tg_bot.HistoryStore(str(db))
    old = {"message_id": 1, "date": int(time.time()) - 3600, "text": "Старый вопрос",
           "chat": {"id": 18, "type": "private", "first_name": "Аня"},
           "from": {"id": 18, "is_bot": False, "first_name": "Аня"}}
    fresh = dict(old, message_id=2, date=int(time.time()) - 30, text="Свежий вопрос")
    store.take([(500, 18, json.dumps(old)), (501, 18, json.dumps(fresh))], 502)
    store.close()
    bot = harness(db=db)
    api.wait_for_messages(18, 2)
    assert sorted(texts(api, 18)) == sorted([tg_bot.OFFLINE_TEXT, "ответ на «Свежий вопрос»"])
    bot.wait_until(lambda: bot.inbox() == [], "both are done with")
    assert [question_of(prompt) for prompt in bot.model.prompts] == ["Свежий вопрос"]
    first_poll = api.wait_for(lambda: [r for r in api.requests if r["method"] == "getUpdates"])[0]
    assert first_poll["offset"] == "502"  # the offset saved with the inbox: nothing from before comes again


# --- no one reads what is not theirs
def test_the_database_files_are_readable_by_their_owner_only(tmp_path):
    previous = os.umask(0o022)
    try:
        old = tmp_path / "old.sqlite3"
        with contextlib.closing(sqlite3.connect(old)) as db:  # as an earlier version left it: 0644
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, chat_id INTEGER NOT NULL, "
                       "role TEXT NOT NULL, text TEXT NOT NULL, created REAL NOT NULL)")
            db.execute("INSERT INTO messages (chat_id, role, text, created) VALUES (1, 'user', 'старое', 1.0)")
            db.commit()
        assert old.stat().st_mode & 0o777 == 0o644
        for path in (tmp_path / "new.sqlite3", old):
            store = tg_bot.HistoryStore(str(path))
            store.add_exchange(1, "Привет", "Здравствуйте")
            files = [Path(str(path) + suffix) for suffix in ("", "-wal", "-shm")]
            assert all(file.exists() for file in files)
            assert {file.name: oct(file.stat().st_mode & 0o777) for file in files} == \
                {file.name: "0o600" for file in files}
            store.close()
        store = tg_bot.HistoryStore(str(old))  # and the old database still reads, speakers added
        assert turns(store, 1) == ["Привет", "Здравствуйте"]  # the odd old turn is not a whole exchange
        store.close()
    finally:
        os.umask(previous)


def test_a_folder_given_as_db_is_a_one_line_error_and_keeps_its_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    folder = tmp_path / "chat-kit"
    folder.mkdir()
    folder.chmod(0o755)
    assert tg_bot.main(["--db", str(folder), "--api-url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tg_bot.py: error: --db {folder}: is a folder")
    with pytest.raises(tg_bot.UserError, match="is a folder"):  # the store itself refuses it too
        tg_bot.HistoryStore(str(folder))
    assert folder.stat().st_mode & 0o777 == 0o755 and list(folder.iterdir()) == []


def test_only_regular_files_are_made_owner_only(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("не база")
    target.chmod(0o644)
    link = tmp_path / "history.sqlite3"
    link.symlink_to(target)  # os.chmod would follow it
    folder = tmp_path / "wal-folder.sqlite3-wal"
    folder.mkdir()
    folder.chmod(0o755)
    tg_bot.restrict_to_owner(str(link))
    tg_bot.restrict_to_owner(str(tmp_path / "wal-folder.sqlite3"))
    assert target.stat().st_mode & 0o777 == 0o644 and folder.stat().st_mode & 0o777 == 0o755
    plain = tmp_path / "plain.sqlite3"
    plain.write_bytes(b"")
    plain.chmod(0o644)
    tg_bot.restrict_to_owner(str(plain))
    assert plain.stat().st_mode & 0o777 == 0o600


def test_a_reset_leaves_no_trace_in_the_database_files(tmp_path):
    path = tmp_path / "history.sqlite3"
    secret = "номер карты 4276 1234 5678 9012"
    store = tg_bot.HistoryStore(str(path))
    store.add_exchange(1, "Привет", "Здравствуйте")
    store.take([(900, 1, f'{{"text": "{secret}"}}')], 901)
    store.add_exchange(1, secret, "Записал", done=900)
    store.add_exchange(2, "Другой чат", "Да")
    files = [Path(str(path) + suffix) for suffix in ("", "-wal", "-shm")]
    assert any(secret.encode() in file.read_bytes() for file in files)  # the test can see it at all
    store.clear(1)
    assert turns(store, 1) == [] and turns(store, 2) == ["Другой чат", "Да"]
    for file in files:
        if file.exists():
            assert secret.encode() not in file.read_bytes(), file.name
    store.close()


def test_an_empty_allowed_users_list_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    for value in ("", " ", ","):
        assert tg_bot.main(["--allowed-users", value, "--api-url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("tg_bot.py: error: --allowed-users") for line in err)
    assert all("no user ids" in line for line in err)


def test_the_start_log_says_who_may_talk_to_the_bot():
    assert tg_bot.describe_access(None).startswith("public: anyone")
    assert tg_bot.describe_access(frozenset({12, 7})) == "private: 2 users may talk to it (7, 12)"


def group_says(api, text, user_id, **kwargs):
    return api.push_text(-700, text, user_id=user_id, chat_type="supergroup", **kwargs)


def test_only_group_admins_may_reset_the_group(api, harness):
    bot = harness()
    api.admins[-700] = {150}
    group_says(api, f"{BOT} запомни: пароль от вайфая кукушка", 151)
    api.wait_for_messages(-700, 1)
    refused = group_says(api, "/reset", 151)
    [_, refusal] = api.wait_for_messages(-700, 2)
    assert refusal["text"] == tg_bot.ADMINS_ONLY_TEXT and refusal["reply_to"] == refused
    bot.wait_until(lambda: len(bot.rows(-700)) == 2, "the exchange is stored")
    assert ("user", "запомни: пароль от вайфая кукушка", "user151") in bot.rows(-700)
    group_says(api, f"/reset@{BOT_USER['username']}", 150)
    assert api.wait_for_messages(-700, 3)[2]["text"] == tg_bot.RESET_TEXT
    assert bot.rows(-700) == []
    asked = [r for r in api.requests if r["method"] == "getChatMember"]
    assert len(asked) == 2 and all(r["status"] == 200 for r in asked)


def test_in_a_group_speakers_are_named_unknown_commands_and_addresses_ignored(api, harness):
    bot = harness()
    group_says(api, "/weather Москва", 151)                      # another bot's command
    group_says(api, "пишите на support@tiny_test_bot.ru", 151)   # an address, not a mention
    group_says(api, f"{BOT} мой номер карты 1234", 151, first_name="Пётр")
    group_says(api, f"Скажи, {BOT}, что он сказал?", 152, first_name="Аня")
    api.wait_for_messages(-700, 2)
    assert [question_of(prompt) for prompt in bot.model.prompts] == ["Пётр: мой номер карты 1234",
                                                                     "Аня: Скажи, , что он сказал?"]
    assert "Вопрос: Пётр: мой номер карты 1234\nОтвет: ответ на «Пётр: мой номер карты 1234»" in bot.model.prompts[1]
    api.push_text(31, "/weather")  # in a private chat an unknown command gets a hint
    assert api.wait_for_messages(31, 1)[0]["text"] == tg_bot.UNKNOWN_COMMAND_TEXT
    assert len(texts(api, -700)) == 2


def test_mentions_come_from_entities_with_utf16_offsets(api, harness):
    bot = harness()
    text = f"😀 {BOT} как дела?"  # the emoji is two UTF-16 units: the offset counts them so
    group_says(api, text, 151)
    api.wait_for_messages(-700, 1)
    assert question_of(bot.model.prompts[0]) == "user151: 😀 как дела?"


# --- settings from the environment (systemd) and the unit
def test_every_flag_can_come_from_the_environment_spaces_and_all():
    environ = {"TG_BOT_PERSONA": "Я помощник библиотеки: отвечаю коротко, по делу", "TG_BOT_MAX_BATCH": "4",
               "TG_BOT_LOG_PROMPTS": "yes", "TG_BOT_NO_PERSONA": "0", "TG_BOT_ALLOWED_USERS": "7, 12"}
    args = tg_bot.parse_args([], environ)
    assert args.persona == "Я помощник библиотеки: отвечаю коротко, по делу"
    assert args.max_batch == 4 and args.log_prompts and not args.no_persona and args.allowed_users == "7, 12"
    assert tg_bot.parse_args(["--max-batch", "2"], environ).max_batch == 2  # the command line wins
    with pytest.raises(tg_bot.UserError, match="TG_BOT_LOG_PROMPTS"):
        tg_bot.parse_args([], {"TG_BOT_LOG_PROMPTS": "sometimes"})


def test_a_bad_value_in_the_environment_is_one_line_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv(tg_bot.TOKEN_ENV, TOKEN)
    cases = {"TG_BOT_MAX_BATCH": ("abc", "not a whole number"), "TG_BOT_TEMPERATURE": ("warm", "not a number"),
             "TG_BOT_QUANTIZE": ("int4", "must be one of auto, int8, none")}
    for name, (value, why) in cases.items():
        monkeypatch.setenv(name, value)
        assert tg_bot.main(["--api-url", "http://127.0.0.1:9"]) == 1
        monkeypatch.delenv(name)
        err = capsys.readouterr().err
        assert err == f"tg_bot.py: error: {name}={value!r}: {why}\n"
    args = tg_bot.parse_args([], {"TG_BOT_MAX_BATCH": " 8 ", "TG_BOT_TEMPERATURE": "0.7", "TG_BOT_QUANTIZE": "none"})
    assert (args.max_batch, args.temperature, args.quantize) == (8, 0.7, "none")  # good values still pass


def read_environment_file(path, commented=False):
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (quotes removed);
    commented=True: the examples left commented out too."""
    environ = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        found = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if found and (commented or not found.group(1)):
            value = found.group(3).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            environ[found.group(2)] = value
    return environ


def test_the_unit_and_the_env_example_pass_settings_whole(repo_root):
    unit = (repo_root / "deploy" / "tg_bot.service").read_text(encoding="utf-8")
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert "$" not in settings["ExecStart"]  # nothing split at spaces
    assert settings["UMask"] == "0077" and settings["StateDirectoryMode"] == "0700"
    example = repo_root / "deploy" / "tg_bot.env.example"
    environ = read_environment_file(example, commented=True)
    assert all(key.startswith(tg_bot.ENV_PREFIX) or key in (tg_bot.TOKEN_ENV, tg_bot.API_URL_ENV) for key in environ)
    args = tg_bot.parse_args([], environ)  # every example names a real flag with a valid value
    tg_bot.check_args(args)
    assert " " in args.persona
    assert tg_bot.parse_args([], read_environment_file(example)).model == "/opt/chat-kit/rugpt3_50k"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_unit_is_rated_ok_or_better_by_systemd_analyze(repo_root):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                             str(repo_root / "deploy" / "tg_bot.service")], capture_output=True, text=True)
    found = re.search(r"Overall exposure level for tg_bot.service: ([\d.]+) (\w+)", result.stdout)
    assert found, result.stdout[-500:] + result.stderr[-500:]
    assert found.group(2) in ("OK", "SAFE", "PERFECT"), found.group(0)


# --- a real crash: kill -9 of the bot process while replies are pending
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("model") / "model")


def live_args(model_dir, db):
    return ["--model", str(model_dir), "--db", str(db), "--max-new-tokens", "8", "--poll-seconds", "1",
            "--workers", "3", "--log-prompts", "--allowed-users", "9,10"]


@pytest.fixture(scope="module")
def crashing(model_dir, tmp_path_factory):
    """A real bot process (and the fake API) for the two tests below, in order."""
    workdir = tmp_path_factory.mktemp("crash")
    with FakeBotApi(TOKEN) as api:
        bot = LiveBot(api, TOKEN, workdir, live_args(model_dir, workdir / "history.sqlite3"))
        bot.db = workdir / "history.sqlite3"
        try:
            yield bot
        finally:
            bot.stop()


def test_after_kill_9_a_restart_answers_every_pending_message_exactly_once(crashing):
    bot, api, db = crashing, crashing.api, crashing.db
    bot.start()
    assert "access: private: 2 users may talk to it (9, 10)" in bot.log_text()
    api.throttle(9, 120)  # Telegram holds the replies to chats 9 and 10 back ("retry after")
    api.throttle(10, 120)
    api.push_text(9, "Первый вопрос")
    api.push_text(9, "Второй вопрос")
    api.push_text(10, "Вопрос из другого чата")
    api.wait_for(lambda: {r["chat_id"] for r in api.requests if r["status"] == 429} == {9, 10}
                 and not api.unconfirmed())
    assert bot.kill() == -9  # replies pending: two generated and held back, one not started
    assert api.sent == []
    api.throttled.clear()
    bot.start()
    replies = [m["text"] for m in api.wait_for_messages(9, 2)]
    api.wait_for_messages(10, 1)
    deadline = time.monotonic() + WAIT
    while query(db, "SELECT COUNT(*) FROM inbox") != [(0,)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert query(db, "SELECT COUNT(*) FROM inbox") == [(0,)]
    rows = query(db, "SELECT role, text FROM messages WHERE chat_id = 9 ORDER BY id")
    assert rows == [("user", "Первый вопрос"), ("bot", replies[0]), ("user", "Второй вопрос"),
                    ("bot", replies[1])]  # in order
    restart_log = bot.logs[-1].read_text(encoding="utf-8")
    assert "3 messages were taken before the last stop and not answered: answering 3" in restart_log
    api.push_text(10, "И ещё один")  # the restarted bot goes on as usual...
    api.wait_for_messages(10, 2)
    assert len(api.messages_to(9)) == 2 and len(api.messages_to(10)) == 2  # ...and answered nothing twice
    assert len(bot.prompts(9)) == 3  # "Первый вопрос" before the crash, then once each after it


def test_a_revoked_token_ends_the_process_with_one_line_and_code_1(crashing):
    bot, api = crashing, crashing.api
    api.revoked = True
    assert bot.wait_exit(WAIT) == 1
    last = bot.log_text().strip().splitlines()[-1]
    assert last.startswith("tg_bot.py: error: getUpdates: Telegram refused the bot token (401")
    assert TOKEN not in bot.log_text()
