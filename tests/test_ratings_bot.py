"""Ratings in tg_bot.py (issue 22): each reply in a private chat carries 👍 / 👎 / 🔄 другой ответ;
the database's ratings table (blocks/ratings.py) keeps the prompt exactly as the model was given it,
the reply, the label and the model; 🔄 writes another reply to the same prompt ids; a press on an
unknown or old message is answered and nothing breaks; /memory counts the ratings, /forget deletes them.

The bot's ChatBot and serve() run in this process (the Harness of tests/test_tg_bot_production.py)
with the real telebot client against the fake Bot API and a stub model that records the token ids
it is given; one test runs the real bot process with a tiny random model."""
import json
import sys
import threading
from pathlib import Path

import pytest
import telebot
from telebot import apihelper, types

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402
from fake_bot_api import FakeBotApi, LiveBot  # noqa: E402
from test_tg_bot_production import PERSONA, TOKEN, WAIT, api, harness, query, question_of, tokenizer  # noqa: E402,F401

import tg_bot  # noqa: E402

MODEL_NAME, MODEL_HASH = "tiny_model", "0123456789abcdef"
SETTINGS = {"persona": PERSONA, "budget": 192, "max_turns": 8, "facts": None, "generation": {},
            "model": MODEL_NAME, "model_hash": MODEL_HASH}
GROUP = -700


class RecordingModel:
    """The model thread's generate(prompts): records each prompt's token ids as given, and
    answers "ответ N на «question»", N counting every reply it wrote (so a 🔄 differs)."""

    def __init__(self):
        self.given = []           # the token ids of every prompt, in order
        self.tokenizer = None     # set by the harness
        self.lock = threading.Lock()

    def __call__(self, prompts, on_text=None):
        replies = []
        with self.lock:
            for prompt in prompts:
                self.given.append(list(prompt))
                replies.append(f"ответ {len(self.given)} на «{question_of(self.tokenizer.decode(prompt))}»")
        return replies

    def release(self):
        pass


@pytest.fixture
def bot(harness):
    """bot(flags) -> a started Harness with a RecordingModel and the ratings' model identity."""
    def make(flags=(), model=None):
        return harness(flags=flags, model=model or RecordingModel(), settings=SETTINGS)
    return make


def ratings(db, chat_id=None):
    where, parameters = ("WHERE chat_id = ?", (chat_id,)) if chat_id is not None else ("", ())
    columns = ("id", "chat_id", "user_id", "message_id", "prompt", "prompt_ids", "prompt_tokens", "reply", "label",
               "replaces", "model", "model_hash", "created", "rated")
    rows = query(db, f"SELECT {', '.join(columns)} FROM ratings {where} ORDER BY id", parameters)
    return [dict(zip(columns, row)) for row in rows]


def sent_rows(harness, count, chat_id=None):
    """The ratings rows once `count` of them have their message id (written as its send returns)."""
    def ready():
        rows = ratings(harness.db, chat_id)
        return len(rows) == count and all(row["message_id"] is not None for row in rows)

    harness.wait_until(ready, f"{count} ratings rows with their message ids")
    return ratings(harness.db, chat_id)


def buttons(message):
    """The (text, callback_data) of every inline button a sent message carries now."""
    markup = message.get("reply_markup") or {}
    return [(button["text"], button.get("callback_data")) for row in markup.get("inline_keyboard", []) for button in row]


def data_of(message, action):
    return next(data for _, data in buttons(message) if data and data.endswith(":" + action))


def say(api, chat_id, text, **kwargs):
    """Send a message and return the chat's next message once it arrives."""
    count = len(api.messages_to(chat_id)) + 1
    api.push_text(chat_id, text, **kwargs)
    return api.wait_for_messages(chat_id, count)[count - 1]


def press(api, chat_id, message, data, **kwargs):
    """Press a button and return the bot's answer to the press (answerCallbackQuery)."""
    query_id = api.push_callback(chat_id, message, data, **kwargs)
    return api.wait_for(lambda: next((a for a in api.callback_answers if a["callback_query_id"] == query_id), None),
                        WAIT)


def test_a_private_reply_carries_the_buttons_and_its_row_holds_the_ids_the_model_was_given(api, bot, tokenizer):
    harness = bot()
    reply = say(api, 301, "Привет, как дела?")
    assert [text for text, _ in buttons(reply)] == ["👍", "👎", "🔄 другой ответ"]
    [row] = sent_rows(harness, 1)
    assert [data for _, data in buttons(reply)] == [f"rate:{row['id']}:{action}" for action in ("up", "down", "again")]
    [given] = harness.model.given
    expected = tg_bot.chat_prompt_ids(["Привет, как дела?"], SETTINGS, tokenizer)  # the prompt rule, built here
    assert json.loads(row["prompt_ids"]) == given == expected
    assert row["prompt"] == tokenizer.decode(given) and row["prompt_tokens"] == len(given)
    assert (row["chat_id"], row["user_id"], row["message_id"], row["reply"]) == (301, 301, reply["message_id"],
                                                                                reply["text"])
    assert (row["label"], row["replaces"], row["rated"]) == (None, None, None)
    assert (row["model"], row["model_hash"]) == (MODEL_NAME, MODEL_HASH) and row["created"] > 0


def test_a_second_press_changes_the_rating_of_the_same_row(api, bot):
    harness = bot()
    reply = say(api, 302, "Расскажи что-нибудь")
    liked = press(api, 302, reply, data_of(reply, "up"))
    [row] = ratings(harness.db)
    assert row["label"] == tg_bot.LIKED and row["rated"] is not None
    assert liked["text"] == tg_bot.RATED_TEXT["up"]
    disliked = press(api, 302, reply, data_of(reply, "down"))
    [row] = ratings(harness.db)
    assert row["label"] == tg_bot.DISLIKED
    assert disliked["text"] == tg_bot.RATED_TEXT["down"]
    assert len(api.messages_to(302)) == 1  # a rating writes nothing into the chat


def test_another_reply_answers_the_same_prompt_ids_and_takes_the_old_ones_place_in_the_history(api, bot, tokenizer):
    harness = bot()
    first = say(api, 303, "Что почитать?")
    answer = press(api, 303, first, data_of(first, "again"))
    assert answer["text"] == tg_bot.AGAIN_TEXT
    second = api.wait_for_messages(303, 2)[1]
    assert second["text"] != first["text"] and buttons(second)  # a new message, with buttons of its own
    old, new = sent_rows(harness, 2)
    assert new["replaces"] == old["id"] and new["message_id"] == second["message_id"] and new["label"] is None
    assert new["prompt_ids"] == old["prompt_ids"] and new["prompt"] == old["prompt"]
    assert harness.model.given[0] == harness.model.given[1] == json.loads(new["prompt_ids"])  # the same prompt
    assert new["reply"] == second["text"] and old["reply"] == first["text"]
    assert data_of(second, "up") == f"rate:{new['id']}:up"
    # The user chose to see another answer: the conversation goes on from it, not from the first.
    harness.wait_until(lambda: [t for _, t in harness.store.history(303)[0]] == ["Что почитать?", second["text"]],
                       "the history holds the new reply")
    say(api, 303, "Спасибо")
    last_prompt = tokenizer.decode(harness.model.given[2])
    assert second["text"] in last_prompt and first["text"] not in last_prompt
    # The old reply can still be rated: the pair then says which one the user preferred.
    press(api, 303, first, data_of(first, "down"))
    assert ratings(harness.db)[0]["label"] == tg_bot.DISLIKED
    # Once the conversation went on, another reply to an earlier prompt leaves the history as it is:
    # the later turns were answered after the reply the user saw then.
    history = [t for _, t in harness.store.history(303)[0]]
    press(api, 303, second, data_of(second, "again"))
    third = api.wait_for_messages(303, 4)[3]
    rows = sent_rows(harness, 4)
    assert rows[3]["replaces"] == new["id"] and rows[3]["reply"] == third["text"]
    assert harness.model.given[3] == harness.model.given[0]
    assert [t for _, t in harness.store.history(303)[0]] == history


def test_a_press_on_an_unknown_or_old_message_is_answered_and_the_bot_goes_on(api, bot):
    harness = bot()
    reply = say(api, 304, "Привет")
    gone = tg_bot.RATING_GONE_TEXT
    [row] = sent_rows(harness, 1)
    assert press(api, 304, {"message_id": 9999, "text": "старое"}, "rate:9999:up")["text"] == gone
    assert press(api, 304, {"message_id": 9998, "text": "старое"}, "rate:9998:again")["text"] == gone
    assert press(api, 304, reply, "что-то чужое")["text"] == gone
    assert press(api, 304, reply, "rate:abc:up")["text"] == gone
    wrong = f"rate:{row['id']}:up"
    assert press(api, 304, {"message_id": reply["message_id"] + 50, "text": "другое"}, wrong)["text"] == gone
    assert press(api, 304, {"message_id": reply["message_id"], "date": 0}, wrong)["text"] == gone  # deleted message
    assert ratings(harness.db)[0]["label"] is None and len(api.messages_to(304)) == 1
    assert "ответ" in say(api, 304, "Ещё вопрос")["text"]  # the bot goes on
    assert harness.error is None


def test_memory_counts_the_ratings_and_forget_deletes_them_from_the_files(api, bot):
    harness = bot()
    first = say(api, 305, "Мой любимый цвет зелёный")
    press(api, 305, first, data_of(first, "up"))
    press(api, 305, first, data_of(first, "again"))
    api.wait_for_messages(305, 2)
    other = say(api, 306, "Другой чат")  # another user's rating stays
    press(api, 306, other, data_of(other, "down"))
    assert len(ratings(harness.db, 305)) == 2
    stored_ids = ratings(harness.db, 305)[0]["prompt_ids"]  # a JSON list only the ratings table holds
    shown = say(api, 305, "/memory")["text"]
    assert tg_bot.RATINGS_KEPT_TEXT.format(count=2) in shown
    assert tg_bot.RATINGS_KEPT_TEXT.format(count=1) in say(api, 306, "/memory")["text"]
    forgot = say(api, 305, "/forget")["text"]
    assert forgot.startswith(tg_bot.FORGOT_ALL_REPLY) and tg_bot.RATINGS_FORGOTTEN_TEXT in forgot
    assert ratings(harness.db, 305) == [] and len(ratings(harness.db, 306)) == 1
    assert "Оцен" not in say(api, 305, "/memory")["text"]
    assert press(api, 305, first, data_of(first, "up"))["text"] == tg_bot.RATING_GONE_TEXT
    harness.stop()
    data = b"".join(Path(str(harness.db) + suffix).read_bytes() for suffix in ("", "-wal")
                    if Path(str(harness.db) + suffix).exists())
    assert stored_ids.encode() not in data  # overwritten, not only unlinked


def test_forget_a_word_deletes_the_ratings_that_hold_it(api, bot):
    harness = bot()
    kept = say(api, 307, "Какая сегодня погода?")
    gone = say(api, 307, "Я люблю Самару")
    press(api, 307, kept, data_of(kept, "up"))
    press(api, 307, gone, data_of(gone, "up"))
    say(api, 307, "/forget Самара")
    assert [row["reply"] for row in ratings(harness.db, 307)] == [kept["text"]]


def test_in_a_group_replies_carry_no_buttons_unless_asked(api, bot):
    harness = bot()
    reply = say(api, GROUP, "@tiny_test_bot привет", user_id=11, chat_type="group")
    assert buttons(reply) == [] and ratings(harness.db) == []
    assert tg_bot.HELP_RATINGS not in say(api, GROUP, "/help@tiny_test_bot", user_id=11, chat_type="group")["text"]
    assert tg_bot.HELP_RATINGS in say(api, 310, "/help")["text"]  # a private chat has the buttons


def test_with_memory_off_forget_still_deletes_the_ratings(api, bot):
    harness = bot(["--no-memory"])
    reply = say(api, 311, "Привет")
    press(api, 311, reply, data_of(reply, "up"))
    assert tg_bot.RATINGS_KEPT_TEXT.format(count=1) in say(api, 311, "/memory")["text"]
    forgot = say(api, 311, "/forget")["text"]
    assert forgot == tg_bot.MEMORY_OFF_REPLY + "\n" + tg_bot.RATINGS_FORGOTTEN_TEXT
    assert ratings(harness.db) == []


def test_in_a_group_with_feedback_on_only_the_asker_rates(api, bot):
    harness = bot(["--feedback", "on"])
    reply = say(api, GROUP - 1, "@tiny_test_bot привет", user_id=11, chat_type="group")
    assert buttons(reply)
    other = press(api, GROUP - 1, reply, data_of(reply, "down"), user_id=12)
    assert other["text"] == tg_bot.NOT_YOURS_TEXT and ratings(harness.db)[0]["label"] is None
    assert press(api, GROUP - 1, reply, data_of(reply, "again"), user_id=12)["text"] == tg_bot.NOT_YOURS_TEXT
    press(api, GROUP - 1, reply, data_of(reply, "up"), user_id=11)
    assert ratings(harness.db)[0]["label"] == tg_bot.LIKED
    assert len(api.messages_to(GROUP - 1)) == 1 and len(ratings(harness.db)) == 1  # nothing rewritten for 12


def test_feedback_off_sends_no_buttons_and_keeps_no_rows(api, bot):
    harness = bot(["--feedback", "off"])
    reply = say(api, 308, "Привет")
    assert buttons(reply) == [] and ratings(harness.db) == []


def test_the_fallback_reply_gets_no_buttons(api, bot):
    harness = bot(model=FallbackModel())
    reply = say(api, 309, "Привет")
    assert reply["text"] == tg_bot.FALLBACK_REPLY and buttons(reply) == [] and ratings(harness.db) == []


class FallbackModel(RecordingModel):
    def __call__(self, prompts, on_text=None):
        super().__call__(prompts, on_text)
        return [tg_bot.FALLBACK_REPLY for _ in prompts]


# --- the keyboard on a reply shown as it is written
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
        return False


def test_a_streamed_group_reply_gets_the_keyboard_on_its_last_message(api, monkeypatch):
    monkeypatch.setattr(apihelper, "API_URL", tg_bot.api_url_template(api.url))
    telegram = telebot.TeleBot(TOKEN, threaded=False)
    markup = types.InlineKeyboardMarkup()
    markup.add(types.InlineKeyboardButton("👍", callback_data="rate:1:up"))
    clock = Clock()
    for chat_id, final in ((-801, "первая часть ответа"), (-802, "первая часть ответа и конец")):
        live = tg_bot.LiveReply(telegram, chat_id, True, None, threading.Event(), clock=clock, pause=clock.advance)
        clock.advance(10)
        live.show("первая часть ответа")  # sent, then edited as it grows
        clock.advance(10)
        message_id = live.finish(final, markup)
        [message] = api.messages_to(chat_id)
        assert message["message_id"] == message_id and message["text"] == final
        assert buttons(message) == [("👍", "rate:1:up")]  # an unchanged text gets the keyboard too
    long = "слово " * 1000  # two messages: the keyboard goes on the last
    live = tg_bot.LiveReply(telegram, 803, False, None, threading.Event(), clock=clock, pause=clock.advance)
    message_id = live.finish(long.strip(), markup)
    first, last = api.messages_to(803)
    assert buttons(first) == [] and buttons(last) and last["message_id"] == message_id


# --- the real bot process
def test_the_bot_process_rates_with_the_model_folders_name_and_hash(tmp_path):
    model_dir = tiny_model.build_tiny_model(tmp_path / "rated_model")
    db = tmp_path / "history.sqlite3"
    args = ["--model", str(model_dir), "--db", str(db), "--max-new-tokens", "4", "--poll-seconds", "1",
            "--threads", "1", "--log-prompts", "--no-stream"]
    with FakeBotApi(TOKEN) as api:
        live = LiveBot(api, TOKEN, tmp_path, args)
        live.start(env={"TG_BOT_FEEDBACK": "auto"})
        try:
            reply = say(api, 401, "Привет")
            press(api, 401, reply, data_of(reply, "again"))
            api.wait_for_messages(401, 2)
            first, second = live.prompts(401)
        finally:
            live.stop()
    old, new = ratings(db)
    assert first == second == old["prompt"] == new["prompt"]  # the model was given the same prompt twice
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = {"persona": PERSONA, "max_turns": tiny_model.CHAT_CONFIG["max_turns"],
                "budget": min(tiny_model.CHAT_CONFIG["context_tokens"], 256 - 4)}
    assert json.loads(old["prompt_ids"]) == tg_bot.chat_prompt_ids(["Привет"], settings, tokenizer)
    assert tokenizer.decode(json.loads(old["prompt_ids"])) == first
    assert (old["model"], old["model_hash"]) == (model_dir.name, tg_bot.model_fingerprint(model_dir))
    assert new["replaces"] == old["id"]
