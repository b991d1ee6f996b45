"""
Console chat with a trained model folder: the quickest way to talk to what you
trained, and the last step of the demo.

The prompt is built by the kit's one prompt rule, the one training used: the
persona (a first "Вопрос:/Ответ:" exchange), then the newest turns that fit the
turn window and token budget the model was trained with (chat_config.json;
--max-turns and --context-tokens change them, with a warning where that goes
beyond training), fed to the model as the very token ids training gave it.
Repetition penalty and n-gram blocking look at the reply only, never at the
prompt, so an answer may repeat the question's words and the name the user gave.
Replies are cut at EOS or at a label that starts a line, cleaned of markup and
links, and never empty; an empty one is not kept in the conversation. A reply is printed as
it is written, cleaned as the whole one is (a label the model goes on to write never shows;
--no-stream prints it once complete). On a CPU the model runs
with int8 linear layers on one thread per physical core, about twice as fast as
plain fp32 (bench/generation.py measures it); --quantize none turns that off. Or the model
runs in an OpenAI-compatible inference server (--server: transformers serve, vLLM), asked
only for the continuation of the chat's own prompt; the folder then gives the tokenizer and
the chat settings and needs no weights.

Run it (CPU):
    python system_prompt.py --model rugpt3_50k
    python system_prompt.py --model rugpt3_medium_CLEAN_model --persona "Я помощник по кулинарии."
    python system_prompt.py --model rugpt3_50k --quantize none --threads 4   # plain fp32 weights
on a GPU:
    python system_prompt.py --model rugpt3_medium_CLEAN_model --device cuda
with the model in an inference server (deploy/README.md has the ways to run one):
    transformers serve rugpt3_50k --host 127.0.0.1 --port 8000 --device cpu &
    python system_prompt.py --model rugpt3_50k --server http://127.0.0.1:8000
without a person (tests, the demo): play a file of user lines, print the transcript
    python system_prompt.py --model rugpt3_50k --script data/demo_chat.txt --show-prompt

In the chat: "выход" ends it, "/reset" forgets the conversation.
"""
import argparse
import html
import json
import os
import re
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import requests
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          StopStringCriteria, StoppingCriteriaList, set_seed)
from transformers.activations import NewGELUActivation
from transformers.generation import BaseStreamer
from transformers.pytorch_utils import Conv1D

# -----------------------------------------------------------------------------
# defaults (every one is also a flag; the model folder's chat_config.json wins over
# the built-in generation values, a flag wins over both)
DEFAULT_MODEL = "rugpt3_50k"
DEFAULT_DEVICE = "auto"
DEFAULT_SEED = 42
DEFAULT_QUANTIZE = "auto"       # int8 linear layers on a CPU, plain weights on a GPU
SERVER = None                   # base URL of an OpenAI-compatible inference server; None: the model runs here
SERVER_TIMEOUT = 60.0           # seconds a reply from the server may take, its wait in the server's queue included
NO_STREAM = False               # True: print a reply once it is complete, not as it is written
EXIT_WORDS = ("выход", "exit", "quit")
RESET_COMMAND = "/reset"
USER_PREFIX = "Вы: "
BOT_PREFIX = "Бот: "
RESET_NOTICE = "(история разговора очищена)"
NOT_UTF8_NOTICE = "(строка не в кодировке UTF-8, пропускаю её)"
SERVER_ERROR_NOTICE = "(сервер модели не ответил, попробуйте ещё раз)"
# -----------------------------------------------------------------------------


# --- prompt rule: the same block in train_transformer.py, train_medium_context.py, system_prompt.py, tg_bot.py, perplexity.py and evaluate.py (tests/test_prompt_rule.py checks)
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


def fit_prompt(tokenizer, turns, max_turns, budget, persona=None, facts=None):
    """Prompt ids for a conversation (turns oldest first, the user's question last): the
    persona, the facts when they fit beside it, the question (its end, if it alone is too
    long), and the newest earlier turns that fit the turn window (max_turns turns, the
    question included) and budget tokens; the oldest go first. None when not even the
    persona and an empty question fit."""
    turns = [prepare_turn(turn) for turn in turns[-max_turns:]]
    if facts and len(encode_text(tokenizer, prompt_text([""], persona, facts))) > budget:
        facts = None
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
# --- end of the prompt rule


# --- decoding: the same block in system_prompt.py, tg_bot.py and evaluate.py (tests/test_prompt_rule.py checks)
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
# --- end of the decoding block


# --- mirrored in system_prompt.py and tg_bot.py (tests/test_system_prompt.py checks they agree)
CHAT_CONFIG_NAME = "chat_config.json"
FALLBACK_REPLY = "Простите, не понял вопрос. Можете сказать иначе?"
DEFAULT_PERSONA = {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."}
DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                      "top_k": 50, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3}
MIN_QUESTION_TOKENS = 16  # a budget that leaves less room than this for the user's words is a misconfiguration
MARKDOWN_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")
HTML_TAG = re.compile(r"</?[A-Za-z!|][^<>\n]{0,200}>")
URL = re.compile(r"(?i)\b(?:https?://|ftp://|www\.|t\.me/)\S+")
MARKUP_RUNS = re.compile(r"(\*\*|__|~~|```|`|^#{1,6}\s|^>\s?)", re.MULTILINE)
# A reply shown while it is written holds back what the next tokens may still turn into something
# the cleaning removes: a word that may become "Вопрос:", a link or a tag not closed yet.
TRAILING_LABEL_WORD = re.compile(r"(?i)\b(?:вопрос|ответ)\s*$")
UNCLOSED_MARKUP = re.compile(r"!?\[[^\]\n]*(?:\]\([^)\n]*)?$|<[^<>\n]*$")
SERVER_CONNECT_SECONDS = 5.0  # an inference server that does not take the connection in this time is down
# Counted by the server's tokenizer at the start: a BOS added, or "</s>" typed by a user read as the
# end of text, would give a count other than the kit's.
PROBE_PROMPT = "Вопрос: </s> проверка <s>\nОтвет:"


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


class ServerError(Exception):
    """The inference server is down, slow, or answered with an error: the reply is an apology."""


def chat_prompt_ids(history, settings, tokenizer):
    """The prompt's token ids for `history` (turns oldest first, alternating user/bot, the
    last the user's new message): the prompt rule with the model's turn window and budget,
    the ids the model is fed as they are."""
    return fit_prompt(tokenizer, history, settings["max_turns"], settings["budget"], settings["persona"],
                      settings.get("facts"))


def clean_reply(text, eos_token=None):
    """The model's raw continuation made fit to show: cut at EOS or at a label that
    starts a line, stripped of markup, links and label leakage; a fallback when empty."""
    if eos_token and eos_token in text:
        text = text[:text.index(eos_token)]
    text = cut_at_next_turn(text)
    text = html.unescape(text)
    text = MARKDOWN_LINK.sub(r"\1", text)
    text = HTML_TAG.sub(" ", text)
    text = URL.sub(" ", text)
    text = MARKUP_RUNS.sub("", text)
    # Undecodable bytes and control characters are noise from a cut multi-byte token.
    text = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    text = " ".join(text.split())
    return text if any(ch.isalnum() for ch in text) else FALLBACK_REPLY


def stable_prefix(raw):
    """The start of a raw continuation that the tokens still to come cannot change: up to its
    last whitespace (the last word may still grow into a label, a link or an entity), less a
    trailing label word (its colon may come next) and a link or tag not yet closed, and again
    up to the whitespace before what that leaves."""
    text = raw
    while True:
        text = text[:max(text.rfind(" "), text.rfind("\n"), text.rfind("\t")) + 1]
        match = TRAILING_LABEL_WORD.search(text) or UNCLOSED_MARKUP.search(text)
        if match is None:
            return text
        text = text[:match.start()]


def visible_reply(raw):
    """What may be shown of a reply still being written ("" while nothing may): cleaned as the
    finished reply is, so it is always a start of clean_reply of the whole continuation, and no
    label, link or markup ever shows, not even for a moment."""
    text = clean_reply(stable_prefix(raw))
    return "" if text == FALLBACK_REPLY else text


class ReplyStreamer(BaseStreamer):
    """Hands each row of a batch being generated its visible text as it grows: on_text[row]
    (None for a row nobody watches) gets each new text, every one a longer start of the last.
    generate() calls put() with the padded prompts first, then with one new token per row at
    every step (pad tokens for the rows that are done). It runs on the generating thread, so
    on_text must only store the text, never wait."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, list(on_text)
        self.ids = [[] for _ in self.on_text]
        self.done = [callback is None for callback in self.on_text]
        self.shown = ["" for _ in self.on_text]
        self.prompts_seen = False

    def put(self, value):
        if not self.prompts_seen:
            self.prompts_seen = True
            return
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            if token == self.tokenizer.eos_token_id:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            text = visible_reply(self.tokenizer.decode(self.ids[row], skip_special_tokens=True))
            if text != self.shown[row] and text.startswith(self.shown[row]):
                self.shown[row] = text
                self.on_text[row](text)

    def end(self):
        pass


def find_weights_folder(folder, need_weights=True):
    """The folder's own weights, else its newest complete checkpoint-N/. Without need_weights
    (a server runs the model) a folder with config.json and the tokenizer will do."""
    def complete(path):
        return (path / "config.json").is_file() and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())

    if complete(folder) or (not need_weights and (folder / "config.json").is_file()):
        return folder
    checkpoints = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        # Trainer writes trainer_state.json last: without it the save was cut short.
        if step.isdigit() and path.is_dir() and complete(path) and (path / "trainer_state.json").is_file():
            checkpoints.append((int(step), path))
    if not checkpoints:
        raise UserError(f"{folder}: no model weights (config.json + model.safetensors) "
                        f"at its top level or in a complete checkpoint-N/ folder")
    return max(checkpoints)[1]


def read_chat_config(folder, weights):
    """chat_config.json from the weights' folder or, for a checkpoint, its parent."""
    for path in (weights / CHAT_CONFIG_NAME, folder / CHAT_CONFIG_NAME):
        if path.is_file():
            break
    else:
        print(f"warning: no {CHAT_CONFIG_NAME} in {folder}; using the kit's default persona and "
              f"generation settings", file=sys.stderr)
        return {"persona": DEFAULT_PERSONA, "generation": dict(DEFAULT_GENERATION)}, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a UTF-8 JSON file ({error})") from None
    if not isinstance(config, dict) or config.get("format_version") != 1:
        raise UserError(f"{path}: expected a JSON object with \"format_version\": 1")
    for key, ours in (("question_label", QUESTION_LABEL), ("answer_label", ANSWER_LABEL),
                      ("turn_separator", TURN_SEPARATOR)):
        if key in config and config[key] != ours:
            raise UserError(f"{path}: {key} {config[key]!r} differs from the kit's prompt format {ours!r}")
    return config, path


def open_model_folder(model_dir, device, need_weights=True):
    """Tokenizer, model config and chat settings of a kit model folder: all that the
    settings are checked against, before the slow part (load_weights). With a server
    running the model (need_weights=False) the folder needs no weights."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    if (folder / "config.json").is_file():
        try:
            kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("kit_model")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            kind = None
        if kind:
            raise UserError(f"{folder}: this is an LSTM folder ({kind}); talk to it with its own script's chat mode")
    weights = find_weights_folder(folder, need_weights)
    chat_config, config_path = read_chat_config(folder, weights)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    tokenizer_dir = weights if (weights / "tokenizer_config.json").is_file() else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = AutoConfig.from_pretrained(weights)
    except (OSError, ValueError) as error:
        raise UserError(f"{weights}: cannot load the model config or the tokenizer ({error})") from None
    if tokenizer.eos_token is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no eos_token")
    if tokenizer.pad_token is None:
        # Only to pad a batch: padded positions are masked out and a reply ends at its EOS.
        tokenizer.pad_token = tokenizer.eos_token
    n_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 2048
    return {"tokenizer": tokenizer, "device": device, "chat_config": chat_config, "config_path": config_path,
            "weights": weights, "n_positions": n_positions}


def physical_cores():
    """Cores this process may run on, SMT siblings counted once: generation is bound
    by memory bandwidth, which a sibling thread shares rather than adds to."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text(encoding="utf-8").strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def choose_quantization(quantize, device):
    """What --quantize (auto, int8, none) means on this device: int8 or none."""
    available = hasattr(torch.ao.quantization, "quantize_dynamic") and torch.backends.quantized.engine != "none"
    if quantize == "auto":
        return "int8" if device == "cpu" and available else "none"
    if quantize == "int8" and device != "cpu":
        raise UserError(f"--quantize int8 runs on the CPU only; with --device {device} use --quantize none or auto")
    if quantize == "int8" and not available:
        raise UserError(f"--quantize int8: this torch {torch.__version__} has no dynamic int8 quantization; "
                        f"use --quantize none")
    return quantize


def conv1d_to_linear(model):
    """GPT-2 keeps its block weights in transformers' Conv1D (in x out), a layer the
    int8 quantizer passes over; the same layer as nn.Linear (out x in) it takes."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.nx, child.nf, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return model


def quantize_int8(model):
    """Every linear layer (the output layer too) with int8 weights, one scale per
    output row, and activations quantized on the fly: a quarter of the weight
    bytes that each generated token must read, which is what bounds a CPU."""
    model = conv1d_to_linear(model)
    with warnings.catch_warnings():
        # torch 2.13 ships this API but marks it deprecated in favour of the torchao
        # package (see deploy/README.md); choose_quantization falls back where it is gone.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)


def fuse_gelu(model):
    """GPT-2's tanh GELU as torch's fused kernel: the same formula in one pass over
    the activations instead of five, which shows in batches."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


def fast_path(model):
    """The model as the fast path runs it on a CPU."""
    return quantize_int8(fuse_gelu(model))


def load_weights(chat, quantize="auto", threads=0):
    """The model itself (int8 on a CPU unless told otherwise), the threads it runs
    on, and the criterion that stops it at the next label."""
    chat["quantize"] = choose_quantization(quantize, chat["device"])
    try:
        model = AutoModelForCausalLM.from_pretrained(chat["weights"]).to(chat["device"]).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"{chat['weights']}: cannot load the model weights ({error})") from None
    chat["model"] = fast_path(model) if chat["quantize"] == "int8" else model
    # torch starts one thread per logical CPU, SMT siblings included.
    chat["threads"] = threads or physical_cores()
    if chat["device"] == "cpu":
        torch.set_num_threads(chat["threads"])
    # Built once: the criterion is stateless, and building it scans the whole vocabulary.
    chat["stop"] = StoppingCriteriaList([StopStringCriteria(chat["tokenizer"], STOP_STRINGS)])
    return chat


def resolve_settings(args, chat):
    """Generation settings, persona, turn window and prompt budget: flags over
    chat_config.json over defaults. settings["warnings"] holds a line for each setting
    the model was not trained with, for the caller to show."""
    generation = dict(DEFAULT_GENERATION)
    generation.update(chat["chat_config"].get("generation") or {})
    source = {key: f"{chat['config_path'] or 'default'} generation.{key}" for key in generation}
    for key in ("max_new_tokens", "temperature", "top_p", "repetition_penalty"):
        if getattr(args, key) is not None:
            generation[key] = getattr(args, key)
            source[key] = "--" + key.replace("_", "-")
    if generation["repetition_penalty"] < 1.0:
        raise UserError(f"{source['repetition_penalty']}: repetition penalty {generation['repetition_penalty']} "
                        f"must be >= 1.0 (below 1 it rewards repetition)")
    if int(generation["max_new_tokens"]) < 1:
        raise UserError(f"{source['max_new_tokens']}: must be at least 1")
    if generation["do_sample"] and not generation["temperature"] > 0:
        raise UserError(f"{source['temperature']}: must be > 0")
    if generation["do_sample"] and not 0 < generation["top_p"] <= 1:
        raise UserError(f"{source['top_p']}: must be in (0, 1]")
    persona = chat["chat_config"].get("persona")
    if args.no_persona:
        persona = None
    elif args.persona is not None:
        persona = {"question": (persona or DEFAULT_PERSONA)["question"], "answer": args.persona}
    max_turns = getattr(args, "max_turns", None)
    if max_turns is not None and max_turns < 1:
        raise UserError("--max-turns must be at least 1")
    if args.context_tokens is not None and args.context_tokens < 1:
        raise UserError("--context-tokens must be at least 1")
    max_turns, budget, warnings = prompt_window(chat["chat_config"] if chat["config_path"] else None,
                                                chat["n_positions"], int(generation["max_new_tokens"]), max_turns,
                                                args.context_tokens)
    spare = budget - len(encode_text(chat["tokenizer"], prompt_text([""], persona)))
    if spare < MIN_QUESTION_TOKENS:
        raise UserError(f"a prompt budget of {budget} tokens (--context-tokens or context_tokens of "
                        f"{chat['config_path'] or 'the defaults'}, at most the model's {chat['n_positions']} "
                        f"positions minus {generation['max_new_tokens']} new tokens) leaves {spare} tokens beside "
                        f"the persona; at least {MIN_QUESTION_TOKENS} are needed")
    return {"generation": generation, "persona": persona, "facts": None, "max_turns": max_turns, "budget": budget,
            "warnings": warnings}


class TopKTopPSampler(LogitsProcessor):
    """Sampling as transformers does it (temperature, then top-k, then top-p), drawn
    among the top k only: transformers sorts and draws over the whole vocabulary at
    every step, a quarter of the time of a batched step on a CPU. The drawn token is
    left the only finite score, so generate's greedy search takes it."""

    def __init__(self, temperature, top_k, top_p):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        top, index = (scores / self.temperature).topk(min(self.top_k or scores.shape[-1], scores.shape[-1]))
        probs = top.softmax(-1)
        top = top.masked_fill(probs.cumsum(-1) - probs >= self.top_p, float("-inf"))  # keeps the first always
        token = index.gather(-1, torch.multinomial(top.softmax(-1), 1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def generate_ids(chat, settings, prompts, on_text=None):
    """The new token ids for each prompt (a list of token ids, as chat_prompt_ids gives it),
    generated as one batch, each row cut at its own EOS. Prompts are padded on the left so
    that all of them end where generation starts; a row that is done gets pad tokens while
    the others go on. on_text, one callable or None per prompt, gets that row's visible text
    as it grows (ReplyStreamer); watching changes no token."""
    tokenizer, generation = chat["tokenizer"], settings["generation"]
    inputs = tokenizer.pad({"input_ids": [list(ids) for ids in prompts]}, padding=True, padding_side="left",
                           return_tensors="pt").to(chat["device"])
    width = inputs["input_ids"].shape[1]
    # transformers' own penalty and n-gram blocking would look at the prompt too: off, and ours instead
    processors = reply_processors(generation, width)
    options = {"max_new_tokens": int(generation["max_new_tokens"]), "do_sample": False,
               "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "stopping_criteria": chat["stop"]}
    if generation.get("min_new_tokens"):
        options["min_new_tokens"] = int(generation["min_new_tokens"])  # fixed-length replies, for benchmarks
    if generation["do_sample"]:
        processors.append(TopKTopPSampler(float(generation["temperature"]), int(generation.get("top_k") or 0),
                                          float(generation["top_p"])))
    if on_text is not None and any(callback is not None for callback in on_text):
        options["streamer"] = ReplyStreamer(tokenizer, on_text)
    with torch.inference_mode():
        output = chat["model"].generate(**inputs, **options, logits_processor=LogitsProcessorList(processors))
    rows = []
    for row in output[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        rows.append(row)
    return rows


def decode_reply(tokenizer, ids):
    return clean_reply(tokenizer.decode(ids, skip_special_tokens=True), tokenizer.eos_token)


def generate_replies(chat, settings, prompts):
    """The model's cleaned answers to prompts (lists of token ids), generated together."""
    return [decode_reply(chat["tokenizer"], ids) for ids in generate_ids(chat, settings, prompts)]


def generate_reply(chat, settings, prompt, on_text=None):
    """The model's cleaned answer to a prompt (a list of token ids), from this process or from
    the inference server the chat was opened with; on_text, if given, gets the visible text as
    it grows."""
    if chat.get("server"):
        return server_reply(chat["server"], settings, chat["tokenizer"].decode(prompt), on_text)
    ids = generate_ids(chat, settings, [prompt], [on_text])[0]
    return decode_reply(chat["tokenizer"], ids)


def server_base_url(url):
    """--server as the base the routes are added to ("/v1/completions"); a UserError unless it is an HTTP URL."""
    base = url.rstrip("/").removesuffix("/v1")
    if not re.match(r"https?://[^/\s]+", base):
        raise UserError(f"--server {url!r}: expected the base URL of an OpenAI-compatible server, such as "
                        f"http://127.0.0.1:8000")
    return base


def open_server(url, tokenizer, timeout, generation=None):
    """The inference server that runs the model (an OpenAI-compatible one: transformers serve,
    vLLM): its address, the model it serves (GET /v1/models, sent with every request), and
    notes for the caller to show: penalties of the generation settings it cannot apply, a
    server that does not answer yet, or one whose tokenizer counts a prompt otherwise than the
    kit (a BOS added, a user's "</s>" read as the end of text)."""
    base = server_base_url(url)
    server = {"url": base, "timeout": float(timeout), "model": None, "eos_token": tokenizer.eos_token,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "notes": []}
    generation = generation or {}
    if float(generation.get("repetition_penalty") or 1.0) != 1.0 or int(generation.get("no_repeat_ngram_size") or 0):
        server["notes"].append("the repetition penalty and n-gram blocking of the generation settings are not sent to "
                               "the server: its own would count the prompt's words too (see deploy/README.md)")
    server["model"] = served_model(server)
    try:
        if server["model"] is None:
            raise ValueError("GET /v1/models names no model")
        probe = requests.post(base + "/v1/completions", timeout=(SERVER_CONNECT_SECONDS, server["timeout"]), json={
            "model": server["model"], "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0.0})
        probe.raise_for_status()
        counted = probe.json()["usage"]["prompt_tokens"]
    except (requests.RequestException, ValueError, LookupError, TypeError) as error:
        server["notes"].append(f"--server {base}: no answer as an OpenAI-compatible server ({type(error).__name__}: "
                               f"{error}); every reply is an apology until it answers")
        return server
    ours = len(encode_text(tokenizer, PROBE_PROMPT))
    if counted != ours:
        server["notes"].append(f"--server {base} counts {counted} tokens in a prompt where the kit counts {ours}: "
                               f"its tokenizer adds a BOS or reads a user's '</s>' as the end of text; serve a "
                               f"model folder whose tokenizer_config.json has \"split_special_tokens\": true")
    return server


def served_model(server):
    """The id of the model the server serves (GET /v1/models), sent with every request; None
    while the server does not say."""
    try:
        listed = requests.get(server["url"] + "/v1/models", timeout=(SERVER_CONNECT_SECONDS, server["timeout"]))
        listed.raise_for_status()
        return listed.json()["data"][0]["id"]
    except (requests.RequestException, ValueError, LookupError, TypeError):
        return None


def server_body(server, settings, prompt_text):
    """The /v1/completions request for a prompt: the kit's prompt as text, the reply's length,
    sampling and the label stop strings, streamed. transformers serve samples only when its own
    generation_config says so (which replaces the folder's: the EOS and pad ids go with it);
    vLLM ignores that key and samples whenever the temperature is above 0. The penalties are
    left out: both servers would count the prompt's tokens too."""
    generation = settings["generation"]
    sample, length = bool(generation["do_sample"]), int(generation["max_new_tokens"])
    config = {"do_sample": sample, "max_new_tokens": length, "eos_token_id": server["eos_token_id"],
              "pad_token_id": server["pad_token_id"]}
    body = {"prompt": prompt_text, "max_tokens": length, "temperature": 0.0, "stop": STOP_STRINGS, "stream": True}
    if sample:
        config.update(temperature=float(generation["temperature"]), top_p=float(generation["top_p"]),
                      top_k=int(generation.get("top_k") or 0))
        body.update(temperature=config["temperature"], top_p=config["top_p"])
    if generation.get("min_new_tokens"):
        config["min_new_tokens"] = int(generation["min_new_tokens"])  # fixed-length replies, for benchmarks
    body["generation_config"] = json.dumps(config)
    if server["model"]:
        body["model"] = server["model"]
    return body


def server_pieces(server, body):
    """The text pieces of a streamed /v1/completions answer as they come. Closing the generator
    closes the connection, which stops the server writing (a request not streamed would run to
    its end after the client gave up). ServerError when the server does not take the connection,
    answers with an error (an HTTP error, or an error event inside a 200 stream), or the reply is
    not complete within server["timeout"] seconds, its wait in the server's queue included."""
    deadline = time.monotonic() + server["timeout"]
    try:
        with requests.post(server["url"] + "/v1/completions", json=body, stream=True,
                           timeout=(SERVER_CONNECT_SECONDS, server["timeout"])) as response:
            if response.status_code != 200:
                raise ServerError(f"{server['url']}: HTTP {response.status_code} {response.text[:200]!r}")
            for line in response.iter_lines():
                if time.monotonic() > deadline:
                    raise ServerError(f"{server['url']}: no complete reply within {server['timeout']:g} s")
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":  # vLLM ends a stream so; transformers serve closes it
                    return
                try:
                    event = json.loads(data)
                    choice = None if "error" in event else event["choices"][0]
                except (ValueError, LookupError, TypeError):
                    raise ServerError(f"{server['url']}: an event that is not JSON: {data[:200]!r}") from None
                if choice is None:
                    raise ServerError(f"{server['url']}: {str(event['error'])[:200]}")
                if choice.get("text"):
                    yield choice["text"]
                if choice.get("finish_reason"):
                    return
    except requests.RequestException as error:
        raise ServerError(f"{server['url']}: {type(error).__name__}: {error}") from None


def server_reply(server, settings, prompt_text, on_text=None):
    """The cleaned reply to a prompt (its text) from the inference server, read as it is
    streamed: on_text, if given, gets the visible text as it grows, and the stream is closed as
    soon as the model starts the next turn, which the cleaning would cut anyway. The same
    cleaning as in this process, so both give the same reply for the same continuation."""
    if server["model"] is None:  # the server did not answer at the start: what does it serve now?
        server["model"] = served_model(server)
    raw, shown = "", ""
    pieces = server_pieces(server, server_body(server, settings, prompt_text))
    try:
        for piece in pieces:
            raw += piece
            if NEXT_TURN.search(LEADING_LABELS.sub("", raw)):
                break
            text = visible_reply(raw) if on_text is not None else ""
            if text != shown and text.startswith(shown):
                shown = text
                on_text(text)
    finally:
        pieces.close()
    return clean_reply(raw, server["eos_token"])
# --- end of the mirrored part


def read_script(path):
    """User lines of a --script file: blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: script file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"{path}: the script has no user lines")
    return lines


class PrintedReply:
    """A reply printed as it is written: each visible text is a longer start of the last, so
    only its new end is printed; the finished reply completes the line."""

    def __init__(self, out):
        self.out, self.printed = out, None

    def update(self, text):
        if self.printed is None:
            print(BOT_PREFIX, end="", file=self.out)
            self.printed = ""
        print(text[len(self.printed):], end="", file=self.out, flush=True)
        self.printed = text

    def finish(self, answer):
        if self.printed is None:
            print(BOT_PREFIX + answer, file=self.out, flush=True)
        elif answer.startswith(self.printed):
            print(answer[len(self.printed):], file=self.out, flush=True)
        else:  # the server failed after part of the reply was printed
            print(file=self.out)
            print(BOT_PREFIX + answer, file=self.out, flush=True)


class ConsoleChat:
    """One conversation: the turns so far, and the reply to each new line."""

    def __init__(self, chat, settings, show_prompt=False, out=None, stream=True):
        self.chat, self.settings, self.show_prompt, self.stream = chat, settings, show_prompt, stream
        self.out = out or sys.stdout
        self.history = []

    def reset(self):
        self.history = []

    def reply(self, text, on_text=None):
        tokenizer = self.chat["tokenizer"]
        prompt = chat_prompt_ids(self.history + [text], self.settings, tokenizer)
        if self.show_prompt:
            print(f"[prompt]\n{tokenizer.decode(prompt)}\n[/prompt]", file=self.out, flush=True)
        answer = generate_reply(self.chat, self.settings, prompt, on_text)
        if answer != FALLBACK_REPLY:
            # The fallback is the kit's words, not the model's: kept, it would teach the
            # conversation that the bot did not understand.
            self.history += [text, answer]
        return answer

    def say(self, text):
        """Print the reply to a line, as it is written unless streaming is off."""
        printed = PrintedReply(self.out) if self.stream else None
        try:
            answer = self.reply(text, printed.update if printed else None)
        except ServerError as error:
            print(f"system_prompt.py: warning: {error}", file=sys.stderr, flush=True)
            answer = SERVER_ERROR_NOTICE
        if printed:
            printed.finish(answer)
        else:
            print(BOT_PREFIX + answer, file=self.out, flush=True)

    def handle(self, line):
        """Play one user line; False when the user said goodbye."""
        if line.lower() in EXIT_WORDS:
            return False
        if line == RESET_COMMAND:
            self.reset()
            print(BOT_PREFIX + RESET_NOTICE, file=self.out, flush=True)
        elif line:
            self.say(line)
        return True


def play_script(session, lines):
    for line in lines:
        print(USER_PREFIX + line, file=session.out, flush=True)
        if not session.handle(line):
            break


def undecodable(line):
    """Whether a line read with errors="surrogateescape" held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in line)


def talk(session):
    print(f"Пишите сообщение. «{EXIT_WORDS[0]}» — закончить, «{RESET_COMMAND}» — начать заново.",
          file=session.out, flush=True)
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 (a pipe from a cp1251 file) is told about and skipped, not a traceback.
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(USER_PREFIX).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=session.out)
            return
        if undecodable(line):
            print(BOT_PREFIX + NOT_UTF8_NOTICE, file=session.out, flush=True)
            continue
        if not session.handle(line):
            return


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Console chat with a trained model folder.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model folder (its newest complete checkpoint-N/ when it has no weights of its own)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--persona", help="the bot's answer to the persona question (default: chat_config.json)")
    parser.add_argument("--no-persona", action="store_true", help="no persona exchange in the prompt")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float, help="must be >= 1.0")
    parser.add_argument("--context-tokens", type=int,
                        help="prompt budget in tokens (default: chat_config.json, what the model was trained with)")
    parser.add_argument("--max-turns", type=int,
                        help="turns of the conversation in the prompt, the new message included (default: "
                             "chat_config.json, what the model was trained with)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--quantize", default=DEFAULT_QUANTIZE, choices=("auto", "int8", "none"),
                        help="int8 weights for the linear layers: about 2x faster on a CPU (auto: int8 on a CPU, "
                             "none on a GPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the model (default: physical cores)")
    parser.add_argument("--server", default=SERVER,
                        help="base URL of an OpenAI-compatible inference server that runs the model (transformers "
                             "serve, vLLM), e.g. http://127.0.0.1:8000; --model still gives the tokenizer and the "
                             "chat settings (default: the model runs in this process)")
    parser.add_argument("--server-timeout", type=float, default=SERVER_TIMEOUT,
                        help="seconds a reply from the server may take, its wait in the server's queue included")
    parser.add_argument("--no-stream", action="store_true", default=NO_STREAM,
                        help="print a reply once it is complete, not as it is written")
    parser.add_argument("--script", help="play this file of user lines (UTF-8, one a line) and print the transcript")
    parser.add_argument("--show-prompt", action="store_true", help="print the prompt given to the model")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        lines = read_script(args.script) if args.script else None
        if args.repetition_penalty is not None and args.repetition_penalty < 1.0:
            raise UserError(f"--repetition-penalty: {args.repetition_penalty} must be >= 1.0 "
                            f"(below 1 it rewards repetition)")
        if args.threads < 0:
            raise UserError("--threads must be 0 (physical cores) or more")
        if not args.server_timeout > 0:
            raise UserError("--server-timeout must be above 0 seconds")
        chat = open_model_folder(args.model, args.device, need_weights=not args.server)
        settings = resolve_settings(args, chat)
        if args.server:
            chat["server"] = open_server(args.server, chat["tokenizer"], args.server_timeout, settings["generation"])
        else:
            load_weights(chat, args.quantize, args.threads)
    except UserError as error:
        print(f"system_prompt.py: error: {error}", file=sys.stderr)
        return 1
    for warning in settings["warnings"] + (chat["server"]["notes"] if args.server else []):
        print(f"system_prompt.py: warning: {warning}", file=sys.stderr)
    set_seed(args.seed)
    session = ConsoleChat(chat, settings, show_prompt=args.show_prompt, stream=not args.no_stream)
    if lines is None:
        talk(session)
    else:
        play_script(session, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
