"""Reply metrics: unigram F1 and distinct-n, for evaluate.py and the two LSTM scripts (pytorch_chatbot.py,
tensorflow_chatbot.py), each scoring token lists of its own tokeniser.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (Counter)."""

def is_word(token):
    """Letters, digits or an underscore first: a word, not a punctuation mark."""
    return token[0].isalnum() or token[0] == "_"


def unigram_f1(hypothesis, reference):
    """Bag-of-words overlap of one reply's tokens with its reference's. Words only: a reply of
    bare punctuation would otherwise score on the reference's full stop."""
    hypothesis = [t for t in hypothesis if is_word(t)]
    reference = [t for t in reference if is_word(t)]
    common = sum((Counter(hypothesis) & Counter(reference)).values())
    if common == 0:
        return float(not hypothesis and not reference)
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def distinct_n(replies, n):
    """Unique n-grams over all n-grams of all replies, each a token list (n-grams never span two replies)."""
    ngrams = [tuple(tokens[i:i + n]) for tokens in replies for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0
