"""Commands and memory: the one command table, /memory and /forget, the one rule for the console chat and the bot.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (and the user_facts block)."""

# How the remembered facts are named to people, and what the commands answer.
FACT_LABELS = {"name": "имя", "city": "город", "age": "возраст", "occupation": "работа", "study": "учёба",
               "family": "семья", "pet": "питомец", "like": "нравится", "dislike": "не нравится",
               "plan": "планы"}
FORGOT_ALL_REPLY = "Забыл всё, что знал о тебе."
FORGOT_SOME_REPLY = "Забыл:"                 # followed by the forgotten facts, one a line
NOTHING_TO_FORGET_REPLY = "Ничего такого я о тебе не помню."
MEMORY_OFF_REPLY = "Память о собеседниках выключена."
EVERYONE, GROUP_ADMINS = "everyone", "group admins"   # who may use a command (in a private chat: its user)


class Command:
    """A row of the command table. The handler is the host script's own (each script registers
    its handlers by name); a row may bring its own, a command only one script has."""

    def __init__(self, name, description, who=EVERYONE, memory=False, usage=None, handler=None):
        self.name, self.description, self.who, self.memory = name, description, who, memory
        self.usage = usage or f"/{name} — {description}"   # its line in /help
        self.handler = handler


# The commands of the console chat and the bot: /help, the bot's menu (setMyCommands) and the
# dispatch of both are made from this table, so a command is added here once.
COMMANDS = [
    Command("start", "начать"),
    Command("help", "что я умею"),
    Command("reset", "забыть разговор и начать заново", who=GROUP_ADMINS,
            usage="/reset — забыть разговор и начать сначала."),
    Command("memory", "что я о тебе помню", memory=True,
            usage="/memory — что я о тебе помню (имя, город, возраст, работа, учёба, семья, питомцы, "
                  "что любишь и не любишь, планы)"),
    Command("forget", "забыть то, что я о тебе знаю", memory=True,
            usage="/forget — забыть всё о тебе; /forget <слово> — забыть то, где есть это слово"),
]


def offered_commands(table, handlers, memory=True):
    """The rows a script answers (a handler of its own or the row's) and shows, in table order;
    with memory off the memory commands are answered (they say so) but not offered."""
    return [row for row in table if (row.handler or handlers.get(row.name)) and (memory or not row.memory)]


def help_text(intro, table, handlers, memory=True):
    """/help: the script's own first words, then a line per command it offers."""
    shown = [row.usage for row in offered_commands(table, handlers, memory) if row.name not in ("start", "help")]
    return "\n".join([intro] + shown)


def render_facts_list(facts):
    """The /memory list: one fact a line, as stored, so that /forget <слово> can name it."""
    in_kind_order = sorted(facts, key=lambda fact: FACT_KINDS.index(fact[0]))
    return "\n".join(f"{FACT_LABELS[kind]}: {value}" for kind, value in in_kind_order)


FUNCTION_WORD_TAGS = {"PREP", "CONJ", "PRCL", "NPRO", "INTJ"}   # "в", "и", "не", "мне", "ой"


def is_function_word(word):
    """A preposition, conjunction, particle, pronoun or interjection in its likeliest reading,
    and never a name ("ли" is also Ли): it is in many facts and names none of them."""
    parses = load_fact_tools()["parse"](word)
    return parses[0].tag.POS in FUNCTION_WORD_TAGS and not any("Name" in p.tag.grammemes for p in parses)


def forget_user_facts(facts, word):
    """(kept, removed): the facts whose value or label holds `word` in any form
    ("/forget казани" removes Казань; "/forget город" removes the city). Punctuation around
    the word is ignored ("Аня,"), and a function word ("в", "не") removes nothing."""
    query = re.sub(r"^\W+|\W+$", "", fold(word))
    if not query or is_function_word(query):
        return list(facts), []
    query_lemmas = {fold(p.normal_form) for p in load_fact_tools()["parse"](query)} | {query}
    kept, removed = [], []
    for kind, value in facts:
        value_words = [w for w in re.split(r"[\s()\-]+", fold(value)) if w]
        lemmas = {fold(p.normal_form) for w in value_words for p in load_fact_tools()["parse"](w)}
        labels = {fold(FACT_LABELS[kind])} | set(fold(FACT_LABELS[kind]).split())
        hit = query in value_words or query_lemmas & lemmas or query in labels or fold(value) == query
        (removed if hit else kept).append((kind, value))
    return kept, removed


# --- /forget: one rule for what goes with a forgotten fact.
# A stored message goes when it holds ANY content word of a forgotten fact, or the word asked
# about, in any form. Not only when it holds all of a fact's words: a user who says "/forget Сочи"
# about "поехать в Сочи летом" expects "я был в Сочи" gone too, since it still tells what they
# asked to forget; function words ("в", "не") are left out, or every message would go.
def forget_words(argument):
    """The words of "/forget <слова>", each on its own, the punctuation around them stripped
    ("/forget Аня," forgets the name; a hyphen inside a word stays)."""
    return [word for word in (re.sub(r"^\W+|\W+$", "", word) for word in argument.split()) if word]


def content_words(value):
    """The words of a fact's value that a forgotten fact takes with it from stored messages:
    not prepositions, conjunctions, particles or pronouns ("поехать в Сочи" takes поехать
    and Сочи, not every message with "в")."""
    words = [word for word in re.split(r"[^\w]+", fold(value)) if word]
    return [word for word in words if word.isdigit() or (len(word) > 1 and not is_function_word(word))]


def any_form_matcher(words, parse=None):
    """holds(text): True when text has one of `words` in any form ("Казани", "казанью" for
    Казань): a word whose normal forms meet theirs, or one of their inflected forms; None for no words."""
    parse = parse or load_fact_tools()["parse"]
    lemmas, forms = set(), set()
    for word in words:
        lemmas |= {word} | {fold(p.normal_form) for p in parse(word)}
        forms |= {word} | {fold(form.word) for p in parse(word)[:3] for form in p.lexeme}
    if not lemmas:
        return None

    def holds(text):
        for word in re.findall(r"\w+", fold(text)):
            if word in forms or word in lemmas or any(fold(p.normal_form) in lemmas for p in parse(word)):
                return True
        return False

    return holds


def forget_facts(facts, argument):
    """/forget (argument "": everything) on a user's facts: (kept, removed, holds), holds(text)
    True for a stored message that must go with them (None: none need to)."""
    words = forget_words(argument)
    if argument.strip():
        kept, removed = list(facts), []
        for word in words:
            kept, gone = forget_user_facts(kept, word)
            removed += gone
    else:
        kept, removed = [], list(facts)
    labels = {word for label in FACT_LABELS.values() for word in fold(label).split()}
    asked = [word for word in words if fold(word) not in labels]  # "/forget город" names a kind, not a word said
    doomed = [word for value in [value for _, value in removed] + asked for word in content_words(value)]
    return kept, removed, any_form_matcher(doomed)


def exchanges_holding(rows, holds):
    """The ids of the stored turns, (id, role, text) oldest first, that go with a forgotten
    word: every turn that holds it, and the other turn of its exchange, so that the
    history left still alternates question and answer."""
    doomed = set()
    for i, (row_id, role, text) in enumerate(rows):
        if not holds(text):
            continue
        doomed.add(row_id)
        if role == "user" and i + 1 < len(rows) and rows[i + 1][1] == "bot":
            doomed.add(rows[i + 1][0])
        elif role == "bot" and i > 0 and rows[i - 1][1] == "user":
            doomed.add(rows[i - 1][0])
    return doomed
