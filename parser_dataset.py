"""Stage 1: collect dialogues from any source into one parquet file.

Reads dialogues from
  * a data set on the model hub, by name (e.g. Den4ikAI/russian_dialogues):
    its parquet / JSONL / CSV files are downloaded with huggingface_hub;
  * a local parquet, CSV or JSONL file with a list-of-turns column
    (`sample`, `dialogue`, `turns`, ...) or question/answer columns;
  * a text file with one turn a line starting with "- " and dialogues
    separated by blank lines (plain, .xz, .gz or .bz2);
  * a Telegram Desktop chat export (result.json).
and writes data/russian_dialogues.parquet with the columns
`sample` (list<string>), `dialogue_id` (int64) and `source` (string).

Run it:
    python parser_dataset.py --input data/sample_dialogues.jsonl
    python parser_dataset.py --input ../shared/data/anekdot_dialogues.txt.xz --limit 50000
    python parser_dataset.py --input ~/Downloads/ChatExport/result.json --max-gap-minutes 120
    python parser_dataset.py --input Den4ikAI/russian_dialogues      # needs the internet

Large inputs are read and written in batches, so memory stays bounded.
"""
import argparse
import bz2
import csv
import gzip
import io
import json
import lzma
import os
import sys
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------- defaults
DEFAULT_OUTPUT = "data/russian_dialogues.parquet"
BATCH_ROWS = 10_000            # dialogues buffered before a batch is written
MIN_TURNS = 2                  # a dialogue needs a question and an answer
MAX_GAP_MINUTES = 60           # Telegram: a longer silence starts a new dialogue
TURN_COLUMNS = ("sample", "dialogue", "dialog", "turns", "messages", "utterances")
QUESTION_COLUMNS = ("question", "context", "query", "prompt", "input")
ANSWER_COLUMNS = ("answer", "response", "reply", "output")
TEXT_SUFFIXES = (".txt", ".text")
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}

SCHEMA = pa.schema([
    ("sample", pa.list_(pa.string())),
    ("dialogue_id", pa.int64()),
    ("source", pa.string()),
])


class UserError(Exception):
    """A mistake in the input that the user can fix; printed as one line."""


# ---------------------------------------------------------------- helpers
def clean_turns(turns):
    """Strip each turn and drop empty ones; everything else is the cleaner's job."""
    out = []
    for turn in turns:
        if turn is None:
            continue
        text = str(turn).strip()
        if text:
            out.append(text)
    return out


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
    """Return ('turns', col) or ('pair', (question_col, answer_col))."""
    turns = pick_column(names, TURN_COLUMNS, args.turns_column)
    if turns:
        return "turns", turns
    question = pick_column(names, QUESTION_COLUMNS, args.question_column)
    answer = pick_column(names, ANSWER_COLUMNS, args.answer_column)
    if question and answer:
        return "pair", (question, answer)
    raise UserError(
        f"{path}: no list-of-turns column ({', '.join(TURN_COLUMNS)}) and no question/answer "
        f"columns among: {', '.join(map(str, names)) or 'none'} "
        "(name them with --turns-column or --question-column/--answer-column)")


def turns_from_value(value, path):
    """A list-of-turns cell: a real list, or (in CSV) a JSON-encoded one."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [text]
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: a turns cell is not a JSON list ({exc.msg})") from None
    if not isinstance(value, (list, tuple)):
        if hasattr(value, "tolist"):
            value = value.tolist()
        else:
            return [str(value)]
    return list(value)


def open_text(path):
    opener = COMPRESSED.get(path.suffix.lower())
    if opener:
        return opener(path, "rt", encoding="utf-8", errors="strict", newline="")
    return open(path, "rt", encoding="utf-8", errors="strict", newline="")


def strip_compression(path):
    return path.with_suffix("") if path.suffix.lower() in COMPRESSED else path


# ---------------------------------------------------------------- readers
# Each reader yields lists of turns, one list a dialogue.

def read_parquet(path, args):
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    kind, cols = choose_layout(path, parquet.schema_arrow.names, args)
    columns = [cols] if kind == "turns" else list(cols)
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        if kind == "turns":
            for value in batch.column(0).to_pylist():
                yield turns_from_value(value, path)
        else:
            for question, answer in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield [question, answer]


def read_csv(path, args):
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise UserError(f"{path}: empty CSV file (no header row)")
        kind, cols = choose_layout(path, reader.fieldnames, args)
        for row in reader:
            if kind == "turns":
                yield turns_from_value(row[cols], path)
            else:
                yield [row[cols[0]], row[cols[1]]]


def read_jsonl(path, args):
    layout = None
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
            if isinstance(record, list):
                yield record
                continue
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {number} is neither an object nor a list of turns")
            if layout is None:
                layout = choose_layout(path, list(record), args)
            kind, cols = layout
            if kind == "turns":
                yield turns_from_value(record.get(cols), path)
            else:
                yield [record.get(cols[0]), record.get(cols[1])]


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


def dialogues_from_chat(messages, max_gap_seconds):
    """Join consecutive messages of one sender into a turn; split on long silences."""
    dialogue, sender, last_time = [], None, None
    for message in messages:
        if not isinstance(message, dict) or message.get("type", "message") != "message":
            continue  # service messages: joins, pins, calls
        text = flatten_telegram_text(message.get("text", "")).strip()
        if not text:
            continue  # stickers, photos and files without a caption
        when = telegram_time(message)
        if dialogue and when is not None and last_time is not None and when - last_time > max_gap_seconds:
            yield dialogue
            dialogue, sender = [], None
        author = message.get("from_id") or message.get("from")
        if dialogue and author == sender:
            dialogue[-1] = f"{dialogue[-1]}\n{text}"
        else:
            dialogue.append(text)
        sender, last_time = author, when if when is not None else last_time
    if dialogue:
        yield dialogue


def read_telegram(path, args, export=None):
    if export is None:
        export = load_json(path)
    chats = list(telegram_chats(export))
    if not chats:
        raise UserError(f"{path}: not a Telegram export (no 'messages' list)")
    found_text = False
    for chat in chats:
        for dialogue in dialogues_from_chat(chat["messages"], args.max_gap_minutes * 60):
            found_text = True
            yield dialogue
    if not found_text:
        raise UserError(f"{path}: the Telegram export has no text messages")


def load_json(path):
    try:
        with open_text(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_json(path, args):
    """A .json file is a Telegram export or a list of dialogue records."""
    data = load_json(path)
    if isinstance(data, dict):
        yield from read_telegram(path, args, export=data)
        return
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a Telegram export or a list of dialogues")
    layout = None
    for record in data:
        if isinstance(record, list):
            yield record
        elif isinstance(record, dict):
            if layout is None:
                layout = choose_layout(path, list(record), args)
            kind, cols = layout
            yield (turns_from_value(record.get(cols), path) if kind == "turns"
                   else [record.get(cols[0]), record.get(cols[1])])


def read_hub(name, args):
    """The real path for users with the internet: fetch the data set's files."""
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id=name, repo_type="dataset",
                                   allow_patterns=["*.parquet", "*.jsonl", "*.csv"])
    except Exception as exc:  # hub errors come in many classes; all mean "not fetched"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(
            f"{name}: the model hub is unreachable or has no such data set ({reason}); "
            "download the files elsewhere and pass a local path with --input") from None
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".parquet", ".jsonl", ".csv"))
    if not files:
        raise UserError(f"{name}: the data set has no parquet, JSONL or CSV files")
    for file in files:
        reader = {".parquet": read_parquet, ".jsonl": read_jsonl, ".csv": read_csv}[file.suffix]
        yield from reader(file, args)


def looks_like_hub_name(text):
    return ("/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1
            and not Path(text).suffix)


def pick_reader(source):
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_name(source):
            return read_hub, source
        raise UserError(f"{source}: no such file")
    if path.is_dir():
        raise UserError(f"{source}: is a folder; pass a file (for a Telegram export, its result.json)")
    if path.stat().st_size == 0:
        raise UserError(f"{source}: the file is empty")
    kind = strip_compression(path).suffix.lower()
    readers = {".parquet": read_parquet, ".csv": read_csv, ".jsonl": read_jsonl,
               ".ndjson": read_jsonl, ".json": read_json}
    if kind in readers:
        return readers[kind], path
    if kind in TEXT_SUFFIXES:
        return read_dash_text, path
    raise UserError(f"{source}: unknown file type '{kind or path.name}' "
                    "(expected .parquet, .csv, .jsonl, .json or .txt)")


# ---------------------------------------------------------------- writing
def write_dialogues(dialogues, output, source_name, limit=None, min_turns=MIN_TURNS):
    """Stream dialogues into a parquet file through a temporary name.
    Returns (written, skipped_short)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    written = skipped = 0
    buffer = []
    writer = pq.ParquetWriter(tmp, SCHEMA)

    def flush():
        if buffer:
            ids = range(written - len(buffer), written)
            table = pa.table({"sample": buffer, "dialogue_id": list(ids),
                              "source": [source_name] * len(buffer)}, schema=SCHEMA)
            writer.write_table(table)
            buffer.clear()

    try:
        for turns in dialogues:
            turns = clean_turns(turns)
            if len(turns) < min_turns:
                skipped += 1
                continue
            buffer.append(turns)
            written += 1
            if len(buffer) >= BATCH_ROWS:
                flush()
            if limit and written >= limit:
                break
        flush()
        writer.close()
        if written == 0:
            raise UserError(f"{source_name}: no dialogues of {min_turns} or more turns found")
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return written, skipped


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="a local file (parquet, csv, jsonl, json, txt[.xz]) or a hub data set name")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="parquet file to write")
    parser.add_argument("--limit", "--rows", type=int, default=None, dest="limit",
                        help="stop after this many dialogues")
    parser.add_argument("--min-turns", type=int, default=MIN_TURNS,
                        help="drop dialogues with fewer turns")
    parser.add_argument("--max-gap-minutes", type=float, default=MAX_GAP_MINUTES,
                        help="Telegram: silence that starts a new dialogue")
    parser.add_argument("--turns-column", help="name of the list-of-turns column")
    parser.add_argument("--question-column", help="name of the question column")
    parser.add_argument("--answer-column", help="name of the answer column")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        reader, source = pick_reader(args.input)
        source_name = Path(str(source)).name if reader is not read_hub else str(source)
        written, skipped = write_dialogues(reader(source, args), args.output, source_name,
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
          f"({skipped} skipped with fewer than {args.min_turns} turns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
