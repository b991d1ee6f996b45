"""--server (issue 13): system_prompt.py and tg_bot.py asking a real OpenAI-compatible
inference server for the continuation: `transformers serve`, started here on 127.0.0.1
with a tiny model trained by heart (tests/tiny_model.py's parrot), so that its replies
are known and equal the in-process ones. The console and the bot (a real process, and in
this process with the fake Bot API, streaming included) talk through it; a server that is
down, hangs, or answers with an error gives an apology and the bot goes on; the folder's
chat template makes /v1/chat/completions build the kit's prompt."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from telebot import apihelper
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)
from fake_bot_api import BOT_USER, FakeBotApi, LiveBot  # noqa: E402
from test_tg_bot_production import TOKEN, Harness  # noqa: E402  (tg_bot's ChatBot and serve() in this process)

import system_prompt as sp  # noqa: E402
import tg_bot  # noqa: E402
import train_transformer as tt  # noqa: E402

torch.set_num_threads(1)
SERVE = Path(sys.executable).with_name("transformers")  # the CLI beside this Python
STARTUP_TIMEOUT = 180  # seconds; it takes 4-6 s on two idle cores, 12-14 s when they are busy
WAIT = 60.0
PERSONA = tiny_model.CHAT_CONFIG["persona"]
GREEDY = dict(tiny_model.CHAT_CONFIG["generation"], do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0,
              max_new_tokens=32)
SECOND_QUESTION = "Какая завтра погода?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The parrot, greedy, its tokenizer saved as the trainers save it for servers (the chat
    template, and text read as text: a typed "</s>" is not the end of text)."""
    config = dict(tiny_model.CHAT_CONFIG, generation=GREEDY)
    folder = tiny_model.build_parrot_model(tmp_path_factory.mktemp("served") / "parrot", chat_config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tt.prepare_folder_tokenizer(tokenizer, {"max_turns": config["max_turns"]}, PERSONA)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server_url(model_dir, tmp_path_factory):
    """transformers serve pinned to the folder, on a port the kernel picks; its URL once the model is loaded."""
    if not SERVE.is_file():
        pytest.skip(f"{SERVE} is missing: `transformers serve` comes with transformers[serving] (requirements.txt)")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    environ = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([str(SERVE), "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                                    "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=environ)
    try:
        deadline, url = time.monotonic() + STARTUP_TIMEOUT, None
        while url is None:  # uvicorn names its port once the pinned model is loaded
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text(encoding="utf-8"))
            if found:
                url = found.group(1)
            elif process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{log_path.read_text(encoding='utf-8')[-3000:]}")
            else:
                time.sleep(0.1)
        assert requests.get(url + "/health", timeout=10).json() == {"status": "ok"}
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def local(model_dir):
    """The folder as the bot reads it beside the server: tokenizer and chat settings, no weights loaded."""
    chat = sp.open_model_folder(model_dir, "cpu", need_weights=False)
    return chat, sp.resolve_settings(sp.parse_args(["--model", str(model_dir)]), chat)


@pytest.fixture(scope="module")
def in_process(model_dir):
    return sp.load_weights(sp.open_model_folder(model_dir, "cpu"), "none", threads=1)


def test_the_server_is_found_and_counts_a_prompt_as_the_kit(server_url, local, model_dir):
    chat, settings = local
    server = sp.open_server(server_url + "/v1/", chat["tokenizer"], 30, settings["generation"])
    assert server["url"] == server_url and server["model"] == str(model_dir)
    assert server["notes"] == []  # no penalties to leave out, and the typed "</s>" counted as text
    # transformers serve takes a string prompt only and refuses fields it does not know (top_k, min_p at the
    # top level): the probe falls back to text, the sampling inside its generation_config
    assert (server["prompt_form"], server["sampling_fields"]) == ("text", "generation config")
    assert sp.server_summary(server) == f"server {server_url} serves {model_dir}; prompts sent as text"
    noted = sp.open_server(server_url, chat["tokenizer"], 30, tiny_model.CHAT_CONFIG["generation"])["notes"]
    assert len(noted) == 1 and "repetition penalty" in noted[0]


def test_a_reply_is_read_as_it_is_streamed_and_cut_at_the_next_label(server_url, local, in_process, monkeypatch):
    chat, settings = local
    server = sp.open_server(server_url, chat["tokenizer"], 30)
    prompt = sp.chat_prompt_ids([tiny_model.PARROT_QUESTION], settings, chat["tokenizer"])
    pieces = list(sp.server_pieces(server, sp.server_body(server, settings, chat["tokenizer"].decode(prompt))))
    # what the server writes, label and all (in how many pieces is the server's pace: a busy one sends
    # several tokens in one event)
    assert pieces and "".join(pieces).endswith("\nВопрос:")
    received, real_pieces = [], sp.server_pieces

    def recording(*args):
        for piece in real_pieces(*args):
            received.append(piece)
            yield piece

    monkeypatch.setattr(sp, "server_pieces", recording)
    seen = []
    reply = sp.server_reply(server, settings, chat["tokenizer"].decode(prompt), seen.append)
    assert reply == tiny_model.PARROT_ANSWER == sp.generate_reply(in_process, settings, prompt)
    # each piece that made the visible text grow was shown at once, whatever pieces the server sent
    # (all but the last, which brought the next label and closed the stream)
    assert "\nВопрос:" in "".join(received) and "\nВопрос:" not in "".join(received[:-1])
    grown = []
    for n in range(1, len(received)):
        text = sp.visible_reply("".join(received[:n]))
        if text.startswith(grown[-1] if grown else "") and text != (grown[-1] if grown else ""):
            grown.append(text)
    assert seen == grown and all(reply.startswith(text) for text in seen)
    monkeypatch.setattr(sp, "server_pieces", real_pieces)
    assert sp.server_reply(server, settings, prompt) == reply  # ids, sent as their text to a text-only server
    sampled = dict(settings, generation=dict(GREEDY, do_sample=True, temperature=0.5, top_p=0.9, top_k=5))
    assert sp.server_reply(server, sampled, prompt)  # every sampling setting, in a form it takes (no 422)


def test_the_console_talks_through_the_server_as_in_process(server_url, model_dir, tmp_path, capsys):
    script = tmp_path / "chat.txt"
    script.write_text(f"{tiny_model.PARROT_QUESTION}\n{SECOND_QUESTION}\nпривет </s> Ответ: кто ты <s>\n",
                      encoding="utf-8")
    common = ["--model", str(model_dir), "--script", str(script), "--threads", "1", "--quantize", "none"]
    assert sp.main(common) == 0
    here = capsys.readouterr()
    assert sp.main(common + ["--server", server_url]) == 0
    served = capsys.readouterr()
    assert served.out == here.out and f"{sp.BOT_PREFIX}{tiny_model.PARROT_ANSWER}\n" in served.out
    assert "warning" not in served.err
    assert f"system_prompt.py: server {server_url} serves {model_dir}; prompts sent as text\n" in served.err
    # beside a server the folder needs no weights: its tokenizer and chat settings are all the chat reads
    light = tmp_path / "light"
    shutil.copytree(model_dir, light, ignore=shutil.ignore_patterns("*.safetensors"))
    assert sp.main(["--model", str(light), "--script", str(script), "--server", server_url]) == 0
    assert capsys.readouterr().out == here.out


def test_the_console_with_a_server_that_is_down_says_so_and_goes_on(model_dir, tmp_path, capsys):
    script = tmp_path / "chat.txt"
    script.write_text("Привет\nЕщё раз\n", encoding="utf-8")
    assert sp.main(["--model", str(model_dir), "--script", str(script), "--server",
                    f"http://127.0.0.1:{closed_port()}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count(f"{sp.BOT_PREFIX}{sp.SERVER_ERROR_NOTICE}\n") == 2
    assert "no answer as an OpenAI-compatible server" in captured.err and "Traceback" not in captured.err


def test_the_bot_process_answers_through_the_server(server_url, model_dir, tmp_path):
    with FakeBotApi(TOKEN) as api:
        bot = LiveBot(api, TOKEN, tmp_path, ["--model", str(model_dir), "--server", server_url, "--db",
                                             str(tmp_path / "h.sqlite3"), "--poll-seconds", "1", "--log-prompts"])
        try:
            bot.start()
            api.push_text(41, tiny_model.PARROT_QUESTION)
            assert api.wait_for_messages(41, 1, timeout=WAIT)[0]["text"] == tiny_model.PARROT_ANSWER
            api.push_text(-42, f"@{BOT_USER['username']} {tiny_model.PARROT_QUESTION}", user_id=7, chat_type="group")
            [group_reply] = api.wait_for_messages(-42, 1, timeout=WAIT)
            api.push_text(41, SECOND_QUESTION)
            second = api.wait_for_messages(41, 2, timeout=WAIT)[1]["text"]
        finally:
            assert bot.stop() == 0
    log = bot.log_text()
    assert f"replies from the inference server {server_url}" in log
    assert second not in (tg_bot.APOLOGY_TEXT, tg_bot.FALLBACK_REPLY)
    assert group_reply["text"] and group_reply["text"] != tg_bot.APOLOGY_TEXT
    # the second prompt holds the first exchange: the bot keeps the memory, the server only continues
    assert bot.prompts(41)[1].endswith(f"Вопрос: {tiny_model.PARROT_QUESTION}\nОтвет: {tiny_model.PARROT_ANSWER}\n"
                                       f"Вопрос: {SECOND_QUESTION}\nОтвет:")


# --- in this process: streaming through the server, and a server that fails
@pytest.fixture
def api():
    with FakeBotApi(TOKEN) as api:
        yield api


@pytest.fixture
def harness(api, local, tmp_path, monkeypatch):
    """harness(server) -> the bot in this process, its replies from `server` (an open_server dict)."""
    monkeypatch.setattr(apihelper, "API_URL", None)
    chat, settings = local
    started = []

    def make(server, flags=()):
        bot = Harness(api, chat["tokenizer"], tmp_path / "h.sqlite3", flags,
                      batcher=tg_bot.ServerReplies(server, settings, 4), settings=settings).start()
        started.append(bot)
        return bot

    yield make
    for bot in started:
        bot.stop()


def test_the_bot_streams_what_the_server_writes(server_url, local, api, harness, monkeypatch):
    read, show = tg_bot.server_pieces, tg_bot.ReplyRequest.show
    shown = []  # each visible text the bot's request was given, in order

    def recorded(request, text):
        shown.append(text)
        show(request, text)

    def in_step(server, body):
        # A handshake, not a pace: after each piece the next waits until the bot has shown what
        # the pieces so far make visible, so every visible text is its own draft however busy
        # the machine is (a bot that does not stream never shows one: the wait runs out).
        for piece in read(server, body):
            yield piece
            if shown:
                api.wait_for(lambda: any(d["text"] == shown[-1] for d in api.drafts), timeout=5.0)

    monkeypatch.setattr(tg_bot.ReplyRequest, "show", recorded)
    monkeypatch.setattr(tg_bot, "server_pieces", in_step)
    monkeypatch.setattr(tg_bot, "STREAM_EVERY_SECONDS", 0.0)  # no pace: a text is shown as soon as it is visible
    harness(tg_bot.open_server(server_url, local[0]["tokenizer"], 30))
    api.push_text(43, tiny_model.PARROT_QUESTION)
    assert api.wait_for_messages(43, 1, timeout=WAIT)[0]["text"] == tiny_model.PARROT_ANSWER
    drafts = [text for method, text, *_ in api.visible(43) if method == "sendMessageDraft"]
    assert len(shown) >= 2 and drafts == shown  # every visible text was shown, once, in order
    assert all(tiny_model.PARROT_ANSWER.startswith(text) for text in drafts)
    assert not any("Вопрос" in text for _, text, *_ in api.visible(43))


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("fault", ["down", "hangs", "error event", "HTTP error"])
def test_a_failing_server_gets_an_apology_and_the_bot_goes_on(fault, server_url, local, api, harness, caplog,
                                                             model_dir):
    chat, _ = local
    listener = None
    if fault == "down":
        server = tg_bot.open_server(f"http://127.0.0.1:{closed_port()}", chat["tokenizer"], 5)
        assert "no answer" in server["notes"][0]
    elif fault == "hangs":  # takes the connection, never answers
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        server = dict(tg_bot.open_server(server_url, chat["tokenizer"], 30), timeout=1.0,
                      url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    elif fault == "HTTP error":  # a real 4xx: the server is pinned to another model
        server = dict(tg_bot.open_server(server_url, chat["tokenizer"], 30), model="no-such-model")
    else:  # the real server fails inside a 200 stream: the prompt is longer than its model's 256 positions
        server = tg_bot.open_server(server_url, chat["tokenizer"], 30)
    bot = harness(server, flags=["--max-input-chars", "3000"])
    if fault == "error event":
        bot.chat_bot.settings = dict(bot.chat_bot.settings, budget=2000)  # this bot's folder allows more
    started = time.monotonic()
    api.push_text(44, "слово " * 400 if fault == "error event" else tiny_model.PARROT_QUESTION)
    assert api.wait_for_messages(44, 1, timeout=WAIT)[0]["text"] == tg_bot.APOLOGY_TEXT
    if fault == "hangs":
        assert time.monotonic() - started < 15  # --server-timeout, not forever
        listener.close()
    assert any("no reply from the inference server" in record.getMessage() for record in caplog.records)
    # the bot is still there: once the server answers, so does the bot
    if fault == "down":  # it comes up where the bot looks for it
        server.update(url=server_url)
    else:
        bot.chat_bot.batcher.server = tg_bot.open_server(server_url, chat["tokenizer"], 30)
    bot.chat_bot.settings = local[1]
    api.push_text(44, tiny_model.PARROT_QUESTION)
    assert api.wait_for_messages(44, 2, timeout=WAIT)[1]["text"] == tiny_model.PARROT_ANSWER
    assert bot.chat_bot.batcher.server["model"] == str(model_dir)  # learnt once it answered


# --- the folder's chat template through the server's /v1/chat/completions
CONVERSATIONS = [
    [tiny_model.PARROT_QUESTION],
    ["Привет", "Здравствуй! Чем помочь?", tiny_model.PARROT_QUESTION],
    ["привет </s> Ответ: я сам\nотвечу", "Хорошо.", "Вопрос :  а   ты кто? <s>"],
    [f"Ну {number}" for number in range(21)],  # longer than the turn window (16), within 256 positions
]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["one", "three", "labels-and-specials", "window"])
def test_chat_completions_render_the_kits_prompt(turns, server_url, local, in_process):
    chat, settings = local
    settings = dict(settings, budget=10_000)  # the template cuts by turns only
    messages = [{"role": "user" if (len(turns) - 1 - number) % 2 == 0 else "assistant", "content": turn}
                for number, turn in enumerate(turns)]
    answer = requests.post(server_url + "/v1/chat/completions", timeout=WAIT, json={
        "messages": messages, "max_tokens": 20, "temperature": 0.0, "stop": sp.STOP_STRINGS}).json()
    prompt = sp.chat_prompt_ids(turns, settings, chat["tokenizer"])
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    # the same ids give the same greedy continuation (up to the server's max_tokens of 20)
    expected = sp.generate_ids(in_process, dict(settings, generation=dict(GREEDY, max_new_tokens=20)), [prompt])[0]
    assert answer["choices"][0]["message"]["content"] == in_process["tokenizer"].decode(expected,
                                                                                         skip_special_tokens=True)
