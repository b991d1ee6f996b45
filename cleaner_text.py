"""Stage 2: clean the dialogues the parser collected.

Reads data/russian_dialogues.parquet (columns sample, dialogue_id, source),
writes data/clean_dialogues.parquet with the same columns and
data/clean_report.json with what every rule did.

Each rule either repairs a turn in place (HTML, links, markup, timestamps,
forwarded headers, chat-log name prefixes, [id|name] and @username, repeated
punctuation, white space) or, where nothing usable is left of a turn or it is
outside the length window, cuts the dialogue around that turn: the longest run
of clean turns survives when it still has --min-turns turns. Dropping a whole
long dialogue for one bad line would waste data. Exact duplicate dialogues go.

Run it:
    python cleaner_text.py
    python cleaner_text.py --input data/russian_dialogues.parquet --max-chars 300

The input is read and written in batches, so memory stays bounded.
"""
import argparse
import hashlib
import html
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------- defaults
DEFAULT_INPUT = "data/russian_dialogues.parquet"
DEFAULT_OUTPUT = "data/clean_dialogues.parquet"
DEFAULT_REPORT = "data/clean_report.json"
MIN_CHARS = 2          # shorter turns carry nothing to learn ("а", ")")
MAX_CHARS = 500        # longer turns are monologues or pasted text, not chat
MIN_TURNS = 2
BATCH_ROWS = 10_000

SCHEMA = pa.schema([
    ("sample", pa.list_(pa.string())),
    ("dialogue_id", pa.int64()),
    ("source", pa.string()),
])

# ---------------------------------------------------------------- patterns
# Attributes must look like attributes, so that "a<b и b>c" is not a tag.
HTML_TAG = re.compile(
    r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s+[a-zA-Z_:][-a-zA-Z0-9_:.]*"
    r"(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?)*\s*/?>")
HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
HTML_ENTITY = re.compile(r"&(?:#\d{1,6}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")

# A link ends before trailing punctuation, which belongs to the sentence.
LINK_TAIL = r"(?:\S*[^\s.,!?;:)\]»\"'])?"
LINK = re.compile(
    rf"(?:https?://|ftp://|www\.){LINK_TAIL}"
    rf"|\b(?:t\.me|vk\.com|youtu\.be|[\w-]+\.(?:ru|com|org|net|рф|su|io|info|me))/{LINK_TAIL}",
    re.IGNORECASE)

QUOTE_BLOCK = re.compile(r"\[quote(?:=[^\]]*)?\](.*?)\[/quote\]", re.IGNORECASE | re.DOTALL)
FORUM_TAG = re.compile(r"\[/?(?:b|i|u|s|url|img|code|spoiler|size|color|quote|center)(?:=[^\]]*)?\]",
                       re.IGNORECASE)

VK_MENTION = re.compile(r"\[(?:id|club|public)\d+\|([^\]]*)\]")
AT_USERNAME = re.compile(r"(?<![\w.@])@[A-Za-z][A-Za-z0-9_]{2,31}\b")

# A timestamp only counts at the very start of a turn, and only in the shapes
# that chat logs use: "[12:45]", "15:40:12" (seconds) or a full date with time.
# "10:30 у метро" and "в 7:15" are natural text and stay.
DATE_TIME = r"\d{1,2}\.\d{1,2}\.\d{2,4},?\s+\d{1,2}:\d{2}(?::\d{2})?"
TIMESTAMP_PREFIX = re.compile(
    rf"^\s*(?:\[(?:{DATE_TIME}|\d{{1,2}}:\d{{2}}(?::\d{{2}})?)\]|{DATE_TIME}|\d{{1,2}}:\d{{2}}:\d{{2}})\s*")

# "Иван Петров, [12.05.2023 15:40]" heads every forwarded message in Telegram.
FORWARD_HEADER = re.compile(rf"^\s*[^\n,\[\]]{{1,60}},\s*\[{DATE_TIME}\]\s*")

# "Маша: ..." chat-log prefixes. A capitalised word and a colon is also how
# Russian opens a remark ("Смотри: ...", "Как Олимпиада: ..."), so a prefix only
# counts when it is a role word or when two or more turns carry such prefixes.
NAME_PREFIX = re.compile(r"^\s*([А-ЯЁA-Z][а-яёa-z]{1,20}(?:\s[А-ЯЁA-Z][а-яёa-z]{1,20})?):\s+")
ROLE_WORDS = {"пользователь", "бот", "админ", "администратор", "модератор", "оператор", "клиент",
              "собеседник", "user", "bot", "admin", "я", "он", "она"}

REPEATED = [
    (re.compile(r"!{2,}"), "!"),
    (re.compile(r"\?{2,}"), "?"),
    (re.compile(r"\.{4,}"), "..."),
    (re.compile(r",{2,}"), ","),
]
INVISIBLE = re.compile(r"[\u200b-\u200f\u2060\ufeff]")
SPACES = re.compile(r"\s+")


class UserError(Exception):
    """A mistake in the input that the user can fix; printed as one line."""


# ---------------------------------------------------------------- repair rules
# Each rule takes a turn and returns it, changed or not.

def fix_html(text):
    if "<" not in text and "&" not in text:
        return text
    text = HTML_BREAK.sub(" ", text)
    text = HTML_TAG.sub("", text)
    # Entities can be double-escaped ("&amp;nbsp;") in scraped data.
    for _ in range(2):
        if not HTML_ENTITY.search(text):
            break
        text = html.unescape(text)
    return text.replace("\xa0", " ")


def remove_links(text):
    return LINK.sub("", text)


def remove_forum_markup(text):
    if "[" not in text:
        return text

    def quote(match):
        # A quote repeats an earlier message: drop it when the turn says
        # something besides it, keep its words when they are the whole turn.
        rest = (text[:match.start()] + text[match.end():]).strip()
        return "" if rest else match.group(1)

    text = QUOTE_BLOCK.sub(quote, text)
    return FORUM_TAG.sub("", text)


def replace_mentions(text):
    text = VK_MENTION.sub(lambda m: m.group(1), text)
    return AT_USERNAME.sub("", text)


def remove_timestamps(text):
    return TIMESTAMP_PREFIX.sub("", text, count=1)


def remove_forward_header(text):
    return FORWARD_HEADER.sub("", text, count=1)


def collapse_punctuation(text):
    for pattern, replacement in REPEATED:
        text = pattern.sub(replacement, text)
    return text


def normalise_space(text):
    text = INVISIBLE.sub("", text)
    # Removing a mention or a link leaves "()", ", привет" or "смотри  ." behind.
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = SPACES.sub(" ", text).strip()
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    return text.lstrip(",;: ").strip()


# Order matters: headers and timestamps are found at the start of the raw
# turn; HTML goes before links so that <a href="..."> does not leave a link.
TURN_RULES = [
    ("forwarded_header", remove_forward_header),
    ("timestamp", remove_timestamps),
    ("html", fix_html),
    ("forum_markup", remove_forum_markup),
    ("link", remove_links),
    ("mention", replace_mentions),
    ("repeated_punctuation", collapse_punctuation),
]


def strip_name_prefixes(turns):
    """Remove 'Name:' prefixes where the dialogue looks like a chat log."""
    matches = [NAME_PREFIX.match(turn) for turn in turns]
    prefixed = sum(1 for m in matches if m)
    out, changed = [], 0
    for turn, match in zip(turns, matches):
        if match and (prefixed >= 2 or match.group(1).lower() in ROLE_WORDS):
            turn = turn[match.end():]
            changed += 1
        out.append(turn)
    return out, changed


# ---------------------------------------------------------------- dialogue
class Report:
    def __init__(self, thresholds):
        self.thresholds = thresholds
        self.turns_changed = Counter()
        self.dialogues_changed = Counter()
        self.dialogues_cut = Counter()
        self.dialogues_dropped = Counter()
        self.counts = Counter()

    def as_dict(self, input_path, output_path):
        rules = {}
        for name, _ in TURN_RULES + [("name_prefix", None), ("whitespace", None)]:
            rules[name] = {"turns_changed": self.turns_changed[name],
                           "dialogues_changed": self.dialogues_changed[name]}
        cuts = {}
        for reason in ("empty_after_cleaning", "too_short", "too_long"):
            cuts[reason] = {"dialogues_cut": self.dialogues_cut[reason],
                            "dialogues_dropped": self.dialogues_dropped[reason]}
        return {"input": str(input_path), "output": str(output_path),
                "dialogues_in": self.counts["dialogues_in"], "dialogues_out": self.counts["dialogues_out"],
                "turns_in": self.counts["turns_in"], "turns_out": self.counts["turns_out"],
                "repair_rules": rules, "cut_rules": cuts,
                "duplicates_dropped": self.counts["duplicates"],
                "thresholds": self.thresholds}


def repair_turns(turns, report):
    changed_here = set()
    turns, n = strip_name_prefixes(list(turns))
    if n:
        report.turns_changed["name_prefix"] += n
        changed_here.add("name_prefix")
    repaired = []
    for turn in turns:
        for name, rule in TURN_RULES:
            new = rule(turn)
            if new != turn:
                report.turns_changed[name] += 1
                changed_here.add(name)
                turn = new
        new = normalise_space(turn)
        # Only count white space that a person would call dirt, not the
        # leftovers of the rules above.
        if new != turn and not changed_here:
            report.turns_changed["whitespace"] += 1
            changed_here.add("whitespace")
        repaired.append(new)
    for name in changed_here:
        report.dialogues_changed[name] += 1
    return repaired


def turn_fault(turn, min_chars, max_chars):
    if not turn or not any(ch.isalnum() for ch in turn):
        return "empty_after_cleaning"
    if len(turn) < min_chars:
        return "too_short"
    if len(turn) > max_chars:
        return "too_long"
    return None


def longest_clean_run(turns, faults):
    """The longest run of consecutive turns without a fault (earliest on ties)."""
    best, start = (0, 0), 0
    for i, fault in enumerate(faults + ["end"]):
        if fault:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = i + 1
    return turns[best[0]:best[1]]


def clean_dialogue(turns, report, min_chars, max_chars, min_turns):
    """Return the cleaned turns, or None when too little is left."""
    turns = repair_turns(turns, report)
    faults = [turn_fault(t, min_chars, max_chars) for t in turns]
    if not any(faults):
        return turns
    kept = longest_clean_run(turns, faults)
    first_fault = next(f for f in faults if f)
    if len(kept) >= min_turns:
        report.dialogues_cut[first_fault] += 1
        return kept
    report.dialogues_dropped[first_fault] += 1
    return None


def dialogue_key(turns):
    digest = hashlib.blake2b("\x1e".join(turns).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ---------------------------------------------------------------- files
def open_input(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (run parser_dataset.py first)")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    missing = {"sample", "dialogue_id"} - set(parquet.schema_arrow.names)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                        "(expected the output of parser_dataset.py)")
    return parquet


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clean_file(input_path, output_path, report_path, min_chars=MIN_CHARS, max_chars=MAX_CHARS,
               min_turns=MIN_TURNS, dedupe=True):
    parquet = open_input(input_path)
    thresholds = {"min_chars": min_chars, "max_chars": max_chars, "min_turns": min_turns,
                  "dedupe": dedupe}
    report = Report(thresholds)
    seen = set()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
    has_source = "source" in parquet.schema_arrow.names
    columns = ["sample", "dialogue_id"] + (["source"] if has_source else [])
    writer = pq.ParquetWriter(tmp, SCHEMA)
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            data = batch.to_pydict()
            sources = data["source"] if has_source else [""] * batch.num_rows
            out = {"sample": [], "dialogue_id": [], "source": []}
            for turns, dialogue_id, source in zip(data["sample"], data["dialogue_id"], sources):
                turns = [t for t in (turns or []) if t is not None]
                report.counts["dialogues_in"] += 1
                report.counts["turns_in"] += len(turns)
                cleaned = clean_dialogue(turns, report, min_chars, max_chars, min_turns)
                if cleaned is None:
                    continue
                if dedupe:
                    key = dialogue_key(cleaned)
                    if key in seen:
                        report.counts["duplicates"] += 1
                        continue
                    seen.add(key)
                out["sample"].append(cleaned)
                out["dialogue_id"].append(dialogue_id)
                out["source"].append(source)
                report.counts["dialogues_out"] += 1
                report.counts["turns_out"] += len(cleaned)
            if out["sample"]:
                writer.write_table(pa.table(out, schema=SCHEMA))
        writer.close()
        if report.counts["dialogues_in"] == 0:
            raise UserError(f"{input_path}: the file has no dialogues")
        if report.counts["dialogues_out"] == 0:
            raise UserError(f"{input_path}: no dialogue survived cleaning (check --min-chars/--max-chars)")
        summary = report.as_dict(input_path, output_path)
        os.replace(tmp, output_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(report_path, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return summary


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT, help="parquet from parser_dataset.py")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="clean parquet to write")
    parser.add_argument("--report", default=None,
                        help="JSON report (default: clean_report.json beside --output)")
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS, help="shortest turn kept")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS, help="longest turn kept")
    parser.add_argument("--min-turns", type=int, default=MIN_TURNS,
                        help="shortest dialogue kept after a cut")
    parser.add_argument("--keep-duplicates", action="store_true", help="do not drop exact duplicates")
    args = parser.parse_args(argv)
    if args.report is None:
        args.report = str(Path(args.output).with_name("clean_report.json"))
    if args.min_chars < 1 or args.max_chars < args.min_chars or args.min_turns < 2:
        parser.error("need 1 <= --min-chars <= --max-chars and --min-turns >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = clean_file(args.input, args.output, args.report, args.min_chars, args.max_chars,
                             args.min_turns, dedupe=not args.keep_duplicates)
    except UserError as exc:
        print(f"cleaner_text.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"kept {summary['dialogues_out']} of {summary['dialogues_in']} dialogues "
          f"({summary['turns_out']} of {summary['turns_in']} turns) -> {args.output}")
    for name, row in summary["repair_rules"].items():
        if row["turns_changed"]:
            print(f"  {name:22s} repaired {row['turns_changed']} turns in {row['dialogues_changed']} dialogues")
    for name, row in summary["cut_rules"].items():
        if row["dialogues_cut"] or row["dialogues_dropped"]:
            print(f"  {name:22s} cut {row['dialogues_cut']} dialogues, dropped {row['dialogues_dropped']}")
    if summary["duplicates_dropped"]:
        print(f"  {'duplicates':22s} dropped {summary['duplicates_dropped']} dialogues")
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
