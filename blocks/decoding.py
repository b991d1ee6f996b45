"""Decoding: the sampling settings and the reply-only penalties the chat scripts and evaluate.py use.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

LEADING_LABELS = re.compile(r"^(?:\s*ответ\s*:)+", re.IGNORECASE)
NEXT_TURN = re.compile(r"(?im)^[ \t]*(?:вопрос|ответ)[ \t]*:")
# the model going on to write the next turn itself: a label that starts a line
STOP_STRINGS = [TURN_SEPARATOR + QUESTION_LABEL.strip(), TURN_SEPARATOR + ANSWER_LABEL.strip()]


class OnReplyOnly:
    """A transformers logits processor that sees the reply's tokens only, input_ids[:, prompt_length:].

    transformers' n-gram blocking looks at the whole sequence, prompt included, so it
    bans the question's words and the name a user gave, which an answer on topic and a
    bot that remembers must repeat. Rows of a left-padded batch share prompt_length."""

    def __init__(self, processor, prompt_length):
        self.processor, self.prompt_length = processor, prompt_length

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.prompt_length:], scores)


def reply_processors(generation, prompt_length):
    """Repetition penalty and n-gram blocking of the generation settings (chat_config.json),
    applied to the reply being generated and never to the prompt."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = []
    penalty = float(generation.get("repetition_penalty") or 1.0)
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_length))
    size = int(generation.get("no_repeat_ngram_size") or 0)
    if size > 0:
        processors.append(OnReplyOnly(NoRepeatNGramLogitsProcessor(size), prompt_length))
    return processors


def cut_at_next_turn(text):
    """The reply without an echoed answer label, cut where the model went on to write the
    next turn itself: at a label that starts a line, never at "вопрос:" inside a sentence."""
    text = LEADING_LABELS.sub("", text)
    label = NEXT_TURN.search(text)
    return text[:label.start()] if label else text
