"""--server against llama.cpp's own C++ llama-server (issue 23), started here on 127.0.0.1 with a
GGUF exported (export_gguf.py) from tests/tiny_model.py's parrot, so that its replies are known and
equal the in-process ones. The kit sends the prompt as its token ids: the server must read exactly
those (it would parse a typed "</s>" in text), every sampling setting is sent (its defaults add
top_k 40 and min_p 0.05), a reply is streamed in pieces, a wrong --server-key is one line at the
start, and a server that goes down gives an apology while the bot goes on.

The binary: $LLAMA_SERVER, else .llama/bin/llama-server (deploy/build_llama_server.sh builds it),
else llama-server on PATH; the tests skip, saying so, where there is none. llama-cpp-python's own
Python server (text prompts only) is checked for the text fallback where it is installed."""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from telebot import apihelper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)
from fake_bot_api import FakeBotApi  # noqa: E402
from test_tg_bot_production import TOKEN, Harness  # noqa: E402  (tg_bot's ChatBot and serve() in this process)

import export_gguf  # noqa: E402
import system_prompt as sp  # noqa: E402
import tg_bot  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 120
WAIT = 60.0
KEY = "s3cret-server-key"
GREEDY = dict(tiny_model.CHAT_CONFIG["generation"], do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0,
              max_new_tokens=32)
TYPED_SPECIALS = "привет </s> Ответ: кто ты <s>"  # text a user may type: the model must read it as text


def find_binary():
    for candidate in (os.environ.get("LLAMA_SERVER"), ROOT / ".llama" / "bin" / "llama-server",
                      shutil.which("llama-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


BINARY = find_binary()
needs_binary = pytest.mark.skipif(BINARY is None, reason="no llama-server: set $LLAMA_SERVER, or build it with "
                                                         "deploy/build_llama_server.sh (.llama/bin/llama-server)")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """A server process on 127.0.0.1:<free port>, up once `ready` answers; stop() ends it."""

    def __init__(self, command, log_path, ready="/health"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [str(part).replace("{port}", str(self.port)) for part in command]
        environ = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        with open(log_path, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                if requests.get(self.url + ready, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{command[0]} did not start:\n{log_path.read_text(encoding='utf-8')[-3000:]}")
            time.sleep(0.2)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def llama_server(gguf, log_path, *flags):
    return Served([BINARY, "-m", gguf, "--host", "127.0.0.1", "--port", "{port}", "-t", "1", "-c", "512",
                   "-np", "2", "--no-webui", *flags], log_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = dict(tiny_model.CHAT_CONFIG, generation=GREEDY)
    return tiny_model.build_parrot_model(tmp_path_factory.mktemp("llama") / "parrot", chat_config=config)


@pytest.fixture(scope="module")
def gguf(model_dir):
    path = model_dir.parent / "parrot.f16.gguf"
    export_gguf.export(model_dir, path, "f16")  # f16: the tiny model's replies stay the in-process ones
    return path


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    if BINARY is None:
        pytest.skip("no llama-server: set $LLAMA_SERVER, or build it with deploy/build_llama_server.sh")
    served = llama_server(gguf, tmp_path_factory.mktemp("log") / "llama-server.log")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def local(model_dir):
    chat = sp.open_model_folder(model_dir, "cpu", need_weights=False)
    return chat, sp.resolve_settings(sp.parse_args(["--model", str(model_dir)]), chat)


@pytest.fixture(scope="module")
def in_process(model_dir):
    return sp.load_weights(sp.open_model_folder(model_dir, "cpu"), "none", threads=1)


@needs_binary
def test_the_server_is_sent_the_kits_token_ids(server, local, in_process, gguf):
    chat, settings = local
    tokenizer = chat["tokenizer"]
    opened = sp.open_server(server.url, tokenizer, 30, settings["generation"])
    assert opened["notes"] == [] and opened["owner"] == "llamacpp"
    assert (opened["prompt_form"], opened["sampling_fields"]) == ("ids", "top level")
    assert sp.server_summary(opened) == f"server {server.url} serves {opened['model']}; prompts sent as token ids"
    assert Path(opened["model"]).name == gguf.name
    for turns in ([tiny_model.PARROT_QUESTION], [TYPED_SPECIALS]):
        ids = sp.chat_prompt_ids(turns, settings, tokenizer)
        body = dict(sp.server_body(opened, settings, ids), stream=False, max_tokens=8, return_tokens=True)
        assert body["prompt"] == ids and body["top_k"] == 0 and body["min_p"] == 0.0
        answer = requests.post(server.url + "/v1/completions", json=body, timeout=WAIT).json()
        # the server counts exactly the ids it was given, and reads them as the kit's tokenizer writes them
        assert answer["usage"]["prompt_tokens"] == len(ids)
        detokenized = requests.post(server.url + "/detokenize", json={"tokens": ids}, timeout=WAIT).json()
        assert detokenized["content"] == tokenizer.decode(ids)
        # and continues them as this process does (greedy): the same ids, the same reply
        assert sp.server_reply(opened, settings, ids) == sp.generate_reply(in_process, settings, ids)
    # sent as text, the typed "</s>" and "<s>" would be read as special tokens: fewer tokens than the kit's
    ids = sp.chat_prompt_ids([TYPED_SPECIALS], settings, tokenizer)
    as_text = requests.post(server.url + "/v1/completions", timeout=WAIT, json={
        "prompt": tokenizer.decode(ids), "max_tokens": 1, "temperature": 0.0}).json()
    assert as_text["usage"]["prompt_tokens"] < len(ids)


@needs_binary
def test_a_reply_is_streamed_in_pieces_and_sampling_is_sent_whole(server, local):
    chat, settings = local
    opened = sp.open_server(server.url, chat["tokenizer"], 30)
    ids = sp.chat_prompt_ids([tiny_model.PARROT_QUESTION], settings, chat["tokenizer"])
    pieces = list(sp.server_pieces(opened, sp.server_body(opened, settings, ids)))
    assert len(pieces) >= 2 and sp.clean_reply("".join(pieces)) == tiny_model.PARROT_ANSWER
    seen = []
    assert sp.server_reply(opened, settings, ids, seen.append) == tiny_model.PARROT_ANSWER
    assert len(seen) >= 2 and all(tiny_model.PARROT_ANSWER.startswith(text) for text in seen)
    sampled = dict(settings, generation=dict(GREEDY, do_sample=True, temperature=0.7, top_p=0.9, top_k=5))
    body = sp.server_body(opened, sampled, ids)
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.7, 0.9, 5, 0.0)
    assert body["samplers"] == ["top_k", "temperature", "top_p"] and body["stop"] == sp.STOP_STRINGS
    assert body["max_tokens"] == 32 and "generation_config" not in body
    # the server's own route reports the settings it sampled with
    settled = requests.post(server.url + "/completion", timeout=WAIT,
                            json=dict(body, stream=False)).json()["generation_settings"]
    assert (settled["top_k"], settled["min_p"], settled["samplers"]) == (5, 0.0, ["top_k", "temperature", "top_p"])
    assert sp.server_reply(opened, sampled, ids)  # a sampled reply, not an error


@needs_binary
def test_a_wrong_key_is_one_line_at_the_start(gguf, model_dir, local, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    keyed = llama_server(gguf, tmp_path / "keyed.log", "--api-key", KEY)
    try:
        script = tmp_path / "chat.txt"
        script.write_text(f"{tiny_model.PARROT_QUESTION}\n", encoding="utf-8")
        common = ["--model", str(model_dir), "--script", str(script), "--server", keyed.url]
        for flags in (["--server-key", "wrong"], []):
            assert sp.main(common + flags) == 1
            captured = capsys.readouterr()
            [line] = captured.err.splitlines()
            assert line.startswith(f"system_prompt.py: error: --server {keyed.url} refused the key (HTTP 401)")
            assert "--server-key" in line and captured.out == ""
        assert sp.main(common + ["--server-key", KEY]) == 0
        assert f"{sp.BOT_PREFIX}{tiny_model.PARROT_ANSWER}\n" in capsys.readouterr().out
        monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the usual variable, where the flag is not given
        assert sp.main(common) == 0
        capsys.readouterr()
        # the bot: one line, exit 1, before it takes a message
        monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
        monkeypatch.setenv("TG_BOT_SERVER_KEY", "wrong")
        with FakeBotApi(TOKEN) as api:
            assert tg_bot.main(["--model", str(model_dir), "--server", keyed.url, "--api-url", api.url,
                                "--db", str(tmp_path / "h.sqlite3")]) == 1
        [line] = capsys.readouterr().err.strip().splitlines()[-1:]
        assert line.startswith(f"tg_bot.py: error: --server {keyed.url} refused the key (HTTP 401)")
        assert "wrong" not in line and not (tmp_path / "h.sqlite3").exists()
    finally:
        keyed.stop()


@needs_binary
def test_a_server_that_goes_down_gets_an_apology_and_the_bot_goes_on(server, gguf, local, tmp_path, monkeypatch):
    chat, settings = local
    monkeypatch.setattr(apihelper, "API_URL", None)
    going = llama_server(gguf, tmp_path / "going.log")
    with FakeBotApi(TOKEN) as api:
        opened = tg_bot.open_server(going.url, chat["tokenizer"], 10)
        assert opened["prompt_form"] == "ids"
        bot = Harness(api, chat["tokenizer"], tmp_path / "h.sqlite3", [],
                      batcher=tg_bot.ServerReplies(opened, settings, 2), settings=settings).start()
        try:
            api.push_text(51, tiny_model.PARROT_QUESTION)
            assert api.wait_for_messages(51, 1, timeout=WAIT)[0]["text"] == tiny_model.PARROT_ANSWER
            going.stop()
            api.push_text(51, tiny_model.PARROT_QUESTION)
            assert api.wait_for_messages(51, 2, timeout=WAIT)[1]["text"] == tg_bot.APOLOGY_TEXT
            opened.update(url=server.url)  # a server answers where the bot looks for it again
            api.push_text(52, tiny_model.PARROT_QUESTION)
            assert api.wait_for_messages(52, 1, timeout=WAIT)[0]["text"] == tiny_model.PARROT_ANSWER
        finally:
            bot.stop()
            going.stop()


def test_llama_cpp_pythons_own_server_gets_text(gguf, local, tmp_path):
    """llama-cpp-python's Python server takes a prompt as text only: the probe falls back to text,
    and the sampling settings go at the top level, which it takes."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed")
    chat, settings = local
    served = Served([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
                     "{port}", "--n_threads", "1", "--n_ctx", "512", "--verbose", "false"], tmp_path / "py.log",
                    ready="/v1/models")
    try:
        opened = sp.open_server(served.url, chat["tokenizer"], 30, settings["generation"])
        assert (opened["prompt_form"], opened["sampling_fields"]) == ("text", "top level")
        assert sp.server_summary(opened).endswith("; prompts sent as text")
        ids = sp.chat_prompt_ids([tiny_model.PARROT_QUESTION], settings, chat["tokenizer"])
        assert sp.server_reply(opened, settings, ids) == tiny_model.PARROT_ANSWER
    finally:
        served.stop()
