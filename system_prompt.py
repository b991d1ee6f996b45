"""
Console chat with a trained model folder: the quickest way to talk to what you
trained, and the last step of the demo.

The prompt holds the persona (a first "Вопрос:/Ответ:" exchange) and as many of
the latest turns as fit in the context budget, so the model remembers the
conversation until it no longer fits. Replies are cut at EOS or at the next
label, cleaned of markup and links, and never empty. On a CPU the model runs
with int8 linear layers on one thread per physical core, about twice as fast as
plain fp32 (bench/generation.py measures it); --quantize none turns that off.

Run it (CPU):
    python system_prompt.py --model rugpt3_50k
    python system_prompt.py --model rugpt3_medium_CLEAN_model --persona "Я помощник по кулинарии."
    python system_prompt.py --model rugpt3_50k --quantize none --threads 4   # plain fp32 weights
on a GPU:
    python system_prompt.py --model rugpt3_medium_CLEAN_model --device cuda
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
import warnings
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          StopStringCriteria, StoppingCriteriaList, set_seed)
from transformers.activations import NewGELUActivation
from transformers.pytorch_utils import Conv1D

# -----------------------------------------------------------------------------
# defaults (every one is also a flag; the model folder's chat_config.json wins over
# the built-in generation values, a flag wins over both)
DEFAULT_MODEL = "rugpt3_50k"
DEFAULT_DEVICE = "auto"
DEFAULT_SEED = 42
DEFAULT_QUANTIZE = "auto"       # int8 linear layers on a CPU, plain weights on a GPU
EXIT_WORDS = ("выход", "exit", "quit")
RESET_COMMAND = "/reset"
USER_PREFIX = "Вы: "
BOT_PREFIX = "Бот: "
RESET_NOTICE = "(история разговора очищена)"
# -----------------------------------------------------------------------------


# --- mirrored in system_prompt.py and tg_bot.py (tests/test_system_prompt.py checks they agree)
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
CHAT_CONFIG_NAME = "chat_config.json"
FALLBACK_REPLY = "Простите, не понял вопрос. Можете сказать иначе?"
DEFAULT_PERSONA = {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."}
DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                      "top_k": 50, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3}
MIN_QUESTION_TOKENS = 16  # a budget that leaves less room than this for the user's words is a misconfiguration
LABEL_PATTERN = re.compile(r"(?i)\b(вопрос|ответ)\s*:")
LEADING_LABELS = re.compile(r"^(?:\s*ответ\s*:)+", re.IGNORECASE)
MARKDOWN_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")
HTML_TAG = re.compile(r"</?[A-Za-z!|][^<>\n]{0,200}>")
URL = re.compile(r"(?i)\b(?:https?://|ftp://|www\.|t\.me/)\S+")
MARKUP_RUNS = re.compile(r"(\*\*|__|~~|```|`|^#{1,6}\s|^>\s?)", re.MULTILINE)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


def neutralise_labels(text):
    # "Ответ:" inside a user's text would otherwise start a fake turn in the prompt.
    return LABEL_PATTERN.sub(lambda m: m.group(1) + " -", text)


def prepare_turn(text):
    # A newline separates turns in the prompt, so a turn must be one line.
    return " ".join(neutralise_labels(text).split())


def turn_label(index, count):
    # Counted backwards from the answer: the turn right before it is always a question.
    return QUESTION_LABEL if (count - 1 - index) % 2 == 0 else ANSWER_LABEL


def render_prompt(persona, turns):
    """The prompt text for prepared turns (oldest first, the last one the user's)."""
    lines = []
    if persona:
        lines += [QUESTION_LABEL + prepare_turn(persona["question"]), ANSWER_LABEL + prepare_turn(persona["answer"])]
    lines += [turn_label(i, len(turns)) + turn for i, turn in enumerate(turns)]
    return TURN_SEPARATOR.join(lines) + TURN_SEPARATOR + ANSWER_LABEL


def count_tokens(tokenizer, text):
    # The same call generate_reply makes, so the count is what the model will see.
    return len(tokenizer(text)["input_ids"])


def fit_latest_turn(turn, persona, tokenizer, budget):
    """The user's new turn, cut to what the budget leaves beside the persona.
    The end is kept: people tend to put the question after the material."""
    if count_tokens(tokenizer, render_prompt(persona, [turn])) <= budget:
        return turn
    room = budget - count_tokens(tokenizer, render_prompt(persona, [""]))
    ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    while room > 0:
        # A cut can split a multi-byte character; drop the broken piece.
        text = tokenizer.decode(ids[-room:], skip_special_tokens=True).replace("\ufffd", "").strip()
        if count_tokens(tokenizer, render_prompt(persona, [text])) <= budget:
            return text
        room -= 1
    return ""


def build_prompt(history, persona, tokenizer, budget):
    """The prompt for `history` (turns oldest first, alternating user/bot, the last
    the user's new message): the persona plus as many of the latest turns as fit in
    `budget` tokens, counted with the model's own tokenizer."""
    turns = [prepare_turn(turn) for turn in history]
    turns[-1] = fit_latest_turn(turns[-1], persona, tokenizer, budget)
    used = count_tokens(tokenizer, render_prompt(persona, turns[-1:]))
    start = len(turns) - 1
    while start > 0:
        line = turn_label(start - 1, len(turns)) + turns[start - 1] + TURN_SEPARATOR
        cost = count_tokens(tokenizer, line)
        if used + cost > budget:
            break
        used += cost
        start -= 1
    if (len(turns) - start) % 2 == 0:
        start += 1  # begin at a user's turn, so a question follows the persona's answer
    prompt = render_prompt(persona, turns[start:])
    # Per-line counts can differ from the whole when the tokenizer merges across lines.
    while count_tokens(tokenizer, prompt) > budget and start < len(turns) - 1:
        start += 2
        prompt = render_prompt(persona, turns[start:])
    return prompt


def clean_reply(text, eos_token=None):
    """The model's raw continuation made fit to show: cut at EOS or at the next
    label, stripped of markup, links and label leakage; a fallback when empty."""
    if eos_token and eos_token in text:
        text = text[:text.index(eos_token)]
    text = LEADING_LABELS.sub("", text)  # the model echoing "Ответ:" before its answer
    label = LABEL_PATTERN.search(text)
    if label:
        text = text[:label.start()]  # the model went on to write the next turn itself
    text = html.unescape(text)
    text = MARKDOWN_LINK.sub(r"\1", text)
    text = HTML_TAG.sub(" ", text)
    text = URL.sub(" ", text)
    text = MARKUP_RUNS.sub("", text)
    # Undecodable bytes and control characters are noise from a cut multi-byte token.
    text = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    text = " ".join(text.split())
    return text if any(ch.isalnum() for ch in text) else FALLBACK_REPLY


def find_weights_folder(folder):
    """The folder's own weights, else its newest complete checkpoint-N/."""
    def complete(path):
        return (path / "config.json").is_file() and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())

    if complete(folder):
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


def open_model_folder(model_dir, device):
    """Tokenizer, model config and chat settings of a kit model folder: all that the
    settings are checked against, before the slow part (load_weights)."""
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
    weights = find_weights_folder(folder)
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
    chat["stop"] = StoppingCriteriaList([StopStringCriteria(chat["tokenizer"],
                                                            [QUESTION_LABEL.strip(), ANSWER_LABEL.strip()])])
    return chat


def resolve_settings(args, chat):
    """Generation settings and the prompt budget: flags over chat_config.json over defaults."""
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
    room = chat["n_positions"] - int(generation["max_new_tokens"])
    budget = args.context_tokens or chat["chat_config"].get("context_tokens") or room
    budget = min(int(budget), room)
    spare = budget - count_tokens(chat["tokenizer"], render_prompt(persona, [""]))
    if spare < MIN_QUESTION_TOKENS:
        raise UserError(f"a prompt budget of {budget} tokens (--context-tokens or context_tokens of "
                        f"{chat['config_path'] or 'the defaults'}, at most the model's {chat['n_positions']} "
                        f"positions minus {generation['max_new_tokens']} new tokens) leaves {spare} tokens beside "
                        f"the persona; at least {MIN_QUESTION_TOKENS} are needed")
    return {"generation": generation, "persona": persona, "budget": budget}


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


def generate_ids(chat, settings, prompts):
    """The new token ids for each prompt, generated as one batch, each row cut at
    its own EOS. Prompts are padded on the left so that all of them end where
    generation starts; a row that is done gets pad tokens while the others go on."""
    tokenizer, generation = chat["tokenizer"], settings["generation"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(chat["device"])
    options = {"max_new_tokens": int(generation["max_new_tokens"]), "do_sample": bool(generation["do_sample"]),
               "repetition_penalty": float(generation["repetition_penalty"]),
               "no_repeat_ngram_size": int(generation.get("no_repeat_ngram_size") or 0),
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "stopping_criteria": chat["stop"]}
    if generation.get("min_new_tokens"):
        options["min_new_tokens"] = int(generation["min_new_tokens"])  # fixed-length replies, for benchmarks
    if options["do_sample"]:
        sampler = TopKTopPSampler(float(generation["temperature"]), int(generation.get("top_k") or 0),
                                  float(generation["top_p"]))
        options.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    with torch.inference_mode():
        output = chat["model"].generate(**inputs, **options)
    rows = []
    for row in output[:, inputs["input_ids"].shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        rows.append(row)
    return rows


def decode_reply(tokenizer, ids):
    return clean_reply(tokenizer.decode(ids, skip_special_tokens=True), tokenizer.eos_token)


def generate_replies(chat, settings, prompts):
    """The model's cleaned answers to prompts, generated together."""
    return [decode_reply(chat["tokenizer"], ids) for ids in generate_ids(chat, settings, prompts)]


def generate_reply(chat, settings, prompt):
    """The model's cleaned answer to a prompt."""
    return generate_replies(chat, settings, [prompt])[0]
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


class ConsoleChat:
    """One conversation: the turns so far, and the reply to each new line."""

    def __init__(self, chat, settings, show_prompt=False, out=None):
        self.chat, self.settings, self.show_prompt = chat, settings, show_prompt
        self.out = out or sys.stdout
        self.history = []

    def reset(self):
        self.history = []

    def reply(self, text):
        prompt = build_prompt(self.history + [text], self.settings["persona"], self.chat["tokenizer"],
                              self.settings["budget"])
        if self.show_prompt:
            print(f"[prompt]\n{prompt}\n[/prompt]", file=self.out, flush=True)
        answer = generate_reply(self.chat, self.settings, prompt)
        self.history += [text, answer]
        return answer

    def handle(self, line):
        """Play one user line; False when the user said goodbye."""
        if line.lower() in EXIT_WORDS:
            return False
        if line == RESET_COMMAND:
            self.reset()
            print(BOT_PREFIX + RESET_NOTICE, file=self.out, flush=True)
        elif line:
            print(BOT_PREFIX + self.reply(line), file=self.out, flush=True)
        return True


def play_script(session, lines):
    for line in lines:
        print(USER_PREFIX + line, file=session.out, flush=True)
        if not session.handle(line):
            break


def talk(session):
    print(f"Пишите сообщение. «{EXIT_WORDS[0]}» — закончить, «{RESET_COMMAND}» — начать заново.",
          file=session.out, flush=True)
    while True:
        try:
            line = input(USER_PREFIX).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=session.out)
            return
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
    parser.add_argument("--context-tokens", type=int, help="prompt budget in tokens (default: chat_config.json)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--quantize", default=DEFAULT_QUANTIZE, choices=("auto", "int8", "none"),
                        help="int8 weights for the linear layers: about 2x faster on a CPU (auto: int8 on a CPU, "
                             "none on a GPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the model (default: physical cores)")
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
        chat = open_model_folder(args.model, args.device)
        settings = resolve_settings(args, chat)
        load_weights(chat, args.quantize, args.threads)
    except UserError as error:
        print(f"system_prompt.py: error: {error}", file=sys.stderr)
        return 1
    set_seed(args.seed)
    session = ConsoleChat(chat, settings, show_prompt=args.show_prompt)
    if lines is None:
        talk(session)
    else:
        play_script(session, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
