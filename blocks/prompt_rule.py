"""The one prompt rule: how a conversation becomes token ids, in training, chat, evaluation and serving.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

# One rule for every prompt the model sees, in training, chat, perplexity and evaluation:
#
#     Вопрос: <persona question>          the persona, when there is one
#     Ответ: <persona answer>
#     Вопрос: Что ты обо мне знаешь?      what the bot knows about the user, when it knows something
#     Ответ: <facts>
#     Ответ: <older turn>                 turns labelled counting back from the answer, so
#     Вопрос: <the user's question>       the turn before the answer is always a question
#     Ответ:                              the prompt ends at the colon ...
#      <answer><EOS>                      ... and the answer keeps its first word's space
#
# GPT-2's byte-level BPE spells a word inside a sentence with its space (" Привет"),
# so the space goes with the answer, not with the prompt. No BOS is added anywhere:
# a prompt starts with its first label in training and in chat alike, whatever the
# tokenizer's add_bos_token says. Text is tokenized as plain text: "</s>" typed by
# a user is five characters, never the EOS id.
PROMPT_RULE = 2                # chat_config.json "prompt_rule": the rule a model folder was trained with
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
FACTS_QUESTION = "Что ты обо мне знаешь?"
DEFAULT_MAX_TURNS = 16         # the turn window of a model folder whose chat_config.json records none
FACTS_ROOM_FOR_QUESTION = 16   # tokens the facts exchange leaves the question (its own length, if shorter)
LABEL_PATTERN = re.compile(r"(?i)\b(вопрос|ответ)\s*:")


def prepare_turn(text):
    """A turn as a prompt holds it: Unicode NFC, one line with single spaces (a newline
    separates turns), and a label inside it ("Ответ:") made "Ответ -", so that a user
    cannot start a turn of their own."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return LABEL_PATTERN.sub(lambda m: m.group(1) + " -", text)


def header_text(persona=None, facts=None):
    """The exchanges every prompt starts with: the persona, then what the bot knows about the user."""
    lines = []
    if persona:
        lines += [QUESTION_LABEL + prepare_turn(persona["question"]), ANSWER_LABEL + prepare_turn(persona["answer"])]
    if facts:
        lines += [QUESTION_LABEL + FACTS_QUESTION, ANSWER_LABEL + prepare_turn(facts)]
    return "".join(line + TURN_SEPARATOR for line in lines)


def prompt_text(turns, persona=None, facts=None):
    """The prompt for turns (oldest first, the user's question last), ending at the answer label's colon."""
    count = len(turns)
    lines = [(QUESTION_LABEL if (count - 1 - i) % 2 == 0 else ANSWER_LABEL) + prepare_turn(turn)
             for i, turn in enumerate(turns)]
    return header_text(persona, facts) + "".join(line + TURN_SEPARATOR for line in lines) + ANSWER_LABEL.rstrip()


def encode_text(tokenizer, text):
    """Token ids of text, taken as plain text: nothing added (no BOS, no EOS), and the spelling
    of a special token ("</s>") tokenized as the characters it is."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def answer_ids(tokenizer, answer):
    """The answer as the model learns to write it after a prompt: its first word with its
    leading space, then the tokenizer's own EOS."""
    return encode_text(tokenizer, " " + prepare_turn(answer)) + [tokenizer.eos_token_id]


def first_fitting(starts, fits):
    """The smallest of the sorted starts that fits (a later start leaves less text), else None."""
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return starts[lo] if lo < len(starts) else None


def fit_question(tokenizer, question, budget, persona=None, facts=None):
    """The longest end of the (prepared) question whose prompt fits in budget tokens, cut
    before a word where one fits; None when not even an empty question fits. The end is
    kept: people ask after the material."""
    def fits(start):
        return len(encode_text(tokenizer, prompt_text([question[start:]], persona, facts))) <= budget

    if fits(0):
        return question
    if not fits(len(question)):
        return None
    word_starts = [i for i in range(1, len(question)) if question[i - 1] == " "]
    start = first_fitting(word_starts, fits)
    if start is None:  # not even the last word fits: keep the end of it
        start = first_fitting(list(range((word_starts or [0])[-1] + 1, len(question) + 1)), fits)
    return question[start:]


def facts_that_fit(tokenizer, facts, budget, persona=None, question=""):
    """The facts answer as a prompt of budget tokens holds it beside the persona, leaving the
    question FACTS_ROOM_FOR_QUESTION tokens (or its own length, if shorter): whole, or cut
    clause by clause from its end, where the answer keeps what matters least (it names the
    user first, their plans last); None when not even its first clause fits. Training and
    chat both cut here, so the exchange a model learnt is the one it is sent."""
    bare = len(encode_text(tokenizer, prompt_text([""], persona)))
    room = min(FACTS_ROOM_FOR_QUESTION, len(encode_text(tokenizer, prompt_text([question], persona))) - bare)

    def fits(text):
        return len(encode_text(tokenizer, prompt_text([""], persona, text))) + room <= budget

    if fits(facts):
        return facts
    clauses = facts.rstrip(".").split(", ")
    for count in range(len(clauses) - 1, 0, -1):
        text = ", ".join(clauses[:count]) + "."
        if fits(text):
            return text
    return None


def fit_prompt(tokenizer, turns, max_turns, budget, persona=None, facts=None):
    """Prompt ids for a conversation (turns oldest first, the user's question last): the
    persona, the facts as far as they fit beside it (facts_that_fit), the question (its end, if it alone is too
    long), and the newest earlier turns that fit the turn window (max_turns turns, the
    question included) and budget tokens; the oldest go first. None when not even the
    persona and an empty question fit."""
    turns = [prepare_turn(turn) for turn in turns[-max_turns:]]
    facts = facts_that_fit(tokenizer, facts, budget, persona, turns[-1]) if facts else None
    whole = encode_text(tokenizer, prompt_text(turns, persona, facts))
    if len(whole) <= budget:
        return whole
    question = fit_question(tokenizer, turns[-1], budget, persona, facts)
    if question is None:
        return None
    earlier = turns[:-1]

    def encoded(count):  # the prompt with the newest `count` earlier turns
        return encode_text(tokenizer, prompt_text(earlier[len(earlier) - count:] + [question], persona, facts))

    lo, hi = 0, len(earlier) - 1  # the prompt with lo earlier turns fits (all of them did not)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encoded(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return encoded(lo)


def encode_exchange(tokenizer, turns, answer, max_turns, context_tokens, max_length, persona=None, facts=None):
    """(prompt ids, answer ids) of one exchange, as training learns it and perplexity.py and
    evaluate.py score it; None when the answer leaves no room for a prompt. The answer is
    never cut: the prompt gets context_tokens, or less where a long answer leaves less of
    max_length."""
    target = answer_ids(tokenizer, answer)
    prompt = fit_prompt(tokenizer, turns, max_turns, min(context_tokens, max_length - len(target)), persona, facts)
    return None if prompt is None else (prompt, target)


def prompt_window(chat_config, n_positions, max_new_tokens, max_turns=None, context_tokens=None):
    """(turn window, prompt budget in tokens, warning lines) for a model folder: what training
    recorded in chat_config.json, or what --max-turns / --context-tokens ask for (a warning
    where that is more than the model was trained on). The budget leaves max_new_tokens of
    the model's positions for the reply."""
    config = chat_config or {}
    notes = []
    rule = config.get("prompt_rule")
    if chat_config is not None and rule is None:
        notes.append("chat_config.json records no prompt_rule: the model was trained by an older kit, on "
                        "prompts that end in 'Ответ: ' with a space; retrain it for the prompts it is given now")
    elif chat_config is not None and rule != PROMPT_RULE:
        notes.append(f"chat_config.json has prompt_rule {rule!r}, this kit builds prompts by rule "
                        f"{PROMPT_RULE}: they may differ from the ones the model was trained on")
    trained_turns = int(config.get("max_turns") or DEFAULT_MAX_TURNS)
    trained_tokens = int(config.get("context_tokens") or n_positions - max_new_tokens)
    turns, tokens = int(max_turns or trained_turns), int(context_tokens or trained_tokens)
    if turns > trained_turns:
        notes.append(f"--max-turns {turns}: the model was trained on at most {trained_turns} turns before "
                        f"the answer")
    if tokens > trained_tokens:
        notes.append(f"--context-tokens {tokens}: the model was trained on prompts of at most "
                        f"{trained_tokens} tokens")
    return turns, min(tokens, n_positions - max_new_tokens), notes
