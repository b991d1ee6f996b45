"""
A Telegram bot that talks with a trained model folder and remembers each chat.

Every chat's history lives in SQLite (--db), and so does every message the bot
has taken and not yet answered: it is written there before Telegram is told the
update was received, so a crash or a restart loses nothing, and the next start
answers what was left, once and in order (a message older than
--max-age-minutes gets a short note instead, or nothing: --old-messages). The
database files are readable by their owner only; /reset deletes a chat's turns
for good, from the write-ahead log too. A chat idle longer than --idle-minutes
starts afresh. The prompt holds the persona and as many of the latest turns as
fit in the model's context budget; in groups each turn carries its speaker's
first name.

It also remembers what each user tells it about themselves (name, city, age, work,
study, family, pets, likes and dislikes, plans): the facts are found in each message
(yargy grammars over pymorphy3, the same block as create_dataset.py's), kept per user
and chat in the same database (in a group, per member, and only for that group), and
put into every prompt of that user as an exchange after the persona ("Что ты обо мне
знаешь?"), when the model folder was trained with it (chat_config.json "facts": true).
They outlive the context window, /reset, idle resets and restarts. /memory shows them,
/forget deletes them all and /forget <слово> the matching ones, for good: the fact rows,
and every stored message that holds the forgotten words in any form, are overwritten
and checkpointed out of the write-ahead log. --no-memory turns it off.

The polling thread only decides and records: the replies and every notice
(busy, too fast, offline, not allowed) are sent by other threads, so a slow or
rate-limited send never holds up other chats. A bounded pool of workers handles
the messages, one at a time per chat; a user writing faster than --rate-limit
messages a minute is told once and the rest are dropped, and past --max-queue
waiting messages in all the bot says it is busy. One model thread writes the
replies, and the prompts of chats that write while it is busy are generated
together as one batch (--max-batch). On a CPU the model runs with int8 linear
layers on one thread per physical core (--quantize, --threads).
bench/generation.py and bench/bot_load.py measure both.

Each reply in a private chat carries three buttons: 👍, 👎 and "🔄 другой ответ" (--feedback:
auto, the default, in private chats only; on, in groups too; off, nowhere). The database keeps a
row for each reply sent with them (the ratings table of blocks/ratings.py, which
create_dataset.py --feedback reads): chat, user, the prompt exactly as the model was given it
(the prompt rule's text and its token ids), the reply, the label (👍 or 👎; a second press
changes it), the model folder's name and a hash of its weights, and when. 🔄 writes another
reply to the same prompt ids (not a new prompt with the first reply in it): a new message and a
new row naming the one it replaces, the pair the newer one preferred unless rated otherwise; the
conversation goes on from the new reply (it takes the old one's place in the history while that
is still the chat's last turn). A press on a message the bot no longer knows gets a short notice;
in a group only the person a reply was for may rate it. /memory says how many ratings are kept;
/forget deletes them all, /forget <слово> the ones whose prompt or reply holds the word; /reset
leaves them (they are the user's feedback, not the conversation). A press is never kept in the
inbox: one lost in a crash is simply pressed again.

A reply is shown as it is written (--no-stream: sent once complete): in a private
chat as a draft that grows about once a second (sendMessageDraft) and is then sent
as the message, in a group (or where the Bot API server has no drafts) as a message
edited as it grows, every three seconds; each row of a batch streams to its own
chat, and nothing the cleaning would remove (a label the model goes on to write, a
link) ever shows. When one machine is not enough, the model runs in an
OpenAI-compatible inference server (--server URL: llama.cpp's llama-server, transformers serve, vLLM with
replicas or tensor parallelism; deploy/README.md): the bot keeps the persona, the
memory, the database, the allow-lists and the streaming, and asks the server only
for the continuation of its prompt, streamed. A server that is down, slow or
failing gets the user an apology; the bot goes on.

Run it (CPU, a small server):
    export TELEGRAM_BOT_TOKEN=123456:ABC...      # from @BotFather; never put it in code
    python tg_bot.py --model rugpt3_50k
or keep the token in a file readable by the bot's user only:
    python tg_bot.py --model rugpt3_medium_CLEAN_model --token-file /etc/chat-kit/token --max-batch 4
every flag can also come from the environment as TG_BOT_<FLAG> (what the systemd unit uses):
    TG_BOT_MODEL=rugpt3_50k TG_BOT_PERSONA="Я помощник библиотеки." python tg_bot.py
one reply at a time, plain fp32 weights (what the kit did before batching):
    python tg_bot.py --model rugpt3_50k --max-batch 1 --quantize none
on a GPU:
    python tg_bot.py --model rugpt3_medium_CLEAN_model --device cuda --max-batch 16
rating buttons in groups too (auto: private chats only; off: none):
    python tg_bot.py --model rugpt3_50k --feedback on
without long-term memory (nothing users say about themselves is kept; no yargy/pymorphy3 needed):
    python tg_bot.py --model rugpt3_50k --no-memory
with the model in an inference server (the folder gives the tokenizer and chat settings):
    vllm serve rugpt3_medium_CLEAN_model --port 8000 --generation-config vllm &
    python tg_bot.py --model rugpt3_medium_CLEAN_model --server http://127.0.0.1:8000
against a self-hosted Bot API server (also what the tests do with a fake one):
    python tg_bot.py --api-url http://127.0.0.1:8081 --model rugpt3_50k
A systemd unit and an env file for a server are in deploy/ (see deploy/README.md).

In a notebook (Jupyter, Colab): paste this whole file into one cell, set the
defaults block below (never the token: set os.environ["TELEGRAM_BOT_TOKEN"] in a cell
before, in Colab from its secrets: userdata.get(...)), and run the cell; it serves until
the notebook's Stop button, then stops cleanly and gives the notebook its Ctrl+C back.
`%run tg_bot.py --flags` and `!python tg_bot.py --flags` take flags as above.

Commands in the chat: /start, /help, /reset (in a group, admins only), /memory,
/forget [слово]. SIGTERM (or Ctrl+C, or a notebook's Stop button) stops polling,
finishes the replies in progress and closes the database; messages not yet started
wait there for the next start. A token that Telegram no longer accepts (401), or
another copy of the bot polling with the same token (409), ends the bot with one
line and exit code 1.

The file, by job (each section's classes and functions do that job):
    secrets and logging          the token, never in the log
    the bot                      ChatBot: a message's way through the parts below, on a worker
    Telegram intake and offsets  Intake, ChatDispatcher, poll, serve: updates on disk before confirmed
    triage                       Triage, RateLimit: which messages are taken, notices for the rest
    commands                     the command table's handlers (/start, /help, /reset...), setMyCommands
    memory commands              Memory: the facts kept, /memory, /forget
    answering and streaming      Answerer, LiveReply: prompt, model (the batcher block), reply
    ratings                      Ratings, Press: the 👍 / 👎 / 🔄 buttons and what a press does
    one send path                send_reply (split, retried, reply-to), Notifier
    the store                    HistoryStore: SQLite, and memory while the disk fails
    settings and main            flags, TG_BOT_* variables, checks, run
The shared blocks after main hold the prompt rule, decoding, the facts grammars, the command
table with the /forget rule (blocks/memory_commands.py), the chat's model code and the batcher
(blocks/batcher.py: the model thread that generates chats' replies together) and the ratings
table (blocks/ratings.py).
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import html
import itertools
import json
import logging
import os
import queue
import re
import signal
import sqlite3
import stat
import sys
import threading
import time
import unicodedata
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests
import telebot
import torch
from telebot import apihelper, types, util
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          StopStringCriteria, StoppingCriteriaList, set_seed)
from transformers.activations import NewGELUActivation
from transformers.generation import BaseStreamer
from transformers.pytorch_utils import Conv1D

# -----------------------------------------------------------------------------
# defaults (every one is also a flag, and every flag also a TG_BOT_<FLAG> environment
# variable; the model folder's chat_config.json wins over the built-in generation
# values, a flag wins over both)
DEFAULT_MODEL = "rugpt3_50k"
DEFAULT_DEVICE = "auto"
DEFAULT_DB = "bot_history.sqlite3"
DEFAULT_MAX_BATCH = 16          # replies generated together; beyond this a 2-4 core CPU gains little
DEFAULT_MAX_BATCH_TOKENS = 8192  # rows x (longest prompt + reply): ~600 MB of key/value cache for ruGPT-3 small
DEFAULT_BATCH_WAIT_MS = 100.0   # the most a batch waits for messages already being prepared
DEFAULT_QUANTIZE = "auto"       # int8 linear layers on a CPU, plain weights on a GPU
DEFAULT_IDLE_MINUTES = 60.0     # a chat silent this long starts a fresh conversation
DEFAULT_MAX_INPUT_CHARS = 1000  # longer messages keep their last this many characters
DEFAULT_POLL_SECONDS = 20       # getUpdates long-poll; SIGTERM takes effect within this
DEFAULT_RATE_LIMIT = 20         # messages a minute from one user; more are dropped after one notice
DEFAULT_MAX_QUEUE = 100         # messages taken and not yet answered, all chats together
DEFAULT_MAX_AGE_MINUTES = 5.0   # an older message (downtime) is not answered
DEFAULT_OLD_MESSAGES = "note"   # ...but gets one short note per chat ("skip": nothing)
DEFAULT_SEED = 42
PERSONA = None                  # the bot's answer to the persona question (None: chat_config.json's)
NO_PERSONA = False              # True: no persona exchange in the prompt
MAX_NEW_TOKENS = None           # None: chat_config.json's generation settings, for these five
TEMPERATURE = None
TOP_P = None
REPETITION_PENALTY = None       # must be >= 1.0
CONTEXT_TOKENS = None           # prompt budget in tokens (None: chat_config.json's)
MAX_TURNS = None                # turns in the prompt, the new message included (None: chat_config.json's)
THREADS = 0                     # CPU threads for the model (0: physical cores)
TOKEN_FILE = None               # file holding the bot token (None: $TELEGRAM_BOT_TOKEN; never the token itself here)
API_URL = None                  # self-hosted Bot API server (None: $TELEGRAM_API_URL, else Telegram's own)
ALLOWED_USERS = None            # "id1,id2": only these Telegram users (None: everyone)
WORKERS = None                  # messages handled at once (None: 2 x DEFAULT_MAX_BATCH)
NO_MEMORY = False               # True: remember nothing users say about themselves; /memory, /forget say so
LOG_PROMPTS = False             # True: log every prompt (users' words: for debugging only)
LOG_LEVEL = "INFO"              # DEBUG, INFO, WARNING or ERROR
SERVER = None                   # base URL of an OpenAI-compatible inference server; None: the model runs here
SERVER_TIMEOUT = 60.0           # seconds a reply from the server may take, its wait in the server's queue included
SERVER_KEY = None               # the server's API key (None: $OPENAI_API_KEY, else none; better: TG_BOT_SERVER_KEY)
NO_STREAM = False               # True: a reply is sent once complete, not shown as it is written
FEEDBACK = "auto"               # 👍 / 👎 / 🔄 under replies: auto (private chats), on (groups too), off
STREAM_EVERY_SECONDS = 1.0      # a streamed reply is updated at most this often in a private chat...
GROUP_STREAM_EVERY_SECONDS = 3.0  # ...and in a group (Telegram allows about 20 messages a minute there)
ENV_PREFIX = "TG_BOT_"          # TG_BOT_PERSONA="..." is --persona "...", spaces and all
TOKENIZER_COPIES = 4            # for building prompts, a millisecond each: more would only take memory
MAX_PENDING_PER_CHAT = 5        # messages of one chat waiting for the model; more are turned away
TYPING_EVERY_SECONDS = 4.0      # Telegram shows "typing…" for about 5 s per action
SEND_ATTEMPTS = 6               # a send is tried this often (429, 5xx, network errors) before giving up
SEND_BACKOFF_SECONDS = 1.0      # first wait after a 5xx or a network error, doubled each time...
MAX_SEND_BACKOFF_SECONDS = 30.0  # ...up to this
MAX_RETRY_AFTER_SECONDS = 300
NOTICE_THREADS = 2              # notices may wait out a 429; they never hold the polling thread
NOTICE_QUEUE = 200              # notices waiting to be sent; beyond this they are dropped
NOTICE_INTERVAL_SECONDS = 60.0  # the same notice goes to a chat at most once in this time
RATING_THREADS = 2              # button presses are looked up and answered here, never on the polling thread
RATING_DATA = re.compile(r"rate:(\d+):(up|down|again)")  # a button's callback_data: rate:<row id>:<action>
CONFLICT_LIMIT = 3              # this many 409s from getUpdates within CONFLICT_WINDOW_SECONDS: another copy polls
CONFLICT_WINDOW_SECONDS = 60.0
BACKLOG_LIMIT = 100_000         # database changes kept in memory while the disk is full
GET_UPDATES_LIMIT = 100         # the most updates one getUpdates returns (Telegram's default and maximum)
HELD_RETRY_SECONDS = 1.0        # while taken updates are not on disk, Telegram resends them at once: the wait between
HISTORY_ROWS_LOADED = 2000      # far beyond any context budget; only bounds the database read
MAX_SPEAKER_CHARS = 32
TOKEN_ENV = "TELEGRAM_BOT_TOKEN"
API_URL_ENV = "TELEGRAM_API_URL"
ANONYMOUS_ADMIN_ID = 1087968824  # @GroupAnonymousBot: the sender of an anonymous group admin's messages

# What the bot says to people.
START_TEXT = ("Привет! Я бот-собеседник. Пишите мне обычным текстом — я помню, о чём мы говорили. "
              "/reset — начать разговор заново, /help — подсказка.")
HELP_INTRO = ("Просто напишите сообщение, и я отвечу. Я помню наш разговор, пока он помещается в мою память, "
              "а после долгой паузы начинаю заново.")  # /help: then a line for each command of the table
HELP_RATINGS = "Под моими ответами есть кнопки: 👍 и 👎 — оценить ответ, 🔄 — попросить другой."
RESET_TEXT = "Хорошо, начнём с чистого листа. О чём поговорим?"
ADMINS_ONLY_TEXT = "В группе эту команду могут давать только её администраторы."
UNKNOWN_COMMAND_TEXT = "Такой команды я не знаю. Список команд — /help."
NON_TEXT_TEXT = "Я понимаю только текст. Напишите, пожалуйста, словами."
EMPTY_TEXT = "Кажется, сообщение пустое. Напишите, что вас интересует."
NOT_ALLOWED_TEXT = "Извините, это закрытый бот: у вас нет к нему доступа."
BUSY_TEXT = "Я ещё отвечаю на предыдущие сообщения. Подождите немного, пожалуйста."
FACTS_UNREADABLE_TEXT = "Не могу сейчас прочитать, что я о вас помню. Попробуйте ещё раз чуть позже."
OVERLOADED_TEXT = "Сейчас мне пишут очень многие, и я не успеваю. Напишите, пожалуйста, через пару минут."
RATE_LIMIT_TEXT = ("Вы пишете слишком часто, я не успеваю читать. Следующие сообщения этой минуты я пропущу — "
                   "подождите немного, пожалуйста.")
OFFLINE_TEXT = "Простите, я был недоступен и пропустил ваши сообщения. Если вопрос ещё актуален, напишите его снова."
UNSAVED_TEXT = ("На сервере сейчас не получается сохранить наш разговор. Я продолжаю отвечать и помню его, "
                "но после перезапуска могу забыть.")
SEND_FAILED_TEXT = "Не получилось отправить ответ: связь с Telegram сбоит. Спросите, пожалуйста, ещё раз чуть позже."
APOLOGY_TEXT = "Простите, что-то пошло не так. Попробуйте ещё раз чуть позже."
RATING_BUTTONS = (("👍", "up"), ("👎", "down"), ("🔄 другой ответ", "again"))
RATED_TEXT = {"up": "Спасибо! Отметил, что ответ хороший.", "down": "Спасибо! Отметил, что ответ неудачный."}
AGAIN_TEXT = "Пишу другой ответ…"
RATING_GONE_TEXT = "Этот ответ уже нельзя оценить: я его больше не помню."
NOT_YOURS_TEXT = "Оценить ответ может только тот, кому он написан."
RATING_UNSAVED_TEXT = "Не получилось сохранить оценку. Попробуйте ещё раз чуть позже."
RATINGS_KEPT_TEXT = "Оценок моих ответов сохранено: {count}."
RATINGS_FORGOTTEN_TEXT = "Оценки моих ответов тоже удалены."
# -----------------------------------------------------------------------------

log = logging.getLogger("tg_bot")

# --- secrets and logging
class RedactingFormatter(logging.Formatter):
    """Formats as usual, then blanks every secret: libraries put request URLs, and
    with them the token, into exception messages."""

    def __init__(self, fmt, secrets):
        super().__init__(fmt)
        self.secrets = [s for secret in secrets if secret for s in {secret, quote(secret, safe="")}]

    def format(self, record):
        return redact(super().format(record), self.secrets)


def redact(text, secrets):
    for secret in secrets:
        text = text.replace(secret, "<token>")
    return text


def setup_logging(level, token):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", [token]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # telebot brings its own stderr handler; route its records through ours instead.
    telebot.logger.handlers.clear()
    telebot.logger.propagate = True
    telebot.logger.setLevel(level)
    # Uncaught errors would otherwise print raw tracebacks past the redaction.
    threading.excepthook = lambda hook: log.error("uncaught error in thread %s", hook.thread and hook.thread.name,
                                                  exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))
    sys.excepthook = lambda kind, value, trace: log.critical("crashed", exc_info=(kind, value, trace))


def read_token(token_file):
    """The bot token from --token-file or TELEGRAM_BOT_TOKEN; never echoed."""
    if token_file:
        path = Path(token_file)
        try:
            token, source = path.read_text(encoding="utf-8").strip(), str(path)
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: cannot read the token file ({type(error).__name__})") from None
    else:
        token, source = os.environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
        if not token:
            raise UserError(f"no bot token: set {TOKEN_ENV} or pass --token-file FILE (get one from @BotFather)")
    try:
        util.validate_token(token)
    except ValueError:
        raise UserError(f"{source}: the bot token is malformed (expected <digits>:<secret>)") from None
    return token


def api_url_template(url):
    """telebot's request URL template from --api-url: a full template with {0} (token)
    and {1} (method) as is, else a server's base address."""
    if "{0}" in url and "{1}" in url:
        return url
    return url.rstrip("/") + "/bot{0}/{1}"

# --- the bot: a message's way from Telegram to its answer
class ChatBot:
    """The bot's parts, each with one job: Intake takes updates (on the polling thread, with
    Triage deciding which), the dispatcher runs each chat's messages in order on a worker,
    handle() sends each to a command of the table or to the Answerer, Memory keeps the facts,
    and every message goes out by the one send path (send_reply; notices through the Notifier)."""

    def __init__(self, bot, me, store, chat, settings, args, batcher, stopping=None):
        self.bot, self.me, self.store, self.settings, self.batcher = bot, me, store, settings, batcher
        self.stopping = stopping or threading.Event()
        self.notifier = Notifier(bot, self.stopping)
        # A message handed to a worker is announced to the model thread, so that a batch
        # can wait the few milliseconds its prompt takes rather than leave without it.
        self.dispatcher = ChatDispatcher(args.workers or 2 * args.max_batch, self.handle,
                                         on_ready=lambda chat_id: batcher.announce())
        self.triage = Triage(me, args, self.notifier, self.dispatcher)
        self.ratings = Ratings(self, args)
        self.intake = Intake(store, self.dispatcher, self.triage, self.stopping, on_press=self.ratings.take)
        self.memory = Memory(self, on=not args.no_memory)
        self.answerer = Answerer(self, chat, args)
        self.told_unsaved = {}   # chat id -> the spell of database trouble it was told about

    # --- on a worker, one message of a chat at a time
    def handle(self, item):
        message, chat_id = item.message, item.chat_id
        item.announced = True  # by the dispatcher; withdrawn below unless it reaches the model
        finished = True
        try:
            if self.stopping.is_set() and item.saved:
                finished = False  # not started before SIGTERM: it waits in the database for the next start
            elif isinstance(item, Press):
                self.ratings.again(item)
            elif message.content_type != "text":
                self.send(message, NON_TEXT_TEXT)
            else:
                self.handle_text(item)
        except ShuttingDown:
            finished = False
            log.info("chat %s: stopping while a send waited to be tried again; the message waits in the "
                     "database for the next start", chat_id)
        except ServerError as error:
            log.error("chat %s: no reply from the inference server: %s", chat_id, error)
            self.send_apology(message, APOLOGY_TEXT)
        except SendFailed as error:
            log.error("chat %s: cannot send the reply: %s", chat_id, error)
            self.send_apology(message, SEND_FAILED_TEXT)
        except apihelper.ApiTelegramException as error:
            if error.error_code == 401:
                finished = False  # the token was revoked: the polling thread ends the bot; keep the message
            log.error("chat %s: reply failed: %s", chat_id, error)
            if error.error_code not in (401, 403):  # 403: the user blocked the bot
                self.send_apology(message, APOLOGY_TEXT)
        except Exception:
            log.exception("chat %s: reply failed", chat_id)
            self.send_apology(message, APOLOGY_TEXT)
        finally:
            if item.announced:
                item.announced = False
                self.batcher.withdraw()
            if finished and not item.recorded:
                self.store.done(item.update_id)

    def handle_text(self, item):
        text = self.triage.strip_mentions(item.message).strip()
        command = util.extract_command(text)
        if command is not None:
            run_command(self, item, command, util.extract_arguments(text) or "")
        elif not text:
            self.send(item.message, EMPTY_TEXT)
        else:
            self.answerer.answer(item, text)

    def tell_if_unsaved(self, message, saved):
        """A chat is told once per spell of database trouble that it is remembered in memory only."""
        if saved or self.told_unsaved.get(message.chat.id) == self.store.faults:
            return
        self.told_unsaved[message.chat.id] = self.store.faults
        self.send(message, UNSAVED_TEXT)

    def send(self, message, text):
        send_reply(self.bot, message.chat.id, text, reply_to_of(message), self.stopping)

    def send_apology(self, message, text):
        """The last word of a message that failed: by the same path, and a failure of its own only logged."""
        try:
            self.send(message, text)
        except Exception as error:
            log.error("chat %s: cannot send a message either: %s", message.chat.id, error)

    def close(self):
        """Finish the messages in progress; the ones not started stay in the database."""
        self.ratings.close()  # first: a press being looked up may still hand the dispatcher a 🔄
        self.dispatcher.close()
        self.notifier.close()

# --- Telegram intake and offsets: updates taken, on disk before they are confirmed, handed to the workers
class Taken:
    """A message the bot took: its update id, and whether the inbox holds it on disk."""

    def __init__(self, update_id, message):
        self.update_id, self.message, self.saved = update_id, message, False
        self.chat_id = message.chat.id
        self.announced = False   # to the model thread, which may hold a batch for it: withdrawn unless it goes there
        self.recorded = False    # its inbox row went with the change it made (an exchange, a reset, a /forget)


class Intake:
    """The polling thread's part: triage a getUpdates batch, write the messages taken to the
    inbox, hand them to the workers, and say which offset confirms them to Telegram; after a
    restart, hand the workers what the inbox still holds."""

    def __init__(self, store, dispatcher, triage, stopping, on_press=None):
        self.store, self.dispatcher, self.triage, self.stopping = store, dispatcher, triage, stopping
        self.on_press = on_press  # on_press(update id, callback query): a button pressed; must not block
        # While the inbox cannot be written, the offset stays at the first update not on disk, so
        # Telegram keeps it (and sends it again with every getUpdates); the updates seen since are
        # not triaged twice, and they are confirmed once the disk takes them.
        self.held_from = None    # the first update id taken and not on disk; None when there is none
        self.held_ids = set()    # the update ids seen since, taken or turned away
        self.held_items = []     # the Taken among them, marked saved once they are
        self.next_offset = None  # past every update seen
        self.held_full_logged = False

    def take_updates(self, updates):
        """Triage a getUpdates batch, write the messages taken (and the next offset) to
        the database, then hand them to the workers; returns the next offset. Only the
        next getUpdates confirms these updates to Telegram, so they are on disk first:
        while they cannot be written (a full disk), the offset returned stays at the first
        one not on disk, and the updates Telegram sends again are not taken twice."""
        now = time.time()
        fresh = [update for update in updates if update.update_id not in self.held_ids]
        taken, extra = [], Counter()
        for update in fresh:
            message = update.message
            try:
                if update.callback_query is not None and self.on_press is not None:
                    self.on_press(update.update_id, update.callback_query)
                elif message is not None and self.triage.takes(message, now, extra, len(taken)):
                    taken.append(Taken(update.update_id, message))
                    extra[message.chat.id] += 1
            except Exception:
                log.exception("cannot take update %s", update.update_id)
        self.next_offset = max(updates[-1].update_id + 1, self.next_offset or 0)
        rows = [(item.update_id, item.chat_id, json.dumps(item.message.json, ensure_ascii=False)) for item in taken]
        if fresh or self.held_from is None:
            saved = self.store.take(rows, self.next_offset)
        else:
            saved = self.store.flush()  # only updates sent again: what is held may go to disk now
        for item in taken:
            item.saved = saved
            self.dispatcher.submit(item.chat_id, item, force=True)
        if len(self.triage.rate.times) > 10_000:
            self.triage.rate.forget_idle(time.monotonic())
        if saved:
            self.release_held()
            return self.next_offset
        if self.held_from is None:
            self.held_from = updates[0].update_id
            log.warning("updates from %d on are not on disk: Telegram keeps them until they are", self.held_from)
        self.held_ids.update(update.update_id for update in fresh)
        self.held_items += taken
        if not fresh:  # Telegram answers at once while it keeps updates: no tight loop of getUpdates
            if len(updates) >= GET_UPDATES_LIMIT and not self.held_full_logged:
                self.held_full_logged = True
                log.error("%d updates wait for the database: Telegram sends no more than these, so new messages "
                          "wait there until it can be written", len(updates))
            self.stopping.wait(HELD_RETRY_SECONDS)
        return self.held_from

    def release_held(self):
        """The updates held in memory are on disk now: the next offset confirms them."""
        if self.held_from is None:
            return
        log.info("%d updates kept in memory are on disk now: confirming them", len(self.held_ids))
        for item in self.held_items:
            item.saved = True
        self.held_from, self.held_ids, self.held_items = None, set(), []
        self.held_full_logged = False

    def offset_to_confirm(self, offset):
        """At a stop: past every update seen once those held in memory are on disk; else
        `offset`, and Telegram sends them to the next start (answered again if they were)."""
        if self.held_from is None:
            return offset
        if self.store.flush():
            self.release_held()
            return self.next_offset
        log.error("%d updates seen while the database could not be written stay unconfirmed: Telegram sends "
                  "them to the next start, which answers them (again, where they were answered)", len(self.held_ids))
        return self.held_from

    def recover(self):
        """Hand the workers the messages taken before the last stop or crash and not yet
        answered: oldest first, each once; too old ones get the offline note."""
        pending, now, answered = self.store.pending(), time.time(), 0
        for update_id, raw in pending:
            try:
                message = types.Message.de_json(raw)
            except Exception:
                log.exception("update %s in the database cannot be read; dropped", update_id)
                self.store.done(update_id)
                continue
            if self.triage.is_old(message, now):
                self.triage.offline_note(message)
                self.store.done(update_id)
                continue
            item = Taken(update_id, message)
            item.saved = True
            self.dispatcher.submit(item.chat_id, item, force=True)
            answered += 1
        if pending:
            log.info("%d messages were taken before the last stop and not answered: answering %d of them now",
                     len(pending), answered)


class ChatDispatcher:
    """Runs handle(item) on a pool of workers so that items of one chat run in
    order, one at a time, while other chats proceed in parallel."""

    def __init__(self, workers, handle, max_pending=MAX_PENDING_PER_CHAT, on_ready=None):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reply")
        self.handle, self.max_pending = handle, max_pending
        self.on_ready = on_ready or (lambda chat_id: None)  # told when an item is handed to the pool
        self.queues = {}  # chat id -> items; the first one is being handled
        self.total = 0    # items in all the queues
        self.idle = threading.Condition()

    def waiting(self, chat_id):
        with self.idle:
            return len(self.queues.get(chat_id, ()))

    def submit(self, chat_id, item, force=False):
        """Queue an item; False when that chat already has too many waiting (unless forced)."""
        with self.idle:
            queue = self.queues.get(chat_id)
            if queue is not None:
                if len(queue) >= self.max_pending and not force:
                    return False
                queue.append(item)
                self.total += 1
                return True
            self.queues[chat_id] = deque([item])
            self.total += 1
        self.on_ready(chat_id)
        self.pool.submit(self._run_next, chat_id)
        return True

    def _run_next(self, chat_id):
        with self.idle:
            item = self.queues[chat_id][0]
        try:
            self.handle(item)
        except Exception:
            log.exception("unhandled error in chat %s", chat_id)
        with self.idle:
            queue = self.queues[chat_id]
            queue.popleft()
            self.total -= 1
            if not queue:
                del self.queues[chat_id]
                self.idle.notify_all()
                return
        # Back of the line: a chat with many messages does not hold a worker for all of them.
        self.on_ready(chat_id)
        self.pool.submit(self._run_next, chat_id)

    def close(self):
        """Wait until every queued item is handled, then stop the workers."""
        with self.idle:
            self.idle.wait_for(lambda: not self.queues)
        self.pool.shutdown(wait=True)


def remove_webhook(bot):
    """getUpdates answers 409 while a webhook is set: remove one left behind (by an
    earlier deployment, another tool) and say so."""
    try:
        info = bot.get_webhook_info()
    except apihelper.ApiTelegramException as error:
        if error.error_code == 401:
            raise UserError(f"getWebhookInfo: Telegram refused the bot token (401 {error.description})") from None
        log.warning("cannot ask whether a webhook is set: %s", error)
        return
    except Exception as error:
        log.warning("cannot ask whether a webhook is set: %s", error)
        return
    if info.url:
        # Only the host: the rest of a webhook address is often a secret of its own.
        log.warning("a webhook was set (to %s), which keeps getUpdates from working: removing it (deleteWebhook)",
                    urlsplit(info.url).hostname or "an address")
        try:
            call_with_retry(lambda: bot.delete_webhook(drop_pending_updates=False))
        except Exception as error:  # getUpdates will answer 409 and bring us back here
            log.error("cannot remove the webhook: %s", error)


def poll(bot, take_updates, stopping, poll_seconds, offset=None):
    """Long-poll getUpdates until `stopping` is set; take_updates(updates) records a
    batch and returns the next offset, which the next call confirms. Returns the
    last offset. A refused token (401) and another copy polling (409 that a
    deleteWebhook does not cure) end it with UserError."""
    backoff, conflicts = 1.0, deque()
    while not stopping.is_set():
        try:
            updates = bot.get_updates(offset=offset, timeout=poll_seconds + 10, long_polling_timeout=poll_seconds,
                                      allowed_updates=["message", "callback_query"])
        except apihelper.ApiTelegramException as error:
            if error.error_code == 401:
                raise UserError(f"getUpdates: Telegram refused the bot token (401 {error.description}): it was "
                                f"revoked or replaced; put the new one from @BotFather in {TOKEN_ENV}") from None
            if error.error_code == 409:
                now = time.monotonic()
                conflicts.append(now)
                while now - conflicts[0] > CONFLICT_WINDOW_SECONDS:
                    conflicts.popleft()
                if len(conflicts) >= CONFLICT_LIMIT:
                    raise UserError(f"getUpdates: {len(conflicts)} conflicts (409 {error.description}) within "
                                    f"{CONFLICT_WINDOW_SECONDS:.0f} s: another copy of this bot is polling with the "
                                    f"same token; stop it") from None
                log.error("getUpdates conflict (409 %s)", error.description)
                if "webhook" in error.description.lower():
                    remove_webhook(bot)
            else:
                log.error("getUpdates failed: %s", error)
            stopping.wait(backoff)
            backoff = min(backoff * 2, 60.0)
            continue
        except Exception as error:  # the network or Telegram having a bad moment: wait, try again
            log.error("getUpdates failed: %s", error)
            stopping.wait(backoff)
            backoff = min(backoff * 2, 60.0)
            continue
        backoff = 1.0
        if updates:
            offset = take_updates(updates)
    return offset


def confirm_updates(bot, offset):
    # Telegram forgets updates below the offset only on the next getUpdates; without
    # this call the messages answered last would come again to whatever polls next.
    if offset is None:
        return
    try:
        bot.get_updates(offset=offset, limit=1, timeout=10, long_polling_timeout=1)
    except Exception as error:
        log.warning("could not confirm the last updates: %s", error)


def serve(bot, chat_bot, stopping, poll_seconds):
    """Remove a stale webhook, answer what the last run left, poll until `stopping`,
    then confirm the updates taken and finish the replies in progress. A fatal API
    error (UserError) comes out after the same shutdown."""
    fatal, offset = None, chat_bot.store.saved_offset()
    try:
        remove_webhook(bot)
        chat_bot.intake.recover()
        offset = poll(bot, chat_bot.intake.take_updates, stopping, poll_seconds, offset)
    except UserError as error:
        fatal = error
    stopping.set()
    if fatal is None:
        confirm_updates(bot, chat_bot.intake.offset_to_confirm(offset))
    chat_bot.close()
    if fatal is not None:
        raise fatal

# --- triage: which messages the bot takes, and what the ones turned away are told
class RateLimit:
    """At most `per_minute` messages from one user in any 60 seconds (0: no limit).
    allow() says "yes", "warn" (the first one over: tell them once) or "no"."""

    def __init__(self, per_minute):
        self.per_minute = per_minute
        self.times = {}      # user -> times of their accepted messages in the last minute
        self.warned = set()

    def allow(self, user, now):
        if not self.per_minute:
            return "yes"
        times = self.times.setdefault(user, deque())
        while times and now - times[0] >= 60.0:
            times.popleft()
        if len(times) < self.per_minute:
            times.append(now)
            self.warned.discard(user)
            return "yes"
        if user in self.warned:
            return "no"
        self.warned.add(user)
        return "warn"

    def forget_idle(self, now):
        for user in [user for user, times in self.times.items() if not times or now - times[-1] >= 60.0]:
            del self.times[user]
            self.warned.discard(user)


def utf16_slice(text, offset, length):
    # Telegram counts entity offsets in UTF-16 code units (an emoji is two).
    units = text.encode("utf-16-le")
    return units[2 * offset:2 * (offset + length)].decode("utf-16-le", errors="replace")


def cut_utf16_spans(text, spans):
    units = text.encode("utf-16-le")
    for offset, length in sorted(spans, reverse=True):
        units = units[:2 * offset] + b" \x00" + units[2 * (offset + length):]
    return units.decode("utf-16-le", errors="replace")


def speaker_name(user):
    """The first name a group turn is labelled with: one line, not too long."""
    name = " ".join(((user and user.first_name) or "").split())[:MAX_SPEAKER_CHARS]
    return name or "Участник"


def speaker_id(message):
    """Whose facts a message adds to: its sender (an anonymous group admin or a channel
    speaking in a group: that chat)."""
    user = message.from_user
    if message.sender_chat is not None or user is None or user.id == ANONYMOUS_ADMIN_ID:
        return (message.sender_chat or message.chat).id
    return user.id


class Triage:
    """On the polling thread, quickly: whether the bot takes a message (meant for it, from someone
    allowed, not too old, not too fast, with room for it), and the notice for one turned away."""

    def __init__(self, me, args, notifier, dispatcher):
        self.me, self.notifier, self.dispatcher = me, notifier, dispatcher
        self.username = (me.username or "").lower()
        self.allowed = args.allowed_users
        self.max_queue = args.max_queue
        self.max_age = args.max_age_minutes * 60
        self.old_messages = args.old_messages
        self.rate = RateLimit(args.rate_limit)

    def takes(self, message, now, extra=None, taken_so_far=0):
        """True when the bot takes the message; notices for the ones it turns away."""
        chat_id, user = message.chat.id, message.from_user
        if message.chat.type == "channel" or message.content_type in util.content_type_service:
            return False
        if in_group(message):
            if not self.addressed_to_me(message):
                return False
            command = util.extract_command(self.strip_mentions(message).strip())
            if command is not None and command_row(command) is None:
                return False  # meant for another bot of the group, or a typo: not ours to answer
        if self.allowed is not None and not self.may_talk(message):
            log.info("chat %s: refused user %s (not on --allowed-users)", chat_id, user and user.id)
            self.notifier.notify(message, NOT_ALLOWED_TEXT)
            return False
        if self.is_old(message, now):  # before the rate limit: a backlog after downtime is no flood
            self.offline_note(message)
            return False
        verdict = self.rate.allow(user.id if user else chat_id, time.monotonic())
        if verdict != "yes":
            if verdict == "warn":
                log.warning("chat %s: user %s writes faster than --rate-limit %d a minute; dropping the rest",
                            chat_id, user and user.id, self.rate.per_minute)
                self.notifier.notify(message, RATE_LIMIT_TEXT)
            return False
        extra = extra or Counter()
        if self.dispatcher.waiting(chat_id) + extra[chat_id] >= MAX_PENDING_PER_CHAT:
            log.warning("chat %s: too many messages waiting, one turned away", chat_id)
            self.notifier.notify(message, BUSY_TEXT)
            return False
        if self.dispatcher.total + taken_so_far >= self.max_queue:
            log.warning("chat %s: %d messages waiting in all (--max-queue): one turned away", chat_id,
                        self.dispatcher.total + taken_so_far)
            self.notifier.notify(message, OVERLOADED_TEXT)
            return False
        return True

    def may_talk(self, message):
        user = message.from_user
        return user is not None and user.id in self.allowed

    def is_old(self, message, now):
        return self.max_age > 0 and now - message.date > self.max_age

    def offline_note(self, message):
        log.info("chat %s: message from %.0f min ago, sent while the bot was away: %s", message.chat.id,
                 (time.time() - message.date) / 60, "noted" if self.old_messages == "note" else "skipped")
        if self.old_messages == "note":
            self.notifier.notify(message, OFFLINE_TEXT)

    def my_mentions(self, message):
        """The (offset, length) of every mention of this bot, from the message's entities:
        "support@tiny_test_bot.ru" holds the name, but Telegram marks it an email."""
        text = message.text or message.caption or ""
        spans = []
        for entity in (message.entities or message.caption_entities or []):
            if entity.type == "mention" and utf16_slice(text, entity.offset, entity.length).lower() == \
                    "@" + self.username:
                spans.append((entity.offset, entity.length))
            elif entity.type == "text_mention" and entity.user is not None and entity.user.id == self.me.id:
                spans.append((entity.offset, entity.length))
        return spans

    def strip_mentions(self, message):
        text = message.text or message.caption or ""
        spans = self.my_mentions(message)
        return cut_utf16_spans(text, spans) if spans else text

    def addressed_to_me(self, message):
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == self.me.id:
            return True
        text = message.text or message.caption or ""
        if util.is_command(text):
            target = text.split()[0].partition("@")[2]
            return not target or target.lower() == self.username
        return bool(self.my_mentions(message))

# --- commands: the rows of the command table (blocks/memory_commands.py) this bot answers
def start_command(chat_bot, item, argument):
    chat_bot.send(item.message, START_TEXT)


def help_command(chat_bot, item, argument):
    chat_bot.send(item.message, bot_help_text(chat_bot.memory.on, chat_bot.ratings.wanted(in_group(item.message))))


def reset_command(chat_bot, item, argument):
    saved = chat_bot.store.clear(item.chat_id, done=item.update_id)
    item.recorded = True
    log.info("chat %s: history reset", item.chat_id)
    chat_bot.send(item.message, RESET_TEXT)
    chat_bot.tell_if_unsaved(item.message, saved)


def memory_command(chat_bot, item, argument):
    chat_bot.memory.show(item)


def forget_command(chat_bot, item, argument):
    chat_bot.memory.forget(item, argument)


# The bot's handler of each row of the table, by name; a row may bring its own instead.
COMMAND_HANDLERS = {"start": start_command, "help": help_command, "reset": reset_command,
                    "memory": memory_command, "forget": forget_command}


def command_row(name):
    """The table's row of a command this bot answers; None for another bot's command or a typo."""
    return next((row for row in offered_commands(COMMANDS, COMMAND_HANDLERS) if row.name == name), None)


def bot_help_text(memory, feedback=True):
    text = help_text(HELP_INTRO, COMMANDS, COMMAND_HANDLERS, memory)
    return text + "\n\n" + HELP_RATINGS if feedback else text


def run_command(chat_bot, item, name, argument):
    """Answer a command by the table: its handler, once its row's `who` allows the sender."""
    row = command_row(name)
    if row is None:
        chat_bot.send(item.message, UNKNOWN_COMMAND_TEXT)  # groups never get here (triage)
        return
    if row.who == GROUP_ADMINS and in_group(item.message) and not is_group_admin(chat_bot.bot, item.message,
                                                                                    chat_bot.stopping):
        log.info("chat %s: /%s by user %s refused: not an admin", item.chat_id, name,
                 item.message.from_user and item.message.from_user.id)
        chat_bot.send(item.message, ADMINS_ONLY_TEXT)
        return
    (row.handler or COMMAND_HANDLERS[row.name])(chat_bot, item, argument)


def is_group_admin(bot, message, stopping):
    """Whether the sender may change the group's bot: its creator or an administrator
    (asked of Telegram each time: rights change), or an admin writing anonymously."""
    user = message.from_user
    if message.sender_chat is not None and message.sender_chat.id == message.chat.id:
        return True  # sent "as the group": only its admins can
    if user is None or user.id == ANONYMOUS_ADMIN_ID:
        return False
    try:
        member = call_with_retry(lambda: bot.get_chat_member(message.chat.id, user.id), stopping)
    except (SendFailed, apihelper.ApiException) as error:
        log.warning("chat %s: cannot ask Telegram whether user %s is an admin (%s): refused", message.chat.id,
                    user.id, error)
        return False
    return member.status in ("creator", "administrator")


def register_commands(bot, memory):
    """The command list Telegram shows when a user types "/" (setMyCommands), from the table; nice
    to have, so never fatal."""
    rows = offered_commands(COMMANDS, COMMAND_HANDLERS, memory)
    try:
        bot.set_my_commands([types.BotCommand(row.name, row.description) for row in rows])
    except Exception as error:
        log.warning("cannot register the command list (setMyCommands): %s", error)


# --- memory commands: what each user said about themselves, per chat (/memory, /forget)
class Memory:
    """Each user's facts in each chat: merged from what they say, shown by /memory, deleted by
    /forget with every stored message of theirs that holds the forgotten words (the one rule of
    blocks/memory_commands.py, which the console chat follows too)."""

    def __init__(self, chat_bot, on):
        self.chat_bot, self.store, self.on = chat_bot, chat_bot.store, on
        # One user's read-merge-write at a time (a user writes in several chats, the workers
        # run chats in parallel), and the grammars are not known to be safe in threads.
        self.lock = threading.Lock()

    def remember(self, message, text):
        """Merge the facts the user states in `text` into what is kept of them in this chat
        (the message's own facts count for its answer, as in training); the facts for the prompt."""
        if not self.on:
            return ()
        chat_id, user_id = message.chat.id, speaker_id(message)
        with self.lock:
            new = extract_user_facts(text)
            stored = self.store.user_facts(chat_id, user_id)
            if stored is None:  # unreadable: answer with what this message says, write nothing over the rest
                return merge_user_facts([], new)
            merged = merge_user_facts(stored, new) if new else stored
            if merged != stored:
                self.store.set_user_facts(chat_id, user_id, merged)
                log.info("chat %s: user %s: %d facts kept (%d new in this message)", chat_id, user_id, len(merged),
                         len(new))
        return merged

    def show(self, item):
        message = item.message
        rated = self.store.rating_count(message.chat.id, speaker_id(message))
        kept = "\n\n" + RATINGS_KEPT_TEXT.format(count=rated) if rated else ""
        if not self.on:
            self.chat_bot.send(message, MEMORY_OFF_REPLY + kept)
            return
        with self.lock:
            facts = self.store.user_facts(message.chat.id, speaker_id(message)) or []
        self.chat_bot.send(message, (render_facts_list(facts) if facts else NO_FACTS_ANSWER) + kept)

    def forget(self, item, argument):
        """/forget: all the user's facts in this chat; /forget <слово>: the ones that hold the
        word in any form. The user's stored messages holding the forgotten words (and the word
        asked about) go too, both sides of their exchanges, and the command's own text; in a
        group, what other members said stays."""
        message, chat_id, user_id = item.message, item.chat_id, speaker_id(item.message)
        everything = not argument.strip()
        # Every row of the user's goes, rated or not (each holds their words); the reply speaks of
        # the ones they rated.
        rows = self.store.rating_count(chat_id, user_id, rated_only=False) if everything else 0
        gone = "\n" + RATINGS_FORGOTTEN_TEXT if rows and self.store.rating_count(chat_id, user_id) else ""
        if not self.on:
            if rows:  # with memory off, /forget still deletes the ratings (and any facts an earlier run kept)
                saved = self.store.forget(chat_id, user_id, [], done=item.update_id, everything=True)
                item.recorded = True
            self.chat_bot.send(message, MEMORY_OFF_REPLY + gone)
            if rows:
                self.chat_bot.tell_if_unsaved(message, saved)
            return
        with self.lock:
            stored = self.store.user_facts(chat_id, user_id)
            if stored is None and argument.strip():
                # unreadable: which facts hold the word is unknown, and forgetting from an empty
                # list would write all of them away
                self.chat_bot.send(message, FACTS_UNREADABLE_TEXT)
                return
            kept, removed, holds = forget_facts(stored or [], argument)
            saved = self.store.forget(chat_id, user_id, kept, holds, done=item.update_id, everything=everything)
        item.recorded = True
        log.info("chat %s: user %s: /forget%s: %d facts forgotten, %d kept", chat_id, user_id,
                 " <word>" if argument.strip() else "", len(removed), len(kept))
        if everything:
            self.chat_bot.send(message, FORGOT_ALL_REPLY + gone)
        elif removed:
            self.chat_bot.send(message, FORGOT_SOME_REPLY + "\n" + render_facts_list(removed))
        else:
            self.chat_bot.send(message, NOTHING_TO_FORGET_REPLY)
        self.chat_bot.tell_if_unsaved(message, saved)

# --- answering and streaming: the prompt, one model for many chats, the reply shown as it is written
class Answerer:
    """A message's answer: the prompt (the chat's history within the idle limit, the user's
    facts), the model's reply shown as it is written, and the exchange stored once it was sent."""

    def __init__(self, chat_bot, chat, args):
        self.chat_bot = chat_bot  # its settings are read for each prompt
        self.idle_seconds = args.idle_minutes * 60
        self.max_input_chars = args.max_input_chars
        self.log_prompts = args.log_prompts
        self.stream = not args.no_stream
        self.drafts = hasattr(chat_bot.bot, "send_message_draft")  # pyTelegramBotAPI before 4.32 has none: edits
        self.tokenizers = TokenizerPool(chat["tokenizer"], TOKENIZER_COPIES)

    def prompt(self, item, text, speaker):
        """(prompt ids, prompt text) for the message: its chat's turns, an idle one started afresh."""
        chat_bot, chat_id = self.chat_bot, item.chat_id
        history, last = chat_bot.store.history(chat_id)
        if last is not None and self.idle_seconds > 0 and time.time() - last > self.idle_seconds:
            chat_bot.store.clear(chat_id)
            log.info("chat %s: idle for %.0f min, starting afresh", chat_id, (time.time() - last) / 60)
            history = []
        facts = chat_bot.memory.remember(item.message, text)
        # In a group, whose words a turn holds: one member's words are not another's.
        turns = [f"{who}: {said}" if who else said for who, said in history + [(speaker, text)]]
        with self.tokenizers.borrow() as tokenizer:
            prompt = chat_prompt_ids(turns, chat_bot.settings, tokenizer, facts)
            prompt_text = tokenizer.decode(prompt)  # what a server is sent
        return prompt, prompt_text

    def answer(self, item, text):
        chat_bot, message, chat_id = self.chat_bot, item.message, item.chat_id
        if len(text) > self.max_input_chars:
            text = text[-self.max_input_chars:]  # the end usually holds the question
        speaker = speaker_name(message.from_user) if in_group(message) else None
        prompt, prompt_text = self.prompt(item, text, speaker)
        reply = self.deliver(item, speaker_id(message), in_group(message), reply_to_of(message), prompt, prompt_text)
        if reply == FALLBACK_REPLY:
            # The model said nothing usable: remembering the stock line would only teach the
            # prompt to repeat it, so the exchange is left out (the message is answered, though).
            saved = chat_bot.store.done(item.update_id)
        else:
            # Stored once it reached the user, so a failed send leaves no exchange they never saw.
            saved = chat_bot.store.add_exchange(chat_id, text, reply, speaker=speaker, done=item.update_id,
                                                user_id=speaker_id(message))
        item.recorded = True
        chat_bot.tell_if_unsaved(message, saved)

    def deliver(self, item, user_id, group, reply_to, prompt, prompt_text, replaces=None):
        """The model's reply to `prompt` (ids; its text for a server and the ratings), shown as it is
        written or sent whole, with the rating buttons where the chat gets them: a message's answer,
        or another one to a rated prompt (🔄, replacing the row `replaces`). The reply."""
        chat_bot, chat_id, ratings = self.chat_bot, item.chat_id, self.chat_bot.ratings
        if self.log_prompts:
            log.info("prompt chat=%s: %s", chat_id, json.dumps(prompt_text, ensure_ascii=False))
        live = None
        if self.stream:
            live = LiveReply(chat_bot.bot, chat_id, group, reply_to, chat_bot.stopping, self.drafts)
        with keep_typing(lambda: chat_bot.bot.send_chat_action(chat_id, "typing")):
            request = chat_bot.batcher.submit(prompt, len(prompt), announced=True, stream=live is not None,
                                              prompt_text=prompt_text)
            item.announced = False
            reply = live.follow(request) if live else request.result()
        if live and live.drafts_refused and self.drafts:
            self.drafts = False
            log.warning("the Bot API server has no sendMessageDraft (404): replies are shown by editing a "
                        "message as they grow")
        # The row comes before the message, so that its buttons can name it; the stock line of a
        # model that said nothing usable is not the model's reply, and is not rated.
        rating = None
        if reply != FALLBACK_REPLY and ratings.wanted(group):
            rating = ratings.record(chat_id, user_id, prompt, prompt_text, reply, replaces)
        markup = ratings.keyboard(rating) if rating is not None else None
        try:
            if live:
                message_id = live.finish(reply, markup)
            else:
                message_id = send_reply(chat_bot.bot, chat_id, reply, reply_to, chat_bot.stopping, markup)[-1].message_id
        except BaseException:
            if rating is not None:
                chat_bot.store.drop_rating(rating)  # no buttons reached the chat: nothing to rate
            raise
        if rating is not None:
            chat_bot.store.rating_sent(rating, message_id)
        return reply


@contextlib.contextmanager
def keep_typing(send_action, every=TYPING_EVERY_SECONDS):
    """Show "typing…" while the body runs, refreshed before Telegram lets it lapse.
    Never waited for: a slow action call must not hold up the reply."""
    done = threading.Event()

    def refresh():
        while True:
            try:
                send_action()
            except Exception as error:  # a missed "typing…" is cosmetic
                log.debug("typing action failed: %s", error)
            if done.wait(every):
                return

    threading.Thread(target=refresh, name="typing", daemon=True).start()
    try:
        yield
    finally:
        done.set()


class LiveReply:
    """A reply shown to its chat while it is written. In a private chat the text grows in a
    draft (sendMessageDraft: a temporary bubble, which the final message replaces); where
    drafts are refused (a group, a Bot API server without them) the first part is sent as a
    message and edited as it grows. At most one call per `every` seconds, counted from the
    start of the reply, so a reply written faster than that is just sent; a 429 is waited out
    and halves the pace; a text over 4096 characters goes on in a second message. Runs on the
    chat's worker (the generating thread only stores the text), and every update is the start
    of the final text. An update that fails stops the updates, never the reply."""

    draft_ids = itertools.count(1)  # non-zero; a new id is a new draft bubble

    def __init__(self, bot, chat_id, group, reply_to, stopping, drafts=True, clock=time.monotonic, pause=None):
        self.bot, self.chat_id, self.reply_to, self.stopping = bot, chat_id, reply_to, stopping
        # The pace is read from `clock` and waited by `pause` (stopping.wait): a test moves a fake clock itself.
        self.clock, self.pause = clock, pause or stopping.wait
        self.mode = "draft" if drafts and not group else "edit"  # "off" once an update failed
        self.every = GROUP_STREAM_EVERY_SECONDS if group else STREAM_EVERY_SECONDS
        self.next_at = self.clock() + self.every
        self.shown = ""            # the text visible now, all its parts together
        self.messages = []         # [message id, text] of each message of this reply, in order
        self.draft_id = next(self.draft_ids)
        self.drafts_refused = False  # a 404: the Bot API server has no drafts at all

    def due(self, text):
        """Whether `text` is to be shown now: it is new, updates are on, and the pace allows one."""
        return self.mode != "off" and text != self.shown and self.clock() >= self.next_at

    def follow(self, request):
        """Show the request's text as it grows, paced, until the reply is done; its result."""
        while True:
            with request.changed:
                while not request.done.is_set() and not self.due(request.visible):
                    news = self.mode != "off" and request.visible != self.shown
                    request.changed.wait(min(max(self.next_at - self.clock(), 0.0), 1.0) if news else 1.0)
                if request.done.is_set():
                    return request.result()
                text = request.visible
            self.show(text)

    def show(self, text):
        parts = util.smart_split(text, util.MAX_MESSAGE_LENGTH)
        try:
            if self.mode == "draft":
                try:
                    self._draft(parts)
                except apihelper.ApiTelegramException as error:
                    if error.error_code not in (400, 404):
                        raise
                    # 404: a Bot API server older than drafts; 400: a chat that takes none
                    log.info("chat %s: no drafts (%s %s): the reply is sent and edited as it grows", self.chat_id,
                             error.error_code, error.description)
                    self.drafts_refused |= error.error_code == 404
                    self.mode = "edit"
                    self._edit(parts)
            else:
                self._edit(parts)
        except RetryAfter as wait:
            if self.pause(wait.seconds):
                self.mode = "off"
            self.every *= 2  # Telegram said too fast: slower for the rest of this reply
            self.next_at = self.clock()  # ...but the text waiting now goes out at once
            return
        except Exception as error:  # the final send tries again and reports what fails
            log.warning("chat %s: an update of the reply being written failed (%s): the reply comes whole",
                        self.chat_id, error)
            self.mode = "off"
            return
        self.shown = text
        self.next_at = self.clock() + self.every

    def _draft(self, parts):
        for part in parts[len(self.messages):-1]:  # parts complete now: messages; the draft goes on after them
            self.messages.append([once(lambda: self.bot.send_message(self.chat_id, part)).message_id, part])
            self.draft_id = next(self.draft_ids)
        once(lambda: self.bot.send_message_draft(self.chat_id, self.draft_id, parts[-1]))

    def _edit(self, parts):
        for number, part in enumerate(parts):
            if number < len(self.messages):
                if self.messages[number][1] != part:
                    once(lambda: self.bot.edit_message_text(part, chat_id=self.chat_id,
                                                            message_id=self.messages[number][0]))
                    self.messages[number][1] = part
            else:
                sent = once(lambda: self.bot.send_message(self.chat_id, part,
                                                          reply_parameters=self._reply_parameters(number)))
                self.messages.append([sent.message_id, part])

    def _reply_parameters(self, number):
        if self.reply_to is None or number > 0:
            return None
        return types.ReplyParameters(self.reply_to, allow_sending_without_reply=True)

    def finish(self, reply, markup=None):
        """Deliver the finished reply, each call tried as send_reply tries one: the messages
        sent so far edited where the text changed (paced), the rest sent; `markup` (the rating
        buttons) goes on the last message, an edit adding it where the text is already whole. A
        draft is temporary, so in a private chat the reply itself is always sent as a message.
        The last message's id."""
        parts = util.smart_split(reply, util.MAX_MESSAGE_LENGTH)
        for number, part in enumerate(parts):
            keyboard = markup if number == len(parts) - 1 else None
            if number < len(self.messages):
                if (self.messages[number][1] != part or keyboard is not None) and \
                        not self._final_edit(number, part, keyboard):
                    self.messages[number] = [self._final_send(number, part, keyboard), part]
            else:
                self.messages.append([self._final_send(number, part, keyboard), part])
        return self.messages[len(parts) - 1][0]

    def _final_edit(self, number, part, markup=None):
        """False when the message cannot be edited (deleted): it is sent anew instead."""
        wait = self.next_at - self.clock()
        if wait > 0:
            self.pause(wait)  # the pace; stopping: the reply still goes
        message_id = self.messages[number][0]
        if self.messages[number][1] == part:  # the text is whole already: only the buttons go on
            edit = lambda: self.bot.edit_message_reply_markup(self.chat_id, message_id, reply_markup=markup)  # noqa: E731
        else:
            edit = lambda: self.bot.edit_message_text(part, chat_id=self.chat_id, message_id=message_id,  # noqa: E731
                                                      reply_markup=markup)
        try:
            call_with_retry(edit, self.stopping)
        except apihelper.ApiTelegramException as error:
            if error.error_code != 400:
                raise
            if "not modified" not in error.description:
                log.info("chat %s: cannot edit the reply (%s); sending it anew", self.chat_id, error.description)
                return False
        self.messages[number][1] = part
        self.next_at = self.clock() + self.every
        return True

    def _final_send(self, number, part, markup=None):
        # The one send path: a part is at most 4096 characters, so it is one message.
        return send_reply(self.bot, self.chat_id, part, self.reply_to if number == 0 else None,
                          self.stopping, markup)[0].message_id

# --- ratings: 👍 / 👎 / 🔄 другой ответ under a reply, kept in the ratings table (blocks/ratings.py)
class Press:
    """A 🔄 press, handed to its chat's worker in line with the chat's messages. Never in the inbox
    (a press lost in a crash is pressed again), so there is no inbox row to mark done."""

    def __init__(self, update_id, query, rating_id):
        self.update_id, self.query, self.rating_id = update_id, query, rating_id
        self.message = query.message  # the bot's message carrying the buttons
        self.chat_id = query.message.chat.id
        self.saved, self.announced, self.recorded = False, False, True


class Ratings:
    """The buttons under a reply and what a press does. Which chats get them: --feedback auto
    (private chats), on (groups too), off (none; a press on an older message is still answered).
    A press is looked up, checked (the row of this very message, pressed by the person the reply
    was for) and answered on a small pool of its own, never on the polling thread; 👍 and 👎 set
    the row's label (a second press changes it), 🔄 goes to the chat's worker like a message."""

    def __init__(self, chat_bot, args):
        self.chat_bot, self.store = chat_bot, chat_bot.store
        self.mode, self.allowed, self.max_queue = args.feedback, args.allowed_users, args.max_queue
        self.pool = ThreadPoolExecutor(max_workers=RATING_THREADS, thread_name_prefix="rating")

    def wanted(self, group):
        return self.mode == "on" or (self.mode == "auto" and not group)

    def record(self, chat_id, user_id, prompt, prompt_text, reply, replaces=None):
        """The row of a reply about to be sent with the buttons; its id, or None (then no buttons)."""
        settings = self.chat_bot.settings
        return self.store.add_rating(chat_id, user_id, prompt_text, prompt, reply, settings.get("model") or "",
                                     settings.get("model_hash") or "", replaces)

    def keyboard(self, rating_id):
        markup = types.InlineKeyboardMarkup()
        markup.row(*[types.InlineKeyboardButton(text, callback_data=f"rate:{rating_id}:{action}")
                     for text, action in RATING_BUTTONS])
        return markup

    def take(self, update_id, query):
        """On the polling thread: the press is looked up and answered on the pool."""
        self.pool.submit(self.press, update_id, query)

    def press(self, update_id, query):
        try:
            self._press(update_id, query)
        except Exception:
            log.exception("a button press (update %s) failed", update_id)
            self.answer(query, APOLOGY_TEXT)

    def _press(self, update_id, query):
        found = RATING_DATA.fullmatch(query.data or "")
        message = query.message
        row = None
        if found and message is not None and message.date:  # date 0: a message deleted, or too old to show
            row = self.store.rating(int(found.group(1)))
        # The row of this very message: data naming another one's row is not taken at its word. A row
        # whose message id is not recorded yet (the send has only just returned) is this chat's latest.
        if row is None or row["chat_id"] != message.chat.id or row["message_id"] not in (None, message.message_id):
            self.answer(query, RATING_GONE_TEXT)
            return
        user = query.from_user
        if self.allowed is not None and user.id not in self.allowed:
            self.answer(query, NOT_ALLOWED_TEXT)
            return
        if user.id != row["user_id"]:  # in a group, another member: the reply was not theirs
            self.answer(query, NOT_YOURS_TEXT)
            return
        action = found.group(2)
        if action != "again":
            saved = self.store.set_label(row["id"], LIKED if action == "up" else DISLIKED)
            log.info("chat %s: reply %s rated %s", row["chat_id"], row["id"], action)
            self.answer(query, RATED_TEXT[action] if saved else RATING_UNSAVED_TEXT)
            return
        dispatcher = self.chat_bot.dispatcher
        if dispatcher.total >= self.max_queue:
            self.answer(query, OVERLOADED_TEXT)
        elif not dispatcher.submit(row["chat_id"], Press(update_id, query, row["id"])):
            self.answer(query, BUSY_TEXT)
        else:
            self.answer(query, AGAIN_TEXT)

    def answer(self, query, text):
        # Telegram shows a spinner on the button until the press is answered; a failed answer is cosmetic.
        try:
            self.chat_bot.bot.answer_callback_query(query.id, text)
        except Exception as error:
            log.warning("cannot answer a button press: %s", error)

    def again(self, item):
        """On the chat's worker: another reply to the rated prompt, its ids as they were; the
        conversation goes on from it, as the user chose to see another answer."""
        row = self.store.rating(item.rating_id)
        if row is None:  # forgotten (/forget) since the press
            return
        group = in_group(item.message)
        reply = self.chat_bot.answerer.deliver(item, row["user_id"], group, item.message.message_id if group else None,
                                               json.loads(row["prompt_ids"]), row["prompt"], replaces=row["id"])
        log.info("chat %s: another reply to the prompt of reply %s", row["chat_id"], row["id"])
        if reply != FALLBACK_REPLY:
            saved = self.store.replace_reply(row["chat_id"], self.store.replies_to(row["chat_id"], row["prompt_ids"]),
                                             reply)
            self.chat_bot.tell_if_unsaved(item.message, saved)

    def close(self):
        self.pool.shutdown(wait=True)

# --- one send path: every message the bot sends, bar the updates of a reply being written
class ShuttingDown(Exception):
    """A wait before trying again was cut short by SIGTERM."""


class SendFailed(Exception):
    """A Bot API call still failed after SEND_ATTEMPTS tries."""


def retry_wait(error, attempt):
    """Seconds to wait before trying `error`'s call again, or None when trying again
    cannot help (a 400, a 403: the request itself is wrong or unwelcome)."""
    backoff = min(SEND_BACKOFF_SECONDS * 2 ** (attempt - 1), MAX_SEND_BACKOFF_SECONDS)
    if isinstance(error, apihelper.ApiTelegramException):
        if error.error_code == 429:
            parameters = (error.result_json or {}).get("parameters") or {}
            return min(max(float(parameters.get("retry_after", 1)), 0.0), MAX_RETRY_AFTER_SECONDS)
        return backoff if error.error_code >= 500 else None
    if isinstance(error, apihelper.ApiHTTPException):  # a proxy's HTML error page
        return backoff if error.result.status_code >= 500 else None
    if isinstance(error, (apihelper.ApiInvalidJSONException, requests.ConnectionError, requests.Timeout)):
        return backoff
    return None


def call_with_retry(call, stopping=None, attempts=SEND_ATTEMPTS):
    """call() with retries: a 429 waits as long as Telegram asks, a 5xx or a network
    error 1, 2, 4... s. A wait ends early when `stopping` is set (ShuttingDown); the
    last error, after `attempts` tries, comes as SendFailed."""
    stopping = stopping or threading.Event()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            wait = retry_wait(error, attempt)
            if wait is None:
                raise
            if attempt == attempts:
                raise SendFailed(f"{attempts} tries, the last: {error}") from error
            code = getattr(error, "error_code", None) or type(error).__name__
            log.warning("Bot API call failed (%s): trying again in %.1f s", code, wait)
            if stopping.wait(wait):
                raise ShuttingDown() from error


def send_reply(bot, chat_id, text, reply_to=None, stopping=None, markup=None):
    """The one way a message goes out (replies, commands' answers, notices, apologies, a streamed
    reply's final parts): split at Telegram's 4096-character limit, each part tried again on a
    429, a 5xx or a network error (call_with_retry); in groups the first part answers the message
    it replies to, and `markup` (the rating buttons) goes on the last. The messages sent, in order."""
    sent = []
    parts = util.smart_split(text, util.MAX_MESSAGE_LENGTH)
    for number, part in enumerate(parts):
        reply = None
        if reply_to is not None and number == 0:
            reply = types.ReplyParameters(reply_to, allow_sending_without_reply=True)
        keyboard = markup if number == len(parts) - 1 else None
        sent.append(call_with_retry(lambda: bot.send_message(chat_id, part, reply_parameters=reply,
                                                             reply_markup=keyboard), stopping))
    return sent


def in_group(message):
    return message.chat.type in ("group", "supergroup")


def reply_to_of(message):
    """The message a reply answers: in a group, so that its members see whom; none in a private chat."""
    return message.message_id if in_group(message) else None


class RetryAfter(Exception):
    """Telegram answered 429: the call may be tried again after `seconds`."""

    def __init__(self, seconds):
        super().__init__(f"retry after {seconds} s")
        self.seconds = seconds


def once(call):
    """call() tried once; a 429 comes as RetryAfter, for the caller to wait out and slow down."""
    try:
        return call()
    except apihelper.ApiTelegramException as error:
        if error.error_code == 429:
            raise RetryAfter(retry_wait(error, 1)) from error
        raise


class Notifier:
    """Short notices (busy, too fast, offline, not allowed) sent from a small pool of
    their own, so that waiting out a 429 for one of them never holds up the polling
    thread. A chat gets the same notice at most once in NOTICE_INTERVAL_SECONDS,
    and at most NOTICE_QUEUE wait to be sent."""

    def __init__(self, bot, stopping, threads=NOTICE_THREADS):
        self.bot, self.stopping = bot, stopping
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="notice")
        self.lock = threading.Lock()
        self.last = {}       # (chat id, text) -> when it was last queued
        self.waiting = 0

    def notify(self, message, text):
        key, now = (message.chat.id, text), time.monotonic()
        with self.lock:
            if now - self.last.get(key, -NOTICE_INTERVAL_SECONDS) < NOTICE_INTERVAL_SECONDS:
                return False
            if self.waiting >= NOTICE_QUEUE:
                log.warning("chat %s: too many notices waiting; this one is dropped", message.chat.id)
                return False
            if len(self.last) > 10 * NOTICE_QUEUE:  # forget chats that have been quiet for a while
                self.last = {k: t for k, t in self.last.items() if now - t < NOTICE_INTERVAL_SECONDS}
            self.last[key] = now
            self.waiting += 1
        self.pool.submit(self._send, message.chat.id, text, reply_to_of(message))
        return True

    def _send(self, chat_id, text, reply_to):
        try:
            send_reply(self.bot, chat_id, text, reply_to, self.stopping)
        except ShuttingDown:
            log.info("chat %s: a notice was not sent: stopping", chat_id)
        except Exception as error:
            log.error("chat %s: cannot send a notice: %s", chat_id, error)
        finally:
            with self.lock:
                self.waiting -= 1

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

# --- the store: history, the inbox of messages not yet answered, the offset, the facts
class Change:
    """One write to the database, kept in memory until it is written."""

    def __init__(self, kind, chat_id=None, rows=(), done=None, offset=None, user_id=None, holds=None,
                 everything=False):
        self.kind, self.chat_id, self.rows, self.done, self.offset = kind, chat_id, list(rows), done, offset
        self.user_id = user_id
        self.holds = holds  # "forget": holds(text) is True for a message to delete with the facts
        self.everything = everything  # "forget": every rating of the user's in the chat goes too


def inbox_message(raw):
    """(text or caption, owner) of a message kept in the inbox as JSON; the owner is whose
    words they are, as speaker_id says of a live message."""
    try:
        message = json.loads(raw)
    except json.JSONDecodeError:
        return raw, None
    if not isinstance(message, dict):
        return "", None
    user, sender = message.get("from") or {}, message.get("sender_chat")
    if sender or not user or user.get("id") == ANONYMOUS_ADMIN_ID:
        owner = (sender or message.get("chat") or {}).get("id")
    else:
        owner = user.get("id")
    return message.get("text") or message.get("caption") or "", owner


def owned_by(owner, user_id):
    # A turn stored before owners were kept (None) counts as the asker's: /forget erred on the
    # side of forgetting then, and still does for those.
    return owner is None or owner == user_id


def restrict_to_owner(path):
    """The database and its -wal and -shm files readable by their owner only. Regular files
    only: os.chmod follows a symbolic link, and a folder at 0600 would lock its owner out."""
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if stat.S_ISREG(os.lstat(name).st_mode):
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


def check_database_path(path):
    """--db names a file: a folder there is a mistake to say, before anything is touched."""
    if os.path.isdir(path):
        raise UserError(f"--db {path}: is a folder; give the database file, e.g. "
                        f"{os.path.join(path, DEFAULT_DB)}")


class HistoryStore:
    """Each chat's turns, the messages taken and not yet answered (the inbox), and
    what each user said about themselves (user_facts, per chat and user), in SQLite,
    readable by its owner only. Deleted rows are overwritten (secure_delete) and a
    reset or a /forget is checkpointed out of the write-ahead log, so forgotten words
    do not linger in the files. A write that fails (a full disk, an
    I/O error) is kept in memory, where reads see it, and tried again with the next
    write: the bot keeps answering from memory, says so once in the log, and
    catches up when the disk has room again."""

    def __init__(self, path):
        self.path = str(path)
        self.lock = threading.Lock()
        self.backlog = []          # changes not yet written, oldest first
        self.fault = None          # the error that keeps changes in memory, while it lasts
        self.faults = 0            # how many such spells there were, so each is told about once
        self.read_fault_logged = False
        check_database_path(self.path)
        try:
            restrict_to_owner(self.path)
            previous = os.umask(0o077)  # new files (the database, -wal, -shm) come out 0600
            try:
                self.db = sqlite3.connect(self.path, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA secure_delete=ON")
                self.db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                                "chat_id INTEGER NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL, "
                                "created REAL NOT NULL, speaker TEXT, user_id INTEGER)")
                columns = [row[1] for row in self.db.execute("PRAGMA table_info(messages)")]
                if "speaker" not in columns:  # a database from before speakers were kept
                    self.db.execute("ALTER TABLE messages ADD COLUMN speaker TEXT")
                if "user_id" not in columns:  # ...or whose exchange a turn is (a group's /forget)
                    self.db.execute("ALTER TABLE messages ADD COLUMN user_id INTEGER")
                self.db.execute("CREATE INDEX IF NOT EXISTS messages_chat ON messages (chat_id, id)")
                self.db.execute("CREATE TABLE IF NOT EXISTS inbox (update_id INTEGER PRIMARY KEY, "
                                "chat_id INTEGER NOT NULL, message TEXT NOT NULL, taken REAL NOT NULL)")
                self.db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                self.db.execute("CREATE TABLE IF NOT EXISTS user_facts (chat_id INTEGER NOT NULL, "
                                "user_id INTEGER NOT NULL, position INTEGER NOT NULL, kind TEXT NOT NULL, "
                                "value TEXT NOT NULL, PRIMARY KEY (chat_id, user_id, position))")
                open_ratings(self.db)
                self.db.commit()
            finally:
                os.umask(previous)
            restrict_to_owner(self.path)
        except (sqlite3.Error, OSError) as error:
            raise UserError(f"{self.path}: cannot open the history database ({error})") from None

    # --- writing
    def _apply(self, change):
        if change.kind == "exchange":
            self.db.executemany("INSERT INTO messages (chat_id, role, text, created, speaker, user_id) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                [(change.chat_id,) + row for row in change.rows])
        elif change.kind == "clear":
            self.db.execute("DELETE FROM messages WHERE chat_id = ?", (change.chat_id,))
        elif change.kind in ("facts", "forget"):
            self.db.execute("DELETE FROM user_facts WHERE chat_id = ? AND user_id = ?",
                            (change.chat_id, change.user_id))
            self.db.executemany("INSERT INTO user_facts (chat_id, user_id, position, kind, value) "
                                "VALUES (?, ?, ?, ?, ?)",
                                [(change.chat_id, change.user_id, position, kind, value)
                                 for position, (kind, value) in enumerate(change.rows)])
            if change.kind == "forget":
                # The ratings' prompts hold the user's words (and the facts' exchange) too.
                rated = self.db.execute("SELECT id, prompt, reply FROM ratings WHERE chat_id = ? AND user_id = ?",
                                        (change.chat_id, change.user_id)).fetchall()
                self.db.executemany("DELETE FROM ratings WHERE id = ?",
                                    [(row_id,) for row_id, prompt, reply in rated if change.everything or (
                                        change.holds is not None and (change.holds(prompt) or change.holds(reply)))])
            if change.kind == "forget" and change.holds is not None:
                # Only the asker's exchanges: in a group, what other members said is theirs.
                rows = self.db.execute("SELECT id, role, text, user_id FROM messages WHERE chat_id = ? ORDER BY id",
                                       (change.chat_id,)).fetchall()
                mine = [(row_id, role, text) for row_id, role, text, owner in rows if owned_by(owner, change.user_id)]
                self.db.executemany("DELETE FROM messages WHERE id = ?",
                                    [(row_id,) for row_id in sorted(exchanges_holding(mine, change.holds))])
                inbox = self.db.execute("SELECT update_id, message FROM inbox WHERE chat_id = ?",
                                        (change.chat_id,)).fetchall()
                self.db.executemany("DELETE FROM inbox WHERE update_id = ?",
                                    [(update_id,) for update_id, raw in inbox
                                     if (change.done is None or update_id < change.done)
                                     and owned_by(inbox_message(raw)[1], change.user_id)
                                     and change.holds(inbox_message(raw)[0])])
        elif change.kind == "replace":
            olds, new = change.rows[0]
            last = self.db.execute("SELECT id, role, text FROM messages WHERE chat_id = ? ORDER BY id DESC LIMIT 1",
                                   (change.chat_id,)).fetchone()
            if last is not None and last[1] == "bot" and last[2] in olds:
                self.db.execute("UPDATE messages SET text = ? WHERE id = ?", (new, last[0]))
        elif change.kind == "take":
            self.db.executemany("INSERT OR REPLACE INTO inbox (update_id, chat_id, message, taken) VALUES (?, ?, ?, ?)",
                                change.rows)
            if change.offset is not None:
                self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('offset', ?)", (change.offset,))
        if change.done is not None:
            self.db.execute("DELETE FROM inbox WHERE update_id = ?", (change.done,))

    def _write(self, change=None):
        """Write `change` (after any kept in memory; None: only those); False when it stays in memory."""
        with self.lock:
            if change is not None:
                self.backlog.append(change)
            if len(self.backlog) > BACKLOG_LIMIT:
                del self.backlog[0]
                log.error("history database: more than %d changes waiting in memory; the oldest is dropped",
                          BACKLOG_LIMIT)
            try:
                with self.db:
                    for waiting in self.backlog:
                        self._apply(waiting)
            except sqlite3.Error as error:
                if self.fault is None:  # once a spell, not once a message
                    self.fault, self.faults = error, self.faults + 1
                    log.error("history database %s: cannot write (%s); answering from memory, and saving "
                              "what is kept there once it can", self.path, error)
                return False
            cleared = any(waiting.kind in ("clear", "forget") for waiting in self.backlog)
            if self.fault is not None:
                log.warning("history database %s: writable again; %d changes kept in memory are saved",
                            self.path, len(self.backlog))
                self.fault = None
            self.backlog.clear()
            if cleared:
                self._checkpoint()
            return True

    def _checkpoint(self):
        # Copies the log into the database and empties it: the deleted turns, zeroed
        # there by secure_delete, are then gone from the -wal file as well.
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            log.warning("history database %s: checkpoint after a reset or /forget failed (%s)", self.path, error)

    def take(self, rows, offset):
        """Messages taken from Telegram, (update id, chat id, message JSON) each, and the
        offset that confirms them: on disk before that offset goes to Telegram."""
        now = time.time()
        return self._write(Change("take", rows=[(u, c, m, now) for u, c, m in rows], offset=offset))

    def flush(self):
        """Try again to write what is kept in memory; True when nothing is left there."""
        return self._write()

    def add_exchange(self, chat_id, question, answer, now=None, speaker=None, done=None, user_id=None):
        """A question and its answer; user_id: whose exchange it is (who asked), for /forget."""
        now = time.time() if now is None else now
        return self._write(Change("exchange", chat_id, [("user", question, now, speaker, user_id),
                                                        ("bot", answer, now, None, user_id)], done=done))

    def clear(self, chat_id, done=None):
        return self._write(Change("clear", chat_id, done=done))

    def done(self, update_id):
        """The message is answered (or deliberately not): the next start leaves it alone."""
        return self._write(Change("done", done=update_id))

    def set_user_facts(self, chat_id, user_id, facts):
        """What the user has said about themselves in this chat, (kind, value) pairs oldest first."""
        return self._write(Change("facts", chat_id, facts, user_id=user_id))

    def forget(self, chat_id, user_id, kept, holds=None, done=None, everything=False):
        """Keep only `kept` of the user's facts in this chat, and delete for good every stored
        message of the user's in the chat (both sides of its exchange, the inbox too) and every rating
        whose prompt or reply holds(text) is True for, or every rating of theirs in the chat
        (everything); `done` is the /forget's own update, whose inbox row goes in the same write."""
        return self._write(Change("forget", chat_id, kept, done=done, user_id=user_id, holds=holds,
                                  everything=everything))

    def replace_reply(self, chat_id, olds, new):
        """The chat's last turn, when it is the bot's and one of `olds`, becomes `new` (🔄: the
        conversation goes on from the reply the user chose to see); an earlier turn stays, as later
        turns were answered after it."""
        return self._write(Change("replace", chat_id, [(tuple(olds), new)]))

    # --- ratings (blocks/ratings.py): written at once, never kept in memory while the disk fails,
    # as a reply's buttons need its row's id: a reply the disk cannot take goes out without them
    def _rating_write(self, sql, parameters):
        with self.lock:
            try:
                with self.db:
                    return self.db.execute(sql, parameters)
            except sqlite3.Error as error:
                log.error("history database %s: cannot write a rating (%s)", self.path, error)
                return None

    def add_rating(self, chat_id, user_id, prompt_text, prompt, reply, model, model_hash, replaces=None):
        """A reply's row, not rated yet (its message id comes once it is sent); its id, or None."""
        cursor = self._rating_write(
            "INSERT INTO ratings (chat_id, user_id, prompt, prompt_ids, prompt_tokens, reply, replaces, model, "
            "model_hash, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (chat_id, user_id, prompt_text, json.dumps([int(i) for i in prompt]), len(prompt), reply, replaces,
             model, model_hash, time.time()))
        return None if cursor is None else cursor.lastrowid

    def rating_sent(self, rating_id, message_id):
        return self._rating_write("UPDATE ratings SET message_id = ? WHERE id = ?", (message_id, rating_id)) is not None

    def drop_rating(self, rating_id):
        self._rating_write("DELETE FROM ratings WHERE id = ?", (rating_id,))

    def set_label(self, rating_id, label):
        """LIKED or DISLIKED; a second press overwrites the first. False when it was not written."""
        cursor = self._rating_write("UPDATE ratings SET label = ?, rated = ? WHERE id = ?",
                                    (label, time.time(), rating_id))
        return cursor is not None and cursor.rowcount == 1

    # --- reading: the database, then what is still in memory
    def _read(self, sql, parameters):
        try:
            return self.db.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            if not self.read_fault_logged:
                self.read_fault_logged = True
                log.error("history database %s: cannot read (%s); answering from memory", self.path, error)
            return []

    def history(self, chat_id):
        """The chat's (speaker, text) turns, oldest first, whole exchanges only, and the
        time of its last one (None for a new chat)."""
        with self.lock:
            cleared = any(change.kind == "clear" and change.chat_id == chat_id for change in self.backlog)
            rows = [] if cleared else self._read(
                "SELECT id, role, speaker, text, created, user_id FROM messages WHERE chat_id = ? "
                "ORDER BY id DESC LIMIT ?", (chat_id, HISTORY_ROWS_LOADED))[::-1]
            for change in self.backlog:
                if change.chat_id == chat_id and change.kind == "clear":
                    rows = []
                elif change.chat_id == chat_id and change.kind == "exchange":
                    rows += [(None, role, speaker, text, created, owner)
                             for role, text, created, speaker, owner in change.rows]
                elif change.chat_id == chat_id and change.kind == "replace":
                    olds, new = change.rows[0]
                    if rows and rows[-1][1] == "bot" and rows[-1][3] in olds:
                        rows[-1] = tuple(rows[-1][:3]) + (new,) + tuple(rows[-1][4:])
                elif change.chat_id == chat_id and change.kind == "forget" and change.holds is not None:
                    numbered = [(i, row[1], row[3]) for i, row in enumerate(rows) if owned_by(row[5], change.user_id)]
                    doomed = exchanges_holding(numbered, change.holds)
                    rows = [row for i, row in enumerate(rows) if i not in doomed]
        last = rows[-1][4] if rows else None
        turns = [(row[2], row[3]) for row in rows]
        return (turns[1:] if len(turns) % 2 else turns), last

    def rating(self, rating_id):
        """A ratings row as a dict, or None (no such row, or the database cannot be read)."""
        columns = ("id", "chat_id", "user_id", "message_id", "prompt", "prompt_ids", "reply", "label")
        with self.lock:
            rows = self._read(f"SELECT {', '.join(columns)} FROM ratings WHERE id = ?", (rating_id,))
        return dict(zip(columns, rows[0])) if rows else None

    def replies_to(self, chat_id, prompt_ids):
        """Every reply the chat was given to this very prompt (a first one and its 🔄s)."""
        with self.lock:
            return [row[0] for row in self._read("SELECT reply FROM ratings WHERE chat_id = ? AND prompt_ids = ?",
                                                 (chat_id, prompt_ids))]

    def rating_count(self, chat_id, user_id, rated_only=True):
        """The user's ratings in the chat: rows they rated or asked another reply for (rated_only),
        or every row of theirs (each reply sent with buttons)."""
        where = " AND (label IS NOT NULL OR replaces IS NOT NULL)" if rated_only else ""
        with self.lock:
            rows = self._read(f"SELECT COUNT(*) FROM ratings WHERE chat_id = ? AND user_id = ?{where}",
                              (chat_id, user_id))
        return rows[0][0] if rows else 0

    def pending(self):
        """The messages taken and not answered, (update id, message JSON), oldest first."""
        with self.lock:
            rows = dict(self._read("SELECT update_id, message FROM inbox ORDER BY update_id", ()))
            for change in self.backlog:
                rows.update((update_id, message) for update_id, _, message, _ in change.rows
                            if change.kind == "take")
                rows.pop(change.done, None)
        return sorted(rows.items())

    def user_facts(self, chat_id, user_id):
        """The user's facts in this chat, (kind, value) pairs oldest first; None when the
        database cannot be read (so that nothing is merged into, and written over, an empty list)."""
        with self.lock:
            try:
                facts = [tuple(row) for row in self.db.execute(
                    "SELECT kind, value FROM user_facts WHERE chat_id = ? AND user_id = ? ORDER BY position",
                    (chat_id, user_id))]
            except sqlite3.Error as error:
                log.error("history database %s: cannot read a user's facts (%s)", self.path, error)
                facts = None
            for change in self.backlog:
                if change.kind in ("facts", "forget") and (change.chat_id, change.user_id) == (chat_id, user_id):
                    facts = list(change.rows)
        return facts

    def saved_offset(self):
        with self.lock:
            rows = self._read("SELECT value FROM state WHERE key = 'offset'", ())
            offsets = [change.offset for change in self.backlog if change.offset is not None]
        return (offsets or [row[0] for row in rows] or [None])[-1]

    def close(self):
        with self.lock:
            if self.backlog:
                try:
                    with self.db:
                        for waiting in self.backlog:
                            self._apply(waiting)
                    self.backlog.clear()
                except sqlite3.Error as error:
                    log.error("history database %s: %d changes could not be saved (%s)", self.path,
                              len(self.backlog), error)
            self.db.close()

# --- settings and main
def parse_user_ids(text):
    """--allowed-users as a set of ids; None (a public bot) only when the flag is absent."""
    if text is None:
        return None
    try:
        ids = frozenset(int(part) for part in re.split(r"[,\s]+", text.strip()) if part)
    except ValueError:
        raise UserError(f"--allowed-users {text!r}: expected Telegram user ids (numbers) separated by commas") from None
    if not ids:
        raise UserError(f"--allowed-users {text!r}: no user ids; leave the flag out for a bot anyone may use")
    return ids


def describe_access(allowed):
    if allowed is None:
        return "public: anyone who finds the bot can talk to it (--allowed-users makes it private)"
    shown = ", ".join(str(user) for user in sorted(allowed)[:10])
    return f"private: {len(allowed)} users may talk to it ({shown}{', ...' if len(allowed) > 10 else ''})"


def environment_argv(parser, environ):
    """Flags from TG_BOT_<FLAG> variables, put before the command line's (which win).
    A systemd EnvironmentFile keeps TG_BOT_PERSONA="a b c" one value, where $VAR in
    ExecStart= splits it at every space."""
    argv = []
    for action in parser._actions:  # argparse keeps no public list of its options
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if not flags or action.dest == "help":
            continue
        name = ENV_PREFIX + flags[0][2:].replace("-", "_").upper()
        if name not in environ:
            continue
        value = environ[name]
        if action.nargs == 0:  # an on/off flag
            if value.strip().lower() in ("1", "true", "yes", "on"):
                argv.append(flags[0])
            elif value.strip().lower() not in ("", "0", "false", "no", "off"):
                raise UserError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")
        else:
            check_environment_value(action, name, value)
            argv += [flags[0], value]
    return argv


def check_environment_value(action, name, value):
    """A bad value is named by its variable: argparse would name a flag the operator never typed."""
    if action.type in (int, float):
        try:
            action.type(value)
        except ValueError:
            raise UserError(f"{name}={value!r}: not a {'whole ' if action.type is int else ''}number") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{name}={value!r}: must be one of {', '.join(action.choices)}")


def build_parser():
    # prog: pasted into a notebook cell, sys.argv[0] is the kernel's launcher, which names no script.
    parser = argparse.ArgumentParser(prog="tg_bot.py",
                                     description="Telegram bot that talks with a trained model folder. Every flag "
                                                 f"can also be set as {ENV_PREFIX}<FLAG> in the environment "
                                                 f"(--max-batch: {ENV_PREFIX}MAX_BATCH); the command line wins.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model folder (its newest complete checkpoint-N/ when it has no weights of its own)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, choices=("auto", "cpu", "cuda"))
    add_prompt_flags(parser)
    parser.add_argument("--token-file", default=TOKEN_FILE, help=f"file holding the bot token (default: ${TOKEN_ENV})")
    parser.add_argument("--api-url", default=API_URL or os.environ.get(API_URL_ENV),
                        help=f"self-hosted Bot API server, e.g. http://127.0.0.1:8081 (default: ${API_URL_ENV}, "
                             f"else Telegram's own)")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite file of the chats' history (created 0600)")
    parser.add_argument("--idle-minutes", type=float, default=DEFAULT_IDLE_MINUTES,
                        help="a chat silent this long starts afresh (0: never)")
    parser.add_argument("--allowed-users", default=ALLOWED_USERS,
                        help="comma-separated Telegram user ids; others are refused (default: all; an empty list "
                             "is an error)")
    parser.add_argument("--rate-limit", type=int, default=DEFAULT_RATE_LIMIT,
                        help="messages a minute from one user; the first one over gets a notice, the rest are "
                             "dropped (0: no limit)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="messages taken and not yet answered, all chats together; beyond it the bot says "
                             "it is busy")
    parser.add_argument("--max-age-minutes", type=float, default=DEFAULT_MAX_AGE_MINUTES,
                        help="a message older than this when the bot gets it (after downtime) is not answered "
                             "(0: answer everything)")
    parser.add_argument("--old-messages", default=DEFAULT_OLD_MESSAGES, choices=("note", "skip"),
                        help="what such messages get: one short \"I was offline\" note per chat, or nothing")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="replies generated together when chats write at once (1: one at a time)")
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                        help="a batch holds at most this many tokens, each row counted at the longest prompt plus "
                             "the reply: bounds the memory of its key/value cache")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="the most a batch waits for messages already being prepared; a lone message never waits")
    parser.add_argument("--quantize", default=DEFAULT_QUANTIZE, choices=("auto", "int8", "none"),
                        help="int8 weights for the linear layers: about 2x faster on a CPU (auto: int8 on a CPU, "
                             "none on a GPU)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="CPU threads for the model (default: physical cores)")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help="messages handled at once; each waits while the model writes its reply "
                             "(default: 2 x --max-batch, so the next batch is ready when the model frees)")
    parser.add_argument("--server", default=SERVER,
                        help="base URL of an OpenAI-compatible inference server that runs the model (llama.cpp's "
                             "llama-server, transformers serve, vLLM), e.g. http://127.0.0.1:8000; --model still gives the tokenizer and the "
                             "chat settings (default: the model runs in this process)")
    parser.add_argument("--server-timeout", type=float, default=SERVER_TIMEOUT,
                        help="seconds a reply from the server may take, its wait in the server's queue included; "
                             "later, the user gets an apology")
    parser.add_argument("--server-key", default=SERVER_KEY,
                        help="the inference server's API key, sent as \"Authorization: Bearer KEY\" (default: "
                             "$OPENAI_API_KEY, else none)")
    parser.add_argument("--feedback", default=FEEDBACK, choices=("auto", "on", "off"),
                        help="👍 / 👎 / 🔄 другой ответ buttons under each reply, the ratings kept in --db with the "
                             "prompt the model was given (create_dataset.py --feedback reads them): auto = in "
                             "private chats, on = in groups too, off = none")
    parser.add_argument("--no-stream", action="store_true", default=NO_STREAM,
                        help="send a reply once it is complete instead of showing it as it is written")
    parser.add_argument("--max-input-chars", type=int, default=DEFAULT_MAX_INPUT_CHARS,
                        help="a longer message keeps its last this many characters")
    parser.add_argument("--poll-seconds", type=int, default=DEFAULT_POLL_SECONDS, help="getUpdates long-poll time")
    parser.add_argument("--no-memory", action="store_true", default=NO_MEMORY,
                        help="remember nothing users say about themselves (name, city...); /memory and /forget "
                             "then say that memory is off")
    parser.add_argument("--log-prompts", action="store_true", default=LOG_PROMPTS,
                        help="log every prompt given to the model (holds users' words: for debugging only)")
    parser.add_argument("--log-level", default=LOG_LEVEL, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def parse_args(argv, environ=None):
    parser = build_parser()
    environ = os.environ if environ is None else environ
    return parser.parse_args(environment_argv(parser, environ) + list(sys.argv[1:] if argv is None else argv))


def check_choices(parser, args):
    """argparse checks `choices` only for values given as flags; a wrong value in the defaults
    block (a notebook cell) or a setting read back from elsewhere is caught here."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{action.option_strings[0]} {value!r}: must be one of {', '.join(action.choices)}")


# Settings that None leaves to chat_config.json, the environment or "none": every other one must be set.
MAY_BE_NONE = {"persona", "max_new_tokens", "temperature", "top_p", "repetition_penalty", "context_tokens",
               "max_turns", "token_file", "api_url", "allowed_users", "workers", "server", "server_key"}


def check_types(parser, args):
    """argparse converts only strings: a default of the wrong type (a notebook cell's defaults
    block: DEFAULT_MODEL = None, NO_MEMORY = "no", a list for a path) would pass through as it is."""
    for action in parser._actions:
        if action.dest == "help" or not hasattr(args, action.dest):
            continue
        value, flag = getattr(args, action.dest), action.option_strings[-1]
        if action.nargs == 0:  # an on/off flag: "no" would be true
            if value is not True and value is not False:
                raise UserError(f"{flag} {value!r}: must be True or False")
        elif value is None:
            if action.dest not in MAY_BE_NONE:
                raise UserError(f"{flag} None: must be set")
        elif action.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{flag} {value!r}: must be a whole number, not {type(value).__name__}")
        elif action.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{flag} {value!r}: must be a number, not {type(value).__name__}")
        elif not isinstance(value, str):
            raise UserError(f"{flag} {value!r}: must be text (a str), not {type(value).__name__}")


def check_args(args):
    parser = build_parser()
    check_types(parser, args)
    check_choices(parser, args)
    if args.repetition_penalty is not None and args.repetition_penalty < 1.0:
        raise UserError(f"--repetition-penalty: {args.repetition_penalty} must be >= 1.0 "
                        f"(below 1 it rewards repetition)")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if args.max_batch_tokens < 1:
        raise UserError("--max-batch-tokens must be at least 1")
    if args.batch_wait_ms < 0:
        raise UserError("--batch-wait-ms must be 0 or more")
    if args.threads < 0:
        raise UserError("--threads must be 0 (physical cores) or more")
    if args.max_input_chars < 1:
        raise UserError("--max-input-chars must be at least 1")
    if args.poll_seconds < 1:
        raise UserError("--poll-seconds must be at least 1")
    if args.rate_limit < 0:
        raise UserError("--rate-limit must be 0 (no limit) or more")
    if args.max_queue < 1:
        raise UserError("--max-queue must be at least 1")
    if args.max_age_minutes < 0:
        raise UserError("--max-age-minutes must be 0 (answer everything) or more")
    if not args.server_timeout > 0:
        raise UserError("--server-timeout must be above 0 seconds")
    if args.server:
        server_base_url(args.server)
    check_database_path(args.db)
    args.allowed_users = parse_user_ids(args.allowed_users)


def check_memory(args):
    """With memory on, the packages it needs are there, or one line says how to do without."""
    if args.no_memory:
        return
    try:
        load_fact_tools()
    except ImportError as error:
        raise UserError(f"long-term memory needs yargy and pymorphy3 ({error}); install them "
                        "(pip install -r requirements.txt) or pass --no-memory") from None


def connect(token, api_url):
    """The telebot client and the bot's own user (for mentions in groups)."""
    # Set either way: a notebook kernel keeps the module (and an earlier cell's server) between runs.
    apihelper.API_URL = api_url_template(api_url) if api_url else None
    where = (apihelper.API_URL or "https://api.telegram.org/bot{0}/{1}").format("<token>", "getMe")
    bot = telebot.TeleBot(token, threaded=False, parse_mode=None)
    try:
        me = bot.get_me()
    except apihelper.ApiTelegramException as error:
        raise UserError(f"{where}: the Bot API refused the token ({error.error_code} {error.description})") from None
    except Exception as error:
        raise UserError(f"{where}: cannot reach the Bot API ({type(error).__name__})") from None
    return bot, me


def model_identity(model_dir, weights, feedback):
    """(name, weights hash) of the model folder, for each ratings row: hashed once at the start
    (a few seconds for a large model), and not at all with --feedback off."""
    folder, weights = Path(model_dir), Path(weights)
    name = folder.resolve().name + ("" if weights.resolve() == folder.resolve() else "/" + weights.name)
    if feedback == "off":
        return name, ""
    try:
        return name, model_fingerprint(weights)
    except OSError as error:
        raise UserError(f"{weights}: cannot read the weights to hash them for the ratings ({error})") from None


def run(args, token):
    bot, me = connect(token, args.api_url)
    chat = open_model_folder(args.model, args.device, need_weights=not args.server)
    settings = resolve_settings(args, chat)
    settings["model"], settings["model_hash"] = model_identity(args.model, chat["weights"], args.feedback)
    for warning in settings["warnings"]:
        log.warning("%s", warning)
    if not args.no_memory and not settings["facts_exchange"]:
        log.warning("memory: %s was not trained with the facts exchange (its chat_config.json has no \"facts\": "
                    "true), so the prompt will not carry what users said about themselves; /memory and /forget work",
                    chat["weights"])
    server = None
    if args.server:
        server = open_server(args.server, chat["tokenizer"], args.server_timeout, settings["generation"],
                             args.server_key)
        for note in server["notes"]:
            log.warning("%s", note)
    # Opened only once the settings are known to be good, so a mistake leaves no new file behind.
    store = HistoryStore(args.db)
    if server is None:
        try:
            load_weights(chat, args.quantize, args.threads)
        except (UserError, KeyboardInterrupt):  # a Stop while the weights load: the database is closed too
            store.close()
            raise
    set_seed(args.seed)
    if server is None and args.workers is not None and args.workers < args.max_batch:
        log.warning("--workers %d: at most %d replies can be generated together, not --max-batch %d",
                    args.workers, args.workers, args.max_batch)
    if server is None:
        batcher = ReplyBatcher(model_thread_generate(chat, settings, log.debug), args.max_batch,
                               args.batch_wait_ms / 1000, args.max_batch_tokens,
                               int(settings["generation"]["max_new_tokens"]))
    else:
        batcher = ServerReplies(server, settings, args.workers or 2 * args.max_batch)
    stopping = threading.Event()
    chat_bot = ChatBot(bot, me, store, chat, settings, args, batcher, stopping)

    def stop(signum, frame):
        log.info("%s received: finishing the replies in progress", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    streaming = "sent whole" if args.no_stream else "shown as they are written"
    if server is None:
        log.info("bot @%s is up: model %s (%s, %s), prompt budget %d tokens, up to %d replies at once, replies %s, "
                 "history in %s", me.username, chat["weights"], "int8" if chat["quantize"] == "int8" else
                 "plain weights", f"{chat['threads']} threads" if chat["device"] == "cpu" else chat["device"],
                 settings["budget"], args.max_batch, streaming, args.db)
    else:
        log.info("bot @%s is up: replies from the inference server %s (%s; tokenizer and chat settings of %s), "
                 "prompt budget %d tokens, replies %s, history in %s", me.username, server["url"],
                 server_summary(server), chat["weights"], settings["budget"], streaming, args.db)
    voice = describe_voice(chat["chat_config"])
    if voice:
        log.info("voice: %s", voice)
    log.info("access: %s", describe_access(args.allowed_users))
    log.info("ratings: %s", "off (--feedback off)" if args.feedback == "off" else
             f"👍 / 👎 / 🔄 under replies in {'private chats' if args.feedback == 'auto' else 'every chat'}, kept in "
             f"{args.db} as written by {settings['model']} (weights {settings['model_hash']})")
    log.info("memory: %s", "off (--no-memory)" if args.no_memory else
             f"what users say about themselves is kept in {args.db} (/memory, /forget)")
    register_commands(bot, not args.no_memory)
    try:
        serve(bot, chat_bot, stopping, args.poll_seconds)
    finally:
        batcher.close()
        store.close()
    log.info("stopped cleanly")
    return 0


@contextlib.contextmanager
def process_hooks_restored():
    """Give back the signal handlers, exception hooks and root log handlers the bot replaces: a notebook
    kernel lives on after the cell, and its Stop button (SIGINT) must interrupt the next cell again."""
    root = logging.getLogger()
    saved = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.excepthook,
             threading.excepthook, root.handlers[:], root.level)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        sys.excepthook, threading.excepthook = saved[2], saved[3]
        root.handlers[:], root.level = saved[4], saved[5]


def main(argv=None):
    with process_hooks_restored():
        token = None
        try:
            args = parse_args(argv)
            check_args(args)
            check_memory(args)
            token = read_token(args.token_file)
            setup_logging(args.log_level, token)
            return run(args, token)
        except UserError as error:
            print("tg_bot.py: error: " + redact(str(error), [token] if token else []), file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl+C or a notebook's Stop button before the bot took over SIGINT
            print("tg_bot.py: stopped before the bot was up", file=sys.stderr)
            return 130


# ==================================================================================================
# Generated blocks: shared code that blocks/build.py writes into every script that needs it.
# Do not edit it here: change the block's source in blocks/, then run `make blocks`
# (`python blocks/build.py`); the suite fails while a copy differs from its source.
# ==================================================================================================


# ==== block blocks/prompt_rule.py: generated, edit the source and run `make blocks` ====
"""The one prompt rule: how a conversation becomes token ids, in training, chat, evaluation and serving.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

# One rule for every prompt the model sees, in training, chat, perplexity and evaluation:
#
#     Вопрос: <persona question>          the persona, when there is one
#     Ответ: <persona answer>
#     Вопрос: Что ты обо мне знаешь?      what the bot knows about the user, when it knows something
#     Ответ: <facts>
#     Ответ: <older turn>                 turns labelled counting back from the answer, so
#     Вопрос: <the user's question>       the turn before the answer is always a question
#     Ответ:                              the prompt ends at the colon ...
#      <answer><EOS>                      ... and the answer keeps its first word's space
#
# GPT-2's byte-level BPE spells a word inside a sentence with its space (" Привет"),
# so the space goes with the answer, not with the prompt. No BOS is added anywhere:
# a prompt starts with its first label in training and in chat alike, whatever the
# tokenizer's add_bos_token says. Text is tokenized as plain text: "</s>" typed by
# a user is five characters, never the EOS id.
PROMPT_RULE = 2                # chat_config.json "prompt_rule": the rule a model folder was trained with
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
FACTS_QUESTION = "Что ты обо мне знаешь?"
DEFAULT_MAX_TURNS = 16         # the turn window of a model folder whose chat_config.json records none
FACTS_ROOM_FOR_QUESTION = 16   # tokens the facts exchange leaves the question (its own length, if shorter)
LABEL_PATTERN = re.compile(r"(?i)\b(вопрос|ответ)\s*:")


def prepare_turn(text):
    """A turn as a prompt holds it: Unicode NFC, one line with single spaces (a newline
    separates turns), and a label inside it ("Ответ:") made "Ответ -", so that a user
    cannot start a turn of their own."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return LABEL_PATTERN.sub(lambda m: m.group(1) + " -", text)


def header_text(persona=None, facts=None):
    """The exchanges every prompt starts with: the persona, then what the bot knows about the user."""
    lines = []
    if persona:
        lines += [QUESTION_LABEL + prepare_turn(persona["question"]), ANSWER_LABEL + prepare_turn(persona["answer"])]
    if facts:
        lines += [QUESTION_LABEL + FACTS_QUESTION, ANSWER_LABEL + prepare_turn(facts)]
    return "".join(line + TURN_SEPARATOR for line in lines)


def prompt_text(turns, persona=None, facts=None):
    """The prompt for turns (oldest first, the user's question last), ending at the answer label's colon."""
    count = len(turns)
    lines = [(QUESTION_LABEL if (count - 1 - i) % 2 == 0 else ANSWER_LABEL) + prepare_turn(turn)
             for i, turn in enumerate(turns)]
    return header_text(persona, facts) + "".join(line + TURN_SEPARATOR for line in lines) + ANSWER_LABEL.rstrip()


def encode_text(tokenizer, text):
    """Token ids of text, taken as plain text: nothing added (no BOS, no EOS), and the spelling
    of a special token ("</s>") tokenized as the characters it is."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def answer_ids(tokenizer, answer):
    """The answer as the model learns to write it after a prompt: its first word with its
    leading space, then the tokenizer's own EOS."""
    return encode_text(tokenizer, " " + prepare_turn(answer)) + [tokenizer.eos_token_id]


def first_fitting(starts, fits):
    """The smallest of the sorted starts that fits (a later start leaves less text), else None."""
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return starts[lo] if lo < len(starts) else None


def fit_question(tokenizer, question, budget, persona=None, facts=None):
    """The longest end of the (prepared) question whose prompt fits in budget tokens, cut
    before a word where one fits; None when not even an empty question fits. The end is
    kept: people ask after the material."""
    def fits(start):
        return len(encode_text(tokenizer, prompt_text([question[start:]], persona, facts))) <= budget

    if fits(0):
        return question
    if not fits(len(question)):
        return None
    word_starts = [i for i in range(1, len(question)) if question[i - 1] == " "]
    start = first_fitting(word_starts, fits)
    if start is None:  # not even the last word fits: keep the end of it
        start = first_fitting(list(range((word_starts or [0])[-1] + 1, len(question) + 1)), fits)
    return question[start:]


def facts_that_fit(tokenizer, facts, budget, persona=None, question=""):
    """The facts answer as a prompt of budget tokens holds it beside the persona, leaving the
    question FACTS_ROOM_FOR_QUESTION tokens (or its own length, if shorter): whole, or cut
    clause by clause from its end, where the answer keeps what matters least (it names the
    user first, their plans last); None when not even its first clause fits. Training and
    chat both cut here, so the exchange a model learnt is the one it is sent."""
    bare = len(encode_text(tokenizer, prompt_text([""], persona)))
    room = min(FACTS_ROOM_FOR_QUESTION, len(encode_text(tokenizer, prompt_text([question], persona))) - bare)

    def fits(text):
        return len(encode_text(tokenizer, prompt_text([""], persona, text))) + room <= budget

    if fits(facts):
        return facts
    clauses = facts.rstrip(".").split(", ")
    for count in range(len(clauses) - 1, 0, -1):
        text = ", ".join(clauses[:count]) + "."
        if fits(text):
            return text
    return None


def fit_prompt(tokenizer, turns, max_turns, budget, persona=None, facts=None):
    """Prompt ids for a conversation (turns oldest first, the user's question last): the
    persona, the facts as far as they fit beside it (facts_that_fit), the question (its end, if it alone is too
    long), and the newest earlier turns that fit the turn window (max_turns turns, the
    question included) and budget tokens; the oldest go first. None when not even the
    persona and an empty question fit."""
    turns = [prepare_turn(turn) for turn in turns[-max_turns:]]
    facts = facts_that_fit(tokenizer, facts, budget, persona, turns[-1]) if facts else None
    whole = encode_text(tokenizer, prompt_text(turns, persona, facts))
    if len(whole) <= budget:
        return whole
    question = fit_question(tokenizer, turns[-1], budget, persona, facts)
    if question is None:
        return None
    earlier = turns[:-1]

    def encoded(count):  # the prompt with the newest `count` earlier turns
        return encode_text(tokenizer, prompt_text(earlier[len(earlier) - count:] + [question], persona, facts))

    lo, hi = 0, len(earlier) - 1  # the prompt with lo earlier turns fits (all of them did not)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encoded(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return encoded(lo)


def encode_exchange(tokenizer, turns, answer, max_turns, context_tokens, max_length, persona=None, facts=None):
    """(prompt ids, answer ids) of one exchange, as training learns it and perplexity.py and
    evaluate.py score it; None when the answer leaves no room for a prompt. The answer is
    never cut: the prompt gets context_tokens, or less where a long answer leaves less of
    max_length."""
    target = answer_ids(tokenizer, answer)
    prompt = fit_prompt(tokenizer, turns, max_turns, min(context_tokens, max_length - len(target)), persona, facts)
    return None if prompt is None else (prompt, target)


def prompt_window(chat_config, n_positions, max_new_tokens, max_turns=None, context_tokens=None):
    """(turn window, prompt budget in tokens, warning lines) for a model folder: what training
    recorded in chat_config.json, or what --max-turns / --context-tokens ask for (a warning
    where that is more than the model was trained on). The budget leaves max_new_tokens of
    the model's positions for the reply."""
    config = chat_config or {}
    notes = []
    rule = config.get("prompt_rule")
    if chat_config is not None and rule is None:
        notes.append("chat_config.json records no prompt_rule: the model was trained by an older kit, on "
                        "prompts that end in 'Ответ: ' with a space; retrain it for the prompts it is given now")
    elif chat_config is not None and rule != PROMPT_RULE:
        notes.append(f"chat_config.json has prompt_rule {rule!r}, this kit builds prompts by rule "
                        f"{PROMPT_RULE}: they may differ from the ones the model was trained on")
    trained_turns = int(config.get("max_turns") or DEFAULT_MAX_TURNS)
    trained_tokens = int(config.get("context_tokens") or n_positions - max_new_tokens)
    turns, tokens = int(max_turns or trained_turns), int(context_tokens or trained_tokens)
    if turns > trained_turns:
        notes.append(f"--max-turns {turns}: the model was trained on at most {trained_turns} turns before "
                        f"the answer")
    if tokens > trained_tokens:
        notes.append(f"--context-tokens {tokens}: the model was trained on prompts of at most "
                        f"{trained_tokens} tokens")
    return turns, min(tokens, n_positions - max_new_tokens), notes
# ==== end of block blocks/prompt_rule.py ====


# ==== block blocks/decoding.py: generated, edit the source and run `make blocks` ====
"""Decoding: the sampling settings and the reply-only penalties the chat scripts and evaluate.py use.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

LEADING_LABELS = re.compile(r"^(?:\s*ответ\s*:)+", re.IGNORECASE)
NEXT_TURN = re.compile(r"(?im)^[ \t]*(?:вопрос|ответ)[ \t]*:")
# the model going on to write the next turn itself: a label that starts a line
STOP_STRINGS = [TURN_SEPARATOR + QUESTION_LABEL.strip(), TURN_SEPARATOR + ANSWER_LABEL.strip()]


class OnReplyOnly:
    """A transformers logits processor that sees the reply's tokens only, input_ids[:, prompt_length:].

    transformers' n-gram blocking looks at the whole sequence, prompt included, so it
    bans the question's words and the name a user gave, which an answer on topic and a
    bot that remembers must repeat. Rows of a left-padded batch share prompt_length."""

    def __init__(self, processor, prompt_length):
        self.processor, self.prompt_length = processor, prompt_length

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.prompt_length:], scores)


def reply_processors(generation, prompt_length):
    """Repetition penalty and n-gram blocking of the generation settings (chat_config.json),
    applied to the reply being generated and never to the prompt."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = []
    penalty = float(generation.get("repetition_penalty") or 1.0)
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_length))
    size = int(generation.get("no_repeat_ngram_size") or 0)
    if size > 0:
        processors.append(OnReplyOnly(NoRepeatNGramLogitsProcessor(size), prompt_length))
    return processors


def cut_at_next_turn(text):
    """The reply without an echoed answer label, cut where the model went on to write the
    next turn itself: at a label that starts a line, never at "вопрос:" inside a sentence."""
    text = LEADING_LABELS.sub("", text)
    label = NEXT_TURN.search(text)
    return text[:label.start()] if label else text
# ==== end of block blocks/decoding.py ====


# ==== block blocks/user_facts.py: generated, edit the source and run `make blocks` ====
"""User facts: what people say about themselves (name, city, family, ...), read with yargy over pymorphy3.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

# What a user says about themselves (name, city, age, work, study, family, pets, likes,
# dislikes, plans with dates), found with yargy grammars over pymorphy3's analyses, kept
# in normal forms ("в Казани" is stored as Казань) and shown back inflected.
# A fact is a (kind, value) pair of strings; a user's facts are a list of them, oldest first.
FACT_KINDS = ("name", "city", "age", "occupation", "study", "family", "pet", "like", "dislike", "plan")
SINGLE_VALUE_KINDS = ("name", "city", "age", "occupation", "study")  # a later statement replaces the earlier one
MAX_VALUES_PER_KIND = 8       # likes, family, plans...: the oldest goes when a kind is full
NO_FACTS_ANSWER = "Пока ничего. Расскажи о себе, и я запомню."
# The answer to "Что ты обо мне знаешь?": a clause about "ты" for each kind, in FACT_KINDS order.
FACT_CLAUSES = {
    "name": "тебя зовут {}",
    "city": "ты живёшь {}",              # в Казани: place_in()
    "age": "тебе {}",                    # 25 лет: years_phrase()
    "occupation": "ты {}",               # ты учитель, ты на пенсии
    "workplace": "ты работаешь {}",      # an occupation that is a place: в школе
    "study": "ты учишься {}",
    "marital": "ты {}",                  # ты замужем
    "relatives": "у тебя есть {}",       # family, then pets, each kind listed with "и"
    "like": "ты любишь {}",
    "dislike": "ты не любишь {}",
    "plan": "{when} ты {what}",          # завтра ты поедешь в Казань: the verb in the second person
    "plan_thing": "{when} у тебя {what}",  # в субботу у тебя концерт
}
CITY_ABBREVIATIONS = {"мск": "Москва", "спб": "Санкт-Петербург", "питер": "Питер", "екб": "Екатеринбург",
                      "нск": "Новосибирск", "нн": "Нижний Новгород"}
# No library marks kinship or pet nouns, so these few lemmas are listed here.
KIN_LEMMAS = {"мама", "мать", "папа", "отец", "брат", "сестра", "муж", "жена", "сын", "дочь", "дочка", "сынок",
              "бабушка", "дедушка", "ребёнок", "дети", "внук", "внучка", "тётя", "дядя", "племянник",
              "племянница", "братишка", "сестрёнка", "супруг", "супруга", "девушка", "парень", "мамочка"}
PARTNER_LEMMAS = {"девушка", "парень"}  # kin only with "мой"/"у меня": "я девушка" says nothing of family
PET_LEMMAS = {"кот", "кошка", "котик", "котёнок", "собака", "пёс", "щенок", "собачка", "попугай", "хомяк",
              "хомячок", "черепаха", "кролик", "рыбка", "шиншилла", "крыса", "ящерица", "змея", "хорёк",
              "лошадь", "морская свинка", "свинка", "попугайчик"}
MARITAL_WORDS = {"замужем", "женат", "разведена", "разведён", "разведен", "помолвлена", "помолвлен"}
STATUS_PHRASES = {"на пенсии", "в декрете", "в отпуске по уходу"}
# "я человек", "я фанатка X": animate nouns that are not an occupation.
NOT_OCCUPATIONS = {"человек", "девушка", "парень", "мужчина", "женщина", "девочка", "мальчик", "ребёнок",
                   "фанат", "фанатка", "любитель", "любительница", "поклонник", "поклонница", "бот", "друг",
                   "подруга", "дурак", "дура", "идиот", "хозяин", "хозяйка", "гость", "новичок", "сам",
                   "робот", "пользователь"} | KIN_LEMMAS | PET_LEMMAS
MINE_LEMMAS = {"мой", "свой"}
POSSESSIVE_LEMMAS = MINE_LEMMAS | {"наш"}   # the user's own: no part of the relative kept ("у меня мой брат")
MODAL_VERBS = {"собираться", "планировать", "хотеть", "думать", "мечтать", "быть"}
WEEKDAYS = {"понедельник", "вторник", "среда", "четверг", "пятница", "суббота", "воскресенье"}
MONTHS = {"январь", "февраль", "март", "апрель", "май", "июнь", "июль", "август", "сентябрь", "октябрь",
          "ноябрь", "декабрь"}
# pymorphy3 knows numerals but not their values.
NUMBER_WORDS = {"один": 1, "два": 2, "три": 3, "четыре": 4, "пять": 5, "шесть": 6, "семь": 7, "восемь": 8,
                "девять": 9, "десять": 10, "одиннадцать": 11, "двенадцать": 12, "тринадцать": 13,
                "четырнадцать": 14, "пятнадцать": 15, "шестнадцать": 16, "семнадцать": 17,
                "восемнадцать": 18, "девятнадцать": 19, "двадцать": 20, "тридцать": 30, "сорок": 40,
                "пятьдесят": 50, "шестьдесат": 60, "шестьдесят": 60, "семьдесят": 70, "восемьдесят": 80,
                "девяносто": 90}
FILLER_WORDS = {"просто", "вообще", "кстати", "короче", "ну", "тоже", "уже", "сейчас", "щас", "теперь", "сам",
                "сама", "вот", "типа", "же", "лично", "пока", "ещё", "еще", "всё", "все", "тут", "здесь"}
QUESTION_WORDS = {"как", "где", "откуда", "сколько", "кто", "что", "чем", "зачем", "почему", "какой", "какая",
                  "какие", "ли", "помнишь", "знаешь", "угадай", "скажи"}
OTHER_PEOPLE = {"он", "она", "они", "ты", "вы", "его", "её", "ее", "их", "тебя", "тебе", "ей", "ему", "им",
                "друг", "подруга", "знакомый", "знакомая", "коллега", "сосед", "соседка"} | KIN_LEMMAS
# Words the grammars below are built on; every rule of a grammar holds one of them (or a
# pair), which is how sentences_worth_parsing() skips most messages without parsing them.
ME_WORDS = ("меня", "миня", "мене")
CALLED_WORDS = ("зовут", "завут", "звать", "зовите", "зови")
LIVE_WORDS = ("живу", "живём", "живем", "проживаю", "обитаю")
MOVED_WORDS = ("переехал", "переехала", "переехали", "перебрался", "перебралась")
WORK_VERBS = ("работаю", "тружусь", "подрабатываю", "работаем")
STUDY_VERBS = ("учусь", "обучаюсь", "учимся")
LOVE_VERBS = ("люблю", "обожаю", "любим", "обожаем")
PLEASE_VERBS = ("нравится", "нравятся", "нравиться", "нравяться")
FAN_WORDS = ("фанат", "фанатка", "поклонник", "поклонница", "любитель", "любительница")
FAVOURITE_WORDS = ("любимая", "любимый", "любимое", "любимые")
IRRITATE_VERBS = ("бесит", "бесят", "раздражает", "раздражают")   # the thing is the subject: nominative
HATE_VERBS = ("ненавижу", *IRRITATE_VERBS, "переношу")
DAY_WORDS = ("завтра", "послезавтра", "сегодня")
SEASON_WORDS = ("летом", "зимой", "весной", "осенью")
DATE_WORDS = (*DAY_WORDS, "выходных", "выходные", *SEASON_WORDS, "через", "неделе", "месяце", "году")
NAME_WORDS = ("имя", "имечко")
MY_NEUTER_WORDS = ("мое", "моё")          # "моё имя"
AGE_UNITS = ("лет", "год", "года")        # "мне 25 лет"; the grammar also takes "годик", "годика"
IN_WORDS = ("в", "во")                    # "живу в Казани", "во Владивостоке"
FROM_WORDS = ("из", "с", "со")            # "я из Казани", "с Питера"
NOW_WORDS = ("теперь", "сейчас")          # "жила в Омске, теперь в Томске"
PLACE_PREPOSITIONS = ("в", "во", "на")    # where one works or studies: "в школе", "на заводе"
CLASS_WORDS = ("классе", "класе")         # "я в 5 классе"
OWNER_WORDS = ("меня", "нас")             # "у меня", "у нас"
OWNER_VERBS = ("есть", "живет", "живёт", "живут")   # "у меня есть кот"
WITH_WORDS = ("с", "со")                  # "мы с мужем"
COLLECTIVE_NUMERALS = ("двое", "трое", "четверо", "пятеро")   # "у меня двое детей"
NAMING_WORDS = ("зовут", "кличке", "кличка", "назвала", "назвал", "назвали", "зову")
# What may stand between the last relative of a list and its name: "... и сестра, которую зовут оля".
BEFORE_NAMING = {"и", "по", "его", "её", "ее", "их", "которого", "которую", "которых", "которая", "который"}
CLAUSE_BREAKS = {",", ".", "!", "?", ";", ":", ")", "(", "а", "но", "однако", "зато", "\n"}
SENTENCE_ENDS = {".", "!", "?", "\n"}
QUOTE_MARKS = {'"', "«", "»", "„", "“", "”"}   # kept out of a plan's words: 'у меня через месяц "аида"'


@functools.lru_cache(maxsize=None)
def load_fact_tools():
    """pymorphy3's analyzer and the yargy parsers, built once on first use.
    The imports live here so that a chat with memory turned off starts without them.
    yargy's own default analyzer is pymorphy2 (which needs pkg_resources); handing it
    pymorphy3 keeps setuptools out of the requirements."""
    import pymorphy3
    from yargy import Parser, and_, not_, or_, rule
    from yargy.morph import MorphAnalyzer
    from yargy.predicates import custom, eq, in_caseless, type as token_type
    from yargy.tokenizer import MorphTokenizer

    class CachedAnalyzer(MorphAnalyzer):
        __call__ = functools.lru_cache(maxsize=20000)(MorphAnalyzer.__call__)

    class SharedTokenizer(MorphTokenizer):
        # Each Parser tokenizes the text it is given, and analysing the words is most of
        # that cost: the grammars and MessageTokens share a message's tokens.
        @functools.lru_cache(maxsize=64)
        def tokens(self, text):
            return tuple(MorphTokenizer.__call__(self, text))

        def __call__(self, text):
            return iter(self.tokens(text))

    morph = pymorphy3.MorphAnalyzer()
    tokenizer = SharedTokenizer(morph=CachedAnalyzer(raw=morph))
    parses = functools.lru_cache(maxsize=20000)(morph.parse)

    def forms_of(lemmas):
        # Every dictionary word has_lemma(lemmas) can match, as tokens are written (е for ё too).
        forms = {form.word for lemma in lemmas if " " not in lemma for p in morph.parse(lemma) for form in p.lexeme}
        return frozenset(forms | {form.replace("ё", "е") for form in forms})

    @functools.lru_cache(maxsize=50000)
    def guessed_lemmas(word):
        # The lemmas pymorphy3 guesses for a word its dictionary lacks: "свого" is свой to has_lemma.
        return frozenset() if morph.word_is_known(word) else frozenset(p.normal_form for p in parses(word))

    def has_form(*grammemes):
        wanted = set(grammemes)
        return custom(lambda word: any(wanted <= p.tag.grammemes for p in parses(word)))

    def likely(*grammemes):
        # The most probable analysis only: "мгу" is also a form of the village Мга.
        wanted = set(grammemes)
        return custom(lambda word: wanted <= parses(word)[0].tag.grammemes)

    def has_lemma(lemmas):
        return custom(lambda word: any(p.normal_form in lemmas for p in parses(word)))

    words = lambda *values: in_caseless(set(values))
    filler = in_caseless(FILLER_WORDS).repeatable(max=3).optional()
    me = words(*ME_WORDS)
    called = words(*CALLED_WORDS)
    # A word pymorphy3 does not know may be a rare name, but it must be a word (not ",").
    unknown_word = custom(lambda w: w.isalpha() and not morph.word_is_known(w.lower()))
    name_nomn = or_(has_form("Name", "nomn"), and_(unknown_word, custom(lambda w: w[:1].isupper())))
    name_any = or_(has_form("Name"), unknown_word)
    name_rules = or_(
        rule(me, filler, called, filler, name_any),                      # меня зовут аня
        rule(called, me, filler, name_any),                              # зовут меня настей
        rule(me, filler, name_any, called),                              # меня кстати дашей зовут
        rule(me, called, eq("не"), name_any, words("а"), name_any),      # меня зовут не аня а катя
        rule(words(*NAME_WORDS), words(*MY_NEUTER_WORDS), name_nomn),
        rule(words(*MY_NEUTER_WORDS), words("имя"), name_nomn),
        rule(words("я", "это"), filler, and_(name_nomn, not_(has_form("VERB")))),  # я саня
        rule(name_nomn, words("я")),                                     # саня я, с питера
        rule(words("а"), me, name_nomn),                                 # ..., а меня маша
    )
    geo = or_(has_form("Geox"), in_caseless(set(CITY_ABBREVIATIONS)))
    place = or_(
        rule(has_form("ADJF").optional(), geo),                          # нижнем новгороде
        rule(custom(str.isalpha), eq("-"), geo),                         # санкт-петербурге
        rule(geo, eq("-"), words("на"), eq("-"), custom(str.isalpha)),   # ростове-на-дону
    )
    geo_gent = or_(has_form("Geox", "gent"), in_caseless(set(CITY_ABBREVIATIONS)))
    place_from = or_(
        rule(has_form("ADJF", "gent").optional(), geo_gent),
        rule(custom(str.isalpha), eq("-"), geo_gent),
    )
    live = words(*LIVE_WORDS)
    moved = words(*MOVED_WORDS)
    other_place = rule(words(*PLACE_PREPOSITIONS), and_(has_form("NOUN"), not_(has_form("Geox"))))
    city_rules = or_(
        rule(live, filler, other_place.optional(), words(*IN_WORDS), place),   # живу в общаге в москве
        rule(live, filler, eq("не"), words(*IN_WORDS), place, eq(",").optional(),
             words("а"), words(*IN_WORDS), place),                             # живу не в москве а в казани
        rule(words(*NOW_WORDS), words(*IN_WORDS), place),                      # жила в омске, теперь в томске
        rule(words(*IN_WORDS), place, filler, live),
        rule(moved, filler, words(*IN_WORDS), place),
        rule(words(*FROM_WORDS), place_from),
    )
    number = or_(
        rule(token_type("INT")),
        rule(has_lemma(set(NUMBER_WORDS)), has_lemma(set(NUMBER_WORDS)).optional()),
    )
    age_rules = rule(words("мне"), filler, number, words(*AGE_UNITS, "годик", "годика").optional())
    work = in_caseless(set(WORK_VERBS))
    # A city is where one lives, not a workplace: "живу в екатеринбурге работаю инженером".
    noun_phrase = rule(or_(has_form("ADJF"), has_form("NUMR"), token_type("INT")).repeatable(max=2).optional(),
                       and_(has_form("NOUN"), not_(likely("Geox"))))
    prepositional = rule(words(*PLACE_PREPOSITIONS), noun_phrase)
    profession_ablt = has_form("NOUN", "anim", "ablt")
    occupation_rules = or_(
        rule(work, filler, prepositional.optional(), profession_ablt, prepositional.optional()),
        rule(work, filler, prepositional),
        rule(prepositional, filler, work),
        rule(words("я"), filler, words("по"), words("профессии"), has_form("NOUN", "anim", "nomn")),
        rule(words("я"), filler, has_form("ADJF", "nomn").optional(),
             and_(has_form("NOUN", "anim", "nomn"), likely("NOUN")),
             rule(has_form("ADJF", "gent").optional(),
                  and_(has_form("NOUN", "gent"), not_(likely("PREP")))).optional()),
        rule(words("на"), words("пенсии")),
        rule(words("в"), words("декрете")),
    )
    study = words(*STUDY_VERBS)
    study_rules = or_(
        rule(study, filler, prepositional.repeatable(max=3)),
        rule(prepositional, filler, study),
        rule(words("я"), filler, words("в"), token_type("INT"), words(*CLASS_WORDS)),
    )
    kin = has_lemma(KIN_LEMMAS)
    pet = has_lemma(PET_LEMMAS)
    relative = or_(kin, pet)
    mine = has_lemma(MINE_LEMMAS)
    count = or_(token_type("INT"), has_form("NUMR"), has_lemma(set(COLLECTIVE_NUMERALS)))
    owner = rule(words("у"), words(*OWNER_WORDS), words(*OWNER_VERBS).optional())
    pet_name = and_(or_(has_form("Name", "nomn"), has_form("NOUN", "nomn"), unknown_word),
                    not_(has_form("ADJF")), not_(has_form("PREP")), not_(has_form("CONJ")), not_(has_form("PRCL")))
    relative_phrase = or_(
        rule(has_form("ADJF").optional(), kin, has_form("Name", "nomn").optional()),
        rule(has_form("ADJF").optional(), pet, pet_name.optional()),
    )
    family_rules = or_(
        rule(mine, relative_phrase),
        rule(relative, mine),
        rule(owner, count, relative),
        rule(owner, relative_phrase,
             rule(in_caseless({"и", ","}).optional(), count.optional(), relative_phrase)
             .repeatable(max=3).optional()),
        rule(relative, words("у"), words("меня")),
        rule(words("мы"), words(*WITH_WORDS), relative),
        rule(and_(kin, has_form("datv")), token_type("INT")),             # сыну 3 года
        rule(words("я"), filler, in_caseless(MARITAL_WORDS)),
        rule(words("а"), and_(kin, has_form("nomn"))),                    # "..., а муж водитель"
    )
    infinitive_phrase = rule(has_form("ADVB").optional(), has_form("INFN"),
                             custom(lambda w: w.isalnum() and w.lower() not in CLAUSE_BREAKS and w.lower() != "и"
                                    and w.lower() not in QUESTION_WORDS)
                             .repeatable(max=4).optional())
    # "с", "и", "в" are also abbreviations that pymorphy3 calls nouns; the likeliest reading decides.
    noun = and_(has_form("NOUN"), not_(likely("PREP")), not_(likely("CONJ")), not_(likely("PRCL")))
    object_np = rule(has_form("ADJF").repeatable(max=2).optional(), noun,
                     and_(noun, has_form("gent")).optional())
    liked_item = or_(infinitive_phrase, object_np)
    objects = rule(liked_item, rule(in_caseless({"и", ","}).optional(), liked_item).repeatable(max=4).optional())
    like_rules = or_(
        rule(words(*LOVE_VERBS), objects),
        rule(words(*PLEASE_VERBS), objects),
        rule(words("увлекаюсь"), objects),
        rule(words("я").optional(), filler, words(*FAN_WORDS), objects),
        rule(words(*FAVOURITE_WORDS), has_form("NOUN"), objects),
        rule(words("терпеть"), words("не"), words("могу"), objects),
        rule(words(*HATE_VERBS), objects),
    )
    date = or_(
        rule(words(*DAY_WORDS), words("вечером", "утром", "днём", "днем").optional()),
        rule(words(*IN_WORDS), has_lemma(WEEKDAYS)),
        rule(words("в"), has_lemma(MONTHS)),
        rule(token_type("INT"), has_lemma(MONTHS)),
        rule(words("на"), words("выходных")),
        rule(words("в"), words("выходные")),
        rule(words(*SEASON_WORDS)),
        rule(words("через"), count.optional(), has_lemma({"день", "неделя", "месяц", "год", "час"})),
        rule(words("на"), words("следующей", "этой"), words("неделе")),
        rule(words("в"), words("следующем", "этом"), words("месяце", "году")),
    )
    parser = lambda grammar: Parser(grammar, tokenizer=tokenizer)
    return {"morph": morph, "parse": parses, "tokenizer": tokenizer, "guessed_lemmas": guessed_lemmas,
            "mine_forms": forms_of(MINE_LEMMAS), "relative_forms": forms_of(KIN_LEMMAS | PET_LEMMAS),
            "number_forms": forms_of(set(NUMBER_WORDS)), "date_forms": forms_of(WEEKDAYS | MONTHS),
            "name": parser(name_rules), "city": parser(city_rules), "age": parser(age_rules),
            "occupation": parser(occupation_rules), "study": parser(study_rules),
            "family": parser(family_rules), "like": parser(like_rules), "date": parser(date)}


def fold(text):
    # One spelling for comparing values: case and ё do not make a fact different.
    return " ".join(text.casefold().replace("ё", "е").split())


def best_parse(word, *grammemes):
    """pymorphy3's most likely analysis of `word` that has all `grammemes`, else its most likely one."""
    parses = load_fact_tools()["parse"](word.lower())
    wanted = set(grammemes)
    return next((p for p in parses if wanted <= p.tag.grammemes), parses[0])


def capitalized(word):
    return "-".join(part[:1].upper() + part[1:] for part in word.split("-"))


def inflect_word(parse, grammemes, fallback):
    inflected = parse.inflect(set(grammemes)) if parse is not None else None
    return inflected.word if inflected else fallback


class MessageTokens:
    """One message's tokens with what the checks need: where clauses and sentences end."""

    def __init__(self, text, sentences):
        self.sentences = sentences  # grammar: the (start, stop) character spans to parse
        self.tokens = list(load_fact_tools()["tokenizer"](text))
        self.words = [token.value.lower() for token in self.tokens]

    def index_at(self, offset):
        return next(i for i, token in enumerate(self.tokens) if token.span.start >= offset)

    def clause_bounds(self, start, stop):
        """Token indices [first, last) of the clause around tokens start..stop."""
        first = start
        while first > 0 and self.words[first - 1] not in CLAUSE_BREAKS:
            first -= 1
        last = stop
        while last < len(self.words) and self.words[last] not in CLAUSE_BREAKS:
            last += 1
        return first, last

    def is_question(self, start, stop):
        # A question that names the user's facts ("а где я живу?") states none of them.
        first, last = self.clause_bounds(start, stop)
        if any(word in QUESTION_WORDS for word in self.words[first:start]):
            return True
        return last < len(self.words) and self.words[last] == "?"

    def is_negated(self, start, stop):
        # "не" inside the match or right before it: "меня зовут не аня", "я не из москвы".
        before = self.words[max(0, start - 2):start]
        return "не" in self.words[start:stop] or "нет" in self.words[start:stop] or "не" in before

    def has_other_subject(self, start):
        """Someone else is the clause's subject before `start` ("моя мама живёт в сочи")."""
        first, _ = self.clause_bounds(start, start)
        for i in range(start - 1, first - 1, -1):
            word = self.words[i]
            if word in ("я", "мы", "меня", "мне"):
                return False
            person = best_parse(word, "nomn")
            if "nomn" in person.tag.grammemes and (word in OTHER_PEOPLE or person.normal_form in OTHER_PEOPLE):
                return True  # only a nominative can be the subject: "мы с мужем живём" is still us
        return False

    def said_by_me_earlier(self, start):
        """An "я" earlier in the same sentence, with nobody else named in between."""
        i = start - 1
        while i >= 0 and self.words[i] not in SENTENCE_ENDS:
            word = self.words[i]
            if word == "я":
                return True
            if word in OTHER_PEOPLE or best_parse(word).normal_form in OTHER_PEOPLE:
                return False
            i -= 1
        return False


def matches_of(kind, text, message):
    """(start, stop, tokens) of each match of the `kind` grammar, as token indices. No rule
    matches across the end of a sentence, so only the sentences worth it are parsed."""
    found = []
    for first, last in message.sentences.get(kind, ()):
        for match in load_fact_tools()[kind].findall(text[first:last]):
            start = message.index_at(first + match.span.start)
            found.append((start, start + len(match.tokens), [token.value for token in match.tokens]))
    return found


def normal_name(word):
    """The name in the nominative; a word that can be nominative stays as typed, since
    pymorphy3 guesses rare diminutives wrongly ("настюша" is not a form of "настюш")."""
    word = word.lower()
    if any("nomn" in p.tag.grammemes for p in load_fact_tools()["parse"](word)):
        return capitalized(word)
    parse = best_parse(word, "Name")
    return capitalized(inflect_word(parse, {"nomn"}, parse.normal_form))


def place_parse(word, cases):
    """The likeliest analysis of a place name in one of the `cases` its preposition governs:
    "в самару" is Самара, though "самару" is likelier the dative of Самар."""
    parses = load_fact_tools()["parse"](word)
    return next((p for p in parses if "Geox" in p.tag.grammemes and p.tag.case in cases), best_parse(word, "Geox"))


def normal_place(words, cases):
    """The place in the nominative, each part capitalized: "нижнем новгороде" -> Нижний Новгород."""
    text = " ".join(words).replace(" - ", "-").lower()
    if text in CITY_ABBREVIATIONS:
        return CITY_ABBREVIATIONS[text]
    if "-" in text:
        parts = text.split("-")
        head = 0 if "на" in parts else len(parts) - 1   # ростове-на-дону: the first part declines
        parse = place_parse(parts[head], cases)
        parts[head] = inflect_word(parse, {"nomn"}, parse.normal_form)
        return "-".join(part if part == "на" else capitalized(part) for part in parts)
    noun = place_parse(words[-1].lower(), cases)
    result = [inflect_word(noun, {"nomn"}, noun.normal_form)]
    if len(words) > 1:
        adjective = best_parse(words[0].lower(), "ADJF")
        agree = {"nomn", "plur"} if "plur" in noun.tag.grammemes else {"nomn", noun.tag.gender or "masc"}
        result.insert(0, inflect_word(adjective, agree, words[0].lower()))
    return " ".join(capitalized(word) for word in result)


def normal_noun_phrase(words, case=None):
    """A noun phrase in the nominative, number kept, adjectives agreeing:
    "корейских дорам" -> корейские дорамы; a genitive tail stays as said ("запах сигарет")."""
    words = [word.lower() for word in words]
    head = next(i for i, word in enumerate(words) if "NOUN" in best_parse(word, "NOUN").tag.grammemes)
    grammemes = ("NOUN", case) if case else ("NOUN",)
    noun = best_parse(words[head], *grammemes)
    if "Fixd" in noun.tag.grammemes:
        nominative = words[head]
    else:
        number = "plur" if "plur" in noun.tag.grammemes else "sing"
        nominative = inflect_word(noun, {"nomn", number}, noun.normal_form)
    result = []
    for word in words[:head]:
        adjective = best_parse(word, "ADJF")
        if "plur" in noun.tag.grammemes:
            agree = {"nomn", "plur"}
        else:
            agree = {"nomn", "sing", noun.tag.gender or "masc"}
        result.append(inflect_word(adjective, agree, word))
    return " ".join(result + [nominative] + words[head + 1:])


def extract_names(text, message):
    names = []
    for start, stop, words in matches_of("name", text, message):
        contrast = "не" in [word.lower() for word in words]
        if (not contrast and message.is_negated(start, stop)) or message.is_question(start, stop):
            continue
        lowered = [word.lower() for word in words]
        if lowered[0] in ("я", "это") and stop < len(message.words) and message.words[stop] in ("зовут", "звать"):
            continue
        if lowered[-1] == "я" and stop < len(message.words) and message.words[stop] not in CLAUSE_BREAKS:
            continue  # "вика я тебя люблю" speaks to Vika; "саня я, с питера" introduces Sanya
        if lowered[0] == "а" and "зовут" not in message.words[:start]:
            continue
        if lowered[0] == "это" and start > 1:
            continue
        name_word = next(w for w in reversed(words)
                         if w.lower() not in ("я", "зовут", "звать", "зови", "зовите", "а", "меня")
                         and w.lower() not in FILLER_WORDS)
        names.append(("name", normal_name(name_word)))
    return names[-1:]


def extract_city(text, message):
    cities = []
    for start, stop, words in matches_of("city", text, message):
        lowered = [w.lower() for w in words]
        # "живу не в москве а в казани": the "не" inside corrects the place; one before still negates.
        contrast = "не" in lowered and "а" in lowered
        negated = "не" in message.words[max(0, start - 2):start] if contrast else message.is_negated(start, stop)
        if negated or message.is_question(start, stop):
            continue
        if words[0].lower() in FROM_WORDS:
            if not message.said_by_me_earlier(start):
                continue
            if start > 0 and message.words[start - 1] in ("родом", "родилась", "родился", "привет", "приехал",
                                                          "приехала", "вернулся", "вернулась"):
                continue
        elif message.has_other_subject(start):
            continue
        if words[0].lower() in NOW_WORDS and not any(
                best_parse(word).normal_form in ("жить", "переехать", "проживать") for word in message.words[:start]):
            continue  # "теперь в томске" moves house only after talk of living somewhere
        while lowered[-1] in FILLER_WORDS or best_parse(lowered[-1]).tag.POS == "VERB":
            lowered.pop()  # "в казани живу"
        last_preposition = max(i for i, w in enumerate(lowered) if w in IN_WORDS + FROM_WORDS
                               and (i == 0 or lowered[i - 1] != "-"))
        cases = ("gent",) if lowered[last_preposition] in FROM_WORDS else ("loct", "accs")
        cities.append(("city", normal_place(lowered[last_preposition + 1:], cases)))
    return cities[-1:]


def number_value(words):
    digits = [word for word in words if word.isdigit()]
    if digits:
        return int(digits[0])
    return sum(NUMBER_WORDS.get(best_parse(word).normal_form, 0) for word in words)


def extract_age(text, message):
    ages = []
    for start, stop, words in matches_of("age", text, message):
        if message.is_question(start, stop) or message.is_negated(start, stop):
            continue
        if start > 0 and message.words[start - 1] in ("во", "в", "ко", "обо", "при"):
            continue  # "во мне 56": not "мне" the dative of age
        after = message.words[stop:stop + 2]
        if after[:1] and after[0] not in AGE_UNITS and (
                {"NOUN", "INFN"} & best_parse(after[0]).tag.grammemes):
            continue  # "мне 2 часа ехать", "мне 3 кг": a number of something else
        if "не" in after or "было" in after or "было" in message.words[max(0, start - 2):start]:
            continue  # an age in the past
        value = number_value([w.lower() for w in words[1:] if w.lower() not in FILLER_WORDS])
        if 3 <= value <= 110:
            ages.append(("age", str(value)))
    return ages[:1]



def is_animate_noun(word, case):
    return {"NOUN", "anim", case} <= best_parse(word, "NOUN", "anim", case).tag.grammemes


def extract_occupation(text, message):
    found = []
    for start, stop, words in matches_of("occupation", text, message):
        if message.is_negated(start, stop) or message.is_question(start, stop):
            continue
        lowered = [w.lower() for w in words]
        phrase = " ".join(lowered)
        if phrase in STATUS_PHRASES:
            if not message.has_other_subject(start):
                found.append(("occupation", phrase))
            continue
        professions = [w for w in lowered if is_animate_noun(w, "ablt")]
        if professions and lowered[0] in WORK_VERBS:   # "работаю учителем (в школе)"
            found.append(("occupation", normal_noun_phrase(professions[:1], "ablt")))
            continue
        if lowered[0] == "я":
            noun = best_parse(next(w for w in lowered[1:] if is_animate_noun(w, "nomn")), "NOUN", "anim", "nomn")
            if noun.normal_form in NOT_OCCUPATIONS or "Name" in noun.tag.grammemes:
                continue
            tail = [w for w in lowered[1:] if w not in FILLER_WORDS and w not in ("по", "профессии")]
            found.append(("occupation", normal_noun_phrase(tail, "nomn")))  # "учительница начальных классов"
            continue
        if message.has_other_subject(start):
            continue
        place = [w for w in lowered if w not in WORK_VERBS and w not in FILLER_WORDS]
        if "Name" in best_parse(place[-1]).tag.grammemes:
            continue  # "работаю с олей": a person, not a workplace
        found.append(("occupation", " ".join(place)))
    return found[-1:]


def extract_study(text, message):
    found = []
    for start, stop, words in matches_of("study", text, message):
        if message.is_negated(start, stop) or message.is_question(start, stop) or message.has_other_subject(start):
            continue
        phrase = [w.lower() for w in words if w.lower() not in (*STUDY_VERBS, "я")
                  and w.lower() not in FILLER_WORDS]
        found.append(("study", " ".join(phrase)))
    return found[-1:]


def relative_value(words, named_later=None):
    """"сестру" -> сестра, "старший брат миша" -> старший брат Миша, "двое детей" as said;
    None where the kin reading is not the word's likeliest noun ("мой внучек")."""
    lowered = [w.lower() for w in words if best_parse(w).normal_form not in POSSESSIVE_LEMMAS]
    if not lowered:
        return None
    if lowered[0].isdigit() or "NUMR" in best_parse(lowered[0]).tag.grammemes or \
            best_parse(lowered[0]).normal_form in COLLECTIVE_NUMERALS:
        return " ".join(lowered)
    head = next((i for i, w in enumerate(lowered) if best_parse(w, "NOUN").normal_form in KIN_LEMMAS | PET_LEMMAS
                 and "NOUN" in best_parse(w, "NOUN").tag.grammemes), None)
    if head is None:
        return None
    phrase = normal_noun_phrase(lowered[:head + 1])
    noun = phrase.split()[-1]
    if noun in ("ребёнок", "ребенок") and "plur" in best_parse(lowered[head], "NOUN").tag.grammemes:
        phrase = phrase[:-len(noun)] + "дети"
    name = lowered[head + 1:] or ([named_later] if named_later else [])
    return phrase + (" " + normal_name(name[0]) if name else "")


def split_relatives(words):
    """The relatives listed after "у меня": "кошка и собака" -> [кошка], [собака]."""
    groups, current = [], []
    for word in words:
        if word.lower() in ("и", ","):
            groups.append(current)
            current = []
        else:
            current.append(word)
    groups.append(current)
    return [group for group in groups if group]


def name_given_after(message, start, stop, listed=False):
    """The name in "... зовут X", "по кличке X", "я назвала X" in the same clause; after a
    list of relatives (`listed`), only right after it, where it names the last one.
    "меня зовут X" names the user, not a relative."""
    first, last = message.clause_bounds(start, stop)
    for i in range(stop if listed else first, last - 1):
        word = message.words[i]
        if word in NAMING_WORDS and (i > 0 and message.words[i - 1] in ME_WORDS or message.words[i + 1] in ME_WORDS):
            if listed:
                return None
            continue
        if word in NAMING_WORDS:
            return message.words[i + 1]
        if listed and word not in BEFORE_NAMING:
            return None
    return None


def extract_family_and_pets(text, message):
    found = []
    for start, stop, words in matches_of("family", text, message):
        if message.is_negated(start, stop) or message.is_question(start, stop):
            continue
        lowered = [w.lower() for w in words]
        if lowered[-1] in MARITAL_WORDS:
            found.append(("family", lowered[-1]))
            continue
        after = message.words[stop:stop + 1]
        if lowered[0] == "а" or best_parse(lowered[-1]).normal_form in MINE_LEMMAS:
            if after == [] or after[0] in CLAUSE_BREAKS or after[0] in ("ты", "вы"):
                continue  # someone spoken to: "сын мой, ...", "а мама?"
            if lowered[0] == "а" and best_parse(lowered[-1]).normal_form in PARTNER_LEMMAS:
                continue
            lowered = [w for w in lowered if w != "а"]
        owned = lowered[:1] == ["у"]
        if owned:
            rest = lowered[2:]
            if rest[0] in OWNER_VERBS:
                rest = rest[1:]
            groups = split_relatives(rest)
        else:
            groups = [[w for w in lowered if w not in ("у", "меня", "мы", *WITH_WORDS) and not w.isdigit()
                       and best_parse(w).normal_form not in MINE_LEMMAS]]
        named_later = name_given_after(message, start, stop, listed=len(groups) > 1)
        for number, group in enumerate(groups, 1):
            lemma = {best_parse(w, "NOUN").normal_form for w in group}
            if lemma & PARTNER_LEMMAS and not (owned or best_parse(lowered[0]).normal_form == "мой" or
                                              best_parse(lowered[-1]).normal_form == "мой"):
                continue
            kind = "pet" if lemma & PET_LEMMAS else "family"
            value = relative_value(group, named_later if number == len(groups) else None)
            if value:
                found.append((kind, value))
    return found


def object_case(trigger):
    # The case the verb governs picks the right analysis: "люблю суши" is not "суша".
    if trigger in PLEASE_VERBS + IRRITATE_VERBS or trigger.startswith("любим"):
        return "nomn"
    if trigger == "увлекаюсь":
        return "ablt"
    if trigger == "я":
        return "gent"
    return "accs"


def is_infinitive_phrase(words):
    first = best_parse(words[0]).tag.grammemes
    return "INFN" in first or (len(words) > 1 and "ADVB" in first and "INFN" in best_parse(words[1]).tag.grammemes)


def split_noun_list(words):
    """"суши роллы" -> [суши], [роллы]; a genitive keeps to its noun ("запах сигарет")."""
    groups, current = [], []
    for word in words:
        after_noun = current and "NOUN" in best_parse(current[-1], "NOUN").tag.grammemes
        if after_noun and ("ADJF" in best_parse(word).tag.grammemes
                           or best_parse(word, "NOUN", "gent").tag.case != "gent"):
            groups.append(current)
            current = []
        current.append(word)
    return groups + [current]


def split_objects(words, case):
    """What follows "люблю": infinitive phrases and nouns listed with "и" and commas, one fact each."""
    values, group = [], []
    for word in words + [","]:
        if word not in ("и", ","):
            group.append(word)
            continue
        if group and is_infinitive_phrase(group):
            values.append(" ".join(group))
        elif group:
            values += [normal_noun_phrase(nouns, case) for nouns in split_noun_list(group)
                       if any("NOUN" in best_parse(word, "NOUN").tag.grammemes for word in nouns)]
        group = []
    return values


def extract_likes(text, message):
    found = []
    for start, stop, words in matches_of("like", text, message):
        lowered = [w.lower() for w in words]
        if message.is_question(start, stop):
            continue
        trigger = lowered[0]
        before = message.words[max(0, start - 3):start]
        if trigger in PLEASE_VERBS:
            experiencer = [w for w in before if w not in ("не", "очень", "тоже", "так", "уже", "сильно", "сейчас")]
            if experiencer and experiencer[-1] not in ("мне", ",", "а", "и", "но") and \
                    "datv" in best_parse(experiencer[-1]).tag.grammemes:
                continue  # "ей нравится рок": someone else's taste
        if trigger in IRRITATE_VERBS and any(
                w in ("тебя", "его", "её", "ее", "их") for w in before):
            continue
        if trigger == "я" or trigger in FAN_WORDS:
            if message.has_other_subject(start):
                continue  # "он фанат металлики"
            trigger = "я"
            objects = lowered[next(i for i, w in enumerate(lowered) if w not in FILLER_WORDS and w != "я") + 1:]
        elif trigger.startswith("любим"):
            objects = lowered[2:]
        elif trigger == "терпеть":
            objects = lowered[3:]
        else:
            objects = lowered[1:]
        negated = "не" in before[-2:] or trigger == "терпеть" or trigger in HATE_VERBS
        if trigger == "переношу" and "не" not in before[-2:]:
            continue
        if any(best_parse(word).normal_form in ("ты", "вы", "твой", "ваш") for word in objects):
            continue  # "люблю тебя", "нравится твоя улыбка": about the one spoken to
        kind = "dislike" if negated else "like"
        found.extend((kind, value) for value in split_objects(objects, object_case(trigger)))
    return found


def verb_for_plan(message, first, last, date_span):
    """The user's verb in the clause: 1st person, present or future; "собираюсь поехать" -> поехать."""
    for i in range(first, last):
        if date_span[0] <= i < date_span[1]:
            continue
        word = message.words[i]
        follows_motion = i + 1 < last and message.words[i + 1] in (*PLACE_PREPOSITIONS, "к", "ко")
        candidates = [p for p in load_fact_tools()["parse"](word)
                      if {"VERB", "1per", "indc"} <= p.tag.grammemes and "past" not in p.tag.grammemes]
        if not candidates:
            continue
        if i > first and message.words[i - 1] == "не":
            return None  # "сегодня не могу"
        if follows_motion and any("intr" in p.tag.grammemes for p in candidates):
            candidates = [p for p in candidates if "intr" in p.tag.grammemes]  # "лечу в сочи": лететь
        verb = candidates[0]
        if verb.normal_form in MODAL_VERBS and i + 1 < last and \
                "INFN" in best_parse(message.words[i + 1]).tag.grammemes:
            return i + 1, message.words[i + 1]
        return i, verb.normal_form
    return None


def extract_plans(text, message):
    plans = []
    for start, stop, words in matches_of("date", text, message):
        if message.is_question(start, stop):
            continue
        first, last = message.clause_bounds(start, stop)
        when = " ".join(w.lower() for w in words)
        found_verb = verb_for_plan(message, first, last, (start, stop))
        if found_verb:
            index, lemma = found_verb
            rest = [message.words[i] for i in range(index + 1, last) if not start <= i < stop
                    and message.words[i] not in QUOTE_MARKS]
            plans.append(("plan", f"{' '.join([lemma] + rest)} ({when})"))
            continue
        clause = message.words[first:last]
        if "меня" in clause and "у" in clause:
            rest = [message.words[i] for i in range(first, last) if not start <= i < stop
                    and message.words[i] not in ("у", "меня", "есть") and message.words[i] not in QUOTE_MARKS]
            nouns = [w for w in rest if "NOUN" in best_parse(w, "NOUN").tag.grammemes]
            if nouns:
                plans.append(("plan", f"{normal_noun_phrase(rest[rest.index(nouns[0]):])} ({when})"))
    return plans


EXTRACTORS = {"name": extract_names, "city": extract_city, "age": extract_age, "occupation": extract_occupation,
              "study": extract_study, "family": extract_family_and_pets, "like": extract_likes, "date": extract_plans}
WORD_TOKEN = re.compile(r"[а-яё]+|[a-z]+|\d+", re.IGNORECASE)   # the words of yargy's tokenizer
SENTENCE = re.compile(r"[^.!?]+")   # yargy makes each of . ! ? a token, which no rule matches


def next_words(written, words, i):
    """The words that can follow words[i] in a rule, up to three filler words skipped
    (the grammars' `filler`), as written."""
    for j in range(i + 1, min(i + 5, len(words))):
        yield written[j]
        if words[j] not in FILLER_WORDS:
            break


def grammars_for_sentence(written):
    """The grammars that could find a fact in a sentence of these words (without punctuation),
    told by what each rule needs: one of a few words, or a pair, or a word of some kind beside
    "я" or "мне"; and what the checks after a match ask for ("из казани" is the user's city
    only after "я" in the same sentence). The word lists are the grammars'. Analyses are of
    the words as written, as in the grammars: "И" is an initial, "и" is not."""
    words = [word.lower() for word in written]
    seen = set(words)
    tools = load_fact_tools()
    has = lambda *options: not seen.isdisjoint(options)
    guessed = []

    def has_lemma(lemmas, forms):
        # The grammars' has_lemma: a dictionary form, or a word pymorphy3 guesses to be one.
        if not seen.isdisjoint(forms):
            return True
        if not guessed:
            guessed.append(frozenset().union(*map(tools["guessed_lemmas"], seen)))
        return not guessed[0].isdisjoint(lemmas)

    grammemes = lambda word: [p.tag.grammemes for p in tools["parse"](word)]
    name_like = lambda word: any("Name" in g for g in grammemes(word)) or not tools["morph"].word_is_known(word.lower())
    person_like = lambda word: word == "по" or any({"NOUN", "anim", "nomn"} <= g or {"ADJF", "nomn"} <= g
                                                   for g in grammemes(word))
    number_like = lambda word: word.isdigit() or word.lower() in tools["number_forms"] or \
        not tools["guessed_lemmas"](word.lower()).isdisjoint(NUMBER_WORDS)
    after = lambda trigger, like: any(like(word) for i, w in enumerate(words) if w == trigger
                                      for word in next_words(written, words, i))
    worth = {
        "name": (has(*ME_WORDS) and (has(*CALLED_WORDS) or "а" in seen)) or has(*NAME_WORDS)
                or after("я", name_like) or ("это" in words[:2] and after("это", name_like))
                or any(name_like(written[i - 1]) for i, w in enumerate(words) if w == "я" and i > 0),
        "city": has(*LIVE_WORDS, *MOVED_WORDS) or (has(*NOW_WORDS) and has(*IN_WORDS))
                or ("я" in seen and has(*FROM_WORDS)),
        "age": "мне" in seen and after("мне", number_like),
        "occupation": has(*WORK_VERBS, "пенсии", "декрете") or after("я", person_like),
        "study": has(*STUDY_VERBS) or ("я" in seen and has(*CLASS_WORDS)),
        "family": ("я" in seen and has(*MARITAL_WORDS)) or (
            ("а" in seen or ("у" in seen and has(*OWNER_WORDS)) or ("мы" in seen and has(*WITH_WORDS))
             or any(word.isdigit() for word in words) or has_lemma(MINE_LEMMAS, tools["mine_forms"]))
            and has_lemma(KIN_LEMMAS | PET_LEMMAS, tools["relative_forms"])),
        "like": has(*LOVE_VERBS, *PLEASE_VERBS, "увлекаюсь", *FAN_WORDS, *FAVOURITE_WORDS, "терпеть", *HATE_VERBS),
        "date": has(*DATE_WORDS) or has_lemma(WEEKDAYS | MONTHS, tools["date_forms"]),
    }
    return [grammar for grammar in EXTRACTORS if worth[grammar]]


def sentences_worth_parsing(text):
    """{grammar: [(start, stop), ...]}: the sentences of `text` where each grammar could find
    a fact. Most messages state nothing about their writer and get {}: a regular expression
    instead of eight parses."""
    worth = {}
    for sentence in SENTENCE.finditer(text):
        words = WORD_TOKEN.findall(sentence.group())
        for grammar in grammars_for_sentence(words) if words else ():
            worth.setdefault(grammar, []).append(sentence.span())
    return worth


def facts_in_message(text, sentences):
    """What the grammars find in the `sentences` of `text` (whitespace normalized; see
    sentences_worth_parsing), checked and made unique."""
    if not any(ch.isalpha() for ch in text):
        return []
    message = MessageTokens(text, sentences)
    facts = []
    for grammar in EXTRACTORS:
        if grammar in sentences:
            facts.extend(EXTRACTORS[grammar](text, message))
    unique = []
    for fact in facts:
        if (fact[0], fold(fact[1])) not in {(k, fold(v)) for k, v in unique}:
            unique.append(fact)
    return unique


def extract_user_facts(text):
    """The facts a user states about themselves in one message, as (kind, value) pairs
    in normal forms; questions, negations and other people's facts give none."""
    text = " ".join(text.split())
    sentences = sentences_worth_parsing(text)
    return facts_in_message(text, sentences) if sentences else []


def relation_of(value):
    # "сестра Оля" and "сестра" are the same relative; the name makes the newer one better.
    return fold(" ".join(word for word in value.split() if not word[:1].isupper()))


def name_of(value):
    return " ".join(word for word in value.split() if word[:1].isupper())


def same_relative(old, new):
    """One relative said of twice ("младшая сестра", then "сестра Оля"): the same head
    noun, and not two different names."""
    old_words, new_words = relation_of(old).split(), relation_of(new).split()
    if not old_words or not new_words or old_words[-1] != new_words[-1]:
        return False
    if not (set(old_words) <= set(new_words) or set(new_words) <= set(old_words)):
        return False
    return not (name_of(old) and name_of(new) and fold(name_of(old)) != fold(name_of(new)))


def combined_relative(old, new):
    # The fuller description and whichever name was given: "младшая сестра Оля".
    relation = max(relation_of(old), relation_of(new), key=len)
    name = name_of(new) or name_of(old)
    return f"{relation} {name}".strip()


def merge_user_facts(stored, new):
    """The stored facts updated with `new` (both lists of (kind, value)): a single-value kind
    is replaced, a list kind grows up to MAX_VALUES_PER_KIND, liking a thing cancels disliking it."""
    facts = [tuple(fact) for fact in stored]
    for kind, value in new:
        if kind in SINGLE_VALUE_KINDS:
            facts = [fact for fact in facts if fact[0] != kind]
        else:
            opposite = {"like": "dislike", "dislike": "like"}.get(kind)
            facts = [fact for fact in facts if not (fact[0] in (kind, opposite) and fold(fact[1]) == fold(value))]
            if kind in ("family", "pet") and value not in MARITAL_WORDS:
                known = [fact for fact in facts if fact[0] == kind and same_relative(fact[1], value)]
                if known:
                    value = combined_relative(known[-1][1], value)
                    facts = [fact for fact in facts if fact not in known]
            same_kind = [fact for fact in facts if fact[0] == kind]
            if len(same_kind) >= MAX_VALUES_PER_KIND:
                facts.remove(same_kind[0])
        facts.append((kind, value))
    return facts


def inflect_phrase(value, case):
    """A stored nominative phrase put in `case`, adjectives agreeing: "итальянская кухня" -> итальянскую кухню."""
    words = value.split()
    head = next((i for i, word in enumerate(words) if "NOUN" in best_parse(word, "NOUN", "nomn").tag.grammemes), None)
    if head is None or "INFN" in best_parse(words[0]).tag.grammemes:
        return value
    noun = best_parse(words[head], "NOUN", "nomn")
    number = "plur" if "plur" in noun.tag.grammemes else "sing"
    result = list(words)
    result[head] = inflect_word(noun, {case, number}, words[head])
    for i in range(head):
        adjective = best_parse(words[i], "ADJF", "nomn")
        if "ADJF" in adjective.tag.grammemes:
            agree = {case, number} | ({noun.tag.gender} if number == "sing" and noun.tag.gender else set())
            if case == "accs" and "anim" in noun.tag.grammemes:
                agree |= {"anim"}
            result[i] = inflect_word(adjective, agree, words[i])
    for i in range(head + 1, len(words)):
        if words[i][:1].isupper():   # a name after the noun agrees with it: "сестру Олю"
            result[i] = capitalized(inflect_word(best_parse(words[i].lower(), "Name"), {case}, words[i]))
    if words[head][:1].isupper():
        result[head] = capitalized(result[head])
    return " ".join(result)


def place_in(value):
    """"Казань" -> "в Казани", with "во" where Russian wants it (во Владивостоке)."""
    parts = value.split()
    inflected = []
    for i, part in enumerate(parts):
        pieces = part.split("-")
        head = 0 if "на" in [p.lower() for p in pieces] else len(pieces) - 1
        parse = best_parse(pieces[head].lower(), "Geox" if i == len(parts) - 1 else "ADJF")
        if "Fixd" not in parse.tag.grammemes:
            number = {"plur"} if "plur" in parse.tag.grammemes else set()
            pieces[head] = capitalized(inflect_word(parse, {"loct"} | number, pieces[head]))
        inflected.append("-".join(pieces))
    phrase = " ".join(inflected)
    first = phrase[:2].lower()
    preposition = "во" if first[:1] in "вф" and first[1:2] not in "аеёиоуыэюя" else "в"
    return f"{preposition} {phrase}"


def years_phrase(age):
    number = int(age)
    year = load_fact_tools()["morph"].parse("год")[0].make_agree_with_number(number).word
    # After a number Russian counts years with "лет", which pymorphy3 spells "годов".
    return f"{number} {'лет' if year == 'годов' else year}"


def second_person(lemma):
    """The infinitive as "ты ..." would say it: ехать -> едешь, поехать -> поедешь."""
    parse = best_parse(lemma, "INFN")
    tense = "futr" if "perf" in parse.tag.grammemes else "pres"
    return inflect_word(parse, {"2per", "sing", tense, "indc"}, lemma)


def plan_clause(value):
    what, _, when = value.rpartition(" (")
    when = when.rstrip(")")
    words = what.split()
    if "INFN" in best_parse(words[0]).tag.grammemes:
        return FACT_CLAUSES["plan"].format(when=when, what=" ".join([second_person(words[0])] + words[1:]))
    return FACT_CLAUSES["plan_thing"].format(when=when, what=what)


def join_russian(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " и " + items[-1]


def fact_clauses(facts):
    """Each kind's facts as one Russian clause about "ты"."""
    by_kind = {}
    for kind, value in facts:
        by_kind.setdefault(kind, []).append(value)
    clauses = []
    for kind in FACT_KINDS:
        values = by_kind.get(kind)
        if not values:
            continue
        if kind in ("name", "study"):
            clauses.append(FACT_CLAUSES[kind].format(values[-1]))
        elif kind == "city":
            clauses.append(FACT_CLAUSES["city"].format(place_in(values[-1])))
        elif kind == "age":
            clauses.append(FACT_CLAUSES["age"].format(years_phrase(values[-1])))
        elif kind == "occupation":
            value = values[-1]
            workplace = value not in STATUS_PHRASES and value.split()[0] in PLACE_PREPOSITIONS
            clauses.append(FACT_CLAUSES["workplace" if workplace else "occupation"].format(value))
        elif kind in ("family", "pet"):
            others = [v for v in values if v not in MARITAL_WORDS]
            clauses += [FACT_CLAUSES["marital"].format(v) for v in values if v in MARITAL_WORDS]
            if others:
                clauses.append(FACT_CLAUSES["relatives"].format(join_russian(others)))
        elif kind in ("like", "dislike"):
            clauses.append(FACT_CLAUSES[kind].format(join_russian([inflect_phrase(v, "accs") for v in values])))
        elif kind == "plan":
            clauses += [plan_clause(v) for v in values]
    return clauses


def render_facts_answer(facts):
    """The bot's answer to "Что ты обо мне знаешь?": "Тебя зовут Аня, ты живёшь в Казани, ..." """
    clauses = fact_clauses(facts)
    if not clauses:
        return NO_FACTS_ANSWER
    text = ", ".join(clauses) + "."
    return text[:1].upper() + text[1:]
# ==== end of block blocks/user_facts.py ====


# ==== block blocks/memory_commands.py: generated, edit the source and run `make blocks` ====
"""Commands and memory: the one command table, /memory and /forget, the one rule for the console chat and the bot.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (and the user_facts block)."""

# How the remembered facts are named to people, and what the commands answer.
FACT_LABELS = {"name": "имя", "city": "город", "age": "возраст", "occupation": "работа", "study": "учёба",
               "family": "семья", "pet": "питомец", "like": "нравится", "dislike": "не нравится",
               "plan": "планы"}
FORGOT_ALL_REPLY = "Забыл всё, что знал о тебе."
FORGOT_SOME_REPLY = "Забыл:"                 # followed by the forgotten facts, one a line
NOTHING_TO_FORGET_REPLY = "Ничего такого я о тебе не помню."
MEMORY_OFF_REPLY = "Память о собеседниках выключена."
EVERYONE, GROUP_ADMINS = "everyone", "group admins"   # who may use a command (in a private chat: its user)


class Command:
    """A row of the command table. The handler is the host script's own (each script registers
    its handlers by name); a row may bring its own, a command only one script has."""

    def __init__(self, name, description, who=EVERYONE, memory=False, usage=None, handler=None):
        self.name, self.description, self.who, self.memory = name, description, who, memory
        self.usage = usage or f"/{name} — {description}"   # its line in /help
        self.handler = handler


# The commands of the console chat and the bot: /help, the bot's menu (setMyCommands) and the
# dispatch of both are made from this table, so a command is added here once.
COMMANDS = [
    Command("start", "начать"),
    Command("help", "что я умею"),
    Command("reset", "забыть разговор и начать заново", who=GROUP_ADMINS,
            usage="/reset — забыть разговор и начать сначала."),
    Command("memory", "что я о тебе помню", memory=True,
            usage="/memory — что я о тебе помню (имя, город, возраст, работа, учёба, семья, питомцы, "
                  "что любишь и не любишь, планы)"),
    Command("forget", "забыть то, что я о тебе знаю", memory=True,
            usage="/forget — забыть всё о тебе; /forget <слово> — забыть то, где есть это слово"),
]


def offered_commands(table, handlers, memory=True):
    """The rows a script answers (a handler of its own or the row's) and shows, in table order;
    with memory off the memory commands are answered (they say so) but not offered."""
    return [row for row in table if (row.handler or handlers.get(row.name)) and (memory or not row.memory)]


def help_text(intro, table, handlers, memory=True):
    """/help: the script's own first words, then a line per command it offers."""
    shown = [row.usage for row in offered_commands(table, handlers, memory) if row.name not in ("start", "help")]
    return "\n".join([intro] + shown)


def render_facts_list(facts):
    """The /memory list: one fact a line, as stored, so that /forget <слово> can name it."""
    in_kind_order = sorted(facts, key=lambda fact: FACT_KINDS.index(fact[0]))
    return "\n".join(f"{FACT_LABELS[kind]}: {value}" for kind, value in in_kind_order)


FUNCTION_WORD_TAGS = {"PREP", "CONJ", "PRCL", "NPRO", "INTJ"}   # "в", "и", "не", "мне", "ой"


def is_function_word(word):
    """A preposition, conjunction, particle, pronoun or interjection in its likeliest reading,
    and never a name ("ли" is also Ли): it is in many facts and names none of them."""
    parses = load_fact_tools()["parse"](word)
    return parses[0].tag.POS in FUNCTION_WORD_TAGS and not any("Name" in p.tag.grammemes for p in parses)


def forget_user_facts(facts, word):
    """(kept, removed): the facts whose value or label holds `word` in any form
    ("/forget казани" removes Казань; "/forget город" removes the city). Punctuation around
    the word is ignored ("Аня,"), and a function word ("в", "не") removes nothing."""
    query = re.sub(r"^\W+|\W+$", "", fold(word))
    if not query or is_function_word(query):
        return list(facts), []
    query_lemmas = {fold(p.normal_form) for p in load_fact_tools()["parse"](query)} | {query}
    kept, removed = [], []
    for kind, value in facts:
        value_words = [w for w in re.split(r"[\s()\-]+", fold(value)) if w]
        lemmas = {fold(p.normal_form) for w in value_words for p in load_fact_tools()["parse"](w)}
        labels = {fold(FACT_LABELS[kind])} | set(fold(FACT_LABELS[kind]).split())
        hit = query in value_words or query_lemmas & lemmas or query in labels or fold(value) == query
        (removed if hit else kept).append((kind, value))
    return kept, removed


# --- /forget: one rule for what goes with a forgotten fact.
# A stored message goes when it holds ANY content word of a forgotten fact, or the word asked
# about, in any form. Not only when it holds all of a fact's words: a user who says "/forget Сочи"
# about "поехать в Сочи летом" expects "я был в Сочи" gone too, since it still tells what they
# asked to forget; function words ("в", "не") are left out, or every message would go.
def forget_words(argument):
    """The words of "/forget <слова>", each on its own, the punctuation around them stripped
    ("/forget Аня," forgets the name; a hyphen inside a word stays)."""
    return [word for word in (re.sub(r"^\W+|\W+$", "", word) for word in argument.split()) if word]


def content_words(value):
    """The words of a fact's value that a forgotten fact takes with it from stored messages:
    not prepositions, conjunctions, particles or pronouns ("поехать в Сочи" takes поехать
    and Сочи, not every message with "в")."""
    words = [word for word in re.split(r"[^\w]+", fold(value)) if word]
    return [word for word in words if word.isdigit() or (len(word) > 1 and not is_function_word(word))]


def any_form_matcher(words, parse=None):
    """holds(text): True when text has one of `words` in any form ("Казани", "казанью" for
    Казань): a word whose normal forms meet theirs, or one of their inflected forms; None for no words."""
    parse = parse or load_fact_tools()["parse"]
    lemmas, forms = set(), set()
    for word in words:
        lemmas |= {word} | {fold(p.normal_form) for p in parse(word)}
        forms |= {word} | {fold(form.word) for p in parse(word)[:3] for form in p.lexeme}
    if not lemmas:
        return None

    def holds(text):
        for word in re.findall(r"\w+", fold(text)):
            if word in forms or word in lemmas or any(fold(p.normal_form) in lemmas for p in parse(word)):
                return True
        return False

    return holds


def forget_facts(facts, argument):
    """/forget (argument "": everything) on a user's facts: (kept, removed, holds), holds(text)
    True for a stored message that must go with them (None: none need to)."""
    words = forget_words(argument)
    if argument.strip():
        kept, removed = list(facts), []
        for word in words:
            kept, gone = forget_user_facts(kept, word)
            removed += gone
    else:
        kept, removed = [], list(facts)
    labels = {word for label in FACT_LABELS.values() for word in fold(label).split()}
    asked = [word for word in words if fold(word) not in labels]  # "/forget город" names a kind, not a word said
    doomed = [word for value in [value for _, value in removed] + asked for word in content_words(value)]
    return kept, removed, any_form_matcher(doomed)


def exchanges_holding(rows, holds):
    """The ids of the stored turns, (id, role, text) oldest first, that go with a forgotten
    word: every turn that holds it, and the other turn of its exchange, so that the
    history left still alternates question and answer."""
    doomed = set()
    for i, (row_id, role, text) in enumerate(rows):
        if not holds(text):
            continue
        doomed.add(row_id)
        if role == "user" and i + 1 < len(rows) and rows[i + 1][1] == "bot":
            doomed.add(rows[i + 1][0])
        elif role == "bot" and i > 0 and rows[i - 1][1] == "user":
            doomed.add(rows[i - 1][0])
    return doomed
# ==== end of block blocks/memory_commands.py ====


# ==== block blocks/chat.py: generated, edit the source and run `make blocks` ====
"""The chat: loading a model folder, the prompt window, generating replies; the console chat and the bot.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

CHAT_CONFIG_NAME = "chat_config.json"
FALLBACK_REPLY = "Простите, не понял вопрос. Можете сказать иначе?"
DEFAULT_PERSONA = {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."}
DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                      "top_k": 50, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3}
MIN_QUESTION_TOKENS = 16  # a budget that leaves less room than this for the user's words is a misconfiguration
MARKDOWN_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")
HTML_TAG = re.compile(r"</?[A-Za-z!|][^<>\n]{0,200}>")
URL = re.compile(r"(?i)\b(?:https?://|ftp://|www\.|t\.me/)\S+")
MARKUP_RUNS = re.compile(r"(\*\*|__|~~|```|`|^#{1,6}\s|^>\s?)", re.MULTILINE)
# A reply shown while it is written holds back what the next tokens may still turn into something
# the cleaning removes: a word that may become "Вопрос:", a link or a tag not closed yet.
TRAILING_LABEL_WORD = re.compile(r"(?i)\b(?:вопрос|ответ)\s*$")
UNCLOSED_MARKUP = re.compile(r"!?\[[^\]\n]*(?:\]\([^)\n]*)?$|<[^<>\n]*$")
SERVER_CONNECT_SECONDS = 5.0  # an inference server that does not take the connection in this time is down
# Counted by the server's tokenizer at the start: a BOS added, or "</s>" typed by a user read as the
# end of text, would give a count other than the kit's.
PROBE_PROMPT = "Вопрос: </s> проверка <s>\nОтвет:"
SERVER_KEY_ENV = "OPENAI_API_KEY"  # the server's key where --server-key is not given


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


class ServerError(Exception):
    """The inference server is down, slow, or answered with an error: the reply is an apology."""


def chat_prompt_ids(history, settings, tokenizer, facts=()):
    """The prompt's token ids for `history` (turns oldest first, alternating user/bot, the
    last the user's new message): the prompt rule with the model's turn window and budget,
    the ids the model is fed as they are. `facts`, what the user said about themselves
    ((kind, value) pairs), become the facts exchange after the persona when the model was
    trained with one (settings["facts_exchange"]): the answer create_dataset.py's facts
    column holds, cut by the prompt rule as training cut it."""
    answer = render_facts_answer(facts) if facts and settings.get("facts_exchange") else None
    return fit_prompt(tokenizer, history, settings["max_turns"], settings["budget"], settings["persona"], answer)


def clean_reply(text, eos_token=None):
    """The model's raw continuation made fit to show: cut at EOS or at a label that
    starts a line, stripped of markup, links and label leakage; a fallback when empty."""
    if eos_token and eos_token in text:
        text = text[:text.index(eos_token)]
    text = cut_at_next_turn(text)
    text = html.unescape(text)
    text = MARKDOWN_LINK.sub(r"\1", text)
    text = HTML_TAG.sub(" ", text)
    text = URL.sub(" ", text)
    text = MARKUP_RUNS.sub("", text)
    # Undecodable bytes and control characters are noise from a cut multi-byte token.
    text = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    text = " ".join(text.split())
    return text if any(ch.isalnum() for ch in text) else FALLBACK_REPLY


def stable_prefix(raw):
    """The start of a raw continuation that the tokens still to come cannot change: up to its
    last whitespace (the last word may still grow into a label, a link or an entity), less a
    trailing label word (its colon may come next) and a link or tag not yet closed, and again
    up to the whitespace before what that leaves."""
    text = raw
    while True:
        text = text[:max(text.rfind(" "), text.rfind("\n"), text.rfind("\t")) + 1]
        match = TRAILING_LABEL_WORD.search(text) or UNCLOSED_MARKUP.search(text)
        if match is None:
            return text
        text = text[:match.start()]


def visible_reply(raw):
    """What may be shown of a reply still being written ("" while nothing may): cleaned as the
    finished reply is, so it is always a start of clean_reply of the whole continuation, and no
    label, link or markup ever shows, not even for a moment."""
    text = clean_reply(stable_prefix(raw))
    return "" if text == FALLBACK_REPLY else text


class ReplyStreamer(BaseStreamer):
    """Hands each row of a batch being generated its visible text as it grows: on_text[row]
    (None for a row nobody watches) gets each new text, every one a longer start of the last.
    generate() calls put() with the padded prompts first, then with one new token per row at
    every step (pad tokens for the rows that are done). It runs on the generating thread, so
    on_text must only store the text, never wait."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, list(on_text)
        self.ids = [[] for _ in self.on_text]
        self.done = [callback is None for callback in self.on_text]
        self.shown = ["" for _ in self.on_text]
        self.prompts_seen = False

    def put(self, value):
        if not self.prompts_seen:
            self.prompts_seen = True
            return
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            if token == self.tokenizer.eos_token_id:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            text = visible_reply(self.tokenizer.decode(self.ids[row], skip_special_tokens=True))
            if text != self.shown[row] and text.startswith(self.shown[row]):
                self.shown[row] = text
                self.on_text[row](text)

    def end(self):
        pass


def unfinished_lora_run(folder):
    """Whether a folder with no model is a --lora run that has not finished: its
    checkpoint-N/ folders hold the adapter only, and the merged model comes at the end."""
    return any((path / "adapter_config.json").is_file() for path in Path(folder).glob("checkpoint-*"))


def find_weights_folder(folder, need_weights=True):
    """The folder's own weights, else its newest complete checkpoint-N/. Without need_weights
    (a server runs the model) a folder with config.json and the tokenizer will do."""
    def complete(path):
        return (path / "config.json").is_file() and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())

    if complete(folder) or (not need_weights and (folder / "config.json").is_file()):
        return folder
    checkpoints = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        # Trainer writes trainer_state.json last: without it the save was cut short.
        if step.isdigit() and path.is_dir() and complete(path) and (path / "trainer_state.json").is_file():
            checkpoints.append((int(step), path))
    if not checkpoints and unfinished_lora_run(folder):
        raise UserError(f"{folder}: a --lora run that has not finished: its checkpoint-N/ folders hold the "
                        f"adapter only, and the merged model is saved when it ends (--resume --lora continues it)")
    if not checkpoints:
        raise UserError(f"{folder}: no model weights (config.json + model.safetensors) "
                        f"at its top level or in a complete checkpoint-N/ folder")
    return max(checkpoints)[1]


def read_chat_config(folder, weights):
    """chat_config.json from the weights' folder or, for a checkpoint, its parent."""
    for path in (weights / CHAT_CONFIG_NAME, folder / CHAT_CONFIG_NAME):
        if path.is_file():
            break
    else:
        print(f"warning: no {CHAT_CONFIG_NAME} in {folder}; using the kit's default persona and "
              f"generation settings", file=sys.stderr)
        return {"persona": DEFAULT_PERSONA, "generation": dict(DEFAULT_GENERATION)}, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a UTF-8 JSON file ({error})") from None
    if not isinstance(config, dict) or config.get("format_version") != 1:
        raise UserError(f"{path}: expected a JSON object with \"format_version\": 1")
    for key, ours in (("question_label", QUESTION_LABEL), ("answer_label", ANSWER_LABEL),
                      ("turn_separator", TURN_SEPARATOR)):
        if key in config and config[key] != ours:
            raise UserError(f"{path}: {key} {config[key]!r} differs from the kit's prompt format {ours!r}")
    return config, path


def open_model_folder(model_dir, device, need_weights=True):
    """Tokenizer, model config and chat settings of a kit model folder: all that the
    settings are checked against, before the slow part (load_weights). With a server
    running the model (need_weights=False) the folder needs no weights."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    if (folder / "config.json").is_file():
        try:
            kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("kit_model")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            kind = None
        if kind:
            raise UserError(f"{folder}: this is an LSTM folder ({kind}); talk to it with its own script's chat mode")
    weights = find_weights_folder(folder, need_weights)
    chat_config, config_path = read_chat_config(folder, weights)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    tokenizer_dir = weights if (weights / "tokenizer_config.json").is_file() else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = AutoConfig.from_pretrained(weights)
    except (OSError, ValueError) as error:
        raise UserError(f"{weights}: cannot load the model config or the tokenizer ({error})") from None
    if tokenizer.eos_token is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no eos_token")
    if tokenizer.pad_token is None:
        # Only to pad a batch: padded positions are masked out and a reply ends at its EOS.
        tokenizer.pad_token = tokenizer.eos_token
    n_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 2048
    return {"tokenizer": tokenizer, "device": device, "chat_config": chat_config, "config_path": config_path,
            "weights": weights, "n_positions": n_positions}


def physical_cores():
    """Cores this process may run on, SMT siblings counted once: generation is bound
    by memory bandwidth, which a sibling thread shares rather than adds to."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text(encoding="utf-8").strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def choose_quantization(quantize, device):
    """What --quantize (auto, int8, none) means on this device: int8 or none."""
    available = hasattr(torch.ao.quantization, "quantize_dynamic") and torch.backends.quantized.engine != "none"
    if quantize == "auto":
        return "int8" if device == "cpu" and available else "none"
    if quantize == "int8" and device != "cpu":
        raise UserError(f"--quantize int8 runs on the CPU only; with --device {device} use --quantize none or auto")
    if quantize == "int8" and not available:
        raise UserError(f"--quantize int8: this torch {torch.__version__} has no dynamic int8 quantization; "
                        f"use --quantize none")
    return quantize


def conv1d_to_linear(model):
    """GPT-2 keeps its block weights in transformers' Conv1D (in x out), a layer the
    int8 quantizer passes over; the same layer as nn.Linear (out x in) it takes."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.nx, child.nf, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return model


def int8_activations_full_range():
    """Whether torch's int8 kernel (fbgemm, the x86 engine) may round activations to all 8 bits.
    With VNNI instructions its products add up in 32 bits; without them pairs of products add
    up in 16 bits, which full-range activations can overflow, hence torch's default of 7 bits
    (reduce_range). On GPT-2 those 7 bits gave three times the logit error of 8 (issue 23);
    the output layer over the vocabulary was not the cause. Read from /proc/cpuinfo; elsewhere
    than on Linux, the safe default."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    # fbgemm takes its 32-bit kernel on AVX-512 VNNI only; AVX-VNNI (Alder Lake and later, without
    # AVX-512) still runs the AVX2 kernel with 16-bit pair sums
    return re.search(r"\bavx512_vnni\b", flags) is not None


def full_range_forward(layer, x):
    """A dynamic int8 linear layer's forward with its activations rounded to 8 bits instead of 7:
    the same packed weights and kernel, so the same bytes read a token."""
    return torch.ops.quantized.linear_dynamic(x, layer._packed_params._packed_params, False)


def quantize_int8(model):
    """Every linear layer (the output layer too) with int8 weights, one scale per
    output row, and activations quantized on the fly: a quarter of the weight
    bytes that each generated token must read, which is what bounds a CPU. The
    activations get all 8 bits where the CPU adds the products in 32 bits (VNNI),
    torch's 7 elsewhere."""
    model = conv1d_to_linear(model)
    with warnings.catch_warnings():
        # torch 2.13 ships this API but marks it deprecated in favour of the torchao
        # package (see deploy/README.md); choose_quantization falls back where it is gone.
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)
    if int8_activations_full_range():
        for module in model.modules():
            if type(module) is torch.ao.nn.quantized.dynamic.Linear:
                module.forward = functools.partial(full_range_forward, module)
    return model


def fuse_gelu(model):
    """GPT-2's tanh GELU as torch's fused kernel: the same formula in one pass over
    the activations instead of five, which shows in batches."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


def fast_path(model):
    """The model as the fast path runs it on a CPU."""
    return quantize_int8(fuse_gelu(model))


def load_weights(chat, quantize="auto", threads=0):
    """The model itself (int8 on a CPU unless told otherwise), the threads it runs
    on, and the criterion that stops it at the next label."""
    chat["quantize"] = choose_quantization(quantize, chat["device"])
    try:
        model = AutoModelForCausalLM.from_pretrained(chat["weights"]).to(chat["device"]).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"{chat['weights']}: cannot load the model weights ({error})") from None
    chat["model"] = fast_path(model) if chat["quantize"] == "int8" else model
    # torch starts one thread per logical CPU, SMT siblings included.
    chat["threads"] = threads or physical_cores()
    if chat["device"] == "cpu":
        torch.set_num_threads(chat["threads"])
    # Built once: the criterion is stateless, and building it scans the whole vocabulary.
    chat["stop"] = StoppingCriteriaList([StopStringCriteria(chat["tokenizer"], STOP_STRINGS)])
    return chat


def resolve_settings(args, chat):
    """Generation settings, persona, turn window and prompt budget: flags over
    chat_config.json over defaults. settings["warnings"] holds a line for each setting
    the model was not trained with, for the caller to show."""
    generation = dict(DEFAULT_GENERATION)
    generation.update(chat["chat_config"].get("generation") or {})
    source = {key: f"{chat['config_path'] or 'default'} generation.{key}" for key in generation}
    for key in ("max_new_tokens", "temperature", "top_p", "repetition_penalty"):
        if getattr(args, key) is not None:
            generation[key] = getattr(args, key)
            source[key] = "--" + key.replace("_", "-")
    if generation["repetition_penalty"] < 1.0:
        raise UserError(f"{source['repetition_penalty']}: repetition penalty {generation['repetition_penalty']} "
                        f"must be >= 1.0 (below 1 it rewards repetition)")
    if int(generation["max_new_tokens"]) < 1:
        raise UserError(f"{source['max_new_tokens']}: must be at least 1")
    if generation["do_sample"] and not generation["temperature"] > 0:
        raise UserError(f"{source['temperature']}: must be > 0")
    if generation["do_sample"] and not 0 < generation["top_p"] <= 1:
        raise UserError(f"{source['top_p']}: must be in (0, 1]")
    persona = chat["chat_config"].get("persona")
    if args.no_persona:
        persona = None
    elif args.persona is not None:
        persona = {"question": (persona or DEFAULT_PERSONA)["question"], "answer": args.persona}
    max_turns = getattr(args, "max_turns", None)
    if max_turns is not None and max_turns < 1:
        raise UserError("--max-turns must be at least 1")
    if args.context_tokens is not None and args.context_tokens < 1:
        raise UserError("--context-tokens must be at least 1")
    max_turns, budget, warnings = prompt_window(chat["chat_config"] if chat["config_path"] else None,
                                                chat["n_positions"], int(generation["max_new_tokens"]), max_turns,
                                                args.context_tokens)
    spare = budget - len(encode_text(chat["tokenizer"], prompt_text([""], persona)))
    if spare < MIN_QUESTION_TOKENS:
        raise UserError(f"a prompt budget of {budget} tokens (--context-tokens or context_tokens of "
                        f"{chat['config_path'] or 'the defaults'}, at most the model's {chat['n_positions']} "
                        f"positions minus {generation['max_new_tokens']} new tokens) leaves {spare} tokens beside "
                        f"the persona; at least {MIN_QUESTION_TOKENS} are needed")
    return {"generation": generation, "persona": persona,
            "facts_exchange": chat["chat_config"].get("facts") is True, "max_turns": max_turns, "budget": budget,
            "warnings": warnings}


class TopKTopPSampler(LogitsProcessor):
    """Sampling as transformers does it (temperature, then top-k, then top-p), drawn
    among the top k only: transformers sorts and draws over the whole vocabulary at
    every step, a quarter of the time of a batched step on a CPU. The drawn token is
    left the only finite score, so generate's greedy search takes it."""

    def __init__(self, temperature, top_k, top_p):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        top, index = (scores / self.temperature).topk(min(self.top_k or scores.shape[-1], scores.shape[-1]))
        probs = top.softmax(-1)
        top = top.masked_fill(probs.cumsum(-1) - probs >= self.top_p, float("-inf"))  # keeps the first always
        token = index.gather(-1, torch.multinomial(top.softmax(-1), 1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def generate_ids(chat, settings, prompts, on_text=None):
    """The new token ids for each prompt (a list of token ids, as chat_prompt_ids gives it),
    generated as one batch, each row cut at its own EOS. Prompts are padded on the left so
    that all of them end where generation starts; a row that is done gets pad tokens while
    the others go on. on_text, one callable or None per prompt, gets that row's visible text
    as it grows (ReplyStreamer); watching changes no token."""
    tokenizer, generation = chat["tokenizer"], settings["generation"]
    inputs = tokenizer.pad({"input_ids": [list(ids) for ids in prompts]}, padding=True, padding_side="left",
                           return_tensors="pt").to(chat["device"])
    width = inputs["input_ids"].shape[1]
    # transformers' own penalty and n-gram blocking would look at the prompt too: off, and ours instead
    processors = reply_processors(generation, width)
    options = {"max_new_tokens": int(generation["max_new_tokens"]), "do_sample": False,
               "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "stopping_criteria": chat["stop"]}
    if generation.get("min_new_tokens"):
        options["min_new_tokens"] = int(generation["min_new_tokens"])  # fixed-length replies, for benchmarks
    if generation["do_sample"]:
        processors.append(TopKTopPSampler(float(generation["temperature"]), int(generation.get("top_k") or 0),
                                          float(generation["top_p"])))
    if on_text is not None and any(callback is not None for callback in on_text):
        options["streamer"] = ReplyStreamer(tokenizer, on_text)
    with torch.inference_mode():
        output = chat["model"].generate(**inputs, **options, logits_processor=LogitsProcessorList(processors))
    rows = []
    for row in output[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        rows.append(row)
    return rows


def decode_reply(tokenizer, ids):
    return clean_reply(tokenizer.decode(ids, skip_special_tokens=True), tokenizer.eos_token)


def generate_replies(chat, settings, prompts):
    """The model's cleaned answers to prompts (lists of token ids), generated together."""
    return [decode_reply(chat["tokenizer"], ids) for ids in generate_ids(chat, settings, prompts)]


def generate_reply(chat, settings, prompt, on_text=None):
    """The model's cleaned answer to a prompt (a list of token ids), from this process or from
    the inference server the chat was opened with; on_text, if given, gets the visible text as
    it grows."""
    if chat.get("server"):
        return server_reply(chat["server"], settings, prompt, on_text)
    ids = generate_ids(chat, settings, [prompt], [on_text])[0]
    return decode_reply(chat["tokenizer"], ids)


class ServerKeyError(ServerError):
    """The inference server refused the key (HTTP 401 or 403)."""


def server_base_url(url):
    """--server as the base the routes are added to ("/v1/completions"); a UserError unless it is an HTTP URL."""
    base = url.rstrip("/").removesuffix("/v1")
    if not re.match(r"https?://[^/\s]+", base):
        raise UserError(f"--server {url!r}: expected the base URL of an OpenAI-compatible server, such as "
                        f"http://127.0.0.1:8000")
    return base


def server_call(server, method, route, **options):
    """One HTTP request to the server with its key; ServerKeyError when the key is refused."""
    response = requests.request(method, server["url"] + route, headers=server["headers"],
                                timeout=(SERVER_CONNECT_SECONDS, server["timeout"]), **options)
    if response.status_code in (401, 403):
        response.close()
        raise ServerKeyError(f"{server['url']} refused the key (HTTP {response.status_code}): "
                             + ("--server-key is not the server's key" if server["headers"] else
                                "give the server's key with --server-key (or OPENAI_API_KEY)"))
    return response


def open_server(url, tokenizer, timeout, generation=None, key=None):
    """The inference server that runs the model (an OpenAI-compatible one: llama.cpp's
    llama-server, vLLM, transformers serve): its address, the model it serves (GET /v1/models,
    sent with every request), how it takes a prompt (probe_server), and notes for the caller to
    show: penalties of the generation settings it cannot apply, a server that does not answer
    yet, or one that takes text only and counts a prompt otherwise than the kit. `key` (else
    $OPENAI_API_KEY) goes as "Authorization: Bearer"; a key the server refuses is a UserError."""
    base = server_base_url(url)
    key = key or os.environ.get(SERVER_KEY_ENV) or None
    server = {"url": base, "timeout": float(timeout), "model": None, "owner": None, "eos_token": tokenizer.eos_token,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "notes": [],
              "tokenizer": tokenizer, "headers": {"Authorization": f"Bearer {key}"} if key else {},
              "prompt_form": None, "sampling_fields": None}
    generation = generation or {}
    if float(generation.get("repetition_penalty") or 1.0) != 1.0 or int(generation.get("no_repeat_ngram_size") or 0):
        server["notes"].append("the repetition penalty and n-gram blocking of the generation settings are not sent to "
                               "the server: its own would count the prompt's words too (see deploy/README.md)")
    try:
        server["notes"].extend(probe_server(server))
    except ServerKeyError as error:
        raise UserError(f"--server {error}") from None
    except ServerError as error:
        server["notes"].append(f"--server {base}: no answer as an OpenAI-compatible server ({error}); every reply is "
                               f"an apology until it answers")
    return server


def served_model(server):
    """The id of the model the server serves (GET /v1/models), sent with every request, and who
    says it serves it ("llamacpp", "vllm"...); None while the server does not say."""
    try:
        with server_call(server, "GET", "/v1/models") as listed:
            listed.raise_for_status()
            entry = listed.json()["data"][0]
        server["owner"] = entry.get("owned_by")
        return entry["id"]
    except (requests.RequestException, ValueError, LookupError, TypeError, AttributeError):
        return None


def probe_server(server):
    """How the server takes a prompt, learnt once with the probe prompt and max_tokens 1, and
    remembered in server["prompt_form"] ("ids" or "text") and server["sampling_fields"] ("top
    level": top_k and min_p beside temperature, as llama-server and vLLM take them; "generation
    config": inside transformers serve's generation_config JSON, as it refuses unknown fields).
    Token ids are used where the server counts exactly their number: it then reads the prompt as
    the kit built it. Else text, with a note where the server's tokenizer counts the probe
    otherwise (a BOS added, a typed "</s>" read as the end of text). The notes are returned;
    ServerError when no form is taken, ServerKeyError when the key is refused."""
    if server["model"] is None:
        server["model"] = served_model(server)
        if server["model"] is None:
            raise ServerError("GET /v1/models names no model")
    ids = encode_text(server["tokenizer"], PROBE_PROMPT)
    probe = {"max_new_tokens": 1, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    failures = []
    for form, fields in (("ids", "top level"), ("ids", "generation config"), ("text", "top level"),
                         ("text", "generation config")):
        body = completion_body(server, probe, ids if form == "ids" else PROBE_PROMPT, fields, stream=False)
        try:
            with server_call(server, "POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    failures.append(f"{form} prompt, {fields}: HTTP {answer.status_code} {answer.text[:120]!r}")
                    continue
                counted = answer.json()["usage"]["prompt_tokens"]
        except ServerKeyError:
            raise
        except (requests.RequestException, ValueError, LookupError, TypeError) as error:
            raise ServerError(f"{type(error).__name__}: {error}") from None
        if form == "ids" and counted != len(ids):
            failures.append(f"ids prompt: {counted} tokens counted for {len(ids)} ids")
            continue
        server["prompt_form"], server["sampling_fields"] = form, fields
        if form == "text" and counted != len(ids):
            return [f"--server {server['url']} takes prompts as text only and counts {counted} tokens in one where "
                    f"the kit counts {len(ids)}: its tokenizer adds a BOS or reads a user's '</s>' as the end of "
                    f"text; serve a model folder whose tokenizer_config.json has \"split_special_tokens\": true"]
        return []
    raise ServerError("; ".join(failures))


def server_summary(server):
    """The start line's words for the server: where it is, what it serves, how prompts go."""
    how = {"ids": "prompts sent as token ids", "text": "prompts sent as text"}.get(server["prompt_form"],
                                                                                "not answering yet")
    return f"server {server['url']} serves {server['model'] or 'a model not known yet'}; {how}"


def completion_body(server, generation, prompt, fields, stream=True):
    """A /v1/completions request: the prompt (token ids or text), the reply's length, every
    sampling setting and the label stop strings. fields "top level": temperature, top_p, top_k
    (0: off; llama-cpp-python's server refuses -1) and min_p 0 beside the prompt, as llama-server
    (whose own defaults are top_k 40 and min_p 0.05) and vLLM take them; llama-server is also told
    the kit's order, temperature before top_p (its own puts it last). fields "generation config":
    transformers serve, which refuses fields it does not know and samples only when its
    generation_config says so (which replaces the folder's: the EOS and pad ids go with it). The
    penalties are left out: the servers would count the prompt's tokens too."""
    sample, length = bool(generation["do_sample"]), int(generation["max_new_tokens"])
    temperature, top_p = float(generation["temperature"]), float(generation["top_p"])
    top_k = int(generation.get("top_k") or 0)
    body = {"prompt": prompt, "max_tokens": length, "temperature": temperature if sample else 0.0,
            "top_p": top_p if sample else 1.0, "stop": STOP_STRINGS, "stream": stream}
    if fields == "top level":
        body.update(top_k=top_k if sample and top_k > 0 else 0, min_p=0.0)
        if sample and server.get("owner") == "llamacpp":
            body["samplers"] = ["top_k", "temperature", "top_p"]
        if generation.get("min_new_tokens"):
            body["min_tokens"] = int(generation["min_new_tokens"])  # vLLM's name; fixed-length replies, for benchmarks
    else:
        config = {"do_sample": sample, "max_new_tokens": length, "eos_token_id": server["eos_token_id"],
                  "pad_token_id": server["pad_token_id"]}
        if sample:
            config.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            del body["top_p"]
        if generation.get("min_new_tokens"):
            config["min_new_tokens"] = int(generation["min_new_tokens"])  # fixed-length replies, for benchmarks
        body["generation_config"] = json.dumps(config)
    if server["model"]:
        body["model"] = server["model"]
    return body


def server_body(server, settings, prompt, prompt_text=None):
    """The streamed /v1/completions request for a prompt (its token ids, or its text), in the form
    the server was found to take (probe_server): the ids themselves where it takes them, else the
    text (prompt_text where the caller has it decoded already: a tokenizer is not shared between
    threads)."""
    if not isinstance(prompt, str) and server["prompt_form"] != "ids":
        prompt = prompt_text if prompt_text is not None else server["tokenizer"].decode(prompt)
    return completion_body(server, settings["generation"], prompt, server["sampling_fields"] or "generation config")


def server_pieces(server, body):
    """The text pieces of a streamed /v1/completions answer as they come. Closing the generator
    closes the connection, which stops the server writing (a request not streamed would run to
    its end after the client gave up). ServerError when the server does not take the connection,
    answers with an error (an HTTP error, or an error event inside a 200 stream), or the reply is
    not complete within server["timeout"] seconds, its wait in the server's queue included. A
    request refused as malformed (400, 422) makes the next reply probe the server again: another
    kind of server may have taken the address."""
    deadline = time.monotonic() + server["timeout"]
    try:
        with server_call(server, "POST", "/v1/completions", json=body, stream=True) as response:
            if response.status_code != 200:
                if response.status_code in (400, 422):
                    server["prompt_form"] = None
                raise ServerError(f"{server['url']}: HTTP {response.status_code} {response.text[:200]!r}")
            for line in response.iter_lines():
                if time.monotonic() > deadline:
                    raise ServerError(f"{server['url']}: no complete reply within {server['timeout']:g} s")
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":  # vLLM and llama-server end a stream so; transformers serve closes it
                    return
                try:
                    event = json.loads(data)
                    choice = None if "error" in event else event["choices"][0]
                except (ValueError, LookupError, TypeError):
                    raise ServerError(f"{server['url']}: an event that is not JSON: {data[:200]!r}") from None
                if choice is None:
                    raise ServerError(f"{server['url']}: {str(event['error'])[:200]}")
                if choice.get("text"):
                    yield choice["text"]
                if choice.get("finish_reason"):
                    return
    except requests.RequestException as error:
        raise ServerError(f"{server['url']}: {type(error).__name__}: {error}") from None


def server_reply(server, settings, prompt, on_text=None, prompt_text=None):
    """The cleaned reply to a prompt (its token ids; text is sent as it is) from the inference
    server, read as it is streamed: on_text, if given, gets the visible text as it grows, and
    the stream is closed as soon as the model starts the next turn, which the cleaning would cut
    anyway. The same cleaning as in this process, so both give the same reply for the same
    continuation. A server that did not answer at the start is probed first."""
    if server["prompt_form"] is None:
        probe_server(server)
    raw, shown = "", ""
    pieces = server_pieces(server, server_body(server, settings, prompt, prompt_text))
    try:
        for piece in pieces:
            raw += piece
            if NEXT_TURN.search(LEADING_LABELS.sub("", raw)):
                break
            text = visible_reply(raw) if on_text is not None else ""
            if text != shown and text.startswith(shown):
                shown = text
                on_text(text)
    finally:
        pieces.close()
    return clean_reply(raw, server["eos_token"])


def describe_voice(chat_config):
    """Whose turns the model learnt to write (chat_config.json "voice": {"keys", "names"}, from
    create_dataset.py --as), as the start line shows it: "говорит как: Вадим Петров"; None where
    the data was everyone's or the record is not one."""
    voice = chat_config.get("voice")
    if not isinstance(voice, dict):
        return None
    names = [str(name) for name in voice.get("names") or [] if str(name).strip()]
    keys = [str(key) for key in voice.get("keys") or [] if str(key).strip()]
    return f"говорит как: {', '.join(names or keys)}" if names or keys else None


def add_prompt_flags(parser):
    """The flags of the persona, the generation settings and the prompt window, which the console
    chat and the bot take alike; their defaults are the host script's defaults block."""
    parser.add_argument("--persona", default=PERSONA,
                        help="the bot's answer to the persona question (default: chat_config.json)")
    parser.add_argument("--no-persona", action="store_true", default=NO_PERSONA,
                        help="no persona exchange in the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=TOP_P)
    parser.add_argument("--repetition-penalty", type=float, default=REPETITION_PENALTY, help="must be >= 1.0")
    parser.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS,
                        help="prompt budget in tokens (default: chat_config.json, what the model was trained with)")
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS,
                        help="turns of the conversation in the prompt, the new message included (default: "
                             "chat_config.json, what the model was trained with)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
# ==== end of block blocks/chat.py ====


# ==== block blocks/batcher.py: generated, edit the source and run `make blocks` ====
"""The batcher: one model thread that generates the replies of several conversations together
(the Telegram bot's chats, the web chat's browser sessions), or the same interface over an
inference server.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""


class TokenizerPool:
    """Copies of the tokenizer, lent to one thread at a time: a fast tokenizer is one
    Rust object whose settings every call mutates, and sharing it across threads
    can fail with "Already borrowed". A copy takes a fifth of a second and a few MB,
    so a few are made at the start rather than one in every worker."""

    def __init__(self, tokenizer, copies):
        self.free = queue.SimpleQueue()
        for _ in range(copies):
            self.free.put(copy.deepcopy(tokenizer))

    @contextlib.contextmanager
    def borrow(self):
        tokenizer = self.free.get()
        try:
            yield tokenizer
        finally:
            self.free.put(tokenizer)


class ReplyRequest:
    """A prompt waiting for the model (its ids, and its text for a server), then its reply or
    the error instead; with stream, also the visible text of the reply while it is written."""

    def __init__(self, prompt, tokens, stream=False, prompt_text=None):
        self.prompt, self.tokens, self.stream, self.prompt_text = prompt, tokens, stream, prompt_text
        self.arrived = time.monotonic()
        self.visible = ""
        self.reply = self.error = None
        self.done = threading.Event()
        self.changed = threading.Condition()

    def show(self, text):
        """The reply so far (from the thread that generates: it only stores the text)."""
        with self.changed:
            self.visible = text
            self.changed.notify_all()

    def finish(self, reply=None, error=None):
        with self.changed:
            self.reply, self.error = reply, error
            self.done.set()
            self.changed.notify_all()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.reply


class ReplyBatcher:
    """The one thread that runs the model. A request that finds it idle starts at
    once; requests that come while it is busy wait, then go together as one
    batch: at most max_batch of them, and at most max_tokens tokens counting every
    row at the longest prompt plus the reply (the key/value cache a batch holds).
    A batch that is not full waits up to max_wait seconds, from its oldest
    request, for messages announced as on their way, never for ones that may not
    come: so a lone message never waits."""

    def __init__(self, generate, max_batch, max_wait, max_tokens=None, reply_tokens=0):
        self.generate, self.max_batch, self.max_wait = generate, max_batch, max_wait
        self.max_tokens, self.reply_tokens = max_tokens, reply_tokens
        self.pending = deque()
        self.coming = 0           # announced and not yet submitted or withdrawn
        self.closing = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.thread.start()

    def announce(self):
        """A message that may need the model is on its way to a worker."""
        with self.changed:
            self.coming += 1

    def withdraw(self):
        """...and it did not need it (a command, an error): nobody should wait for it."""
        with self.changed:
            self.coming -= 1
            self.changed.notify_all()

    def submit(self, prompt, tokens=0, announced=False, stream=False, prompt_text=None):
        request = ReplyRequest(prompt, tokens, stream, prompt_text)
        with self.changed:
            self.coming -= bool(announced)
            self.pending.append(request)
            self.changed.notify_all()
        return request

    def reply(self, prompt, tokens=0):
        return self.submit(prompt, tokens).result()

    def _fitting(self):
        """How many of the pending requests, oldest first, the next batch can take."""
        count, longest = 0, 0
        for request in self.pending:
            longest = max(longest, request.tokens + self.reply_tokens)
            if count == self.max_batch or (count and self.max_tokens and (count + 1) * longest > self.max_tokens):
                break
            count += 1
        return count

    def _next_batch(self):
        with self.changed:
            self.changed.wait_for(lambda: self.pending or self.closing)
            if not self.pending:
                return None
            deadline = self.pending[0].arrived + self.max_wait
            while self._fitting() == len(self.pending) < self.max_batch and self.coming > 0 and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return [self.pending.popleft() for _ in range(self._fitting())]

    def _run(self):
        while (batch := self._next_batch()) is not None:
            try:
                # Each streamed row hands its text to its own request, so to its own chat.
                replies = self.generate([request.prompt for request in batch],
                                        [request.show if request.stream else None for request in batch])
                replies = list(zip(batch, replies, strict=True))
            except Exception as error:  # every waiting worker answers its chat with an apology
                replies = [(request, error) for request in batch]
            for request, reply in replies:
                if isinstance(reply, Exception):
                    request.finish(error=reply)
                else:
                    request.finish(reply)

    def close(self):
        """Finish what is queued, then stop the thread."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.thread.join()


class ServerReplies:
    """The replies from an inference server instead of the model thread (--server): each
    request is sent, streamed, from a pool of threads as large as the bot's workers, and the
    server batches (vLLM) or queues (transformers serve) them. The same interface as
    ReplyBatcher, so a worker does not know which one answers."""

    def __init__(self, server, settings, threads):
        self.server, self.settings = server, settings
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="server")

    def announce(self):
        pass  # nothing waits for company: the server does its own batching

    def withdraw(self):
        pass

    def submit(self, prompt, tokens=0, announced=False, stream=False, prompt_text=None):
        request = ReplyRequest(prompt, tokens, stream, prompt_text)
        self.pool.submit(self._run, request)
        return request

    def _run(self, request):
        try:
            request.finish(server_reply(self.server, self.settings, request.prompt,
                                        request.show if request.stream else None, request.prompt_text))
        except Exception as error:  # ServerError: the worker apologises to its chat
            request.finish(error=error)

    def close(self):
        self.pool.shutdown(wait=True)


def model_thread_generate(chat, settings, note=None):
    """generate(prompts, on_text) -> replies for the model thread, with its own tokenizer
    (the workers' copies are busy building prompts); on_text, one callable or None a prompt,
    gets that reply's visible text as it grows. note(format, *values), if given, hears of
    each batch (the bot's debug log)."""
    chat = dict(chat, tokenizer=copy.deepcopy(chat["tokenizer"]))

    def generate(prompts, on_text=None):
        start = time.monotonic()
        rows = generate_ids(chat, settings, prompts, on_text)
        if note is not None:
            note("batch of %d: %s new tokens in %.2f s", len(rows), ",".join(str(len(row)) for row in rows),
                 time.monotonic() - start)
        return [decode_reply(chat["tokenizer"], row) for row in rows]

    return generate
# ==== end of block blocks/batcher.py ====


# ==== block blocks/ratings.py: generated, edit the source and run `make blocks` ====
"""Ratings of the bot's replies (👍 / 👎 / 🔄 другой ответ): the table tg_bot.py writes into its
SQLite database and create_dataset.py --feedback reads back, defined once for both.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (sqlite3, json, hashlib, os).

One row per reply the bot sent with rating buttons. `prompt` is the prompt rule's text exactly as
the model was given it, and `prompt_ids` its token ids (a JSON list), so a training run can check
that it trains on what was served. `label` is LIKED, DISLIKED or NULL (not rated yet; a second
press overwrites the first). A reply written by 🔄 names the reply it replaces in `replaces`: the
two are a pair, the newer one preferred unless the ratings say otherwise. `model` is the model
folder's name and `model_hash` a hash of its weights (model_fingerprint), so that ratings of one
model never silently train another.
"""
LIKED = 1
DISLIKED = 0
RATINGS_TABLE = "ratings"
RATINGS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ratings ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "chat_id INTEGER NOT NULL, "
    "user_id INTEGER NOT NULL, "
    "message_id INTEGER, "          # the bot's message carrying the reply and its buttons
    "prompt TEXT NOT NULL, "
    "prompt_ids TEXT NOT NULL, "    # JSON list of token ids
    "prompt_tokens INTEGER NOT NULL, "
    "reply TEXT NOT NULL, "
    "label INTEGER, "               # LIKED, DISLIKED or NULL
    "replaces INTEGER, "            # id of the reply 🔄 replaced, or NULL
    "model TEXT NOT NULL, "
    "model_hash TEXT NOT NULL, "
    "created REAL NOT NULL, "
    "rated REAL)"
)
RATINGS_INDEX = "CREATE INDEX IF NOT EXISTS ratings_message ON ratings (chat_id, message_id)"
FINGERPRINT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")
FINGERPRINT_CHUNK = 1 << 20


def model_fingerprint(folder):
    """A short hash of a model folder's weights (sha256 over the weight files, in name order,
    first 16 hex digits); of config.json where the folder has no weights (a --server bot), so a
    ratings row always says which model wrote the reply."""
    folder = os.fspath(folder)
    names = sorted(name for name in os.listdir(folder)
                   if name in FINGERPRINT_FILES or (name.startswith("model-") and name.endswith(".safetensors")))
    if not names:
        names = [name for name in ("config.json",) if os.path.isfile(os.path.join(folder, name))]
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8"))
        with open(os.path.join(folder, name), "rb") as handle:
            for chunk in iter(lambda: handle.read(FINGERPRINT_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def open_ratings(db):
    """Make sure the ratings table exists in an open sqlite3 connection."""
    db.execute(RATINGS_SCHEMA)
    db.execute(RATINGS_INDEX)
    return db


def open_ratings_file(path):
    """An SQLite file holding the ratings table (made if new), for a script that keeps no other table
    (system_prompt.py --web --db): readable by its owner only, the file and its -wal and -shm files
    (regular files only: os.chmod follows a link), and deleted rows overwritten (secure_delete), so
    that a /forget leaves no words behind. One connection, shared by the caller's threads under its lock."""
    path = os.fspath(path)

    def owner_only():
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.isfile(name) and not os.path.islink(name):
                os.chmod(name, 0o600)

    owner_only()
    previous = os.umask(0o077)  # new files (the database, -wal, -shm) come out 0600
    try:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA secure_delete=ON")
        open_ratings(db)
        db.commit()
    finally:
        os.umask(previous)
    owner_only()
    return db
# ==== end of block blocks/ratings.py ====


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
