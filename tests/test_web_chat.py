"""The web chat (system_prompt.py --web, issue 21): a Gradio page over the console's chat.

The browser test starts the script on a tiny model and drives the page in Debian's headless
Chromium through /usr/bin/chromedriver (skipped where they are absent): a reply grows and ends,
/memory lists a fact of the first message, the memory panel shows it, and a second browser
sees none of it; its screenshot is reports/web_chat.png, which the README shows.

The in-process tests open the page in this process with a recording stand-in for the model and
talk to it through the page's own API (gradio_client, one client a browser session): the prompts
of a web conversation are the console's token ids for the same lines, with facts and without;
sessions do not see each other's words; prompts that meet at the model go as one batch, and past
--max-queue a session is told the bot is busy. The command-line tests check the one-line errors
and the warning of --host 0.0.0.0, and that SIGTERM closes the page cleanly.
"""
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import system_prompt
from tiny_model import CHAT_CONFIG, build_parrot_model, build_tiny_model
from web_page import Page, free_port, loaded

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "system_prompt.py"
SCREENSHOT = REPO / "reports" / "web_chat.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
START_TIMEOUT = 240   # seconds for the script to load torch, gradio and the model on a loaded machine
WAIT = 120            # seconds for the page to show what it must
FACT_LINE = "Меня зовут Маша, я живу в Казани."
LINES = ["Привет!", FACT_LINE, "Как дела?", "/memory", "/forget Казань", "Что нового?", "/reset", "/help",
         "Пока!", "/forget", "Ещё раз привет"]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GRADIO_ANALYTICS_ENABLED="False",
                OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def facts_model(tmp_path_factory):
    """The tiny model trained with the facts exchange (chat_config.json "facts": true)."""
    return build_tiny_model(tmp_path_factory.mktemp("web") / "tiny", chat_config=dict(CHAT_CONFIG, facts=True))


class Started:
    """system_prompt.py --web in a subprocess: its stderr lines, read in a thread, and its URL."""

    def __init__(self, *flags, cwd=None):
        self.lines, self.url = [], None
        self.seen = threading.Condition()
        self.process = subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            with self.seen:
                self.lines.append(line.rstrip("\n"))
                self.seen.notify_all()
        with self.seen:
            self.lines.append(None)  # the end of stderr
            self.seen.notify_all()

    def wait_for_start(self):
        with self.seen:
            self.seen.wait_for(lambda: None in self.lines or any("web chat on " in line for line in self.lines),
                               timeout=START_TIMEOUT)
        [start] = [line for line in self.lines if line and "web chat on " in line] or [None]
        assert start, "no start line:\n" + "\n".join(line for line in self.lines if line)
        self.url = start.split("web chat on ")[1].split()[0]
        return self

    def stop(self):
        """SIGTERM, as systemd or a container stops it: the exit code and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        with self.seen:
            self.seen.wait_for(lambda: None in self.lines, timeout=10)
        return code, [line for line in self.lines if line is not None]


# ---- the page in a real browser --------------------------------------------------------------------
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--lang=ru"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# Records every text the newest bot message shows, as the page updates it.
RECORD_BOT_TEXTS = """
window.botTexts = [];
const note = () => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText.trim();
    if (window.botTexts[window.botTexts.length - 1] !== text) window.botTexts.push(text);
};
new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def bot_texts(driver):
    from selenium.webdriver.common.by import By

    return [element.text.strip() for element in driver.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')]


def send(driver, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, 'textarea[data-testid="textbox"]')
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def idle(driver):
    """The reply is complete: the page offers the send button again, not the stop button."""
    from selenium.webdriver.common.by import By

    return bool(driver.find_elements(By.CSS_SELECTOR, '[data-testid="submit-button"]')) and not \
        driver.find_elements(By.CSS_SELECTOR, '[data-testid="stop-button"]')


def memory_panel(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#memory-panel textarea").get_attribute("value")


@pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                    reason=f"the browser test needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER})")
def test_the_page_in_a_browser_streams_remembers_and_keeps_sessions_apart(tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    folder = build_parrot_model(tmp_path / "parrot", chat_config=dict(CHAT_CONFIG, facts=True))
    page = Started("--model", str(folder), "--device", "cpu", "--web", "--port", str(free_port()),
                   "--max-new-tokens", "40", "--threads", "1", "--quantize", "none").wait_for_start()
    first = second = None
    try:
        assert page.url.startswith("http://127.0.0.1:"), page.lines
        assert not [line for line in page.lines if line and "warning: --host" in line]
        first = browser()
        first.get(page.url)
        waiting = WebDriverWait(first, WAIT)
        waiting.until(lambda d: d.find_elements("css selector", 'textarea[data-testid="textbox"]'))
        assert "Чат с моделью parrot" in first.page_source and "Я дружелюбный помощник" in first.page_source
        first.execute_script(RECORD_BOT_TEXTS)
        send(first, FACT_LINE + " Привет! Как дела?")
        waiting.until(lambda d: bot_texts(d) and idle(d))
        reply = bot_texts(first)[-1]
        grew = [text for text in first.execute_script("return window.botTexts;") if text]
        assert reply, "an empty reply"
        # The reply was shown as it was written: more than one text, each a start of the next,
        # the last the reply itself.
        print("the reply as the page showed it:", grew)
        assert len(grew) >= 2 and grew[-1] == reply, grew
        assert all(reply.startswith(text) for text in grew), grew
        waiting.until(lambda d: "Маша" in memory_panel(d))
        send(first, "/memory")
        waiting.until(lambda d: len(bot_texts(d)) == 2 and idle(d))
        assert "имя: Маша" in bot_texts(first)[-1] and "город: Казань" in bot_texts(first)[-1]
        SCREENSHOT.parent.mkdir(exist_ok=True)
        first.execute_script("window.scrollTo(0, 0);")
        first.save_screenshot(str(SCREENSHOT))

        second = browser()  # another person: a browser of its own
        second.get(page.url)
        WebDriverWait(second, WAIT).until(lambda d: d.find_elements("css selector", "#memory-panel textarea"))
        assert bot_texts(second) == []
        assert "Маша" not in memory_panel(second)
        send(second, "/memory")
        WebDriverWait(second, WAIT).until(lambda d: bot_texts(d) and idle(d))
        assert bot_texts(second) == [system_prompt.NO_FACTS_ANSWER]
        assert "Маша" not in second.page_source and FACT_LINE not in second.page_source
    finally:
        for driver in (first, second):
            if driver is not None:
                driver.quit()
        code, lines = page.stop()
    assert code == 0, lines
    assert "system_prompt.py: web chat stopped cleanly" in lines, lines
    assert not [line for line in lines if "Traceback" in line], lines
    assert SCREENSHOT.stat().st_size > 10_000


# ---- the page's API in this process, a recording model behind it ----------------------------------
class Recorder:
    """The model's stand-in: records each batch of prompts, answers each with a numbered reply that
    it streams in two pieces; `gate` (an Event), while unset, holds the first batch."""

    def __init__(self, gate=None):
        self.batches, self.gate = [], gate
        self.held = threading.Event()  # the first batch is being held

    def __call__(self, prompts, on_text=None):
        if self.gate is not None and not self.batches:
            self.batches.append(list(prompts))
            self.held.set()
            self.gate.wait(WAIT)
        else:
            self.batches.append(list(prompts))
        replies = []
        for i, callback in enumerate(on_text or [None] * len(prompts)):
            reply = f"Ответ номер {sum(map(len, self.batches)) - len(prompts) + i + 1}."
            if callback is not None:
                callback(reply[:5])
            replies.append(reply)
        return replies

    def prompts(self):
        return [prompt for batch in self.batches for prompt in batch]


def say(client, line):
    """What the page answers a line: (reply, memory panel)."""
    return client.predict(line, api_name="/chat")


def console_prompts(args, chat, settings, lines, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(system_prompt, "generate_reply",
                        lambda chat, settings, prompt, on_text=None: recorder([prompt], [on_text])[0])
    session = system_prompt.ConsoleChat(chat, settings, out=io.StringIO(), memory=not args.no_memory)
    for line in lines:
        session.handle(line)
    return recorder.prompts()


@pytest.mark.parametrize("memory", [True, False], ids=["with-facts", "no-memory"])
def test_web_prompts_are_the_consoles_token_ids(facts_model, monkeypatch, memory):
    pytest.importorskip("gradio_client")
    args, chat, settings = loaded(facts_model, *([] if memory else ["--no-memory"]))
    recorder = Recorder()
    page = Page(args, chat, settings, recorder)
    try:
        client = page.client()
        answers = [say(client, line) for line in LINES]
    finally:
        page.close()
    web = recorder.prompts()
    assert web == console_prompts(args, chat, settings, LINES, monkeypatch)
    assert len(web) == sum(not line.startswith("/") for line in LINES)  # one prompt a line for the model
    decoded = [chat["tokenizer"].decode(prompt) for prompt in web]
    assert all(line in text for line, text in zip([line for line in LINES if not line.startswith("/")], decoded))
    assert "Ответ номер 1." in decoded[1]  # the conversation is in the prompt, the web reply kept
    memory_answer = answers[LINES.index("/memory")]
    if memory:
        assert "Маша" in decoded[2] and system_prompt.FACTS_QUESTION in decoded[2]  # the facts exchange
        assert memory_answer == ("имя: Маша\nгород: Казань",) * 2  # the reply and the panel
        assert answers[LINES.index("/forget Казань")][1] == "имя: Маша"
        assert "Казан" not in decoded[3]  # /forget took the fact and the exchange that held it
        assert "Маша" not in decoded[-1] and answers[-1][1] == system_prompt.NO_FACTS_ANSWER
    else:
        assert not any("Маша" in text and system_prompt.FACTS_QUESTION in text for text in decoded)
        assert memory_answer == (system_prompt.MEMORY_OFF_REPLY,) * 2
    assert answers[LINES.index("/reset")][0] == system_prompt.RESET_NOTICE
    assert "Привет!" not in decoded[-1]  # /reset emptied the conversation


def test_sessions_do_not_see_each_other_and_meet_in_one_batch(facts_model):
    """Four browser sessions: each one's prompts hold its own words only; the three that write while
    the model is busy go as one batch; past --max-queue a fifth is told the bot is busy, and a message
    past --max-input-chars gets one line."""
    pytest.importorskip("gradio_client")
    args, chat, settings = loaded(facts_model, "--max-queue", "4", "--max-input-chars", "50")
    gate = threading.Event()
    recorder = Recorder(gate)
    page = Page(args, chat, settings, recorder)
    try:
        clients = [page.client() for _ in range(5)]
        first = clients[0].submit(FACT_LINE, api_name="/chat")
        assert recorder.held.wait(WAIT)
        others = [client.submit(f"Привет, я гость номер {i}.", api_name="/chat")
                  for i, client in enumerate(clients[1:4], 2)]
        batcher = page.chats.replies  # the first batch holds one prompt, the other three wait for the model
        with batcher.changed:
            assert batcher.changed.wait_for(lambda: len(batcher.pending) == 3, timeout=WAIT), recorder.batches
        assert say(clients[4], "Привет!") == (system_prompt.BUSY_TEXT, system_prompt.NO_FACTS_ANSWER)
        gate.set()
        results = [first.result(timeout=WAIT)] + [job.result(timeout=WAIT) for job in others]
        assert say(clients[4], "x" * 51)[0] == system_prompt.TOO_LONG_TEXT.format(limit=50)
        assert "\n" not in system_prompt.TOO_LONG_TEXT
        assert [len(batch) for batch in recorder.batches] == [1, 3]
        assert results[0][1] == "имя: Маша\nгород: Казань"
        assert all(result[1] == system_prompt.NO_FACTS_ANSWER for result in results[1:])
        guest = say(clients[2], "/memory")
        assert guest[0] == system_prompt.NO_FACTS_ANSWER
        say(clients[1], "А где я живу?")
        say(clients[0], "А как меня зовут?")
    finally:
        page.close()
    decoded = [chat["tokenizer"].decode(prompt) for prompt in recorder.prompts()]
    [masha] = [text for text in decoded if "А как меня зовут?" in text]
    [guest] = [text for text in decoded if "А где я живу?" in text]
    assert FACT_LINE in masha and "Маша" in masha
    assert "гость номер 2" in guest and "Маша" not in guest and "Казан" not in guest and "гость номер 3" not in guest


# ---- the command line -------------------------------------------------------------------------------
def test_bad_auth_is_one_line_before_the_model_loads(tmp_path):
    for auth in (":password", "user:", "user password", str(tmp_path)):  # a folder is no file of it either
        with pytest.raises(system_prompt.UserError, match="^--auth: must be user:password"):
            system_prompt.read_auth(auth)
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "none"), "--web", "--auth",
                           "user-password"],
                          env=env(), capture_output=True, text=True, timeout=START_TIMEOUT)
    assert done.returncode == 1
    # (the environment's own libraries may print their notes on import; the script's lines are its own)
    said = [line for line in done.stderr.splitlines() if line.startswith("system_prompt.py:")]
    assert said == ["system_prompt.py: error: --auth: must be user:password, or a file holding that one line"], \
        done.stderr
    assert "Traceback" not in done.stderr
    assert "password" not in done.stderr.replace("user:password", "")  # the value is not echoed


def test_auth_from_a_file_and_an_open_host_warning_then_sigterm_stops_cleanly(facts_model, tmp_path):
    auth = tmp_path / "web_auth"
    auth.write_text("guest:secret-words\n", encoding="utf-8")
    assert system_prompt.read_auth(str(auth)) == ("guest", "secret-words")
    assert system_prompt.read_auth("a:b:c") == ("a", "b:c")
    page = Started("--model", str(facts_model), "--device", "cpu", "--web", "--host", "0.0.0.0", "--port",
                   str(free_port()), "--threads", "1", "--quantize", "none").wait_for_start()
    code, lines = page.stop()
    warnings = [line for line in lines if line.startswith("system_prompt.py: warning: --host 0.0.0.0")]
    assert len(warnings) == 1 and "--auth" in warnings[0], lines
    assert code == 0 and "system_prompt.py: web chat stopped cleanly" in lines, lines
    assert not [line for line in lines if "Traceback" in line], lines
