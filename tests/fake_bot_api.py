"""A fake Telegram Bot API server on loopback, for end-to-end tests of tg_bot.py,
and LiveBot, the real bot process talking to it (tests and bench/bot_load.py).

It speaks the few methods the bot uses (getMe, getUpdates with long polling and
offsets, sendMessage, sendMessageDraft, editMessageText, editMessageReplyMarkup,
answerCallbackQuery, sendChatAction, getChatMember, getWebhookInfo and deleteWebhook,
plus a plain "ok" for anything else), hands out the updates a test queues (messages
with the entities Telegram would mark: mentions, commands, emails; presses of inline
buttons: callback queries), and records what the bot sent, with the inline keyboard
each message carries now (an edit without one removes it, as Telegram does). A test can make the next call of a method fail (a 429
with retry_after, a 5xx, a dropped connection, a 400), possibly for one chat
only, or slow; throttle a chat (every send to it 429 for a while), or answer
with a 429 every send that comes sooner than chat_send_interval after the last
one to that chat, as Telegram does with bursts; leave a webhook set; have another
copy "poll" (409); or revoke the token (401). Drafts are taken in private chats only
(400 elsewhere), or nowhere (drafts=False: 404, as a Bot API server older than
them answers); an edit that changes nothing gets Telegram's 400 "message is not
modified". visible(chat_id) lists every text a user could have seen, in order.

    with FakeBotApi(token) as api:
        start the bot with --api-url api.url
        api.push_text(chat_id=1, text="Привет")
        [reply] = api.wait_for_messages(1, count=1)
        api.push_callback(chat_id=1, message=reply, data=reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
        [answer] = api.wait_for(lambda: api.callback_answers)
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parent.parent
BOT_USER = {"id": 424242, "is_bot": True, "first_name": "Tiny", "username": "tiny_test_bot"}
MAX_LONG_POLL_SECONDS = 5.0  # whatever the bot asks, so a test never waits on a poll for long
DROP = 0                     # fail_next(method, DROP): close the connection without an answer
# Roughly as Telegram marks them: a command at the start, an @username not inside a
# word or an address, an email address (which holds an @ but mentions nobody).
COMMAND = re.compile(r"^/[A-Za-z0-9_]+(?:@[A-Za-z0-9_]+)?")
EMAIL = re.compile(r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
MENTION = re.compile(r"(?<![\w@.])@[A-Za-z0-9_]{5,32}(?![\w@])")


def utf16_len(text):
    return len(text.encode("utf-16-le")) // 2


def entities_of(text):
    """The entities Telegram's server would attach to `text` (offsets in UTF-16 units)."""
    found, taken = [], []
    for kind, pattern in (("bot_command", COMMAND), ("email", EMAIL), ("mention", MENTION)):
        for match in pattern.finditer(text):
            if any(start < match.end() and match.start() < end for start, end in taken):
                continue
            taken.append(match.span())
            found.append({"type": kind, "offset": utf16_len(text[:match.start()]), "length": utf16_len(match.group())})
    return sorted(found, key=lambda entity: entity["offset"])


def markup_of(params):
    """The reply_markup a call carries, as a dict (None when it has none)."""
    markup = params.get("reply_markup")
    return json.loads(markup) if isinstance(markup, str) else markup


class FakeBotApi:
    def __init__(self, token, drafts=True):
        self.token = token
        self.drafts_supported = drafts  # False: sendMessageDraft is an unknown method (404), as on older servers
        self.lock = threading.Condition()
        self.updates = []             # queued, not yet confirmed by an offset
        self.next_update_id = 1000
        self.next_message_id = 1
        self.chats = {}               # chat id -> chat object of the updates pushed
        self.sent = []                # sendMessage calls answered with success; "text", "reply_markup" follow edits
        self.drafts = []              # sendMessageDraft calls answered with success
        self.edits = []               # editMessageText calls answered with success
        self.callback_answers = []    # answerCallbackQuery calls: {"callback_query_id", "text", "show_alert", "time"}
        self.next_callback_id = 1
        self.actions = []             # sendChatAction calls
        self.calls = []               # (method, time, HTTP status) of every call
        self.requests = []            # every call answered: {"method", "chat_id", "text", "offset", "status", "time"}
        self.failures = {}            # method -> [(chat id or None, status, body, html)] for its next calls
        self.delays = {}              # method -> [seconds] for its next calls
        self.arrivals = []            # (method, chat id, time) as a request comes in, before any delay
        self.throttled = {}           # chat id -> until when every sendMessage to it gets a 429
        self.chat_send_interval = 0.0  # > 0: a send to a chat sooner than this after the last one gets a 429
        self.last_send = {}           # chat id -> time of its last sendMessage answered with success
        self.admins = {}              # chat id -> user ids that getChatMember calls administrators
        self.webhook_url = ""         # set: getUpdates answers 409, as Telegram does
        self.conflict = False         # True: getUpdates answers 409 as when another copy polls
        self.revoked = False          # True: every call answers 401, as for a revoked token
        self.confirmed = []           # update ids forgotten through an offset, in order
        self.my_commands = None       # the command list of the last setMyCommands: [{"command", "description"}]
        self.on_confirm = None        # called (under the lock) with each update id as it is confirmed
        self.bad_tokens = 0
        self.closing = False
        self.hurry = False            # True: long polls answer at once (a test winding down)
        self.clock = time.monotonic   # what the calls are timed by: a test may give a fake clock it moves itself
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="fake-bot-api", daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- what a test does
    def _push(self, message):
        self._push_update("message", message, message["chat"])
        return message["message_id"]

    def _push_update(self, kind, content, chat):
        with self.lock:
            self.chats[chat["id"]] = chat
            self.updates.append({"update_id": self.next_update_id, kind: content})
            self.next_update_id += 1
            self.lock.notify_all()

    def _message(self, chat_id, user_id, chat_type="private", date=None, first_name=None, **content):
        with self.lock:
            message_id = self.next_message_id
            self.next_message_id += 1
        first_name = first_name or f"user{user_id}"
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = f"group {chat_id}"
        user = {"id": user_id, "is_bot": False, "first_name": first_name}
        return {"message_id": message_id, "date": int(time.time() if date is None else date), "chat": chat,
                "from": user, **content}

    def push_text(self, chat_id, text, user_id=None, chat_type="private", reply_to=None, date=None,
                  first_name=None, entities=None):
        """Queue a text message; reply_to is a message the bot sent (a dict from `sent`);
        date a Unix time (default now); entities as Telegram would mark them unless given."""
        message = self._message(chat_id, user_id or chat_id, chat_type, date, first_name, text=text)
        found = entities_of(text) if entities is None else entities
        if found:
            message["entities"] = found
        if reply_to is not None:
            message["reply_to_message"] = {"message_id": reply_to["message_id"], "date": int(time.time()),
                                           "chat": message["chat"], "from": BOT_USER, "text": reply_to["text"]}
        return self._push(message)

    def push_callback(self, chat_id, message, data, user_id=None, chat_type=None, first_name=None):
        """Queue a press of an inline button: `message` is the bot's message carrying it (a dict from
        `sent`, or any {"message_id", "text"} for a message the bot never sent; "date": 0 for one Telegram
        no longer shows the bot: deleted, or too old), `data` the button's
        callback_data, user_id who pressed (default: the chat's own user). The query's id."""
        with self.lock:
            query_id = str(self.next_callback_id)
            self.next_callback_id += 1
            chat = self.chats.get(chat_id) or {"id": chat_id, "type": chat_type or "private",
                                               "first_name": f"user{chat_id}"}
        user_id = user_id or chat_id
        user = {"id": user_id, "is_bot": False, "first_name": first_name or f"user{user_id}"}
        shown = {"message_id": message["message_id"], "date": int(time.time()), "chat": chat, "from": BOT_USER,
                 "text": message.get("text") or ""}
        if message.get("date") == 0:  # deleted, or too old: Telegram sends an InaccessibleMessage
            shown = {"message_id": message["message_id"], "date": 0, "chat": chat}
        elif message.get("reply_markup"):
            shown["reply_markup"] = message["reply_markup"]
        self._push_update("callback_query", {"id": query_id, "from": user, "message": shown,
                                             "chat_instance": f"instance-{chat_id}", "data": data}, chat)
        return query_id

    def push_sticker(self, chat_id, user_id=None):
        sticker = {"file_id": "sticker-1", "file_unique_id": "s1", "type": "regular", "width": 512,
                   "height": 512, "is_animated": False, "is_video": False}
        return self._push(self._message(chat_id, user_id or chat_id, sticker=sticker))

    def fail_next(self, method, status, description="", retry_after=None, chat_id=None, html=False):
        """The next call of `method` (to `chat_id` only, if given) fails with `status`: a
        JSON error as Telegram sends it, an HTML page as a proxy in front of it does
        (html=True), or no answer at all (status DROP)."""
        body = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        with self.lock:
            self.failures.setdefault(method, []).append((chat_id, status, body, html))

    def throttle(self, chat_id, seconds):
        """Every sendMessage to the chat for the next `seconds` gets a 429 with the time left."""
        with self.lock:
            self.throttled[chat_id] = self.clock() + seconds

    def delay_next(self, method, seconds):
        with self.lock:
            self.delays.setdefault(method, []).append(seconds)

    def wait_for(self, condition, timeout=30.0):
        """Wait until condition() (called under the lock) is true; its value, or AssertionError."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = condition()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fake Bot API: condition not met within {timeout} s; sent so far: "
                                         f"{[(m['chat_id'], m['text'][:40]) for m in self.sent]}")
                self.lock.wait(min(left, 0.2))

    def end_long_polls(self):
        """From now on getUpdates answers at once: a bot that is stopping need not wait out a poll."""
        with self.lock:
            self.hurry = True
            self.lock.notify_all()

    def unconfirmed(self):
        """The update ids handed out or queued that no offset has confirmed yet."""
        with self.lock:
            return [update["update_id"] for update in self.updates]

    def messages_to(self, chat_id):
        with self.lock:
            return [m for m in self.sent if m["chat_id"] == chat_id]

    def visible(self, chat_id):
        """What a user of the chat could have seen, in order: (method, text, time, message id or
        draft id) of every sendMessage, sendMessageDraft and editMessageText answered with success."""
        with self.lock:
            return [(r["method"], r["text"], r["time"], r["message_id"] or r["draft_id"]) for r in self.requests
                    if r["chat_id"] == chat_id and r["status"] == 200
                    and r["method"] in ("sendMessage", "sendMessageDraft", "editMessageText")]

    def wait_for_messages(self, chat_id, count, timeout=30.0):
        """The first `count` messages sent to a chat, once that many have arrived."""
        def enough():
            mine = [m for m in self.sent if m["chat_id"] == chat_id]
            return mine[:count] if len(mine) >= count else None

        return self.wait_for(enough, timeout)

    # --- the HTTP side
    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_GET(self):
                self._serve()

            def do_POST(self):
                self._serve()

            def _serve(self):
                parts = urlsplit(self.path)
                params = {key: values[-1] for key, values in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    body = self.rfile.read(length).decode("utf-8")
                    if self.headers.get("Content-Type", "").startswith("application/json"):
                        params.update(json.loads(body))
                    else:
                        params.update({k: v[-1] for k, v in parse_qs(body).items()})
                segments = parts.path.strip("/").split("/")
                if len(segments) != 2 or segments[0] != "bot" + api.token or api.revoked:
                    api.bad_tokens += segments[0] != "bot" + api.token
                    return self._reply(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
                status, body = api.answer(segments[1], params)
                if status == DROP:
                    self.close_connection = True
                    return  # the bot's request ends without an answer, as when a connection breaks
                self._reply(status, body)

            def _reply(self, status, body):
                if isinstance(body, str):  # an HTML error page
                    data, kind = body.encode("utf-8"), "text/html"
                else:
                    data, kind = json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the bot went away mid-poll

        return Handler

    def _failure(self, method, chat_id):
        """The failure queued for this call, if any (called under the lock)."""
        now = self.clock()
        if method == "sendMessage" and self.chat_send_interval and chat_id in self.last_send:
            # Telegram's advice is at most one message a second in a chat; it answers bursts with 429.
            self.throttled[chat_id] = max(self.throttled.get(chat_id, 0),
                                          self.last_send[chat_id] + self.chat_send_interval)
        if method == "sendMessage" and self.throttled.get(chat_id, 0) > now:
            wait = math.ceil(self.throttled[chat_id] - now)
            return 429, {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {wait}",
                         "parameters": {"retry_after": wait}}
        if method == "getUpdates" and self.webhook_url:
            return 409, {"ok": False, "error_code": 409, "description": "Conflict: can't use getUpdates method "
                         "while webhook is active; use deleteWebhook to delete the webhook first"}
        if method == "getUpdates" and self.conflict:
            return 409, {"ok": False, "error_code": 409, "description": "Conflict: terminated by other getUpdates "
                         "request; make sure that only one bot instance is running"}
        for number, (only, status, body, html) in enumerate(self.failures.get(method, [])):
            if only is None or only == chat_id:
                del self.failures[method][number]
                if html:
                    return status, f"<html><body><h1>{status} Bad Gateway</h1></body></html>"
                return status, body
        return None

    def answer(self, method, params):
        chat_id = int(params["chat_id"]) if "chat_id" in params else None
        with self.lock:
            self.arrivals.append((method, chat_id, self.clock()))
            self.lock.notify_all()
            delay = self.delays.get(method, []).pop(0) if self.delays.get(method) else 0
            failure = self._failure(method, chat_id)
        if delay:
            time.sleep(delay)
        if failure is None:
            failure = self._refusal(method, params, chat_id)
        if failure is not None:
            status, body = failure
        elif method == "getUpdates":
            status, body = 200, {"ok": True, "result": self._get_updates(params)}
        else:
            status, body = 200, {"ok": True, "result": self._result(method, params, chat_id)}
        with self.lock:
            self.calls.append((method, self.clock(), status))
            self.requests.append({"method": method, "chat_id": chat_id, "text": params.get("text"), "status": status,
                                  "offset": params.get("offset"), "time": self.clock(),
                                  "message_id": body["result"].get("message_id") if status == 200 and isinstance(
                                      body.get("result"), dict) else None,
                                  "draft_id": int(params["draft_id"]) if "draft_id" in params else None})
            self.lock.notify_all()
        return status, body

    def _refusal(self, method, params, chat_id):
        """Telegram's answer to a draft or an edit it does not take, else None."""
        def bad(description):
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: " + description}

        with self.lock:
            if method == "sendMessageDraft":
                if not self.drafts_supported:
                    return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
                if self.chats.get(chat_id, {"type": "private"})["type"] != "private":
                    return bad("method is available only in private chats")
                if int(params.get("draft_id") or 0) == 0:
                    return bad("draft_id must be non-zero")
                if not params.get("text"):
                    return bad("message text is empty")
            if method in ("editMessageText", "editMessageReplyMarkup"):
                target = [m for m in self.sent if m["chat_id"] == chat_id
                          and m["message_id"] == int(params.get("message_id") or 0)]
                if not target:
                    return bad("message to edit not found")
                text = params.get("text") if method == "editMessageText" else target[0]["text"]
                if target[0]["text"] == text and target[0]["reply_markup"] == markup_of(params):
                    return bad("message is not modified: specified new message content and reply markup are "
                               "exactly the same as a current content and reply markup of the message")
        return None

    def _get_updates(self, params):
        offset = int(params.get("offset", 0))
        limit = int(params.get("limit", 100))
        wait = min(float(params.get("timeout", 0)), MAX_LONG_POLL_SECONDS)
        deadline = time.monotonic() + wait
        with self.lock:
            # As Telegram does: an offset confirms (forgets) every update below it.
            for update in self.updates:
                if update["update_id"] < offset:
                    self.confirmed.append(update["update_id"])
                    if self.on_confirm is not None:
                        self.on_confirm(update["update_id"])
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
            while not self.updates and not self.closing and not self.hurry and time.monotonic() < deadline:
                self.lock.wait(deadline - time.monotonic())
            return self.updates[:limit]

    def _result(self, method, params, chat_id):
        if method == "getMe":
            return BOT_USER
        if method == "setMyCommands":
            commands = params.get("commands")
            with self.lock:
                self.my_commands = json.loads(commands) if isinstance(commands, str) else commands
            return True
        if method == "getWebhookInfo":
            with self.lock:
                return {"url": self.webhook_url, "has_custom_certificate": False,
                        "pending_update_count": len(self.updates)}
        if method == "deleteWebhook":
            with self.lock:
                self.webhook_url = ""
            return True
        if method == "getChatMember":
            user_id = int(params["user_id"])
            with self.lock:
                admin = user_id in self.admins.get(chat_id, ())
            user = {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}
            if not admin:
                return {"status": "member", "user": user}
            rights = ("can_be_edited", "is_anonymous", "can_manage_chat", "can_delete_messages",
                      "can_manage_video_chats", "can_restrict_members", "can_promote_members", "can_change_info",
                      "can_invite_users", "can_post_stories", "can_edit_stories", "can_delete_stories")
            return {"status": "administrator", "user": user, **{right: False for right in rights}}
        if method == "sendChatAction":
            with self.lock:
                self.actions.append({"chat_id": chat_id, "action": params.get("action"), "time": self.clock()})
            return True
        if method == "sendMessageDraft":
            with self.lock:
                self.drafts.append({"chat_id": chat_id, "draft_id": int(params["draft_id"]), "text": params["text"],
                                    "time": self.clock()})
            return True
        if method in ("editMessageText", "editMessageReplyMarkup"):
            with self.lock:
                [message] = [m for m in self.sent if m["chat_id"] == chat_id
                             and m["message_id"] == int(params["message_id"])]
                message["text"] = params.get("text", message["text"])
                message["reply_markup"] = markup_of(params)  # Telegram drops a keyboard an edit does not repeat
                if method == "editMessageText":
                    self.edits.append({"chat_id": chat_id, "message_id": message["message_id"],
                                       "text": params["text"], "time": self.clock()})
                chat = self.chats.get(chat_id, {"id": chat_id, "type": "private", "first_name": "user"})
            return {"message_id": message["message_id"], "date": int(time.time()), "edit_date": int(time.time()),
                    "chat": chat, "from": BOT_USER, "text": message["text"]}
        if method == "answerCallbackQuery":
            with self.lock:
                self.callback_answers.append({"callback_query_id": params.get("callback_query_id"),
                                              "text": params.get("text"),
                                              "show_alert": str(params.get("show_alert")).lower() == "true",
                                              "time": self.clock()})
            return True
        if method == "sendMessage":
            reply = json.loads(params["reply_parameters"]) if params.get("reply_parameters") else {}
            with self.lock:
                message = {"message_id": self.next_message_id, "chat_id": chat_id, "text": params["text"],
                           "reply_to": reply.get("message_id"), "reply_markup": markup_of(params),
                           "time": self.clock()}
                self.next_message_id += 1
                self.sent.append(message)
                self.last_send[chat_id] = message["time"]
                chat = self.chats.get(chat_id, {"id": chat_id, "type": "private", "first_name": "user"})
            return {"message_id": message["message_id"], "date": int(time.time()), "chat": chat,
                    "from": BOT_USER, "text": message["text"]}
        return True


class LiveBot:
    """tg_bot.py as a subprocess against a FakeBotApi, started with `args` after
    --api-url; every run's output goes to its own log file in workdir."""

    def __init__(self, api, token, workdir, args, script=None):
        self.api, self.token, self.workdir, self.args = api, token, Path(workdir), list(args)
        self.script = Path(script or REPO / "tg_bot.py")  # another copy, e.g. an older version, for a benchmark
        self.logs, self.process, self.exit_codes = [], None, []

    def start(self, timeout=120, wait=True, env=None):
        """Start the bot (with `env` added to its environment); wait=True: until it is up."""
        log_path = self.workdir / f"bot-{len(self.logs)}.log"
        self.logs.append(log_path)
        environ = dict(os.environ, TELEGRAM_BOT_TOKEN=self.token, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        environ.pop("TELEGRAM_API_URL", None)
        for name in [name for name in environ if name.startswith("TG_BOT_")]:  # settings of the caller's own bot
            del environ[name]
        environ.update(env or {})
        command = [sys.executable, str(self.script), "--api-url", self.api.url] + self.args
        with open(log_path, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.workdir)
        if wait:
            self.wait_for_log("is up", timeout=timeout)

    def kill(self):
        """kill -9: no shutdown at all, as in a crash or an out-of-memory kill."""
        self.process.kill()
        code = self.process.wait(10)
        self.process = None
        self.exit_codes.append(code)
        return code

    def wait_exit(self, timeout=30):
        """The exit code of a bot that ends by itself."""
        code = self.process.wait(timeout)
        self.process = None
        self.exit_codes.append(code)
        return code

    def stop(self, timeout=30):
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self.process = None
        self.exit_codes.append(code)
        return code

    def log_text(self):
        return "".join(path.read_text(encoding="utf-8") for path in self.logs)

    def wait_for_log(self, needle, timeout=30):
        deadline = time.monotonic() + timeout
        while needle not in self.logs[-1].read_text(encoding="utf-8"):
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the bot exited ({self.process.returncode}):\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the bot's log within {timeout} s")
            time.sleep(0.1)

    def prompts(self, chat_id):
        """Every prompt the bot gave the model in this chat, from its --log-prompts lines."""
        marker = f"prompt chat={chat_id}: "
        return [json.loads(line.split(marker, 1)[1]) for line in self.log_text().splitlines() if marker in line]
