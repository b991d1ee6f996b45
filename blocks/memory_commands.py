"""Memory commands: /memory and /forget, the one rule for the console chat and the bot.

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
MEMORY_HELP = ("/memory — что я о тебе помню (имя, город, возраст, работа, учёба, семья, питомцы, "
               "что любишь и не любишь, планы)\n"
               "/forget — забыть всё о тебе; /forget <слово> — забыть то, где есть это слово")


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
