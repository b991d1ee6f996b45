"""Stage 2: clean the dialogues the parser collected.

Reads data/russian_dialogues.parquet (columns sample, dialogue_id, source, and
speakers where the parser wrote it), writes data/clean_dialogues.parquet with
the same columns and data/clean_report.json with what every rule did.

Each rule repairs a turn in place (white space, forwarded headers, chat-log
timestamps and name prefixes, HTML, forum markup, links, [id|name] and
@username, personal data, runs of punctuation, the space around punctuation)
or splits a turn that holds two speakers' lines. The rules are written to keep
what a person wrote on purpose: emoticons ("Привет :)"), dialogue dashes ("спать! - ?"),
emphasis ("???" stays; longer runs shorten to three), emoji sequences joined by
U+200D, a one-letter answer ("Я"), a label that is the answer ("Минусы: 5").
Where nothing usable is left of a turn or it is outside the length window, the
dialogue is cut around it: the longest run of clean turns survives when it
still has --min-turns turns. A dialogue with fewer than --min-turns turns
goes too, cut or not (a missing turn is no turn). Exact duplicate dialogues
go. A second pass over the output changes nothing.

Personal data stays out of training: phone numbers (Russian, +7 / 8 with any
brackets, dashes and spaces, 11 digits, or a 9xx mobile number of 10 digits in
its groups; international +NNN, 8 to 15 digits), e-mail addresses and payment
card numbers (13 to 19 digits, four-digit groups or 16 in a row, Luhn-valid)
become <телефон>, <почта> and <карта>. Dates, times, prices, years, ranges and
numbers written in thousands stay, and so does a number that follows "заказ",
"трек", "посылка", "накладная", "артикул", "серийный номер", "полис" or "№"
(such a number names no person; a 9-digit order number is no phone anyway).
Known misses: digits spaced one by one, "ivan [at] mail.ru", a card number with
a typo (it fails the Luhn check). --keep-personal-data (KEEP_PERSONAL_DATA)
turns the rule off.

Who said each turn (the `speakers` column, one entry a turn; "" or an empty
list where unknown) stays aligned with `sample` through every rule and cut: a
dropped, cut-off or missing turn takes its speaker with it, and a turn split in
two (only a turn whose speaker is unknown is split) leaves both pieces unknown.
A turn whose speaker is known is one person's message, so it is never split as
"two speakers in one turn", and no rule joins turns. Exact duplicates are
compared on the turns and the speaker keys (before "|"). The input's schema
metadata, the parser's b"owner" record of a Telegram account export among it,
is written to the output as it was (but pandas' description of the columns).

Run it:
    python cleaner_text.py
    python cleaner_text.py --input data/russian_dialogues.parquet --max-chars 300
    python cleaner_text.py --keep-personal-data     # phones, e-mails and cards stay as written

The input is read and written in batches, so memory stays bounded.

In a notebook (Jupyter, Colab): paste this whole file into one cell, set the
defaults block below, and run the cell. `%run cleaner_text.py --max-chars 300`
and `!python cleaner_text.py --max-chars 300` take flags as above.
"""
import argparse
import contextlib
import hashlib
import html
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------- defaults
DEFAULT_INPUT = "data/russian_dialogues.parquet"
DEFAULT_OUTPUT = "data/clean_dialogues.parquet"
DEFAULT_REPORT = None  # JSON report (None: clean_report.json beside the output)
MIN_CHARS = 1          # "Я" is a whole answer to "Кто забил?"
MAX_CHARS = 500        # longer turns are monologues or pasted text, not chat
MIN_TURNS = 2
KEEP_DUPLICATES = False  # True: keep exact duplicate dialogues
KEEP_PERSONAL_DATA = False  # True: leave phone numbers, e-mails and card numbers in the turns
BATCH_ROWS = 10_000

SCHEMA = pa.schema([
    ("sample", pa.list_(pa.string())),
    ("dialogue_id", pa.int64()),
    ("source", pa.string()),
])
SPEAKERS_FIELD = pa.field("speakers", pa.list_(pa.string()))  # written where the input has it

# ---------------------------------------------------------------- patterns
# U+200D glues emoji into one picture (👨‍👩‍👧, 🏃‍♀️), so it stays between two
# pictographs; anywhere else it is as invisible as the rest of this list.
PICTO = "\u00a9\u00ae\u203c-\u2bff\u3030\u303d\u3297\u3299\ufe0f\U0001f000-\U0001faff"
INVISIBLE = re.compile(rf"[\u00ad\u200b\u200c\u200e\u200f\u2060\ufeff]"
                       rf"|(?<![{PICTO}])\u200d|\u200d(?![{PICTO}])")
SPACES = re.compile(r"\s+")
EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")

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
# What may sit between a link and the end of its sentence.
SENTENCE_END = re.compile(r"\s*(?:[.!?…]|$)")

QUOTE_BLOCK = re.compile(r"\[quote(?:=[^\]]*)?\](.*?)\[/quote\]", re.IGNORECASE | re.DOTALL)
FORUM_TAG = re.compile(r"\[/?(?:b|i|u|s|url|img|code|spoiler|size|color|quote|center)(?:=[^\]]*)?\]",
                       re.IGNORECASE)

VK_MENTION = re.compile(r"\[(?:id|club|public)\d+\|([^\]]*)\]")
AT_USERNAME = re.compile(r"(?<![\w.@])@[A-Za-z][A-Za-z0-9_]{2,31}\b")
# "@olga, привет": the comma addressed the name that is gone.
LEADING_ADDRESS = re.compile(r"^\s*@[A-Za-z][A-Za-z0-9_]{2,31}\b\s*[,:]?\s*")

# A timestamp only counts at the very start of a turn, and only in the shapes
# that chat logs use: "[12:45]", "15:40:12" (seconds) or a full date with time.
# "10:30 у метро" and "в 7:15" are natural text and stay.
DATE_TIME = r"\d{1,2}\.\d{1,2}\.\d{2,4},?\s+\d{1,2}:\d{2}(?::\d{2})?"
ONE_TIMESTAMP = rf"(?:\[(?:{DATE_TIME}|\d{{1,2}}:\d{{2}}(?::\d{{2}})?)\]|{DATE_TIME}|\d{{1,2}}:\d{{2}}:\d{{2}})"
TIMESTAMP_PREFIX = re.compile(rf"^\s*(?:{ONE_TIMESTAMP}\s*)+")

# "Иван Петров, [12.05.2023 15:40]" heads every forwarded message in Telegram.
FORWARD_HEADER = re.compile(rf"^\s*(?:[^\n,\[\]]{{1,60}},\s*\[{DATE_TIME}\]\s*)+")

# "Маша: ..." chat-log prefixes. A capitalised word and a colon is also how
# Russian opens a remark ("Смотри: ...") or gives an answer ("Минусы: 5",
# "Шофер: весь день людей возит..."), so a prefix only goes when the dialogue
# shows it is a speaker: the line came with a chat-log timestamp, or a label
# heads two or more turns, or every label is a word for a speaker.
NAME_PREFIX = re.compile(r"^([А-ЯЁA-Z][а-яёa-z]{1,20}(?:\s[А-ЯЁA-Z][а-яёa-z]{1,20})?):\s+(?=\S)")
SPEAKER_WORDS = {"пользователь", "бот", "админ", "администратор", "модератор", "оператор",
                 "клиент", "собеседник", "ассистент", "user", "bot", "admin", "assistant",
                 "я", "он", "она", "муж", "жена", "мать", "отец", "мама", "папа", "сын", "дочь",
                 "доктор", "врач", "пациент"}
# "Первый: ..." is a speaker beside "Второй: ...", and "the first question" alone.
ORDINAL_WORDS = {"первый", "второй", "третий", "первая", "вторая", "третья"}
# "Циле: - Туфли у тебя от кого?", "Подтвердил Виторган: - Она тоже...": a
# name (or the tail of the author's words) in one or two capitalised words, a
# colon and a dialogue dash open the line a speaker says. Without the capitals
# it is the speaker's own words ("Скажи честно: - я красивая?", "Как обычно:
# - ...", "Бабушка: - не бегай, говорит, ..." answering "who said so?").
SPEAKER_DASH = re.compile(r"^[А-ЯЁA-Z][\w-]*(?:\s[А-ЯЁA-Z][\w-]*)?:\s*[-–—]\s+(?=[А-ЯЁA-Z])")

# Two speakers' lines in one turn: "Есть. - А черная?". The split needs the
# end of a sentence, a dash, a space and no lowercase word after the dash, and
# the turn must have no author's words, where the dash does not change the
# speaker: "- Иди сюда, - сказал он.", "Нет! - Отвечает девушка", "Черт! - Муж
# начинает нервничать. - Люб, ну ладно", "Ни слова больше! - *звонит*". A word
# that looks like a verb in the third person or the past, first or second after
# a dash, marks them ("- Бывает." then stays merged too: a lost split, not a
# wrong one), and so does an action in asterisks.
MERGED_TURNS = re.compile(r"(?<=[.!?…])\s*[-–—]\s+(?=[^\s\-–—a-zа-яё])")
AUTHOR_WORDS = re.compile(
    r"[,.!?…]\s*[-–—]\s*[a-zа-яё]"
    r"|(?<!\w)[-–—]\s*[.…]*\s*(?:[А-ЯЁа-яё]+\s+)?[А-ЯЁа-яё]+"
    r"(?:[аяуе]ет|ит|[аяеи]тся|[уюая]тся|[аяие]л|[аяие]ла|[аяие]ло)\b(?!\s*[?!])"
    r"|(?<!\w)[-–—]\s*\*")

# Personal data. A number must stand alone: not glued to a word, not the tail
# or head of a date, a time, a decimal or a longer number ("12.05.2024",
# "3,5", "12:30", "1990-2000" stay). A phone needs its whole length, so a
# price in thousands ("1 500 000 000") and an order number of 9 digits stay.
PHONE_PLACEHOLDER, EMAIL_PLACEHOLDER, CARD_PLACEHOLDER = "<телефон>", "<почта>", "<карта>"
PLACEHOLDERS = {"phone": PHONE_PLACEHOLDER, "email": EMAIL_PLACEHOLDER, "card": CARD_PLACEHOLDER}
EMAIL = re.compile(r"(?<![\w.+\-@])[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)*\.[^\W\d_]{2,}(?![\w@])")
NUMBER_START = r"(?<![\w+])(?<!\d[.,:/ \u00a0\-])"
NUMBER_END = r"(?!\w)(?![.,:/]\d)(?![ \u00a0\-]?\d)"
SEP = r"[ \u00a0\-]?"
CARD_NUMBER = re.compile(
    NUMBER_START
    + r"(?:\d{4}(?:[ \u00a0\-]\d{4}){2,3}(?:[ \u00a0\-]\d{1,3})?|\d{4}[ \u00a0\-]\d{6}[ \u00a0\-]\d{4,5}|\d{16})"
    + NUMBER_END)
PHONE_NUMBER = re.compile(
    NUMBER_START + r"(?:"
    + rf"(?:\+7|8){SEP}(?:\(\s?\d{{3,5}}\s?\)|\d{{3,5}}){SEP}\d{{1,3}}(?:{SEP}\d{{2}}){{2}}"  # +7 / 8
    + rf"|\+[1-69]\d{{0,2}}{SEP}(?:\(\d{{1,4}}\){SEP})?\d{{1,4}}(?:{SEP}\d{{1,4}}){{1,4}}"  # +44 20 7946 0958
    + rf"|(?:\(9\d\d\)|9\d\d){SEP}\d{{3}}{SEP}\d{{2}}{SEP}\d{{2}}"  # (912) 345-67-89
    + r")" + NUMBER_END)
THOUSANDS = re.compile(r"\+?\d{1,3}(?:[ \u00a0]\d{3})+")
# A number named as an order, parcel, article, serial or policy number names no
# person (a tenth of such numbers pass the Luhn check by chance); "№ 123..." too.
ORDER_NUMBER = re.compile(r"(?:№|\bзаказ\w*|\bтрек\w*|\bпосылк\w*|\bнакладн\w*|\bартикул\w*"
                          r"|\bсерийн\w*(?:\s+номер\w*)?|\bполис\w*)"
                          r"\s*(?:№\s*)?[:#]?\s*$", re.IGNORECASE)

# Runs of one mark: three keep the emphasis a person meant ("а как же я???!!!"),
# more is noise.
REPEATED = [
    (re.compile(r"!{4,}"), "!!!"),
    (re.compile(r"\?{4,}"), "???"),
    (re.compile(r"\.{4,}"), "..."),
    (re.compile(r"…{2,}"), "…"),
    (re.compile(r",{2,}"), ","),
]

# Russian sets no space before , . ! ? ; : or …; but a space before an
# emoticon (":)", ";-)") or after a dash ("спать! - ?") is part of the writing,
# so the space goes only after a word and before a mark that ends there.
SPACE_BEFORE_PUNCT = re.compile(
    r"(?<=[\w»\"”])\s+(?=(?:[.!?…]+|;)(?:$|[»\"”]|\s(?!\s*[.!?…]))|:\s+\w)"
    r"|(?<=[\w»\"”.])\s+(?=,)")
NO_SPACE_AFTER_COMMA = re.compile(r",(?=[^\W\d_])")


class UserError(Exception):
    """A mistake in the input that the user can fix; printed as one line."""


# ---------------------------------------------------------------- repair rules
# Each rule takes a turn and returns it, changed or not. A rule that removes
# something tidies the space it leaves, so that its own leftovers count as its
# own change and no later rule has to guess.

def tidy(text):
    text = EMPTY_BRACKETS.sub("", text)
    return SPACES.sub(" ", text).strip()


def normalise_space(text):
    text = INVISIBLE.sub("", text)
    return SPACES.sub(" ", text).strip()


def remove_forward_header(text):
    return FORWARD_HEADER.sub("", text, count=1)


def remove_timestamps(text):
    return TIMESTAMP_PREFIX.sub("", text, count=1)


def fix_html(text):
    if "<" not in text and "&" not in text:
        return text
    # Scraped text is sometimes escaped twice ("&amp;lt;b&amp;gt;"), and
    # unescaping can reveal a tag: repeat until nothing changes.
    for _ in range(4):
        new = HTML_BREAK.sub(" ", text)
        new = HTML_TAG.sub("", new)
        if HTML_ENTITY.search(new):
            new = html.unescape(new)
        new = new.replace("\xa0", " ")
        if new == text:
            break
        text = new
    return tidy(text)


def remove_forum_markup(text):
    if "[" not in text:
        return text

    def quote(match):
        # A quote repeats an earlier message: drop it when the turn says
        # something besides it, keep its words when they are the whole turn.
        rest = (text[:match.start()] + text[match.end():]).strip()
        return "" if rest else match.group(1)

    new = FORUM_TAG.sub("", QUOTE_BLOCK.sub(quote, text))
    return tidy(new) if new != text else text


def remove_links(text):
    """Drop links; a turn where a link stood inside a sentence ("Читай тут:
    <link>, там всё") makes no sense without it and becomes empty, so the
    dialogue is cut there instead of learning a broken sentence."""
    matches = list(LINK.finditer(text))
    if not matches:
        return text
    for match in matches:
        before = text[:match.start()]
        after = text[match.end():]
        if (any(ch.isalnum() for ch in before) and any(ch.isalnum() for ch in after)
                and not SENTENCE_END.match(after)):
            return ""
    return tidy(LINK.sub("", text))


def replace_mentions(text):
    new = VK_MENTION.sub(lambda m: m.group(1), text)
    new = LEADING_ADDRESS.sub("", new, count=1)
    new = AT_USERNAME.sub("", new)
    return tidy(new) if new != text else text


def luhn_valid(digits):
    """The check digit every payment card carries; a random number passes 1 in 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_order_number(text, start):
    return bool(ORDER_NUMBER.search(text[max(0, start - 30):start]))


def mask_card(match):
    digits = re.sub(r"\D", "", match.group())
    if 13 <= len(digits) <= 19 and luhn_valid(digits) and not is_order_number(match.string, match.start()):
        return CARD_PLACEHOLDER
    return match.group()


def mask_phone(match):
    found = match.group()
    if THOUSANDS.fullmatch(found) or is_order_number(match.string, match.start()):
        return found
    digits = re.sub(r"\D", "", found)
    if found.startswith(("+7", "8")):
        whole = len(digits) == 11
    elif found.startswith("+"):
        whole = 8 <= len(digits) <= 15  # E.164 allows at most 15
    else:
        # "912 345-67-89", a mobile number without its +7: only in its groups,
        # since ten digits in a row are as often an account or order number.
        whole = len(digits) == 10 and found != digits
    return PHONE_PLACEHOLDER if whole else found


def mask_personal_data(text):
    """Phone numbers, e-mail addresses and card numbers become placeholders."""
    if "@" in text:
        text = EMAIL.sub(EMAIL_PLACEHOLDER, text)
    if not any(ch.isdigit() for ch in text):
        return text
    # Cards first: a card's 16 digits could otherwise pass for a long phone number.
    return PHONE_NUMBER.sub(mask_phone, CARD_NUMBER.sub(mask_card, text))


def collapse_punctuation(text):
    for pattern, replacement in REPEATED:
        text = pattern.sub(replacement, text)
    return text


def remove_space_before_punctuation(text):
    return SPACE_BEFORE_PUNCT.sub("", text)


def add_space_after_comma(text):
    return NO_SPACE_AFTER_COMMA.sub(", ", text)


# Order matters: white space first, so every later rule sees one-line turns;
# headers and timestamps are found at the start of the raw turn; HTML goes
# before links so that <a href="..."> does not leave a link; personal data
# after the markup is gone (an e-mail in an HTML entity, a number in a tag)
# and before the dialogue rules, which must not split a phone number.
MARKUP_RULES = [
    ("whitespace", normalise_space),
    ("forwarded_header", remove_forward_header),
    ("timestamp", remove_timestamps),
    ("html", fix_html),
    ("forum_markup", remove_forum_markup),
    ("link", remove_links),
    ("mention", replace_mentions),
    ("personal_data", mask_personal_data),
]
PUNCTUATION_RULES = [
    ("repeated_punctuation", collapse_punctuation),
    ("space_before_punctuation", remove_space_before_punctuation),
    ("space_after_comma", add_space_after_comma),
]
DIALOGUE_RULES = ["merged_turns", "speaker_prefix", "name_prefix"]
RULE_NAMES = [name for name, _ in MARKUP_RULES] + DIALOGUE_RULES + [name for name, _ in PUNCTUATION_RULES]
CUT_REASONS = ("empty_after_cleaning", "too_short", "too_long")


def remove_speaker_dash(text):
    return SPEAKER_DASH.sub("", text, count=1)


def split_merged_turns(turns, speakers=None):
    """[(turn, [pieces])] for turns that hold two or more speakers' lines. A
    turn whose speaker is known (speakers[i] != "") is one person's message
    and stays whole."""
    speakers = speakers or [""] * len(turns)
    out = []
    for turn, speaker in zip(turns, speakers):
        pieces = [turn]
        if not speaker and MERGED_TURNS.search(turn) and not AUTHOR_WORDS.search(turn):
            pieces = [p for p in MERGED_TURNS.split(turn) if p]
            # "Бегал. - ..." : a silence is a turn that says nothing, and the
            # cut it would cause loses the rest of the dialogue; leave it be.
            if not all(has_content(p) for p in pieces):
                pieces = [turn]
        out.append((turn, pieces))
    return out


def is_speaker_dialogue(labels):
    """Whether the 'Name:' labels heading these turns are speakers' names."""
    if not labels:
        return False
    counts = Counter(labels)
    if max(counts.values()) >= 2:
        return True
    words = {label.lower() for label in labels}
    if words <= SPEAKER_WORDS | ORDINAL_WORDS:
        return bool(words & SPEAKER_WORDS) or len(words) >= 2
    return False


def strip_name_prefixes(turns, logged):
    """Remove 'Name:' prefixes where the dialogue shows they name speakers.
    `logged[i]` says turn i came with a chat-log timestamp. Returns the turns
    and the indexes changed. A label followed by no words ("Минусы: 5") is
    the content of the turn, not a speaker."""
    matches = [NAME_PREFIX.match(turn) for turn in turns]
    labelled = [m and any(ch.isalpha() for ch in turns[i][m.end():]) for i, m in enumerate(matches)]
    speakers = is_speaker_dialogue([m.group(1) for m, ok in zip(matches, labelled) if ok])
    out, changed = [], []
    for i, (turn, match) in enumerate(zip(turns, matches)):
        if labelled[i] and (speakers or logged[i]):
            turn = turn[match.end():]
            changed.append(i)
        out.append(turn)
    return out, changed


# ---------------------------------------------------------------- dialogue
class Report:
    """Counts of what each rule did. `trace`, when set, is called with
    (rule, before, after) for every change (bench/clean_precision.py)."""

    def __init__(self, thresholds, trace=None):
        self.thresholds = thresholds
        self.trace = trace
        self.turns_changed = Counter()
        self.dialogues_changed = Counter()
        self.dialogues_cut = Counter()
        self.dialogues_dropped = Counter()
        self.counts = Counter()

    def changed(self, rule, before, after, dialogue_rules):
        self.turns_changed[rule] += 1
        dialogue_rules.add(rule)
        if rule == "personal_data":
            for kind, placeholder in PLACEHOLDERS.items():
                self.counts[f"replaced_{kind}"] += after.count(placeholder) - before.count(placeholder)
        if self.trace:
            self.trace(rule, before, after)

    def as_dict(self, input_path, output_path):
        rules = {name: {"turns_changed": self.turns_changed[name],
                        "dialogues_changed": self.dialogues_changed[name]} for name in RULE_NAMES}
        rules["merged_turns"]["turns_added"] = self.counts["turns_added"]
        rules["personal_data"]["replaced"] = {kind: self.counts[f"replaced_{kind}"] for kind in PLACEHOLDERS}
        cuts = {reason: {"dialogues_cut": self.dialogues_cut[reason],
                         "dialogues_dropped": self.dialogues_dropped[reason]} for reason in CUT_REASONS}
        return {"input": str(input_path), "output": str(output_path),
                "dialogues_in": self.counts["dialogues_in"], "dialogues_out": self.counts["dialogues_out"],
                "turns_in": self.counts["turns_in"], "turns_out": self.counts["turns_out"],
                "repair_rules": rules, "cut_rules": cuts,
                "too_few_turns_dropped": self.counts["too_few_turns"],
                "duplicates_dropped": self.counts["duplicates"],
                "thresholds": self.thresholds}


def apply_turn_rules(turn, rules, report, dialogue_rules):
    """The turn after `rules`, and the names of the rules that changed it."""
    fired = set()
    for name, rule in rules:
        new = rule(turn)
        if new != turn:
            report.changed(name, turn, new, dialogue_rules)
            fired.add(name)
            turn = new
    return turn, fired


def markup_rules(keep_personal_data):
    if keep_personal_data:
        return [(name, rule) for name, rule in MARKUP_RULES if name != "personal_data"]
    return MARKUP_RULES


def repair_turns(turns, report, keep_personal_data=KEEP_PERSONAL_DATA):
    """Every repair rule over one dialogue's turns (speakers unknown)."""
    return repair_dialogue(turns, [], report, keep_personal_data)[0]


def repair_dialogue(turns, speakers, report, keep_personal_data=KEEP_PERSONAL_DATA):
    """Every repair rule over one dialogue's turns; counts each changed turn
    once per rule that changed it. Returns (turns, speakers), aligned; the
    speakers are [] where the input's were (none known)."""
    known = bool(speakers)
    speakers = list(speakers) if known else [""] * len(turns)
    dialogue_rules = set()
    repaired, logged = [], []
    for turn in turns:
        turn, fired = apply_turn_rules(turn, markup_rules(keep_personal_data), report, dialogue_rules)
        repaired.append(turn)
        logged.append("timestamp" in fired)

    split, split_logged, split_speakers = [], [], []
    for (turn, pieces), was_logged, speaker in zip(split_merged_turns(repaired, speakers), logged, speakers):
        if len(pieces) > 1:
            report.changed("merged_turns", turn, " ‖ ".join(pieces), dialogue_rules)
            report.counts["turns_added"] += len(pieces) - 1
        split.extend(pieces)
        split_logged.extend([was_logged] + [False] * (len(pieces) - 1))
        split_speakers.extend([speaker] * len(pieces))

    split = [apply_turn_rules(turn, [("speaker_prefix", remove_speaker_dash)], report, dialogue_rules)[0]
             for turn in split]
    stripped, changed = strip_name_prefixes(split, split_logged)
    for i in changed:
        report.changed("name_prefix", split[i], stripped[i], dialogue_rules)

    out = [apply_turn_rules(turn, PUNCTUATION_RULES, report, dialogue_rules)[0] for turn in stripped]
    for name in dialogue_rules:
        report.dialogues_changed[name] += 1
    return out, (split_speakers if known else [])


def has_content(turn):
    """A turn says something when it has a letter, a digit, a "?" or "!"
    (a reply of "???" is an answer) or a pictograph such as 👍."""
    return any(ch.isalnum() or ch in "?!¿¡" or unicodedata.category(ch) == "So" for ch in turn)


def turn_fault(turn, min_chars, max_chars):
    if not turn or not has_content(turn):
        return "empty_after_cleaning"
    if len(turn) < min_chars:
        return "too_short"
    if len(turn) > max_chars:
        return "too_long"
    return None


def clean_run_bounds(faults):
    """(start, end) of the longest run of turns without a fault (earliest on ties)."""
    best, start = (0, 0), 0
    for i, fault in enumerate(faults + ["end"]):
        if fault:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = i + 1
    return best


def clean_dialogue(turns, report, min_chars, max_chars, min_turns, keep_personal_data=KEEP_PERSONAL_DATA):
    """Return the cleaned turns, or None when fewer than min_turns are left,
    whether or not the dialogue was cut."""
    kept = clean_dialogue_with_speakers(turns, [], report, min_chars, max_chars, min_turns, keep_personal_data)
    return kept and kept[0]


def clean_dialogue_with_speakers(turns, speakers, report, min_chars, max_chars, min_turns,
                                 keep_personal_data=KEEP_PERSONAL_DATA):
    """Return (turns, speakers) cleaned and aligned (speakers [] where none
    is known), or None when fewer than min_turns are left, whether or not the
    dialogue was cut."""
    turns, speakers = repair_dialogue(turns, speakers, report, keep_personal_data)
    faults = [turn_fault(t, min_chars, max_chars) for t in turns]
    if not any(faults):
        if len(turns) < min_turns:
            # Short from the start (or a turn was missing): no rule cut it, so it counts on its own.
            report.counts["too_few_turns"] += 1
            return None
        return turns, speakers
    start, end = clean_run_bounds(faults)
    kept = turns[start:end]
    first_fault = next(f for f in faults if f)
    if len(kept) < min_turns:
        kept = None
    (report.dialogues_cut if kept else report.dialogues_dropped)[first_fault] += 1
    if report.trace:
        report.trace(f"cut:{first_fault}", " ‖ ".join(turns), " ‖ ".join(kept) if kept else "(dropped)")
    return (kept, speakers[start:end]) if kept else None


def dialogue_key(turns, speakers=()):
    """Exact duplicates: the same turns, and the same speakers where known (one
    line said by two people is two dialogues for a bot that talks like one)."""
    text = "\x1e".join(turns)
    if speakers:
        text += "\x1d" + "\x1e".join(speaker_key(s) for s in speakers)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def speaker_key(speaker):
    """The part of a speaker string that tells speakers apart: before the first "|"."""
    return (speaker or "").split("|", 1)[0]


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
    schema = parquet.schema_arrow
    missing = {"sample", "dialogue_id"} - set(schema.names)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                        "(expected the output of parser_dataset.py)")
    sample_type = schema.field("sample").type
    if not (pa.types.is_list(sample_type) or pa.types.is_large_list(sample_type)):
        raise UserError(f"{path}: column 'sample' holds {sample_type}, not a list of turns "
                        "(run parser_dataset.py on it first)")
    if "speakers" in schema.names:
        speakers_type = schema.field("speakers").type
        if not ((pa.types.is_list(speakers_type) or pa.types.is_large_list(speakers_type))
                and pa.types.is_string(speakers_type.value_type)):
            raise UserError(f"{path}: column 'speakers' holds {speakers_type}, not lists of strings "
                            "(who said each turn, as parser_dataset.py writes it)")
    return parquet


def row_speakers(speakers, turns, path, dialogue_id):
    """A row's speakers, aligned with its turns; [] where none is known."""
    if not speakers:
        return []
    if len(speakers) != len(turns):
        raise UserError(f"{path}: dialogue_id {dialogue_id} has {len(speakers)} speakers for "
                        f"{len(turns)} turns (column 'speakers' must hold one a turn, or nothing)")
    return ["" if s is None else s for s in speakers]


def output_schema(input_schema):
    """The output's columns: the speakers column where the input has one, and
    the input's own metadata (the parser's owner record) kept as it was."""
    schema = SCHEMA.append(SPEAKERS_FIELD) if "speakers" in input_schema.names else SCHEMA
    metadata = {k: v for k, v in (input_schema.metadata or {}).items() if not k.startswith(b"ARROW:")}
    metadata.pop(b"pandas", None)  # describes the input's columns, not ours
    return schema.with_metadata(metadata) if metadata else schema


def check_outputs(output_path, report_path):
    """Refuse outputs the write would fail on, before any input is read."""
    for path, flag in ((output_path, "--output"), (report_path, "--report")):
        if path.is_dir():
            raise UserError(f"{path}: is a folder; {flag} needs a file name")
    if output_path.resolve() == report_path.resolve():
        raise UserError(f"{output_path}: --output and --report name the same file")


@contextlib.contextmanager
def writing(path, flag):
    """An OSError here is the output's fault (a read-only or missing place, a
    full disk): one line naming the file, not a traceback."""
    try:
        yield
    except OSError as exc:
        # pyarrow's message names the temporary file: the errno's own words say the reason alone.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"{path}: cannot write the {flag} file ({reason})") from None


def temp_name(path):
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def clean_file(input_path, output_path, report_path, min_chars=MIN_CHARS, max_chars=MAX_CHARS,
               min_turns=MIN_TURNS, dedupe=True, trace=None, keep_personal_data=KEEP_PERSONAL_DATA):
    output_path, report_path = Path(output_path), Path(report_path)
    check_outputs(output_path, report_path)
    parquet = open_input(input_path)
    thresholds = {"min_chars": min_chars, "max_chars": max_chars, "min_turns": min_turns,
                  "dedupe": dedupe, "keep_personal_data": keep_personal_data}
    report = Report(thresholds, trace)
    seen = set()
    tmp, report_tmp = temp_name(output_path), temp_name(report_path)
    names = parquet.schema_arrow.names
    has_source, has_speakers = "source" in names, "speakers" in names
    schema = output_schema(parquet.schema_arrow)
    columns = ["sample", "dialogue_id"] + (["source"] if has_source else []) + (["speakers"] if has_speakers else [])
    with writing(output_path, "--output"):
        output_path.parent.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(tmp, schema)
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            data = batch.to_pydict()
            sources = data["source"] if has_source else [""] * batch.num_rows
            speaker_lists = data["speakers"] if has_speakers else [None] * batch.num_rows
            out = {"sample": [], "dialogue_id": [], "source": [], "speakers": []}
            for turns, dialogue_id, source, speakers in zip(data["sample"], data["dialogue_id"], sources,
                                                            speaker_lists):
                speakers = row_speakers(speakers, turns or [], input_path, dialogue_id)
                if speakers:  # a missing turn goes with its speaker
                    speakers = [s for t, s in zip(turns, speakers) if t is not None]
                turns = [t for t in (turns or []) if t is not None]
                report.counts["dialogues_in"] += 1
                report.counts["turns_in"] += len(turns)
                cleaned = clean_dialogue_with_speakers(turns, speakers, report, min_chars, max_chars, min_turns,
                                                       keep_personal_data)
                if cleaned is None:
                    continue
                cleaned, speakers = cleaned
                if dedupe:
                    key = dialogue_key(cleaned, speakers)
                    if key in seen:
                        report.counts["duplicates"] += 1
                        continue
                    seen.add(key)
                out["sample"].append(cleaned)
                out["dialogue_id"].append(dialogue_id)
                out["source"].append(source)
                out["speakers"].append(speakers)
                report.counts["dialogues_out"] += 1
                report.counts["turns_out"] += len(cleaned)
            if not has_speakers:
                del out["speakers"]
            if out["sample"]:
                with writing(output_path, "--output"):
                    writer.write_table(pa.table(out, schema=schema))
        with writing(output_path, "--output"):
            writer.close()
        if report.counts["dialogues_in"] == 0:
            raise UserError(f"{input_path}: the file has no dialogues")
        if report.counts["dialogues_out"] == 0:
            raise UserError(f"{input_path}: no dialogue survived cleaning (check --min-chars/--max-chars)")
        summary = report.as_dict(input_path, output_path)
        # Both files are whole under their temporary names before either replaces
        # its previous version, so a report that cannot be written leaves the
        # previous output, not a new output beside an old report.
        with writing(report_path, "--report"):
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        with writing(output_path, "--output"):
            os.replace(tmp, output_path)
        with writing(report_path, "--report"):
            os.replace(report_tmp, report_path)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to report
            writer.close()
        tmp.unlink(missing_ok=True)
        report_tmp.unlink(missing_ok=True)
        raise
    return summary


def parse_args(argv):
    # prog: in a notebook cell argparse would name the kernel (ipykernel_launcher.py) in its messages.
    parser = argparse.ArgumentParser(prog="cleaner_text.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT, help="parquet from parser_dataset.py")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="clean parquet to write")
    parser.add_argument("--report", default=DEFAULT_REPORT,
                        help="JSON report (default: clean_report.json beside --output)")
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS, help="shortest turn kept")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS, help="longest turn kept")
    parser.add_argument("--min-turns", type=int, default=MIN_TURNS,
                        help="fewest turns a dialogue keeps after cleaning, cut or not")
    parser.add_argument("--keep-duplicates", action="store_true", default=KEEP_DUPLICATES,
                        help="do not drop exact duplicates")
    parser.add_argument("--keep-personal-data", action="store_true", default=KEEP_PERSONAL_DATA,
                        help="leave phone numbers, e-mail addresses and card numbers as written "
                             "(default: replaced by <телефон>, <почта>, <карта>)")
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
                             args.min_turns, dedupe=not args.keep_duplicates,
                             keep_personal_data=args.keep_personal_data)
    except UserError as exc:
        print(f"cleaner_text.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"kept {summary['dialogues_out']} of {summary['dialogues_in']} dialogues "
          f"({summary['turns_in']} turns in, {summary['turns_out']} out) -> {args.output}")
    for name, row in summary["repair_rules"].items():
        if row["turns_changed"]:
            added = f", {row['turns_added']} turns added" if row.get("turns_added") else ""
            if row.get("replaced"):
                added += ", " + ", ".join(f"{n} {kind}" for kind, n in row["replaced"].items() if n) + " replaced"
            print(f"  {name:24s} repaired {row['turns_changed']} turns in "
                  f"{row['dialogues_changed']} dialogues{added}")
    for name, row in summary["cut_rules"].items():
        if row["dialogues_cut"] or row["dialogues_dropped"]:
            print(f"  {name:24s} cut {row['dialogues_cut']} dialogues, dropped {row['dialogues_dropped']}")
    if summary["too_few_turns_dropped"]:
        print(f"  {'too_few_turns':24s} dropped {summary['too_few_turns_dropped']} dialogues "
              f"(fewer than {args.min_turns} turns without a cut)")
    if summary["duplicates_dropped"]:
        print(f"  {'duplicates':24s} dropped {summary['duplicates_dropped']} dialogues")
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
