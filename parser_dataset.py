"""Stage 1: collect dialogues from any source into one parquet file.

Reads dialogues from
  * a data set on the model hub, by name (e.g. Den4ikAI/russian_dialogues):
    its parquet / JSONL / CSV files (plain or gzipped) are downloaded with
    huggingface_hub;
  * a local parquet, CSV, TSV, JSONL or JSON file with a list-of-turns column
    (`sample`, `dialogue`, `turns`, ...; a list of strings, or of chat
    messages {"role": ..., "content": ...}, where a system message is not a
    turn) or question/answer columns;
  * a text file with one turn a line starting with "- " and dialogues
    separated by blank lines (plain, .xz, .gz or .bz2);
  * a Telegram Desktop chat export (result.json), one chat or the whole account;
  * the public Russian dialogue sets people fine-tune on, by their hub name
    or detected by their columns (--preset names one when detection is not
    enough):
      russian_dialogues      Den4ikAI/russian_dialogues: question, answer,
                             relevance; only relevance 1 is kept (the 0 rows
                             are generated negatives)
      russian_dialogues_2    Den4ikAI/russian_dialogues_2: sample
      siberian_persona_chat  SiberiaSoft/SiberianPersonaChat(-2): input (a
                             persona, then "Собеседник:"/"Ты:"/"Я:" turns), output
      toloka_persona_chat    Toloka Persona Chat Rus (dialogues.tsv): two
                             persona profiles and an HTML dialogue of
                             <span class=participant_N> messages
    A persona is not a turn, so it is left out.
and writes data/russian_dialogues.parquet with the columns
`sample` (list<string>), `dialogue_id` (int64), `source` (string) and
`speakers` (list<string>).

Who said each turn: `speakers[i]` names the speaker of `sample[i]`, as a key,
then "|" and a display name where the source has one. The key is everything
before the first "|", never contains "|", and is what tells speakers apart:
  * Telegram: the sender's from_id and the latest display name the export shows
    for it, "user111|Вадим Петров" (channels "channel222|Новости"); the key
    stays when a person renames themselves. A sender without from_id is keyed
    by the display name ("|" there becomes "/").
  * chat messages: "user" or "assistant" (human, prompter / gpt, bot, model
    map to them);
  * Toloka Persona Chat: "participant_1", "participant_2";
  * SiberianPersonaChat: "user" (Собеседник, or Ты where the persona is Я)
    and "persona" (the reply, Ты or Я);
  * question/answer tables: "question", "answer".
An empty string is a turn whose speaker is unknown, and an empty list a
dialogue whose speakers are all unknown (lists of strings, dash text): later
stages treat an empty list and a missing column alike. Consecutive messages
of one speaker become one turn where a source sends them apart (Telegram, chat
messages, Toloka, persona labels); messages of different speakers never do.

Whose account: a whole-account Telegram export (result.json with
personal_information and chats.list) names its owner, and the parquet's
schema metadata records it under the key b"owner" as JSON,
{"key": "user111", "name": "Вадим Петров"} (the key as in `speakers`; no phone
number or username is copied): pq.read_schema(path).metadata[b"owner"].
Other inputs have no b"owner" entry. cleaner_text.py keeps it.

Run it:
    python parser_dataset.py          # the bundled sample, data/sample_dialogues.jsonl
    python parser_dataset.py --input ../shared/data/anekdot_dialogues.txt.xz --limit 50000
    python parser_dataset.py --input ~/Downloads/ChatExport/result.json --max-gap-minutes 120
    python parser_dataset.py --input Den4ikAI/russian_dialogues      # needs the internet
    python parser_dataset.py --input TlkPersonaChatRus/dialogues.tsv

Text files may start with a byte-order mark. Large inputs are read and
written in batches, so memory stays bounded.

In a notebook (Jupyter, Colab): paste this whole file into one cell, set INPUT
and the rest in the defaults block below, and run the cell. `%run
parser_dataset.py --input x.jsonl` and `!python parser_dataset.py --input
x.jsonl` take flags as above.
"""
import argparse
import bz2
import contextlib
import csv
import gzip
import html
import json
import lzma
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------- defaults
INPUT = "data/sample_dialogues.jsonl"  # a local file or a hub data set name
DEFAULT_OUTPUT = "data/russian_dialogues.parquet"
LIMIT = None                   # stop after this many dialogues (None: all)
TURNS_COLUMN = None            # the list-of-turns column (None: found by its name)
QUESTION_COLUMN = None         # the question and answer columns (None: found by their names)
ANSWER_COLUMN = None
BATCH_ROWS = 10_000            # dialogues buffered before a batch is written
MIN_TURNS = 2                  # a dialogue needs a question and an answer
MAX_GAP_MINUTES = 60           # Telegram: a longer silence starts a new dialogue
TURN_COLUMNS = ("sample", "dialogue", "dialog", "turns", "messages", "conversation",
                "conversations", "utterances")
QUESTION_COLUMNS = ("question", "context", "query", "prompt", "input")
ANSWER_COLUMNS = ("answer", "response", "reply", "output")
RELEVANCE_COLUMN = "relevance"  # question/answer sets with generated negatives mark them 0
TEXT_SUFFIXES = (".txt", ".text")
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
CSV_FIELD_LIMIT = 2**31 - 1    # the csv module stops at 128 KB a field, JSONL has no limit
HUB_FILES = ["*.parquet", "*.jsonl", "*.jsonl.gz", "*.json.gz", "*.csv", "*.tsv"]
PRESET = None                  # a public data set's layout (PRESETS below); None: by the columns

# Chat messages: who speaks in a turn. A system message sets the bot up; it is not a turn.
USER_ROLES = {"user", "human", "prompter"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model"}

SCHEMA = pa.schema([
    ("sample", pa.list_(pa.string())),
    ("dialogue_id", pa.int64()),
    ("source", pa.string()),
    ("speakers", pa.list_(pa.string())),
])
OWNER_METADATA_KEY = b"owner"  # schema metadata: the whole-account export's owner, as JSON


class UserError(Exception):
    """A mistake in the input that the user can fix; printed as one line."""


class Dialogue(NamedTuple):
    """The turns of one dialogue and who said each ("" where unknown)."""
    turns: list
    speakers: list


class Owner(NamedTuple):
    """Whose Telegram account an export is: the speaker key and the name."""
    key: str
    name: str


class Layout(NamedTuple):
    """How a table holds dialogues: `kind` is turns (a list-of-turns column),
    pair (question, answer), persona_chat (input with labelled turns, output)
    or toloka (an HTML dialogue); `keep` names a column that must be 1."""
    kind: str
    columns: tuple
    keep: str = None


PRESETS = {
    "russian_dialogues": Layout("pair", ("question", "answer"), keep=RELEVANCE_COLUMN),
    "russian_dialogues_2": Layout("turns", ("sample",)),
    "siberian_persona_chat": Layout("persona_chat", ("input", "output")),
    "toloka_persona_chat": Layout("toloka", ("dialogue",)),
}
HUB_PRESETS = {
    "den4ikai/russian_dialogues": "russian_dialogues",
    "den4ikai/russian_dialogues_2": "russian_dialogues_2",
    "siberiasoft/siberianpersonachat": "siberian_persona_chat",
    "siberiasoft/siberianpersonachat-2": "siberian_persona_chat",
}

# SiberianPersonaChat: "<persona> Продолжи диалог:\nСобеседник: ...\nТы: ..." (the
# second version: "Ты: ..." / "Я: ..."); the last label is left empty for the output.
PERSONA_END = "Продолжи диалог:"
SPEAKER_LABEL = re.compile(r"(?:^|(?<=\s))(Собеседник|Ты|Я):[ \t]*")
# Toloka Persona Chat: <span class=participant_1>Пользователь 1: Привет</span><br />...
TOLOKA_MESSAGE = re.compile(r"<span class=[\"']?participant_(\d+)[\"']?>(.*?)</span>", re.DOTALL)
TOLOKA_SPEAKER = re.compile(r"^\s*Пользователь\s*\d+\s*:\s*")
HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
DASH = "-\u2013\u2014"
SKIPPED = object()  # a row the data set itself marks as not a dialogue (relevance 0)


# ---------------------------------------------------------------- helpers
def clean_turns(turns, speakers=None):
    """Strip each turn and drop empty ones, with their speakers; everything
    else is the cleaner's job. Returns (turns, speakers): speakers is [] where
    no turn's speaker is known."""
    speakers = list(speakers) if speakers else [""] * len(turns)
    out, who = [], []
    for turn, speaker in zip(turns, speakers):
        if turn is None:
            continue
        text = str(turn).strip()
        if text:
            out.append(text)
            who.append(speaker or "")
    return out, (who if any(who) else [])


def as_dialogue(item):
    """A reader's dialogue: a Dialogue, or a bare list of turns (speakers unknown)."""
    if isinstance(item, Dialogue):
        return item
    return Dialogue(list(item), [])


def pick_column(names, candidates, wanted):
    lowered = {name.lower(): name for name in names}
    if wanted:
        if wanted not in names:
            raise UserError(f"column '{wanted}' not found (columns: {', '.join(names)})")
        return wanted
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    return None


def choose_layout(path, names, args):
    """The Layout of a table with these column names: from the flags, the
    preset, or the columns themselves."""
    names = [str(name) for name in names]
    lowered = {name.lower(): name for name in names}
    if args.turns_column:
        return Layout("turns", (pick_column(names, (), args.turns_column),))
    if args.question_column or args.answer_column:
        question = pick_column(names, QUESTION_COLUMNS, args.question_column)
        answer = pick_column(names, ANSWER_COLUMNS, args.answer_column)
        if question and answer:
            return Layout("pair", (question, answer))
    elif args.preset:
        preset = PRESETS[args.preset]
        missing = [c for c in preset.columns + ((preset.keep,) if preset.keep else ()) if c not in lowered]
        if missing:
            raise UserError(f"{path}: the {args.preset} preset needs column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(names) or 'none'})")
        return Layout(preset.kind, tuple(lowered[c] for c in preset.columns),
                      lowered[preset.keep] if preset.keep else None)
    else:
        if "persona_1_profile" in lowered and "dialogue" in lowered:
            return Layout("toloka", (lowered["dialogue"],))
        turns = pick_column(names, TURN_COLUMNS, None)
        if turns:
            return Layout("turns", (turns,))
        if "input" in lowered and "output" in lowered:
            return Layout("persona_chat", (lowered["input"], lowered["output"]))
        question = pick_column(names, QUESTION_COLUMNS, None)
        answer = pick_column(names, ANSWER_COLUMNS, None)
        if question and answer:
            return Layout("pair", (question, answer), lowered.get(RELEVANCE_COLUMN))
    raise UserError(
        f"{path}: no list-of-turns column ({', '.join(TURN_COLUMNS)}) and no question/answer "
        f"columns among: {', '.join(names) or 'none'} "
        "(name them with --turns-column or --question-column/--answer-column)")


def message_text(content):
    """A chat message's content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(part.get("text") or "" if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def turns_from_messages(messages):
    """User/assistant messages in order; a system (or tool) message is not a
    turn, and consecutive messages of one side make one turn. The speakers
    are the sides, "user" or "assistant" ("" for a bare string)."""
    turns, speakers, side = [], [], None
    for message in messages:
        if isinstance(message, str):
            turns.append(message)
            speakers.append("")
            side = None
            continue
        if not isinstance(message, dict):
            continue
        role = str(message.get("role") or message.get("from") or "").lower()
        if role not in USER_ROLES | ASSISTANT_ROLES:
            continue
        text = message_text(message.get("content", message.get("value", message.get("text")))).strip()
        if not text:
            continue
        speaker = "user" if role in USER_ROLES else "assistant"
        if turns and speaker == side:
            turns[-1] = f"{turns[-1]}\n{text}"
        else:
            turns.append(text)
            speakers.append(speaker)
        side = speaker
    return Dialogue(turns, speakers)


def turns_from_toloka(text):
    """Toloka Persona Chat: one <span class=participant_N> a message; a
    participant's consecutive messages make one turn, its speaker "participant_N"."""
    turns, speakers, last = [], [], None
    for who, body in TOLOKA_MESSAGE.findall(text):
        body = TOLOKA_SPEAKER.sub("", html.unescape(HTML_BREAK.sub("\n", body))).strip()
        if not body:
            continue
        if turns and who == last:
            turns[-1] = f"{turns[-1]}\n{body}"
        else:
            turns.append(body)
            speakers.append(f"participant_{who}")
        last = who
    return Dialogue(turns, speakers)


def turns_from_persona_prompt(text):
    """The turns of a SiberianPersonaChat input, without the persona before them,
    and their speakers ("user", or "persona" for the side the output continues);
    text without speaker labels is one turn, the user's."""
    text = text or ""
    if PERSONA_END in text:
        text = text.split(PERSONA_END, 1)[1]
    labels = list(SPEAKER_LABEL.finditer(text))
    if not labels:
        return Dialogue([text], ["user"])
    # The first version is Собеседник (user) and Ты (persona); the second Ты
    # (user, talking to the persona) and Я (persona).
    persona = "Я" if any(label.group(1) == "Я" for label in labels) else "Ты"
    turns, speakers, last = [], [], None
    for label, following in zip(labels, labels[1:] + [None]):
        body = text[label.end():following.start() if following else len(text)].strip()
        if not body:
            continue
        if turns and label.group(1) == last:
            turns[-1] = f"{turns[-1]}\n{body}"
        else:
            turns.append(body)
            speakers.append("persona" if label.group(1) == persona else "user")
        last = label.group(1)
    return Dialogue(turns, speakers)


def turns_from_dash_lines(text):
    """'- Привет\n- Привет, как дела?': the dash-text format in one cell."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 2 and all(line[0] in DASH for line in lines):
        return [line[1:].strip() for line in lines]
    return None


def turns_from_value(value, path, column):
    """A list-of-turns cell: a real list (of strings or chat messages), a
    JSON-encoded one (CSV), or text in a format known here."""
    if value is None:
        return Dialogue([], [])
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: a cell of column '{column}' is not a JSON list ({exc.msg})") from None
        elif TOLOKA_MESSAGE.search(text):
            return turns_from_toloka(text)
        else:
            turns = turns_from_dash_lines(text)
            if turns is None:
                shown = text[:40].replace("\n", " ")
                raise UserError(
                    f"{path}: column '{column}' holds text, not a list of turns (e.g. '{shown}'); "
                    "give it lists, or name question/answer columns with --question-column/--answer-column")
            return turns
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{path}: column '{column}' holds {type(value).__name__} values, not lists of turns")
    return turns_from_messages(value)


def row_turns(layout, row, path):
    """The turns of one table row under `layout`; SKIPPED for a row the data
    set marks as no dialogue."""
    if layout.keep is not None:
        try:
            if float(row.get(layout.keep)) != 1:
                return SKIPPED
        except (TypeError, ValueError):
            return SKIPPED
    first = row.get(layout.columns[0])
    if layout.kind == "turns":
        return turns_from_value(first, path, layout.columns[0])
    if layout.kind == "toloka":
        return turns_from_toloka(first or "")
    second = row.get(layout.columns[1])
    if layout.kind == "persona_chat":
        prompt = turns_from_persona_prompt(first)
        return Dialogue(prompt.turns + [second], prompt.speakers + ["persona"])
    return Dialogue([first, second], ["question", "answer"])


def open_text(path):
    # utf-8-sig: a byte-order mark at the start is read as nothing, not as "\ufeff".
    opener = COMPRESSED.get(path.suffix.lower())
    if opener:
        return opener(path, "rt", encoding="utf-8-sig", errors="strict", newline="")
    return open(path, "rt", encoding="utf-8-sig", errors="strict", newline="")


def strip_compression(path):
    return path.with_suffix("") if path.suffix.lower() in COMPRESSED else path


# ---------------------------------------------------------------- readers
# Each reader yields dialogues: a Dialogue (turns and speakers) or a bare list
# of turns (speakers unknown); a Telegram account export yields its Owner first.

def read_parquet(path, args):
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    layout = choose_layout(path, parquet.schema_arrow.names, args)
    columns = list(dict.fromkeys(layout.columns + ((layout.keep,) if layout.keep else ())))
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield row_turns(layout, row, path)


def read_csv(path, args):
    # A turn longer than the csv module's 128 KB default is rare but real (a
    # pasted log); JSONL reads it, so CSV should too.
    csv.field_size_limit(CSV_FIELD_LIMIT)
    delimiter = "\t" if strip_compression(path).suffix.lower() == ".tsv" else ","
    with open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise UserError(f"{path}: empty CSV file (no header row)")
        layout = choose_layout(path, reader.fieldnames, args)
        for row in reader:
            yield row_turns(layout, row, path)


def read_records(records, path, args):
    """Dialogues from JSON records: lists of turns or messages, or objects."""
    layout = None
    for number, record in records:
        if isinstance(record, list):
            yield turns_from_messages(record)
            continue
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {number} is neither an object nor a list of turns")
        if layout is None:
            layout = choose_layout(path, list(record), args)
        yield row_turns(layout, record, path)


def jsonl_records(path):
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None


def read_jsonl(path, args):
    yield from read_records(jsonl_records(path), path, args)


def read_dash_text(path, args):
    """One turn a line starting with '- '; a blank line ends the dialogue.
    A non-blank line without the dash continues the turn above it."""
    turns = []
    with open_text(path) as handle:
        for line in handle:
            line = line.rstrip("\r\n")
            stripped = line.strip()
            if not stripped:
                if turns:
                    yield turns
                    turns = []
                continue
            if stripped[0] in "-\u2013\u2014":
                turns.append(stripped[1:].strip())
            elif turns:
                turns[-1] = f"{turns[-1]} {stripped}"
            else:
                turns.append(stripped)
    if turns:
        yield turns


def flatten_telegram_text(text):
    """Telegram stores formatted text as a list of strings and entity objects."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        parts = []
        for piece in text:
            if isinstance(piece, str):
                parts.append(piece)
            elif isinstance(piece, dict):
                parts.append(str(piece.get("text", "")))
        return "".join(parts)
    return ""


def telegram_chats(export):
    """One chat's export has a "messages" list; a whole account's export
    ("Export Telegram data") has its chats under chats.list."""
    if isinstance(export, dict) and isinstance(export.get("messages"), list):
        yield export
    elif isinstance(export, dict) and isinstance(export.get("chats"), dict):
        for chat in export["chats"].get("list", []):
            if isinstance(chat, dict) and isinstance(chat.get("messages"), list):
                yield chat


def telegram_time(message):
    if message.get("date_unixtime"):
        return float(message["date_unixtime"])
    try:
        return datetime.fromisoformat(message["date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def telegram_sender(message):
    """The sender's stable key: from_id ("user111"), else the display name."""
    key = message.get("from_id")
    if key is None or key == "":
        name = message.get("from")
        return None if name is None or name == "" else str(name).replace("|", "/")
    return str(key).replace("|", "/")


def telegram_names(chats):
    """{sender key: the latest display name the export shows for it (by the
    message's date)}, so that one person keeps one name in every speaker string
    of the file."""
    names, when = {}, {}
    for chat in chats:
        for message in chat["messages"]:
            if isinstance(message, dict) and message.get("type", "message") == "message":
                key = telegram_sender(message)
                if key is None or not message.get("from"):
                    continue
                time = telegram_time(message) or 0.0
                if time >= when.get(key, float("-inf")):
                    names[key], when[key] = str(message["from"]), time
    return names


def speaker_label(key, names):
    if key is None:
        return ""
    name = names.get(key)
    return f"{key}|{name}" if name else key


def telegram_owner(export):
    """The whole-account export's owner, from personal_information (user_id and
    name only: the phone number and username stay out of the data)."""
    info = export.get("personal_information") if isinstance(export, dict) else None
    if not isinstance(info, dict) or info.get("user_id") in (None, ""):
        return None
    name = " ".join(str(info[part]).strip() for part in ("first_name", "last_name") if info.get(part))
    return Owner(f"user{info['user_id']}", name)


def dialogues_from_chat(messages, max_gap_seconds, names=None):
    """Join consecutive messages of one sender into a turn; split on long
    silences. Yields Dialogue(turns, speakers)."""
    names = names or {}
    dialogue, speakers, sender, last_time = [], [], None, None
    for message in messages:
        if not isinstance(message, dict) or message.get("type", "message") != "message":
            continue  # service messages: joins, pins, calls
        text = flatten_telegram_text(message.get("text", "")).strip()
        if not text:
            continue  # stickers, photos and files without a caption
        when = telegram_time(message)
        if dialogue and when is not None and last_time is not None and when - last_time > max_gap_seconds:
            yield Dialogue(dialogue, speakers)
            dialogue, speakers, sender = [], [], None
        # Two people may share a display name; from_id tells them apart. A
        # message with no sender at all is nobody's continuation.
        author = telegram_sender(message)
        if dialogue and author is not None and author == sender:
            dialogue[-1] = f"{dialogue[-1]}\n{text}"
        else:
            dialogue.append(text)
            speakers.append(speaker_label(author, names))
        sender, last_time = author, when if when is not None else last_time
    if dialogue:
        yield Dialogue(dialogue, speakers)


def read_telegram(path, args, export=None):
    if export is None:
        export = load_json(path)
    chats = list(telegram_chats(export))
    if not chats:
        raise UserError(f"{path}: not a Telegram export (no 'messages' list)")
    owner = telegram_owner(export)
    if owner:
        yield owner
    names = telegram_names(chats)
    found_text = False
    for chat in chats:
        for dialogue in dialogues_from_chat(chat["messages"], args.max_gap_minutes * 60, names):
            found_text = True
            yield dialogue
    if not found_text:
        raise UserError(f"{path}: the Telegram export has no text messages")


def load_json(path):
    try:
        with open_text(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a file named .json
            return None
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_json(path, args):
    """A .json file is a Telegram export or a list of dialogue records (or JSON lines)."""
    data = load_json(path)
    if data is None:
        yield from read_jsonl(path, args)
        return
    if isinstance(data, dict):
        yield from read_telegram(path, args, export=data)
        return
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a Telegram export or a list of dialogues")
    yield from read_records(enumerate(data, 1), path, args)


def reader_for_file(path):
    kind = strip_compression(path).suffix.lower()
    readers = {".parquet": read_parquet, ".csv": read_csv, ".tsv": read_csv, ".jsonl": read_jsonl,
               ".ndjson": read_jsonl, ".json": read_json}
    if kind in readers:
        return readers[kind]
    if kind in TEXT_SUFFIXES:
        return read_dash_text
    return None


def read_hub(name, args):
    """The real path for users with the internet: fetch the data set's files."""
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id=name, repo_type="dataset", allow_patterns=HUB_FILES)
    except Exception as exc:  # hub errors come in many classes; all mean "not fetched"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(
            f"{name}: the model hub is unreachable or has no such data set ({reason}); "
            "download the files elsewhere and pass a local path with --input") from None
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and reader_for_file(p))
    if not files:
        raise UserError(f"{name}: the data set has no parquet, JSONL, CSV or TSV files")
    for file in files:
        yield from reader_for_file(file)(file, args)


def looks_like_hub_name(text):
    return ("/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1
            and not Path(text).suffix)


def pick_reader(source):
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_name(source):
            return read_hub, source
        # A pasted notebook cell reads INPUT relative to the kernel's folder, which may not be the kit's.
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise UserError(f"{source}: no such file{where} (pass --input, or set INPUT in the defaults block)")
    if path.is_dir():
        raise UserError(f"{source}: is a folder; pass a file (for a Telegram export, its result.json)")
    if path.stat().st_size == 0:
        raise UserError(f"{source}: the file is empty")
    reader = reader_for_file(path)
    if reader is None:
        kind = strip_compression(path).suffix.lower()
        raise UserError(f"{source}: unknown file type '{kind or path.name}' "
                        "(expected .parquet, .csv, .tsv, .jsonl, .json or .txt)")
    return reader, path


# ---------------------------------------------------------------- writing
def check_output(output):
    """Refuse an output the write would fail on, before any input is read."""
    if output.is_dir():
        raise UserError(f"{output}: is a folder; --output needs a file name "
                        f"(e.g. {output / Path(DEFAULT_OUTPUT).name})")


@contextlib.contextmanager
def writing(output):
    """An OSError here is the output's fault (a read-only or missing place, a
    full disk): say so, where main would otherwise blame the input."""
    try:
        yield
    except OSError as exc:
        # pyarrow's message names the temporary file: the errno's own words say the reason alone.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"{output}: cannot write the --output file ({reason})") from None


def schema_with_owner(owner):
    if owner is None:
        return SCHEMA
    record = json.dumps({"key": owner.key, "name": owner.name}, ensure_ascii=False)
    return SCHEMA.with_metadata({OWNER_METADATA_KEY: record.encode("utf-8")})


def write_dialogues(dialogues, output, source_name, limit=None, min_turns=MIN_TURNS):
    """Stream dialogues into a parquet file through a temporary name.
    Returns (written, skipped_short, skipped_by_the_data_set)."""
    output = Path(output)
    check_output(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    written = skipped = negatives = 0
    buffer, who = [], []
    writer = None
    # Find out now whether the output can be written at all, before any input
    # is read; the parquet writer itself waits for the owner (schema metadata),
    # which a Telegram account export yields before its first dialogue.
    with writing(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    items = iter(dialogues)

    def flush():
        if buffer:
            ids = range(written - len(buffer), written)
            table = pa.table({"sample": buffer, "dialogue_id": list(ids),
                              "source": [source_name] * len(buffer), "speakers": who}, schema=SCHEMA)
            with writing(output):
                writer.write_table(table)
            buffer.clear()
            who.clear()

    try:
        first = next(items, None)
        owner = first if isinstance(first, Owner) else None
        if first is not None and owner is None:
            items = chain_first(first, items)
        with writing(output):
            writer = pq.ParquetWriter(tmp, schema_with_owner(owner))
        for item in items:
            if item is SKIPPED:
                negatives += 1
                continue
            dialogue = as_dialogue(item)
            turns, speakers = clean_turns(dialogue.turns, dialogue.speakers)
            if len(turns) < min_turns:
                skipped += 1
                continue
            buffer.append(turns)
            who.append(speakers)
            written += 1
            if len(buffer) >= BATCH_ROWS:
                flush()
            if limit and written >= limit:
                break
        flush()
        with writing(output):
            writer.close()
        if written == 0:
            raise UserError(f"{source_name}: no dialogues of {min_turns} or more turns found")
        with writing(output):
            os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to report
            if writer is not None:
                writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return written, skipped, negatives


def chain_first(first, rest):
    yield first
    yield from rest


def parse_args(argv):
    # prog: in a notebook cell argparse would name the kernel (ipykernel_launcher.py) in its messages.
    parser = argparse.ArgumentParser(prog="parser_dataset.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=INPUT,
                        help="a local file (parquet, csv, jsonl, json, txt[.xz]) or a hub data set name")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="parquet file to write")
    parser.add_argument("--limit", "--rows", type=int, default=LIMIT, dest="limit",
                        help="stop after this many dialogues")
    parser.add_argument("--min-turns", type=int, default=MIN_TURNS,
                        help="drop dialogues with fewer turns (at least 2)")
    parser.add_argument("--max-gap-minutes", type=float, default=MAX_GAP_MINUTES,
                        help="Telegram: silence that starts a new dialogue")
    parser.add_argument("--turns-column", default=TURNS_COLUMN, help="name of the list-of-turns column")
    parser.add_argument("--question-column", default=QUESTION_COLUMN, help="name of the question column")
    parser.add_argument("--answer-column", default=ANSWER_COLUMN, help="name of the answer column")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=PRESET,
                        help="read the columns as this public data set lays them out "
                             "(a hub name of one of them picks it by itself)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    if args.min_turns < 2:
        parser.error("--min-turns must be at least 2 (a dialogue needs a question and an answer)")
    if args.preset is not None and args.preset not in PRESETS:  # a PRESET set in the defaults block
        parser.error(f"--preset {args.preset!r}: must be one of {', '.join(sorted(PRESETS))}")
    if args.preset is None:
        args.preset = HUB_PRESETS.get(args.input.strip().lower())
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        reader, source = pick_reader(args.input)
        source_name = Path(str(source)).name if reader is not read_hub else str(source)
        written, skipped, negatives = write_dialogues(reader(source, args), args.output, source_name,
                                                      limit=args.limit, min_turns=args.min_turns)
    except UserError as exc:
        print(f"parser_dataset.py: error: {exc}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as exc:
        print(f"parser_dataset.py: error: {args.input}: not UTF-8 text "
              f"(byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start})", file=sys.stderr)
        return 1
    except (lzma.LZMAError, OSError, EOFError, csv.Error) as exc:
        print(f"parser_dataset.py: error: {args.input}: cannot read ({exc})", file=sys.stderr)
        return 1
    print(f"wrote {written} dialogues to {args.output} "
          f"({skipped} skipped with fewer than {args.min_turns} turns"
          + (f", {negatives} rows skipped whose relevance is not 1" if negatives else "") + ")")
    return 0


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
