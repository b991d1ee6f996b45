"""The web chat's 👍/👎 (system_prompt.py --web --db): a press writes the reply's row of the bot's
ratings table (blocks/ratings.py), the row tg_bot.py writes and create_dataset.py --feedback reads.

The page is built by the script's own build_page and served in this process, a recording stand-in
for the model behind it; each browser session is a gradio_client Client, and a press is the like
event the page's chat sends (POST .../run/rate with the event's data, in the client's session). The
rows must hold the very token ids the model was given (the console's for the same lines), the
model's folder name and weights hash, the label of the last press; /memory counts them, /forget
deletes that session's rows and no other's, and create_dataset.py --feedback exports them.
"""
import io
import json
import os
import sqlite3
import stat
import threading

import pytest
import requests

import system_prompt
from tiny_model import CHAT_CONFIG, build_tiny_model
from web_page import Page, loaded

FACT_LINE = "Меня зовут Маша, я живу в Казани."
LINES = ["/help", FACT_LINE, "Как дела?"]   # the page's indices: 0-1 the command, 2-3 and 4-5 the model's


@pytest.fixture(scope="module")
def facts_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("ratings") / "tiny", chat_config=dict(CHAT_CONFIG, facts=True))


class Recorder:
    """The model's stand-in: records each prompt, answers with a numbered reply."""

    def __init__(self):
        self.prompts, self.lock = [], threading.Lock()

    def __call__(self, prompts, on_text=None):
        with self.lock:
            start = len(self.prompts)
            self.prompts += [list(prompt) for prompt in prompts]
        return [f"Ответ номер {start + i + 1}." for i in range(len(prompts))]


def say(client, line):
    return client.predict(line, api_name="/chat")[0]


def press(page, client, index, reply, liked):
    """The like event as the page's chat sends it: the message's index, its contents, and True (👍),
    False (👎) or "" (the pressed thumb again)."""
    answer = requests.post(page.url.rstrip("/") + "/gradio_api/run/rate", timeout=60, json={
        "data": [], "session_hash": client.session_hash,
        "event_data": {"index": index, "value": [{"type": "text", "text": reply}], "liked": liked}})
    assert answer.status_code == 200, answer.text


def rows(path):
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM ratings ORDER BY id")]


def console_prompts(args, chat, settings, lines, monkeypatch):
    """The token ids the console gives the model for the same lines."""
    recorder = Recorder()
    monkeypatch.setattr(system_prompt, "generate_reply",
                        lambda chat, settings, prompt, on_text=None: recorder([prompt])[0])
    session = system_prompt.ConsoleChat(chat, settings, out=io.StringIO(), memory=not args.no_memory)
    for line in lines:
        session.handle(line)
    return recorder.prompts


def test_presses_write_the_bots_rating_rows_and_forget_deletes_them(facts_model, tmp_path, monkeypatch):
    pytest.importorskip("gradio_client")
    db = tmp_path / "web.sqlite3"
    args, chat, settings = loaded(facts_model, "--db", str(db))
    recorder = Recorder()
    page = Page(args, chat, settings, recorder)
    try:
        assert len(page.like_listeners()) == 1  # the buttons show where a like listener is
        masha, guest = page.client(), page.client()
        answers = [say(masha, line) for line in LINES]
        assert answers[1:] == ["Ответ номер 1.", "Ответ номер 2."]
        assert say(guest, "Привет!") == "Ответ номер 3."
        assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
        assert rows(db) == []  # nothing is kept of a reply nobody rated

        press(page, masha, 3, answers[1], True)
        press(page, masha, 5, answers[2], False)
        press(page, masha, 1, answers[0], True)   # the command's answer: not the model's, no row
        press(page, guest, 1, "Ответ номер 3.", False)
        first = rows(db)
        assert [(row["reply"], row["label"]) for row in first] == [
            ("Ответ номер 1.", system_prompt.LIKED), ("Ответ номер 2.", system_prompt.DISLIKED),
            ("Ответ номер 3.", system_prompt.DISLIKED)]
        press(page, masha, 3, answers[1], False)  # a second press changes the label, in the same row
        press(page, masha, 5, answers[2], "")     # taking the press back deletes the row...
        assert [(row["id"], row["label"]) for row in rows(db)] == [(first[0]["id"], system_prompt.DISLIKED),
                                                                  (first[2]["id"], system_prompt.DISLIKED)]
        press(page, masha, 5, answers[2], True)   # ...and a new press writes it again
        kept = rows(db)
        assert [(row["reply"], row["label"]) for row in kept] == [
            ("Ответ номер 1.", system_prompt.DISLIKED), ("Ответ номер 3.", system_prompt.DISLIKED),
            ("Ответ номер 2.", system_prompt.LIKED)]

        # The rows hold what the model was given: the console's token ids for the same lines.
        console = console_prompts(args, chat, settings, LINES, monkeypatch)
        mine = [row for row in kept if row["reply"] != "Ответ номер 3."]
        assert sorted(json.loads(row["prompt_ids"]) for row in mine) == sorted(console)
        assert [json.loads(row["prompt_ids"]) for row in kept] == [recorder.prompts[0], recorder.prompts[2],
                                                                   recorder.prompts[1]]
        tokenizer = chat["tokenizer"]
        for row in kept:
            ids = json.loads(row["prompt_ids"])
            assert row["prompt"] == tokenizer.decode(ids) and row["prompt_tokens"] == len(ids)
            assert row["model"] == facts_model.name
            assert row["model_hash"] == system_prompt.model_fingerprint(facts_model)
            assert row["created"] <= row["rated"] and row["replaces"] is None and row["message_id"] is None
        assert FACT_LINE in mine[0]["prompt"] and system_prompt.FACTS_QUESTION in mine[1]["prompt"]
        # A session is one person's chat: stable negative ids of its own, far from Telegram's.
        ids = {(row["chat_id"], row["user_id"]) for row in kept}
        masha_id = system_prompt.WebRatings.chat_id(masha.session_hash)
        assert (masha_id, masha_id) in ids and len(ids) == 2 and all(c < -(1 << 62) for c, _ in ids)

        memory = say(masha, "/memory")
        assert memory.endswith("\n\n" + system_prompt.RATINGS_KEPT_TEXT.format(count=2)) and "Маша" in memory

        import create_dataset

        if hasattr(create_dataset, "export_feedback"):  # create_dataset.py --feedback reads the rows
            import pyarrow.parquet as pq

            counts, _ = create_dataset.export_feedback(str(db), str(tmp_path / "feedback"), model="any")
            assert sum(c["liked"] + c["disliked"] for c in counts.values()) == 3
            exported = [row for split in ("train", "val")
                        for row in pq.read_table(tmp_path / "feedback" / f"feedback_{split}.parquet").to_pylist()]
            assert sorted(row["prompt_ids"] for row in exported) == sorted(recorder.prompts)
            assert {row["label"] for row in exported} == {True, False}

        forgot = say(masha, "/forget")
        assert forgot.endswith("\n" + system_prompt.RATINGS_FORGOTTEN_TEXT)
        assert [row["reply"] for row in rows(db)] == ["Ответ номер 3."]  # the guest's row stays
        press(page, masha, 3, answers[1], True)  # a reply forgotten: its press writes nothing
        assert [row["reply"] for row in rows(db)] == ["Ответ номер 3."]
        assert say(masha, "/memory") == system_prompt.NO_FACTS_ANSWER
    finally:
        page.close()


def test_no_db_no_buttons_and_db_mistakes_are_one_line(facts_model, tmp_path):
    args, chat, settings = loaded(facts_model)
    page = Page(args, chat, settings, Recorder())
    try:
        assert page.like_listeners() == []
    finally:
        page.close()
    with pytest.raises(system_prompt.UserError, match="^--db: .*add --web"):
        system_prompt.check_args(system_prompt.parse_args(["--model", str(facts_model), "--db", str(tmp_path / "x")]))
    with pytest.raises(system_prompt.UserError, match="is a folder"):
        loaded(facts_model, "--db", str(tmp_path))
    assert not (tmp_path / "x").exists()
