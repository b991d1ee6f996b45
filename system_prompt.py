"""
Console chat with a trained model folder: the quickest way to talk to what you
trained, and the last step of the demo.

The prompt is built by the kit's one prompt rule, the one training used: the
persona (a first "Вопрос:/Ответ:" exchange), then the newest turns that fit the
turn window and token budget the model was trained with (chat_config.json;
--max-turns and --context-tokens change them, with a warning where that goes
beyond training), fed to the model as the very token ids training gave it.
Repetition penalty and n-gram blocking look at the reply only, never at the
prompt, so an answer may repeat the question's words and the name the user gave.
Replies are cut at EOS or at a label that starts a line, cleaned of markup and
links, and never empty; an empty one is not kept in the conversation. A reply is printed as
it is written, cleaned as the whole one is (a label the model goes on to write never shows;
--no-stream prints it once complete). On a CPU the model runs
with int8 linear layers on one thread per physical core, about twice as fast as
plain fp32 (bench/generation.py measures it); --quantize none turns that off. Or the model
runs in an OpenAI-compatible inference server (--server: llama.cpp's llama-server, transformers serve, vLLM), asked
only for the continuation of the chat's own prompt; the folder then gives the tokenizer and
the chat settings and needs no weights.

Run it (CPU):
    python system_prompt.py --model rugpt3_50k
    python system_prompt.py --model rugpt3_medium_CLEAN_model --persona "Я помощник по кулинарии."
    python system_prompt.py --model rugpt3_50k --quantize none --threads 4   # plain fp32 weights
on a GPU:
    python system_prompt.py --model rugpt3_medium_CLEAN_model --device cuda
with the model in an inference server (deploy/README.md has the ways to run one):
    transformers serve rugpt3_50k --host 127.0.0.1 --port 8000 --device cpu &
    python system_prompt.py --model rugpt3_50k --server http://127.0.0.1:8000
without a person (tests, the demo): play a file of user lines, print the transcript
    python system_prompt.py --model rugpt3_50k --script data/demo_chat.txt --show-prompt
a chat page in the browser instead (--web: Gradio's chat interface on http://127.0.0.1:7860):
    python system_prompt.py --model rugpt3_50k --web
    python system_prompt.py --model rugpt3_50k --web --host 0.0.0.0 --auth /etc/chat-kit/web_auth   # user:password
In a notebook (Jupyter, Colab): paste this whole file into one cell, set the defaults block
below (DEFAULT_MODEL, DEFAULT_DEVICE = "cuda" on a GPU...), run the cell and chat in it; "выход"
ends the chat. With WEB = True the page shows in the cell's output instead (SHARE = True: also a
public gradio.live link, for a phone or a friend), until the notebook's Stop button, which closes it
cleanly. `%run system_prompt.py --flags` and `!python system_prompt.py --flags` take flags as above.

The web chat (--web) is the console's chat for each browser session: its own conversation and
remembered facts, the same commands and the same prompt rule (the token ids of a web turn equal the
console's), a reply shown as it is written, the persona and the model named on the page, and a
panel with what the bot remembers about you. Messages of several sessions that meet at the model
are generated together (the bot's batcher, --max-batch); past --max-queue waiting messages a
session is told the bot is busy, and a message longer than --max-input-chars gets one line. It
listens on 127.0.0.1 only, unless --host says otherwise (the start line warns; set --auth).

In the chat: "выход" ends it, "/reset" forgets the conversation. Long-term memory: what the user
says about themselves (name, city, age, work, study, family, pets, likes, dislikes, plans) is
kept for the session, outlives /reset and the prompt's turn window, and goes into every prompt
as the facts exchange after the persona when the model was trained with it (chat_config.json
"facts": true); "/memory" lists it, "/forget" deletes it all, "/forget <слово>" what matches,
and with it the exchanges of the conversation that hold it. --no-memory turns it off.
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import html
import json
import os
import queue
import re
import signal
import sqlite3
import sys
import threading
import time
import unicodedata
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          StopStringCriteria, StoppingCriteriaList, set_seed)
from transformers.activations import NewGELUActivation
from transformers.generation import BaseStreamer
from transformers.pytorch_utils import Conv1D

# -----------------------------------------------------------------------------
# defaults (every one is also a flag; the model folder's chat_config.json wins over
# the built-in generation values, a flag wins over both)
WEB = False                     # True: a chat page in the browser instead of the console (--web)
HOST = "127.0.0.1"              # the page's address; "0.0.0.0" opens it to the network (set AUTH then)
PORT = None                     # the page's port (None: 7860, or the next free one)
SHARE = False                   # True: also a public gradio.live link (anyone who has it can chat)
AUTH = None                     # "user:password", or a file holding it: the page asks for them
MAX_BATCH = 8                   # web: replies generated together
MAX_QUEUE = 32                  # web: messages waiting for the model, all sessions together; more: "busy"
MAX_INPUT_CHARS = 1000          # web: a longer message gets one line instead of a reply
DB = None                       # web: SQLite file for the 👍/👎 under the replies (None: no buttons, nothing kept)
DEFAULT_MODEL = "rugpt3_50k"
DEFAULT_DEVICE = "auto"
DEFAULT_SEED = 42
DEFAULT_QUANTIZE = "auto"       # int8 linear layers on a CPU, plain weights on a GPU
SERVER = None                   # base URL of an OpenAI-compatible inference server; None: the model runs here
SERVER_TIMEOUT = 60.0           # seconds a reply from the server may take, its wait in the server's queue included
SERVER_KEY = None               # the server's API key (None: $OPENAI_API_KEY, else none is sent)
NO_STREAM = False               # True: print a reply once it is complete, not as it is written
NO_MEMORY = False               # True: no long-term memory: nothing the user says about themselves is kept
PERSONA = None                  # the bot's answer to the persona question (None: chat_config.json's)
NO_PERSONA = False              # True: no persona exchange in the prompt
MAX_NEW_TOKENS = None           # None: chat_config.json's generation settings, for these five
TEMPERATURE = None
TOP_P = None
REPETITION_PENALTY = None       # must be >= 1.0
CONTEXT_TOKENS = None           # prompt budget in tokens (None: what the model was trained with)
MAX_TURNS = None                # turns in the prompt, the new message included (None: as trained)
THREADS = 0                     # CPU threads for the model (0: physical cores)
CHAT_SCRIPT = None              # play this file of user lines instead of asking (None: ask)
SHOW_PROMPT = False             # True: print the prompt given to the model
DEVICES = ("auto", "cpu", "cuda")
QUANTIZE_CHOICES = ("auto", "int8", "none")
EXIT_WORDS = ("выход", "exit", "quit")
RESET_COMMAND = "/reset"
MEMORY_COMMAND = "/memory"
FORGET_COMMAND = "/forget"      # alone: forget everything; "/forget <слово>": the facts that match
USER_PREFIX = "Вы: "
BOT_PREFIX = "Бот: "
RESET_NOTICE = "(история разговора очищена)"
HELP_INTRO = f"Пишите сообщение, и я отвечу; «{EXIT_WORDS[0]}» — закончить разговор."
NOT_UTF8_NOTICE = "(строка не в кодировке UTF-8, пропускаю её)"
SERVER_ERROR_NOTICE = "(сервер модели не ответил, попробуйте ещё раз)"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BATCH_WAIT_SECONDS = 0.05       # the most a batch waits for messages already being prepared
MAX_BATCH_TOKENS = 8192         # rows x (longest prompt + reply): the key/value cache a batch holds
TOKENIZER_COPIES = 4            # prompts are built in the page's threads; a fast tokenizer is not shared
WEB_HELP_INTRO = "Пишите сообщение, и я отвечу."
TOO_LONG_TEXT = "Сообщение слишком длинное: не больше {limit} знаков. Сократите его, пожалуйста."
EMPTY_TEXT = "Кажется, сообщение пустое. Напишите, что вас интересует."
STILL_ANSWERING_TEXT = "Я ещё отвечаю на предыдущее сообщение. Подождите немного, пожалуйста."
BUSY_TEXT = "Сейчас мне пишут очень многие, и я не успеваю. Напишите, пожалуйста, через минуту."
APOLOGY_TEXT = "Простите, что-то пошло не так. Попробуйте ещё раз чуть позже."
MEMORY_PANEL_LABEL = "Что я о вас помню"
RATINGS_KEPT_TEXT = "Оценок моих ответов сохранено: {count}."  # tg_bot.py's words
RATINGS_FORGOTTEN_TEXT = "Оценки моих ответов тоже удалены."
WEB_CHAT_IDS = 1 << 62          # a web session's chat id is -(WEB_CHAT_IDS + its hash): far from any Telegram id
# -----------------------------------------------------------------------------


def read_script(path):
    """User lines of a --script file: blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: script file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"{path}: the script has no user lines")
    return lines


class PrintedReply:
    """A reply printed as it is written: each visible text is a longer start of the last, so
    only its new end is printed; the finished reply completes the line."""

    def __init__(self, out):
        self.out, self.printed = out, None

    def update(self, text):
        if self.printed is None:
            print(BOT_PREFIX, end="", file=self.out)
            self.printed = ""
        print(text[len(self.printed):], end="", file=self.out, flush=True)
        self.printed = text

    def finish(self, answer):
        if self.printed is None:
            print(BOT_PREFIX + answer, file=self.out, flush=True)
        elif answer.startswith(self.printed):
            print(answer[len(self.printed):], file=self.out, flush=True)
        else:  # the server failed after part of the reply was printed
            print(file=self.out)
            print(BOT_PREFIX + answer, file=self.out, flush=True)


class ConsoleChat:
    """One conversation: the turns so far, what the user said about themselves (kept for the
    session, /reset included), and the reply to each new line."""

    def __init__(self, chat, settings, show_prompt=False, out=None, stream=True, memory=True):
        self.chat, self.settings, self.show_prompt, self.stream = chat, settings, show_prompt, stream
        self.out = out or sys.stdout
        self.memory = memory
        self.history = []
        self.facts = []

    def reset(self):
        self.history = []  # the facts stay: long-term memory outlives the conversation

    def remember(self, text):
        """Merge what the line says about the user, before its prompt is built: the question's own
        facts count for its answer, as in training."""
        if self.memory:
            self.facts = merge_user_facts(self.facts, extract_user_facts(text))

    def forget(self, argument):
        """Drop the facts that match a word of argument (all of them for ""), and the exchanges of the
        conversation that hold them or the word, by the bot's own rule (forget_facts), so that no
        prompt carries them again; the facts dropped."""
        self.facts, removed, holds = forget_facts(self.facts, argument)
        if holds is not None:
            # Whole exchanges go, question and answer: the labels count back from the answer, so a
            # lone turn dropped would turn every older question into an answer.
            rows = [(i, "user" if i % 2 == 0 else "bot", turn) for i, turn in enumerate(self.history)]
            doomed = exchanges_holding(rows, holds)
            self.history = [turn for i, turn in enumerate(self.history) if i not in doomed]
        self.forgot(not argument.strip(), holds)
        return removed

    def forgot(self, everything, holds):
        """What else a /forget takes: nothing the console keeps (the web chat's ratings, WebChat)."""

    def prompt(self, text, tokenizer=None):
        """The prompt's token ids for a new line (its facts remembered first), by the one prompt rule."""
        tokenizer = tokenizer or self.chat["tokenizer"]
        self.remember(text)
        prompt = chat_prompt_ids(self.history + [text], self.settings, tokenizer, self.facts)
        if self.show_prompt:
            print(f"[prompt]\n{tokenizer.decode(prompt)}\n[/prompt]", file=self.out, flush=True)
        return prompt

    def keep(self, text, answer):
        if answer != FALLBACK_REPLY:
            # The fallback is the kit's words, not the model's: kept, it would teach the
            # conversation that the bot did not understand.
            self.history += [text, answer]

    def reply(self, text, on_text=None):
        prompt = self.prompt(text)
        answer = generate_reply(self.chat, self.settings, prompt, on_text)
        self.keep(text, answer)
        return answer

    def say(self, text):
        """Print the reply to a line, as it is written unless streaming is off."""
        printed = PrintedReply(self.out) if self.stream else None
        try:
            answer = self.reply(text, printed.update if printed else None)
        except ServerError as error:
            print(f"system_prompt.py: warning: {error}", file=sys.stderr, flush=True)
            answer = SERVER_ERROR_NOTICE
        if printed:
            printed.finish(answer)
        else:
            print(BOT_PREFIX + answer, file=self.out, flush=True)

    def tell(self, text):
        """The bot's own words (not the model's), a line under the other, aligned after the prefix."""
        print(BOT_PREFIX + text.replace("\n", "\n" + " " * len(BOT_PREFIX)), file=self.out, flush=True)

    def command_reset(self, argument):
        self.reset()
        self.tell(RESET_NOTICE)

    def command_help(self, argument):
        self.tell(help_text(HELP_INTRO, COMMANDS, self.handlers(), self.memory))

    def command_memory(self, argument):
        if not self.memory:
            self.tell(MEMORY_OFF_REPLY)
        else:
            self.tell(render_facts_list(self.facts) if self.facts else NO_FACTS_ANSWER)

    def command_forget(self, argument):
        if not self.memory:
            self.tell(MEMORY_OFF_REPLY)
        elif not argument:
            self.forget("")
            self.tell(FORGOT_ALL_REPLY)
        else:
            removed = self.forget(argument)
            self.tell(FORGOT_SOME_REPLY + "\n" + render_facts_list(removed) if removed else NOTHING_TO_FORGET_REPLY)

    def handlers(self):
        """The console's handlers of the command table's rows, by name: a row without one here is
        a bot's command (/start), which the console passes to the model as any other line."""
        return {"reset": self.command_reset, "help": self.command_help, "memory": self.command_memory,
                "forget": self.command_forget}

    def command(self, line):
        """Run a line that is a command of the table this chat answers; False when it is not one."""
        command, _, argument = line.partition(" ")
        row = next((row for row in COMMANDS if "/" + row.name == command), None)
        handler = row and (row.handler or self.handlers().get(row.name))
        if handler:
            handler(argument.strip())
        return bool(handler)

    def handle(self, line):
        """Play one user line; False when the user said goodbye."""
        if line.lower() in EXIT_WORDS:
            return False
        if not self.command(line) and line:
            self.say(line)
        return True


class WebChat(ConsoleChat):
    """One browser session's conversation: the console's turns, facts, commands and prompt, with
    the bot's own words (a command's answer) kept for the page instead of printed."""

    def __init__(self, chat, settings, show_prompt=False, stream=True, memory=True, ratings=None, key=""):
        super().__init__(chat, settings, show_prompt=show_prompt, out=sys.stderr, stream=stream, memory=memory)
        self.told = []
        self.busy = threading.Lock()  # one message at a time: the next one's prompt holds this one's reply
        self.ratings, self.chat_id = ratings, WebRatings.chat_id(key)
        self.rateable = {}  # the page's index of each model reply -> what its row holds (WebRatings)

    def offer(self, position, prompt, prompt_text, answer):
        """A model reply the page shows at `position` (its index in the chat), for its buttons."""
        if self.ratings is not None and position is not None and answer != FALLBACK_REPLY:
            self.rateable[position] = {"prompt": prompt_text, "prompt_ids": [int(i) for i in prompt], "reply": answer,
                                       "created": time.time(), "row": None}

    def rate(self, position, shown, liked):
        """A press of 👍 (liked True), 👎 (False) or the pressed one again (""): the reply's row; False
        for a press on no reply of the model's (a command's answer, a reply forgotten since)."""
        reply = self.rateable.get(position)
        if self.ratings is None or reply is None or reply["reply"] not in shown:
            return False
        label = LIKED if liked is True else DISLIKED if liked is False else None
        return self.ratings.rate(self.chat_id, reply, label)

    def forgot(self, everything, holds):
        if self.ratings is None or not (everything or holds):
            return
        self.rateable = {} if everything else {
            position: reply for position, reply in self.rateable.items()
            if not (holds(reply["prompt"]) or holds(reply["reply"]))}
        self.ratings.forget(self.chat_id, None if everything else holds)

    def command_forget(self, argument):
        everything = not argument.strip()
        rated = self.ratings.count(self.chat_id) if self.ratings is not None and everything else 0
        super().command_forget(argument)
        if everything and not self.memory:  # with memory off, /forget still deletes the ratings, as the bot's
            self.forgot(True, None)
        if rated:
            self.told[-1] += "\n" + RATINGS_FORGOTTEN_TEXT

    def command_memory(self, argument):
        super().command_memory(argument)
        rated = self.ratings.count(self.chat_id) if self.ratings is not None else 0
        if rated:
            self.told[-1] += "\n\n" + RATINGS_KEPT_TEXT.format(count=rated)

    def tell(self, text):
        self.told.append(text)

    def command_help(self, argument):
        self.tell(help_text(WEB_HELP_INTRO, COMMANDS, self.handlers(), self.memory))

    def answer_command(self, line):
        """A command's answer for the page, or None when the line is no command."""
        self.told = []
        return "\n".join(self.told) if self.command(line) else None

    def remembered(self):
        """The memory panel: what /memory says."""
        if not self.memory:
            return MEMORY_OFF_REPLY
        return render_facts_list(self.facts) if self.facts else NO_FACTS_ANSWER


class WebRatings:
    """The 👍/👎 under the page's replies (--db): rows of the bot's ratings table (blocks/ratings.py),
    the columns tg_bot.py writes and create_dataset.py --feedback reads, the prompt's text and its very
    token ids among them. A row is written at a reply's first press (a reply nobody rated leaves
    nothing behind), a second press changes its label, and taking the press back (the pressed thumb
    again) deletes the row. A browser session is a chat of one person: its chat_id and user_id are
    both -(WEB_CHAT_IDS + 61 bits of the sha256 of Gradio's session hash), below -2**62 where no
    Telegram id reaches, so one database can hold the bot's rows and the page's; a reloaded page is
    a new session."""

    def __init__(self, path, model, model_hash):
        self.path, self.model, self.model_hash = str(path), model, model_hash
        self.lock = threading.Lock()
        try:
            self.db = open_ratings_file(self.path)
        except (sqlite3.Error, OSError) as error:
            raise UserError(f"--db {self.path}: cannot open the ratings database ({error})") from None

    @staticmethod
    def chat_id(key):
        digest = hashlib.sha256(str(key).encode("utf-8")).digest()
        return -(WEB_CHAT_IDS + (int.from_bytes(digest[:8], "big") >> 3))

    def _write(self, sql, parameters):
        try:
            with self.lock, self.db:
                return self.db.execute(sql, parameters)
        except sqlite3.Error as error:  # a full disk: the page goes on, the press is not kept
            print(f"system_prompt.py: warning: --db {self.path}: cannot write a rating ({error})",
                  file=sys.stderr, flush=True)
            return None

    def rate(self, chat_id, reply, label):
        """Write, relabel or (label None) delete a reply's row; False when the database refused."""
        if label is None:
            done = reply["row"] is None or self._write("DELETE FROM ratings WHERE id = ?", (reply["row"],))
            reply["row"] = None
        elif reply["row"] is None:
            done = self._write(
                "INSERT INTO ratings (chat_id, user_id, prompt, prompt_ids, prompt_tokens, reply, label, model, "
                "model_hash, created, rated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (chat_id, chat_id, reply["prompt"], json.dumps(reply["prompt_ids"]), len(reply["prompt_ids"]),
                 reply["reply"], label, self.model, self.model_hash, reply["created"], time.time()))
            reply["row"] = done.lastrowid if done else None
        else:
            done = self._write("UPDATE ratings SET label = ?, rated = ? WHERE id = ?", (label, time.time(), reply["row"]))
        return bool(done)

    def forget(self, chat_id, holds=None):
        """The session's rows (holds: only those whose prompt or reply holds a forgotten word)."""
        with self.lock:
            rows = self.db.execute("SELECT id, prompt, reply FROM ratings WHERE chat_id = ?", (chat_id,)).fetchall()
        doomed = [(row_id,) for row_id, prompt, reply in rows if holds is None or holds(prompt) or holds(reply)]
        try:
            with self.lock:
                with self.db:
                    self.db.executemany("DELETE FROM ratings WHERE id = ?", doomed)
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the words out of the -wal file too
        except sqlite3.Error as error:
            print(f"system_prompt.py: warning: --db {self.path}: cannot delete ratings ({error})", file=sys.stderr,
                  flush=True)

    def count(self, chat_id):
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM ratings WHERE chat_id = ? AND label IS NOT NULL",
                                   (chat_id,)).fetchone()[0]

    def close(self):
        with self.lock:
            self.db.close()


class WebChats:
    """The page's conversations, one per browser session, and the one way to the model they share:
    the batcher's model thread, or the inference server. Yields what the page shows of a reply."""

    def __init__(self, chat, settings, args, replies, ratings=None):
        self.chat, self.settings, self.replies, self.ratings = chat, settings, replies, ratings
        self.show_prompt, self.stream, self.memory = args.show_prompt, not args.no_stream, not args.no_memory
        self.max_queue, self.max_chars = args.max_queue, args.max_input_chars
        self.tokenizers = TokenizerPool(chat["tokenizer"], TOKENIZER_COPIES)
        self.sessions = {}
        self.waiting = 0  # messages given to the model and not answered yet, all sessions together
        self.lock = threading.Lock()

    def session(self, key):
        with self.lock:
            if key not in self.sessions:
                self.sessions[key] = WebChat(self.chat, self.settings, self.show_prompt, self.stream, self.memory,
                                             self.ratings, key)
            return self.sessions[key]

    def drop(self, key):
        """A closed page: its conversation and facts go (the console keeps them for its session only too)."""
        with self.lock:
            self.sessions.pop(key, None)

    def respond(self, key, message, position=None):
        """(text of the reply so far, memory panel) pairs for a message of session `key`; `position`:
        the reply's index in the page's chat, where its 👍/👎 find it."""
        session = self.session(key)
        text = (message or "").strip()
        if len(text) > self.max_chars:
            yield TOO_LONG_TEXT.format(limit=self.max_chars), session.remembered()
            return
        if not text:
            yield EMPTY_TEXT, session.remembered()
            return
        if not session.busy.acquire(blocking=False):
            yield STILL_ANSWERING_TEXT, session.remembered()
            return
        try:
            told = session.answer_command(text)
            if told is not None:
                yield told, session.remembered()
            else:
                yield from self.model_turn(session, text, position)
        finally:
            session.busy.release()

    def model_turn(self, session, text, position=None):
        with self.lock:
            full = self.waiting >= self.max_queue
            self.waiting += not full
        if full:
            yield BUSY_TEXT, session.remembered()
            return
        try:
            self.replies.announce()  # a batch about to start waits a moment for this prompt
            try:
                with self.tokenizers.borrow() as tokenizer:
                    prompt = session.prompt(text, tokenizer)
                    prompt_text = tokenizer.decode(prompt) if self.chat.get("server") or self.ratings else None
            except BaseException:
                self.replies.withdraw()
                raise
            request = self.replies.submit(prompt, len(prompt), announced=True, stream=self.stream,
                                          prompt_text=prompt_text)
            shown = ""
            while True:
                with request.changed:
                    request.changed.wait_for(lambda: request.done.is_set() or request.visible != shown)
                    done, visible = request.done.is_set(), request.visible
                if done:
                    break
                shown = visible
                yield shown, session.remembered()
            try:
                answer = request.result()
            except ServerError as error:
                print(f"system_prompt.py: warning: {error}", file=sys.stderr, flush=True)
                answer = SERVER_ERROR_NOTICE
            except Exception as error:  # the session gets an apology; the page goes on
                print(f"system_prompt.py: error: a reply failed: {error!r}", file=sys.stderr, flush=True)
                answer = APOLOGY_TEXT
            else:
                session.keep(text, answer)
                session.offer(position, prompt, prompt_text, answer)
            yield answer, session.remembered()
        finally:
            with self.lock:
                self.waiting -= 1

    def rate(self, key, position, shown, liked):
        return self.session(key).rate(position, shown, liked)

    def close(self):
        self.replies.close()
        if self.ratings is not None:
            self.ratings.close()


def model_replies(chat, settings, args):
    """The batcher (the model here) or the server's pool, behind one interface."""
    if chat.get("server"):
        return ServerReplies(chat["server"], settings, args.max_batch)
    return ReplyBatcher(model_thread_generate(chat, settings), args.max_batch, BATCH_WAIT_SECONDS, MAX_BATCH_TOKENS,
                        int(settings["generation"]["max_new_tokens"]))


def page_heading(args, chat, settings):
    """The page's title and the lines under it: the model, the persona, the commands."""
    title = f"Чат с моделью {html.escape(Path(args.model).name)}"
    if chat.get("server"):
        title += f" (сервер {chat['server']['url']})"
    persona = settings["persona"]
    lines = [f"Персона: «{html.escape(persona['answer'])}»" if persona else "Без персоны."]
    session = WebChat(chat, settings, memory=not args.no_memory)
    commands = offered_commands(COMMANDS, session.handlers(), session.memory)
    names = [f"/{row.name}" for row in commands if row.name != "start"]
    lines.append(f"Команды: {', '.join(names)} (что они делают — /help).")
    return title, lines


def build_page(chats, title, lines):
    """The Gradio page: its chat interface (a reply streams as it is written), the memory panel."""
    import gradio as gr

    def respond(message, history, request: gr.Request):
        # The reply follows the message the page adds after `history`: its index, for its buttons.
        yield from chats.respond(request.session_hash, message, len(history) + 1)

    def rated(press: gr.LikeData, request: gr.Request):
        chats.rate(request.session_hash, press.index, shown_text(press.value), press.liked)

    def cleared(request: gr.Request):  # the chat's bin button: as /reset
        session = chats.session(request.session_hash)
        session.reset()
        return session.remembered()

    def closed(request: gr.Request):
        chats.drop(request.session_hash)

    fresh = WebChat(chats.chat, chats.settings, memory=chats.memory).remembered()
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown("## " + title + "\n\n" + "\n\n".join(lines), elem_id="heading")
        memory_panel = gr.Textbox(fresh, label=MEMORY_PANEL_LABEL, interactive=False, lines=8, render=False,
                                  elem_id="memory-panel")
        with gr.Row():
            with gr.Column(scale=3):
                interface = gr.ChatInterface(respond, additional_outputs=[memory_panel], concurrency_limit=None,
                                             api_name="chat", analytics_enabled=False, fill_height=False)
            with gr.Column(scale=1):
                memory_panel.render()
        interface.chatbot.clear(cleared, outputs=[memory_panel], api_visibility="undocumented")
        if chats.ratings is not None:  # the buttons show where a like listener is; no --db, no buttons
            interface.chatbot.like(rated, api_name="rate", api_visibility="undocumented", queue=False)
        page.unload(closed)
    return page


def shown_text(value):
    """The text of a pressed message as the page sends it: a string, or its contents' parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return shown_text(value.get("text") or value.get("content") or "")
    return "\n".join(shown_text(part) for part in value or ())


def read_auth(value):
    """(user, password) from "user:password" or from a file holding it; None for no login."""
    if value is None:
        return None
    text = value = os.fspath(value)
    if os.path.isfile(value):
        try:
            text = Path(value).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--auth: cannot read {value}: {error}") from None
    user, colon, password = text.partition(":")
    if not (colon and user.strip() and password) or "\n" in text:
        # the value is never echoed: it may be a mistyped password
        raise UserError("--auth: must be user:password, or a file holding that one line")
    return user.strip(), password


def in_notebook():
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def web_warnings(args, auth):
    lines = []
    if args.host not in LOCAL_HOSTS:
        lines.append(f"--host {args.host}: the page is open to every machine that can reach this one"
                     + ("" if auth else "; anyone can talk to the model (set --auth user:password)"))
    if args.share:
        lines.append("--share: the page has a public gradio.live address for 72 hours; anyone who has the link "
                     + ("and the password " if auth else "") + "can talk to the model")
    return lines


def web_ratings(args, chat):
    """The ratings database of --db (None without it): the rows name the model folder (and its
    checkpoint, where the weights are one) and a hash of the weights, so that they never train another."""
    if args.db is None:
        return None
    folder, weights = Path(args.model).resolve(), Path(chat["weights"]).resolve()
    name = folder.name + ("" if weights == folder else "/" + weights.name)
    try:
        model_hash = model_fingerprint(weights)
    except OSError as error:
        raise UserError(f"{weights}: cannot read the weights to hash them for the ratings ({error})") from None
    return WebRatings(args.db, name, model_hash)


def serve_page(args, chat, settings):
    """Run the web chat until Ctrl+C, SIGTERM or a notebook's Stop button; close it cleanly."""
    auth = read_auth(args.auth)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401  (the console needs no gradio)
    except ImportError as error:
        raise UserError(f"--web needs gradio ({error}); pip install -r requirements.txt") from None
    for warning in web_warnings(args, auth):
        print(f"system_prompt.py: warning: {warning}", file=sys.stderr)
    title, lines = page_heading(args, chat, settings)
    chats = WebChats(chat, settings, args, model_replies(chat, settings, args), web_ratings(args, chat))
    page = build_page(chats, title, lines)
    stopping = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if in_main else None
    try:  # KeyboardInterrupt: Ctrl+C, or the notebook's Stop button, at any moment
        try:
            _, local_url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                                  auth=auth, prevent_thread_lock=True, quiet=True,
                                                  max_threads=args.max_queue + 8, ssr_mode=False)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot open the page on {args.host}:{args.port or 'a free port'}: {error}") from None
        if in_main:
            signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
        print(f"system_prompt.py: web chat on {local_url}" + (f" and {share_url}" if share_url else "")
              + (" (the notebook's Stop button ends it)" if in_notebook() else " (Ctrl+C stops it)"),
              file=sys.stderr, flush=True)
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, saved)
        page.close()
        chats.close()
    print("system_prompt.py: web chat stopped cleanly", file=sys.stderr, flush=True)


def play_script(session, lines):
    for line in lines:
        print(USER_PREFIX + line, file=session.out, flush=True)
        if not session.handle(line):
            break


def undecodable(line):
    """Whether a line read with errors="surrogateescape" held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in line)


def talk(session):
    print(f"Пишите сообщение. «{EXIT_WORDS[0]}» — закончить, «{RESET_COMMAND}» — начать заново, "
          f"«{MEMORY_COMMAND}» — что я о вас помню, «{FORGET_COMMAND}» — забыть это "
          f"(«{FORGET_COMMAND} слово» — только то, где есть слово).", file=session.out, flush=True)
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 (a pipe from a cp1251 file) is told about and skipped, not a traceback.
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(USER_PREFIX).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=session.out)
            return
        except NotImplementedError:  # IPython's answer where no person can type (nbconvert, papermill)
            raise UserError("this run cannot ask for input; set CHAT_SCRIPT (--script) to a file of lines") from None
        if undecodable(line):
            print(BOT_PREFIX + NOT_UTF8_NOTICE, file=session.out, flush=True)
            continue
        if not session.handle(line):
            return


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="system_prompt.py", description="Console chat with a trained model folder.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model folder (its newest complete checkpoint-N/ when it has no weights of its own)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, choices=DEVICES)
    add_prompt_flags(parser)
    parser.add_argument("--quantize", default=DEFAULT_QUANTIZE, choices=QUANTIZE_CHOICES,
                        help="int8 weights for the linear layers: about 2x faster on a CPU (auto: int8 on a CPU, "
                             "none on a GPU)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="CPU threads for the model (default: physical cores)")
    parser.add_argument("--server", default=SERVER,
                        help="base URL of an OpenAI-compatible inference server that runs the model (llama.cpp's "
                             "llama-server, transformers serve, vLLM), e.g. http://127.0.0.1:8000; --model still gives the tokenizer and the "
                             "chat settings (default: the model runs in this process)")
    parser.add_argument("--server-timeout", type=float, default=SERVER_TIMEOUT,
                        help="seconds a reply from the server may take, its wait in the server's queue included")
    parser.add_argument("--server-key", default=SERVER_KEY,
                        help="the server's API key (llama-server --api-key, vLLM --api-key), sent as "
                             "\"Authorization: Bearer KEY\" (default: $OPENAI_API_KEY, else none)")
    parser.add_argument("--no-stream", action="store_true", default=NO_STREAM,
                        help="print a reply once it is complete, not as it is written")
    parser.add_argument("--no-memory", action="store_true", default=NO_MEMORY,
                        help="no long-term memory: keep nothing of what the user says about themselves "
                             "(and no facts exchange in the prompt)")
    parser.add_argument("--script", default=CHAT_SCRIPT,
                        help="play this file of user lines (UTF-8, one a line) and print the transcript")
    parser.add_argument("--show-prompt", action="store_true", default=SHOW_PROMPT,
                        help="print the prompt given to the model")
    web = parser.add_argument_group("web chat")
    web.add_argument("--web", action="store_true", default=WEB,
                     help="a chat page in the browser (Gradio) instead of the console")
    web.add_argument("--host", default=HOST,
                     help="the page's address (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                          "network, set --auth then)")
    web.add_argument("--port", type=int, default=PORT, help="the page's port (default: 7860, or the next free one)")
    web.add_argument("--share", action="store_true", default=SHARE,
                     help="also a public gradio.live link (a notebook's way to open it elsewhere)")
    web.add_argument("--auth", default=AUTH,
                     help="user:password, or a file holding it: the page asks for them (default: no login)")
    web.add_argument("--max-batch", type=int, default=MAX_BATCH, help="replies generated together")
    web.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                     help="messages waiting for the model, all sessions together; past it a session is told "
                          "the bot is busy")
    web.add_argument("--max-input-chars", type=int, default=MAX_INPUT_CHARS,
                     help="a longer message gets one line instead of a reply")
    web.add_argument("--db", default=DB,
                     help="SQLite file for the 👍/👎 under each reply: a press writes that reply's row of the "
                          "bot's ratings table (create_dataset.py --feedback reads it); made readable by its "
                          "owner only (default: no buttons, nothing kept)")
    return parser.parse_args(argv)


# What each setting of the defaults block must be: argparse converts a string default with the flag's
# `type`, but passes any other value on as it is (None for a folder, a list for a file, "no" for False).
PATH_KINDS, TEXT_KINDS = (str, os.PathLike), (str,)
WHOLE_KINDS, NUMBER_KINDS, SWITCH_KINDS = (int,), (int, float), (bool,)
BLOCK_VALUE_KINDS = (  # (dest, kinds, None allowed, what to call it)
    ("model", PATH_KINDS, False, "a folder name (a string)"),
    ("script", PATH_KINDS, True, "a file name (a string)"),
    ("persona", TEXT_KINDS, True, "a text (a string)"),
    ("server", TEXT_KINDS, True, "a URL (a string)"),
    ("server_key", TEXT_KINDS, True, "a key (a string)"),
    ("max_new_tokens", WHOLE_KINDS, True, "a whole number"),
    ("context_tokens", WHOLE_KINDS, True, "a whole number"),
    ("max_turns", WHOLE_KINDS, True, "a whole number"),
    ("threads", WHOLE_KINDS, True, "a whole number"),
    ("seed", WHOLE_KINDS, False, "a whole number"),
    ("temperature", NUMBER_KINDS, True, "a number"),
    ("top_p", NUMBER_KINDS, True, "a number"),
    ("repetition_penalty", NUMBER_KINDS, True, "a number"),
    ("server_timeout", NUMBER_KINDS, False, "a number of seconds"),
    ("no_persona", SWITCH_KINDS, False, "True or False"),
    ("no_stream", SWITCH_KINDS, False, "True or False"),
    ("no_memory", SWITCH_KINDS, False, "True or False"),
    ("show_prompt", SWITCH_KINDS, False, "True or False"),
    ("web", SWITCH_KINDS, False, "True or False"),
    ("host", TEXT_KINDS, False, "an address (a string)"),
    ("port", WHOLE_KINDS, True, "a whole number"),
    ("share", SWITCH_KINDS, False, "True or False"),
    ("auth", PATH_KINDS, True, "user:password or a file name (a string)"),
    ("max_batch", WHOLE_KINDS, False, "a whole number"),
    ("max_queue", WHOLE_KINDS, False, "a whole number"),
    ("max_input_chars", WHOLE_KINDS, False, "a whole number"),
    ("db", PATH_KINDS, True, "a file name (a string)"),
)


def check_value_kinds(args):
    """A setting of the defaults block of the wrong kind, named by its flag, before it becomes a
    traceback (Path(None)) or a silent mistake (NO_MEMORY = "no" is true)."""
    for dest, kinds, none_allowed, what in BLOCK_VALUE_KINDS:
        value = getattr(args, dest)
        if value is None and none_allowed:
            continue
        # bool is an int to isinstance: True is no seed, 1 no switch
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag}: must be {what}{' or None' if none_allowed else ''}, not {value!r}")


def check_args(args):
    """What argparse leaves unchecked: the kind of a value set in the defaults block and a `choices`
    value set there (argparse checks only the command line's), and numbers out of range."""
    check_value_kinds(args)
    for flag, value, choices in (("--device", args.device, DEVICES), ("--quantize", args.quantize, QUANTIZE_CHOICES)):
        if value not in choices:
            raise UserError(f"{flag} {value!r}: must be one of {', '.join(choices)}")
    if args.repetition_penalty is not None and args.repetition_penalty < 1.0:
        raise UserError(f"--repetition-penalty: {args.repetition_penalty} must be >= 1.0 "
                        f"(below 1 it rewards repetition)")
    if args.threads is None:  # THREADS = None, as other settings say "the default"
        args.threads = 0
    if args.threads < 0:
        raise UserError("--threads must be 0 (physical cores) or more")
    if args.server_timeout is None or not args.server_timeout > 0:
        raise UserError("--server-timeout must be above 0 seconds")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-input-chars", args.max_input_chars)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1")
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be from 1 to 65535")
    if args.web and args.script:
        raise UserError("--web and --script: a page or a played file, not both")
    if args.db is not None and not args.web:
        raise UserError("--db: the ratings are the web chat's buttons; add --web (the console keeps nothing)")
    if args.db is not None and os.path.isdir(args.db):
        raise UserError(f"--db {args.db}: is a folder; give the database file, e.g. {os.path.join(args.db, 'ratings.db')}")
    if args.web:
        read_auth(args.auth)  # a bad --auth stops before the model is loaded


def check_memory(args):
    """Load the facts tools now, so that a missing package stops the chat before it starts."""
    if args.no_memory:
        return
    try:
        load_fact_tools()
    except ImportError as error:
        raise UserError(f"long-term memory needs yargy and pymorphy3 ({error}); install them "
                        f"(pip install -r requirements.txt) or turn memory off with --no-memory") from None


def memory_notes(args, chat, settings):
    if args.no_memory or settings["facts_exchange"]:
        return []
    return [f"{chat['config_path'] or args.model}: the model was not trained with the facts exchange (no "
            f"\"facts\": true), so the prompt will not carry what the user says about themselves; "
            f"{MEMORY_COMMAND} and {FORGET_COMMAND} still work"]


def start_lines(args, chat):
    """What the chat runs on, for stderr: the server and how it is sent prompts, the model's voice."""
    lines = [server_summary(chat["server"])] if args.server else []
    voice = describe_voice(chat["chat_config"])
    return lines + ([f"voice: {voice}"] if voice else [])


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        lines = read_script(args.script) if args.script else None
        check_memory(args)
        chat = open_model_folder(args.model, args.device, need_weights=not args.server)
        settings = resolve_settings(args, chat)
        if args.server:
            chat["server"] = open_server(args.server, chat["tokenizer"], args.server_timeout, settings["generation"],
                                         args.server_key)
        else:
            load_weights(chat, args.quantize, args.threads)
    except UserError as error:
        print(f"system_prompt.py: error: {error}", file=sys.stderr)
        return 1
    for warning in settings["warnings"] + (chat["server"]["notes"] if args.server else []):
        print(f"system_prompt.py: warning: {warning}", file=sys.stderr)
    for line in start_lines(args, chat):
        print(f"system_prompt.py: {line}", file=sys.stderr)
    for note in memory_notes(args, chat, settings):
        print(f"system_prompt.py: note: {note}", file=sys.stderr)
    set_seed(args.seed)
    if args.web:
        try:
            serve_page(args, chat, settings)
        except UserError as error:
            print(f"system_prompt.py: error: {error}", file=sys.stderr)
            return 1
        return 0
    session = ConsoleChat(chat, settings, show_prompt=args.show_prompt, stream=not args.no_stream,
                          memory=not args.no_memory)
    if lines is None:
        try:
            talk(session)
        except UserError as error:
            print(f"system_prompt.py: error: {error}", file=sys.stderr)
            return 1
    else:
        play_script(session, lines)
    return 0


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
