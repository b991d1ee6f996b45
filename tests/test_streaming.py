"""Replies shown as they are written (issue 13): the hold-back rule that keeps every
visible text a start of the final reply, the streamer that hands each row of a batch its
own text without changing a token, the console printing a reply as it comes, and
tg_bot's LiveReply against the fake Bot API: drafts in private chats, send-then-edit in
groups and where drafts are refused, the pace, a 429 waited out, a long reply going on
in a second message; then the bot end to end with a real (tiny) model held in step with the bot."""
import io
import math
import random
import sys
import threading
from pathlib import Path

import pytest
import telebot
import torch
from telebot import apihelper
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)
from fake_bot_api import FakeBotApi  # noqa: E402
from test_tg_bot_production import Harness  # noqa: E402  (tg_bot's ChatBot and serve() in this process)

import system_prompt as sp  # noqa: E402
import tg_bot  # noqa: E402

torch.set_num_threads(1)
TOKEN = "987654:TEST-s3cret_token-value"  # the Harness's
PERSONA = tiny_model.CHAT_CONFIG["persona"]
PACE, GROUP_PACE = 0.3, 0.6  # tg_bot's pace for the tests, so that a stream of a second or two shows several updates
SLACK = 1e-6                 # seconds: float rounding only, the bot and the fake Bot API read one fake clock
WAIT = 30.0


# --- the hold-back rule
PIECES = ["Привет", "ну", " ", " ", "\n", "\t", "Вопрос", "вопрос", "ВОПРОС", "Ответ", "ответ", ":", " :", "_", "*",
          "**", "`", "#", "# ", ">", "[", "]", "(", ")", "https://", "www.", "t.me/", "example.com/a", "<b>", "</b>",
          "<", "&amp;", "&", ";", "x", ".", ",", "ё", "!", "\ufffd", "1"]
TRICKY = ["Привет, всё хорошо.\nВопрос: а ты?", "Мой ответ: да.\nОтвет: нет", "[тут и там](https://example.com/a b) ок",
          "Да &amp; нет <b>жирно</b> конец", "Ответ: Ответ: эхо и всё", "Смотри www.spam.ru и t.me/x тоже",
          "**Да**, `код` и ~~нет~~ ну", "Хороший вопрос: погода\n  вопрос  : дальше", "Раз\n> цитата\n# Заголовок два"]


def test_every_visible_text_is_a_start_of_the_final_reply():
    rng = random.Random(13)
    raws = TRICKY + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30))) for _ in range(1500)]
    for raw in raws:
        final = sp.clean_reply(raw)
        shown = ""
        for end in range(len(raw) + 1):  # every token boundary there could be, one character at a time
            text = sp.visible_reply(raw[:end])
            assert final.startswith(text), (raw, raw[:end], text, final)
            assert text.startswith(shown) or text == "", (raw[:end], shown, text)  # nothing is taken back
            shown = text or shown
    assert [sp.visible_reply(TRICKY[0][:end]) for end in (9, 20, 26, len(TRICKY[0]))] == \
        ["Привет,", "Привет, всё хорошо.", "Привет, всё хорошо.", "Привет, всё хорошо."]


# --- the streamer: each row its own text, no token changed
@pytest.fixture(scope="module")
def parrot(tmp_path_factory):
    folder = tiny_model.build_parrot_model(tmp_path_factory.mktemp("parrot") / "model")
    return sp.load_weights(sp.open_model_folder(folder, "cpu"), "none", threads=1)


def settings_for(persona=PERSONA, **generation):
    return {"generation": dict(tiny_model.CHAT_CONFIG["generation"], **generation), "persona": persona,
            "facts": None, "max_turns": 16, "budget": 192}


def test_the_streamer_gives_each_row_its_own_text_and_changes_no_token(parrot):
    # Sampled hot, the parrot wanders off what it learnt (another seed, another reply): a draw
    # the streamer took or a token it changed would show as a different reply for the same seed.
    settings = settings_for(max_new_tokens=24, temperature=1.5, top_p=1.0, top_k=0, no_repeat_ngram_size=0,
                            repetition_penalty=1.0)
    histories = [["Привет! Как дела?"], ["Какая завтра погода?", "Обещают дождь.", "А послезавтра?"], ["Ну?"]]
    prompts = [sp.chat_prompt_ids(history, settings, parrot["tokenizer"]) for history in histories]
    set_seed(7)
    plain = sp.generate_ids(parrot, settings, prompts)
    seen = [[], [], []]
    set_seed(7)
    streamed = sp.generate_ids(parrot, settings, prompts, [seen[0].append, seen[1].append, None])
    assert streamed == plain
    assert seen[2] == []  # nobody watches that row
    for row in (0, 1):
        final = sp.decode_reply(parrot["tokenizer"], plain[row])
        assert seen[row], row
        assert all(final.startswith(text) for text in seen[row]), (row, seen[row], final)
        assert all(len(a) < len(b) and b.startswith(a) for a, b in zip(seen[row], seen[row][1:])), seen[row]
    assert seen[0] != seen[1]


def test_the_label_the_model_goes_on_to_write_is_never_shown(parrot):
    settings = settings_for(do_sample=False)
    prompt = sp.chat_prompt_ids([tiny_model.PARROT_QUESTION], settings, parrot["tokenizer"])
    raw = parrot["tokenizer"].decode(sp.generate_ids(parrot, settings, [prompt])[0])
    assert raw.endswith("\nВопрос:")  # the parrot writes the next question itself; the stop string ends it
    seen = []
    assert sp.generate_reply(parrot, settings, prompt, seen.append) == tiny_model.PARROT_ANSWER
    assert len(seen) > 2 and seen[-1] == tiny_model.PARROT_ANSWER
    assert not any("Вопрос" in text or "\n" in text for text in seen)


class Writes(io.StringIO):
    """An output that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_the_console_prints_a_reply_as_it_is_written(parrot):
    settings = settings_for(do_sample=False)
    streamed, whole = Writes(), Writes()
    sp.ConsoleChat(parrot, settings, out=streamed).handle(tiny_model.PARROT_QUESTION)
    sp.ConsoleChat(parrot, settings, out=whole, stream=False).handle(tiny_model.PARROT_QUESTION)
    assert streamed.getvalue() == whole.getvalue() == sp.BOT_PREFIX + tiny_model.PARROT_ANSWER + "\n"
    pieces = [text for text in streamed.writes if text.strip()]
    assert len(pieces) > 3 and pieces[0] == sp.BOT_PREFIX  # the reply came in pieces, each printed once
    assert "".join(pieces[1:]) == tiny_model.PARROT_ANSWER


def test_the_no_stream_flag_prints_the_same_transcript(parrot, tmp_path, capsys):
    script = tmp_path / "chat.txt"
    script.write_text(f"{tiny_model.PARROT_QUESTION}\nЧто ещё?\n", encoding="utf-8")
    folder = str(parrot["weights"])
    transcripts = []
    for flags in ([], ["--no-stream"]):
        assert sp.main(["--model", folder, "--script", str(script), "--threads", "1", "--quantize", "none",
                        "--temperature", "0.7", *flags]) == 0
        transcripts.append(capsys.readouterr().out)
    assert transcripts[0] == transcripts[1]
    assert f"{sp.BOT_PREFIX}{tiny_model.PARROT_ANSWER}\n" in transcripts[0]


# --- LiveReply against the fake Bot API
@pytest.fixture
def api(request):
    with FakeBotApi(TOKEN, drafts=getattr(request, "param", True)) as api:
        yield api


class FakeClock:
    """Time that moves only when the test moves it, or when the bot pauses (a 429, the pace):
    the pace is then the same on a busy machine as on an idle one."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
        return False  # as stopping.wait answers when the bot is not stopping


@pytest.fixture
def bot(api, monkeypatch):
    monkeypatch.setattr(apihelper, "API_URL", tg_bot.api_url_template(api.url))
    monkeypatch.setattr(tg_bot, "STREAM_EVERY_SECONDS", PACE)
    monkeypatch.setattr(tg_bot, "GROUP_STREAM_EVERY_SECONDS", GROUP_PACE)
    bot = telebot.TeleBot(TOKEN, threaded=False)
    bot.fake_clock = api.clock = FakeClock()  # the fake Bot API times its calls by it too
    return bot


def words(count, length=5):
    return " ".join(f"с{i:0{length - 1}d}" for i in range(count))


def stream(bot, chat_id, final, steps, step, group=False, reply_to=None, drafts=True):
    """LiveReply showing a reply written in `steps` growing texts, one every `step` seconds of
    the fake clock (each a start of `final`, cut at a space), then `final`; (live, start time).
    Each text is offered as follow() offers it, when due() says the pace allows it."""
    clock = bot.fake_clock
    cuts = [final.rfind(" ", 0, len(final) * (number + 1) // (steps + 1)) for number in range(steps)]
    live = tg_bot.LiveReply(bot, chat_id, group, reply_to, threading.Event(), drafts, clock=clock,
                            pause=clock.advance)
    started = clock()
    for cut in cuts:
        clock.advance(step)
        if cut > 0 and live.due(final[:cut]):
            live.show(final[:cut])
    clock.advance(step)
    live.finish(final)
    return live, started


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def test_a_private_reply_grows_in_a_draft_at_the_pace_then_is_sent(api, bot):
    final = words(60)
    _, started = stream(bot, 1, final, steps=30, step=0.05)  # written over about 1.5 s
    shown = api.visible(1)
    drafts = [(text, at, draft) for method, text, at, draft in shown if method == "sendMessageDraft"]
    assert [method for method, *_ in shown] == ["sendMessageDraft"] * len(drafts) + ["sendMessage"]
    assert shown[-1][1] == final and [m["text"] for m in api.messages_to(1)] == [final]
    assert 2 <= len(drafts) <= math.ceil((shown[-1][2] - started) / PACE)  # no more than the pace allows
    assert all(final.startswith(text) for text, *_ in drafts)
    assert all(len(a) < len(b) for a, b in zip([d[0] for d in drafts], [d[0] for d in drafts][1:]))
    assert len({draft for *_, draft in drafts}) == 1  # one bubble, animated
    times = [started] + [at for _, at, _ in drafts]
    assert min(gaps(times)) >= PACE - SLACK  # the first one too: a reply quicker than the pace is just sent


def test_a_reply_written_faster_than_the_pace_is_just_sent(api, bot, monkeypatch):
    monkeypatch.setattr(tg_bot, "STREAM_EVERY_SECONDS", 2.0)  # far beyond the 0.055 s it takes
    final = words(20)
    stream(bot, 2, final, steps=10, step=0.005)
    assert [(method, text) for method, text, *_ in api.visible(2)] == [("sendMessage", final)]


def test_a_429_is_waited_out_and_slows_the_pace(api, bot):
    final = words(60)
    api.fail_next("sendMessageDraft", 429, "Too Many Requests: retry after 1", retry_after=1)
    stream(bot, 3, final, steps=40, step=0.07)  # written over about 2.9 s
    drafts = [r for r in api.requests if r["method"] == "sendMessageDraft" and r["chat_id"] == 3]
    assert drafts[0]["status"] == 429 and all(r["status"] == 200 for r in drafts[1:]) and len(drafts) >= 3
    assert drafts[1]["time"] - drafts[0]["time"] >= 1.0 - SLACK  # retry_after honoured
    assert min(gaps([r["time"] for r in drafts[1:]])) >= 2 * PACE - SLACK  # and the pace halved
    assert api.messages_to(3)[-1]["text"] == final


@pytest.mark.parametrize("api", [False], indirect=True)
def test_where_the_server_has_no_drafts_the_reply_is_sent_then_edited(api, bot):
    final = words(60)
    live, started = stream(bot, 4, final, steps=30, step=0.05)
    assert live.drafts_refused
    shown = api.visible(4)
    assert [method for method, *_ in shown] == ["sendMessage"] + ["editMessageText"] * (len(shown) - 1)
    assert len(shown) >= 3 and len({message for *_, message in shown}) == 1
    assert all(final.startswith(text) for _, text, *_ in shown) and shown[-1][1] == final
    assert [m["text"] for m in api.messages_to(4)] == [final]
    assert all(r["status"] == 200 for r in api.requests if r["method"] == "editMessageText")  # never "not modified"
    assert min(gaps([at for _, _, at, _ in shown])) >= PACE - SLACK


def test_a_chat_that_refuses_a_draft_gets_edits(api, bot):
    api.chats[5] = {"id": 5, "type": "supergroup", "title": "g"}  # Telegram takes drafts in private chats only
    final = words(40)
    live, _ = stream(bot, 5, final, steps=20, step=0.05)
    assert not live.drafts_refused  # a 400 says nothing about other chats
    statuses = [(r["method"], r["status"]) for r in api.requests if r["chat_id"] == 5]
    assert statuses[0] == ("sendMessageDraft", 400) and ("sendMessage", 200) in statuses
    assert ("editMessageText", 200) in statuses  # it went on growing, by edits
    assert [m["text"] for m in api.messages_to(5)] == [final]


def test_in_a_group_the_reply_answers_the_message_and_is_edited_at_the_group_pace(api, bot):
    api.chats[-6] = {"id": -6, "type": "supergroup", "title": "g"}
    final = words(60)
    _, started = stream(bot, -6, final, steps=30, step=0.07, group=True, reply_to=77)  # about 2.2 s
    shown = api.visible(-6)
    assert [method for method, *_ in shown] == ["sendMessage"] + ["editMessageText"] * (len(shown) - 1)
    assert 2 <= len(shown) <= math.ceil((shown[-1][2] - started) / GROUP_PACE)
    assert not any(r["method"] == "sendMessageDraft" for r in api.requests)
    assert api.messages_to(-6)[0]["reply_to"] == 77 and api.messages_to(-6)[0]["text"] == final
    assert min(gaps([at for _, _, at, _ in shown])) >= GROUP_PACE - SLACK


@pytest.mark.parametrize("group", [False, True])
def test_a_reply_over_4096_characters_goes_on_in_a_second_message(api, bot, group):
    chat_id = -7 if group else 7
    if group:
        api.chats[chat_id] = {"id": chat_id, "type": "group", "title": "g"}
    final = words(1200)  # 7199 characters
    stream(bot, chat_id, final, steps=24, step=0.06, group=group, reply_to=1 if group else None)
    parts = telebot.util.smart_split(final, 4096)
    assert len(parts) == 2 and [m["text"] for m in api.messages_to(chat_id)] == parts
    assert all(len(text) <= 4096 for _, text, *_ in api.visible(chat_id))
    shown = [(method, text, place) for method, text, _, place in api.visible(chat_id)]
    first, second = [m["message_id"] for m in api.messages_to(chat_id)]
    if group:  # the first message edited until it is full, then the second
        assert all(parts[0].startswith(text) for method, text, place in shown if place == first)
        assert all(parts[1].startswith(text) for method, text, place in shown if place == second)
        assert [place for *_, place in shown] == sorted(place for *_, place in shown)
    else:  # the first part sent once it is full, the draft going on with the second (a new bubble)
        drafts = [(text, place) for method, text, place in shown if method == "sendMessageDraft"]
        sent_at = [method for method, *_ in shown].index("sendMessage")
        assert len({place for _, place in drafts}) == 2 and sent_at < len(shown) - 1
        assert all(parts[0].startswith(text) for text, _ in drafts[:sent_at])
        assert all(parts[1].startswith(text) for method, text, _ in shown[sent_at + 1:])


# --- the bot end to end: a real model, held in step with the bot so that the stream shows
class InStep:
    """A logits processor that holds the model in step with the bot, a handshake and not a pace:
    before each token it waits until the bot has shown, as a draft in its chat, the last visible
    text each reply was given so far. Every visible text is then its own draft however busy the
    machine is. A bot that does not stream never shows one: the first wait runs out, the model
    goes on unheld, and the test finds no drafts."""

    def __init__(self, api):
        self.api, self.chats, self.last, self.holding = api, {}, {}, True
        self.lock = threading.Lock()

    def expect(self, chat_id, prompt):
        self.chats[tuple(prompt)] = chat_id

    def shown(self, request, text):
        with self.lock:
            self.last[self.chats.get(tuple(request.prompt))] = text

    def drafted(self):
        with self.lock:
            last = list(self.last.items())
        return all(any(d["text"] == text and chat_id in (None, d["chat_id"]) for d in self.api.drafts)
                   for chat_id, text in last)

    def __call__(self, input_ids, scores):
        if self.holding:
            try:
                self.api.wait_for(self.drafted, timeout=5.0)
            except AssertionError:
                self.holding = False
        return scores


def run_bot(api, chat, settings, db, flags, questions, max_wait=0.0, step=None):
    """The bot in this process, its model `chat` held in step with it (InStep), answering
    `questions` (chat id -> text, queued before it starts, so that one getUpdates takes them
    all); the replies, and the sizes of the batches the model ran."""
    sizes = []
    generate = tg_bot.model_thread_generate(chat, settings)

    def counted(prompts, on_text=None):
        sizes.append(len(prompts))
        return generate(prompts, on_text)

    for chat_id, question in questions.items():
        if step is not None:
            step.expect(chat_id, sp.chat_prompt_ids([question], settings, chat["tokenizer"]))
        api.push_text(chat_id, question)
    bot = Harness(api, chat["tokenizer"], db, flags, batcher=tg_bot.ReplyBatcher(counted, 4, max_wait),
                  settings=settings).start()
    try:
        return {chat_id: api.wait_for_messages(chat_id, 1, timeout=WAIT)[0]["text"] for chat_id in questions}, sizes
    finally:
        bot.stop()


@pytest.fixture
def in_step(api, monkeypatch):
    """The model held in step with the bot (InStep), which shows a text as soon as it is visible."""
    monkeypatch.setattr(apihelper, "API_URL", None)
    monkeypatch.setattr(tg_bot, "STREAM_EVERY_SECONDS", 0.0)
    step, show = InStep(api), tg_bot.ReplyRequest.show

    def recorded(request, text):
        step.shown(request, text)
        show(request, text)

    monkeypatch.setattr(tg_bot.ReplyRequest, "show", recorded)
    processors = tg_bot.reply_processors
    monkeypatch.setattr(tg_bot, "reply_processors", lambda *args: processors(*args) + [step])
    return step


def test_a_streamed_reply_ends_as_the_reply_sent_whole_for_the_same_seed(parrot, api, tmp_path, in_step):
    settings = settings_for(temperature=1.3, max_new_tokens=24)  # hot: another seed, another reply
    finals = []
    for run, flags in enumerate((["--no-stream"], [])):
        set_seed(42)
        replies, _ = run_bot(api, parrot, settings, tmp_path / f"h{run}.sqlite3", flags, {21 + run: "Привет!"},
                             step=in_step)
        finals.append(replies[21 + run])
    assert finals[0] == finals[1]
    assert [method for method, *_ in api.visible(21)] == ["sendMessage"]
    drafts = [text for method, text, *_ in api.visible(22) if method == "sendMessageDraft"]
    assert drafts and all(finals[1].startswith(text) for text in drafts), (drafts, finals[1])


def test_the_bot_streams_each_row_of_a_batch_to_its_own_chat(parrot, api, tmp_path, in_step):
    settings = settings_for(do_sample=False)
    questions = {31: tiny_model.PARROT_QUESTION, 32: "Какая завтра погода?"}
    replies, sizes = run_bot(api, parrot, settings, tmp_path / "h.sqlite3", [], questions, max_wait=WAIT,
                             step=in_step)  # it waits only for a message announced as on its way
    assert sizes == [2]
    assert replies[31] == tiny_model.PARROT_ANSWER and replies[32] != replies[31]
    for chat_id, question in questions.items():
        prompt = sp.chat_prompt_ids([question], settings, parrot["tokenizer"])
        assert replies[chat_id] == sp.generate_reply(parrot, settings, prompt)  # what it says alone, unstreamed
        drafts = [text for method, text, *_ in api.visible(chat_id) if method == "sendMessageDraft"]
        assert drafts and all(replies[chat_id].startswith(text) for text in drafts), (chat_id, drafts)
        assert not any("Вопрос" in text for _, text, *_ in api.visible(chat_id))
