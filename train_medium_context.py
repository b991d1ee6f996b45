"""Fine-tune a GPT-2-style causal language model on answers in their dialogue context.

Reads data/context_{train,val}.parquet (dialogue_id, context: the turns before
the answer, oldest first; answer) and writes rugpt3_medium_CLEAN_model/: a
save_pretrained folder (model, tokenizer, generation config), chat_config.json,
training_curves.png, trainer_state.json and the checkpoint-N/ folders of the run.
The tokenizer carries the prompt rule as a chat template and reads text as the
rule does (a typed "</s>" stays text, no BOS), and generation_config.json the
chat's sampling settings, so an OpenAI-compatible server (transformers serve,
vLLM) prompts and samples the model as the kit's chat does.

Each row becomes one example by the kit's prompt rule (../shared/DESIGN.md), the
same code the chat, perplexity.py and evaluate.py build their prompts with; the
turns are labelled counting back from the answer:

    Вопрос: Кто ты?
    Ответ: <persona>
    Вопрос: <turn 1>
    Ответ: <turn 2>
    Вопрос: <turn 3>
    Ответ: <answer><EOS>

The window is the chat's: up to --max-turns turns (16; all a long conversation
the chat keeps), within the prompt budget in tokens. A longer context loses its
oldest turns first, then the start of the question; the answer is never cut. So
the model learns to use what was said many turns ago, as the chat will ask it to.

Everything past reading the context files is the trainer's, as in
train_transformer.py (the trainer block below): the loss covers the answer and
EOS only, EOS, BOS and pad come from the vocabulary (printed, with the reason),
and the validation loss printed at the end is weighted by answer tokens, as
perplexity.py counts it.

Run it:
    # CPU, a tiny model and tokenizer built from the data (no internet needed)
    python train_medium_context.py --from-scratch --device cpu --max-steps 300
    # GPU, ruGPT-3 medium from the model hub (bf16 from Ampere on, fp16 with loss scaling on a T4)
    python train_medium_context.py --device cuda --epochs 2 --batch-size 8 --grad-accum 2
    # a bigger model on a small GPU: LoRA adapters (merged into the saved model) and activations
    # recomputed in the backward pass; --model takes ruGPT-3 small, medium and large by hub name
    python train_medium_context.py --device cuda --lora --gradient-checkpointing --model ai-forever/rugpt3large_based_on_gpt2
    # several GPUs: the same flags under torchrun or accelerate, with DeepSpeed ZeRO if you like
    # (pip install deepspeed; deepspeed/zero3_offload.json also moves the weights to CPU memory)
    torchrun --nproc_per_node 4 train_medium_context.py --epochs 3
    accelerate launch train_medium_context.py --epochs 3
    accelerate launch --use_deepspeed --num_processes 4 train_medium_context.py --deepspeed deepspeed/zero2.json
    # continue an interrupted run from its newest complete checkpoint (early
    # stopping's patience included): the first run's flags plus --resume
    python train_medium_context.py --from-scratch --device cpu --max-steps 600 --resume
    # learning from the bot's 👍/👎 (create_dataset.py --feedback bot.sqlite3 writes the file): KTO from the
    # served folder into rugpt3_medium_CLEAN_model_feedback/ (DPO on the 🔄 pairs with --feedback-loss dpo); compare the
    # two with evaluate.py before switching the bot
    python train_medium_context.py --feedback data/feedback_train.parquet --model rugpt3_medium_CLEAN_model

In a notebook (Jupyter, Colab): paste this whole file into one cell, set the
defaults block below (FROM_SCRATCH, DEVICE, MAX_STEPS, ...), run the cell; the
training curves show in the cell. `%run train_medium_context.py --flags` and
`!python train_medium_context.py --flags` take flags as above.

Map of the file: the imports; the defaults block; read_context and
load_splits (the context files with their optional facts column, this
script's own data), trained_turns (the turn window the data allows);
parse_args (--max-turns on top of the trainer's flags) and main; then the
generated blocks prompt_rule (one prompt for training, chat and scoring) and
trainer (examples, model, LoRA, DeepSpeed, the run and the saved folder), and
feedback (--feedback: KTO/DPO with TRL from a model folder on the bot's ratings).
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import unicodedata

# ---------------------------------------------------------------- defaults of train_medium_context.py
# every flag's default; in a notebook cell, set them here
DATA_DIR = "data"           # the folder of context_train.parquet and context_val.parquet
ROWS = None                 # use the first N rows of context_train.parquet (None: all)
VAL_ROWS = 2000             # validate on the first N rows of context_val.parquet (all of a big split is slow)
OUTPUT_DIR = "rugpt3_medium_CLEAN_model"
RESUME = False              # True: continue from the newest complete checkpoint
MODEL_NAME = "ai-forever/rugpt3medium_based_on_gpt2"
MAX_LENGTH = 384            # tokens per example: context + answer + EOS; prompts get this less MAX_NEW_TOKENS
MAX_TURNS = 16              # turns before the answer, the question included: what the chat keeps
EPOCHS = 3.0
MAX_STEPS = -1              # > 0 overrides --epochs
BATCH_SIZE = 8
GRAD_ACCUM = 2
LR = None                   # None: LR_PRETRAINED, or LR_FROM_SCRATCH with FROM_SCRATCH
LR_PRETRAINED = 3e-5
LR_FROM_SCRATCH = 1e-3      # a small model trained from random weights wants a larger step
WARMUP = 0.05               # share of the optimizer steps
WEIGHT_DECAY = 0.01
EVAL_STEPS = 200
LOGGING_STEPS = 20
PATIENCE = 3                # evaluations without improvement before stopping
SAVE_TOTAL_LIMIT = 2
SEED = 42
DEVICE = "auto"             # "auto", "cpu" or "cuda"
# --from-scratch: a new GPT-2 and a BPE tokenizer trained on the contexts and answers
FROM_SCRATCH = False        # True: a new GPT-2 and BPE tokenizer trained on the data instead of MODEL_NAME
N_LAYER = 4
N_HEAD = 4
N_EMBD = 256
VOCAB_SIZE = 8000
N_POSITIONS = 256           # the new model's positions: examples get at most this, not MAX_LENGTH
# --feedback: the context model's folder trained further on the bot's 👍/👎 (create_dataset.py --feedback)
FEEDBACK = None             # a feedback_train.parquet: train --model on its ratings (KTO) instead of on the splits
FEEDBACK_VAL = None         # None: feedback_val.parquet beside FEEDBACK (the liked share before and after)
FEEDBACK_LOSS = "kto"       # "kto": every 👍/👎 row; "dpo": the pairs 🔄 made (chosen, rejected)
FEEDBACK_LR = 2e-5          # measured: moves a 4-layer GPT-2; 5e-5 collapsed it, TRL's 1e-6 barely moves it
FEEDBACK_LR_LORA = 2e-4     # adapters start at zero and want a larger step
FEEDBACK_BETA = 0.1         # how far from the reference (the source folder) the model may go; higher: less
FEEDBACK_EPOCHS = 2.0
# ruGPT-3 medium or large on a small GPU, and past one GPU (the README's table says which fits where)
LORA = False                # True: train LoRA adapters instead of every weight; the saved model has them merged in
LORA_R = 16                 # adapter rank
LORA_ALPHA = 32             # adapter updates are scaled by LORA_ALPHA / LORA_R
LORA_DROPOUT = 0.05
LR_LORA = 2e-4              # adapters start at zero and want a larger step than a full fine-tune
SAVE_ADAPTER = False        # True (with LORA): also keep the adapter alone in <output>/adapter/
GRADIENT_CHECKPOINTING = False  # True: recompute activations in the backward pass (less memory, slower)
OPTIM_8BIT = False          # True: AdamW with 8-bit state (pip install bitsandbytes)
DEEPSPEED = None            # a DeepSpeed config, e.g. "deepspeed/zero2.json" (under accelerate launch or torchrun)
# chat_config.json: how the chat talks to the model (MAX_TURNS above: the turn window it keeps)
MAX_NEW_TOKENS = 64         # the reply's room: prompts (training and chat) get at most MAX_LENGTH less this
NO_PERSONA = False          # True: persona null in chat_config.json
PERSONA = {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."}
GENERATION = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
              "top_k": 50, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3}

PROG = "train_medium_context.py"


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


def read_context(path, max_turns, limit=None):
    """[(turns, answer, facts)] from a context_*.parquet file, keeping the last `max_turns` turns.

    facts is the optional string column of that name (create_dataset.py: the answer to "Что ты обо
    мне знаешь?" from what the user side said earlier), None where the file has no such column or
    the row none. Rows without context (a dialogue's first turn) have no question to answer and are
    left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found (create_dataset.py writes it)")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a parquet file ({first_line(exc)})")
    missing = {"context", "answer"} - set(schema.names)
    if missing:
        raise UserError(f"{path}: no column {', '.join(sorted(missing))} "
                        f"(expected dialogue_id,context,answer; got {','.join(schema.names)})")
    context_type = schema.field("context").type
    if not (pa.types.is_list(context_type) or pa.types.is_large_list(context_type)) or \
            not (pa.types.is_string(context_type.value_type) or pa.types.is_large_string(context_type.value_type)):
        raise UserError(f"{path}: column context is {context_type}, expected list<string>")
    has_facts = "facts" in schema.names
    if has_facts:
        facts_type = schema.field("facts").type
        if not (pa.types.is_string(facts_type) or pa.types.is_large_string(facts_type) or pa.types.is_null(facts_type)):
            raise UserError(f"{path}: column facts is {facts_type}, expected string")
    table = pq.read_table(path, columns=["context", "answer"] + (["facts"] if has_facts else []))
    if limit is not None:
        table = table.slice(0, limit)
    facts_column = table.column("facts").to_pylist() if has_facts else [None] * table.num_rows
    rows = []
    for context, answer, facts in zip(table.column("context").to_pylist(), table.column("answer").to_pylist(),
                                      facts_column):
        turns = [t for t in (context or []) if t is not None][-max_turns:]
        if turns and answer and answer.strip():
            rows.append((turns, answer, facts or None))
    if not rows:
        raise UserError(f"{path}: no rows with both context and an answer")
    return rows


def load_splits(data_dir, rows, val_rows, max_turns):
    train = read_context(os.path.join(data_dir, "context_train.parquet"), max_turns, limit=rows)
    val = read_context(os.path.join(data_dir, "context_val.parquet"), max_turns, limit=val_rows)
    return train, val


# ----------------------------------------------------------------------------
# the turn window and the command line

def trained_turns(rows, max_turns):
    """The turn window the model is trained with, and chat_config.json records for the chat:
    --max-turns, or fewer where no row of the data holds that many (create_dataset.py
    --max-turns caps the context it writes), since the model never saw more."""
    longest = max(len(row[0]) for row in rows)
    if longest < max_turns:
        print(f"the training data holds at most {longest} turns before an answer (create_dataset.py --max-turns "
              f"caps them): the model is trained, and the chat set, for {longest}, not --max-turns {max_turns}",
              flush=True)
    return min(longest, max_turns)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description="Fine-tune a causal LM on answers in context.")
    add_common_arguments(parser, OUTPUT_DIR, MODEL_NAME)
    parser.add_argument("--max-turns", type=positive_int, default=MAX_TURNS,
                        help="turns before the answer, the question included (default %(default)s); the chat keeps "
                             "as many")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.feedback:  # learning from the bot's 👍/👎 (the feedback block)
            run_feedback(args)
            return 0
        train_rows, val_rows = load_splits(args.data_dir, args.rows, args.val_rows, args.max_turns)
        run(args, train_rows, val_rows, trained_turns(train_rows, args.max_turns),
            None if args.no_persona else PERSONA)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ==================================================================================================
# Generated blocks: shared code that blocks/build.py writes into every script that needs it.
# Do not edit it here: change the block's source in blocks/, then run `make blocks`
# (`python blocks/build.py`); the suite fails while a copy differs from its source.
# ==================================================================================================


# ==== block blocks/prompt_rule.py: generated, edit the source and run `make blocks` ====
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
# ==== end of block blocks/prompt_rule.py ====


# ==== block blocks/trainer.py: generated, edit the source and run `make blocks` ====
"""The trainer: examples by the prompt rule, model and tokenizer, Trainer, checkpoints and saving.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses and defines, before it, the
defaults block (every flag's default) and UserError, PROG and the host's own data reading.

The prompt ends at "Ответ:"; the answer's first word keeps its space, as GPT-2's
tokenizer spells a word inside a sentence. The loss covers only the answer and
EOS, so the model learns where to stop. EOS, BOS and pad are chosen among the
tokens the vocabulary already has (printed, with the reason); only a missing
pad is added, and pad is never EOS. Batches are padded to their longest example
and grouped by length. chat_config.json records the prompt rule, the turn
window and the prompt budget, which every reader of the folder uses, and "voice":
whose turns the answers were (create_dataset.py --as writes them into the data
folder's voice.json; null where the data is everyone's). The figure
printed at the end is the validation loss weighted by answer tokens, as
perplexity.py counts it; early stopping and the best checkpoint go by it too."""

# the from-scratch tokenizer's special tokens (ruGPT-3's layout), and what a missing pad is called
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
EOS_CANDIDATES = ("</s>", "<|endoftext|>")   # where the files declare no EOS the vocabulary has, in this order
BOS_CANDIDATES = ("<s>", "<|endoftext|>")
IGNORE_INDEX = -100         # label value the loss skips

DEVICES = ("auto", "cpu", "cuda")
FINAL_TMP = ".final-tmp"
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D layers; c_proj: the attention's and the MLP's output
ADAPTER_DIR = "adapter"     # --save-adapter: <output>/adapter/
RUGPT3_LARGE = "ai-forever/rugpt3large_based_on_gpt2"
MODEL_FILE_RE = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
                           r"|model\.safetensors\.index\.json|pytorch_model.*\.bin|training_args\.bin)$")
RUN_FILES = {"chat_config.json", "training_curves.png", "trainer_state.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja"}

VOICE_FILE = "voice.json"   # <data-dir>/voice.json, create_dataset.py --as: {"keys": [...], "names": [...]}

# ----------------------------------------------------------------------------
# examples

def encode_example(tokenizer, turns, answer, window, persona=None, facts=None):
    """input_ids/attention_mask/labels for one example, or None when the answer leaves no room.

    The prompt rule builds it (fit_prompt, as the chat does): the persona, the facts
    exchange where it fits beside it, then the newest turns within window["max_turns"]
    and window["context_tokens"], less where a long answer leaves less of
    window["max_length"]; oldest turns go first, then the start of the question; the
    answer is never cut."""
    exchange = encode_exchange(tokenizer, turns, answer, window["max_turns"], window["context_tokens"],
                               window["max_length"], persona, facts)
    if exchange is None:
        return None
    prompt, target = exchange
    input_ids = prompt + target
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt) + target}


def row_parts(row):
    """(turns, answer, facts) of a (turns, answer) or (turns, answer, facts) row."""
    return (row[0], row[1], row[2] if len(row) > 2 else None)


def encode_examples(tokenizer, rows, window, desc, persona=None):
    """Encode (turns, answer) or (turns, answer, facts) rows; returns the examples and how many were skipped."""
    from tqdm.auto import tqdm

    examples, skipped = [], 0
    for row in tqdm(rows, desc=desc, unit="ex", mininterval=2, disable=len(rows) < 5000):
        turns, answer, facts = row_parts(row)
        example = encode_example(tokenizer, turns, answer, window, persona, facts)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


def facts_exchanges(tokenizer, rows, window, persona=None):
    """How many rows' prompts hold the facts exchange, whole or cut: those with facts of which
    fit_prompt's own test (facts_that_fit) keeps some beside the persona in the prompt's budget."""
    count = 0
    for row in rows:
        turns, answer, facts = row_parts(row)
        if facts and turns:
            budget = min(window["context_tokens"], window["max_length"] - len(answer_ids(tokenizer, answer)))
            count += facts_that_fit(tokenizer, facts, budget, persona, prepare_turn(turns[-1])) is not None
    return count


# ----------------------------------------------------------------------------
# data


def first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def looks_like_hub_name(name):
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


def load_pretrained(name):
    """Model and tokenizer from a local folder or the model hub, as UserError when neither works."""
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    local = os.path.isdir(name)
    if not local and not looks_like_hub_name(name):
        raise UserError(f"{name}: model folder not found")
    if not local and name.lower().rsplit("/", 1)[-1] == "rugpt3xl":
        raise UserError(f"{name}: ruGPT-3 XL is a Megatron-DeepSpeed checkpoint with sparse attention and no "
                        f"config.json, not a transformers model; use {RUGPT3_LARGE} or a local GPT-2 folder")
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        # a kit folder whose run has not finished: its newest complete checkpoint
        checkpoint = complete_checkpoint(name)
        if checkpoint is None and complete_checkpoint(name, adapter=True):
            raise UserError(f"{name}: a --lora run that has not finished: its checkpoints hold the adapters only "
                            f"(the merged model is saved at the end); wait for it, or --resume it with --lora")
        if checkpoint is None:
            raise UserError(f"{name}: not a transformers model folder (no config.json)")
        name = checkpoint
    if local:
        with open(os.path.join(name, "config.json"), encoding="utf-8") as f:
            try:
                kit_model = json.load(f).get("kit_model")
            except (ValueError, AttributeError):
                kit_model = None
        if kit_model:
            raise UserError(f"{name}: an LSTM model folder ({kit_model}), not a transformers causal language model")
    if not local:
        print(f"loading {name} from the model hub ...", flush=True)
    # the hub client logs every retry; the user gets one line at the end instead
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        config = AutoConfig.from_pretrained(name)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise UserError(f"{name}: model type '{config.model_type}' is not a causal language model")
        tokenizer = AutoTokenizer.from_pretrained(name)
        # fp32 whatever the folder was saved in (transformers 5 would keep a 16-bit folder 16-bit): mixed
        # precision wants fp32 master weights, and the merge of --lora adapters an fp32 base
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if local:
            raise UserError(f"{name}: cannot load it as a causal language model ({first_line(exc)})")
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")
        if offline or "connect" in str(exc).lower():
            raise UserError(f"cannot download '{name}': the model hub is unreachable (and no local folder of "
                            f"that name); train offline with --from-scratch or pass a local model folder to --model")
        raise UserError(f"cannot load '{name}' from the model hub ({first_line(exc)}); "
                        f"check the name, or use --from-scratch or a local model folder")
    finally:
        hub_logger.setLevel(level)
    return model, tokenizer


def vocabulary(tokenizer):
    """The tokens of the tokenizer's own files, without those transformers adds while
    loading: GPT-2's tokenizer class adds its default <|endoftext|> as a new token when the
    files declare no EOS, and a model would learn to stop on an id it never saw."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.get_vocab(with_added_tokens=False)
    added = tokenizer.get_added_vocab()
    return {token: i for token, i in tokenizer.get_vocab().items() if token not in added}


def choose_special_tokens(tokenizer, embeddings):
    """{"eos_token": ..., "bos_token": ..., "pad_token": ...} among the tokens the vocabulary
    already has, and a line for each saying why.

    EOS: the declared one when the vocabulary has it, else </s>, else <|endoftext|>.
    BOS (never put in a prompt; generation configs name one): likewise with <s>.
    pad: the declared one when the vocabulary has it and it is not EOS (with pad == EOS the
    collator masks EOS out of the labels and the model never learns to stop), else <pad>;
    only where there is none is <pad> added, the one token this may add."""
    vocab = vocabulary(tokenizer)
    added = {token: i for token, i in tokenizer.get_added_vocab().items() if i < embeddings}

    def pick(kind, declared, candidates, known=vocab):
        if declared is not None and declared in known:
            return declared, f"{kind} {declared!r} id {known[declared]} (declared)"
        why = f"the tokenizer's {declared!r} is not in its vocabulary" if declared is not None else "none declared"
        for token in candidates:
            if token in known:
                return token, f"{kind} {token!r} id {known[token]} ({why}; the vocabulary has {token!r})"
        return None, why

    eos, eos_note = pick("EOS", tokenizer.eos_token, EOS_CANDIDATES)
    if eos is None:
        raise UserError(f"the tokenizer has no EOS in its vocabulary ({eos_note}, and no "
                        f"{' or '.join(EOS_CANDIDATES)}), so replies could never end; set eos_token in its "
                        f"tokenizer_config.json")
    bos, bos_note = pick("BOS", tokenizer.bos_token, BOS_CANDIDATES)
    declared_pad = tokenizer.pad_token if tokenizer.pad_token != eos else None
    pad, pad_note = pick("pad", declared_pad, ("<pad>",), {**vocab, **added})
    notes = [eos_note, bos_note if bos else f"no BOS ({bos_note}): none is needed, prompts never start with one"]
    if pad is None:
        pad = SPECIAL_TOKENS["pad_token"]
        if pad == eos:
            raise UserError(f"the tokenizer's EOS is {eos!r}, the name a new pad token would take; pad must "
                            f"differ from EOS")
        why = "the declared pad is EOS" if tokenizer.pad_token == eos else pad_note
        pad_note = f"pad {pad!r} added as a new token ({why}; a pad of its own keeps EOS in the labels)"
    notes.append(pad_note)
    chosen = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        chosen["bos_token"] = bos
    return chosen, notes


def fix_special_tokens(model, tokenizer):
    """The chosen EOS, BOS and pad set on the tokenizer and written into the model's
    configs; returns the model, the tokenizer and the lines that say what was chosen."""
    chosen, notes = choose_special_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
    tokenizer.add_special_tokens(chosen)
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "right"      # labels line up with input_ids; generation sets its own side
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, notes


def train_tokenizer(texts, vocab_size, model_max_length):
    """A byte-level BPE tokenizer trained on `texts`, with ruGPT-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=model_max_length, **SPECIAL_TOKENS)


def tokenizer_texts(rows, max_turns, persona=None):
    """The training texts shaped as training feeds them: prompt + " " + answer."""
    for row in rows:
        turns, answer, facts = row_parts(row)
        yield prompt_text(turns[-max_turns:], persona, facts) + " " + prepare_turn(answer)


def build_from_scratch(train_rows, args, max_turns, persona=None):
    """A GPT-2 model from a config and a tokenizer trained on the training texts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.n_embd % args.n_head:
        raise UserError(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    texts = tokenizer_texts(train_rows, max_turns, persona)
    tokenizer = train_tokenizer(texts, args.vocab_size, args.n_positions)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config), tokenizer


def context_size(config):
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise UserError("the model config names no context size (n_positions / max_position_embeddings)")


def training_window(model, max_length, max_turns):
    """The window every prompt of this model is fitted to, in training and in chat:
    {"max_turns", "context_tokens", "max_length", "max_new_tokens"}. A prompt gets
    max_length less the reply's room, so a chat prompt plus its reply fits what training
    showed the model."""
    max_length = min(max_length, context_size(model.config))
    max_new = min(MAX_NEW_TOKENS, max_length // 2)
    return {"max_turns": max_turns, "context_tokens": max_length - max_new, "max_length": max_length,
            "max_new_tokens": max_new}


def chat_config(window, persona, facts=False, voice=None):
    """chat_config.json; "facts": whether training showed the model the facts exchange, which the chat
    then puts into its prompts (a model that never saw it would take it for a turn of the dialogue);
    "voice": whose turns it learnt to write ({"keys", "names"}; None: everyone's)."""
    return {"format_version": 1, "prompt_rule": PROMPT_RULE, "question_label": QUESTION_LABEL,
            "answer_label": ANSWER_LABEL, "turn_separator": TURN_SEPARATOR, "persona": persona,
            "facts": bool(facts), "max_turns": window["max_turns"], "context_tokens": window["context_tokens"],
            "max_length": window["max_length"],
            "generation": dict(GENERATION, max_new_tokens=window["max_new_tokens"]), "voice": voice}


def read_voice(data_dir):
    """{"keys", "names"} of the person whose turns the data's answers are (create_dataset.py --as writes
    <data-dir>/voice.json beside the splits), or None where there is no such file."""
    path = os.path.join(data_dir, VOICE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            voice = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable as JSON ({first_line(exc)}); run create_dataset.py again") from None
    if not (isinstance(voice, dict) and isinstance(voice.get("keys"), list) and voice["keys"]
            and isinstance(voice.get("names"), list) and len(voice["names"]) == len(voice["keys"])
            and all(isinstance(v, str) for v in voice["keys"] + voice["names"])):
        raise UserError(f"{path}: expected {{\"keys\": [...], \"names\": [...]}} as create_dataset.py --as "
                        "writes it; run create_dataset.py again")
    return {"keys": voice["keys"], "names": voice["names"]}


# The prompt rule as a chat template, saved with the tokenizer (chat_template.jinja), so that
# apply_chat_template and OpenAI-compatible servers (transformers serve, vLLM) build the kit's prompt:
# a system message is the persona's answer; every other message is a turn, oldest first, labelled
# counting back from the reply whatever its role; each turn made one line with its labels neutralised
# (prepare_turn); the folder's turn window; the end at "Ответ:" with add_generation_prompt. For a
# conversation within the prompt budget the ids equal fit_prompt's. Jinja has no Unicode normalisation
# (send NFC text) and no token budget (keep conversations within it); a typed "</s>" stays text through
# the tokenizer (split_special_tokens), not the template. Variables a request may set
# (chat_template_kwargs): persona ({"question", "answer"} or none), max_turns (0: all), facts.
CHAT_TEMPLATE = r"""{%- if persona is not defined -%}{%- set persona = default_persona -%}{%- endif -%}
{%- if max_turns is not defined -%}{%- set max_turns = default_max_turns -%}{%- endif -%}
{%- if facts is not defined -%}{%- set facts = none -%}{%- endif -%}
{%- macro one_line(text) -%}
{#- prepare_turn without NFC: single spaces, and "вопрос"/"ответ" (any case) at a word start followed by
    ":" or " :" written "<word> -"; a character scan, since Jinja has no regular expressions -#}
{%- set flat = (text or "").split() | join(" ") -%}
{%- set low = flat | lower -%}
{%- if "вопрос" not in low and "ответ" not in low -%}
{{- flat -}}
{%- else -%}
{%- set scan = namespace(out="", resume=0) -%}
{%- for i in range(flat | length) -%}
{%- if i >= scan.resume -%}
{%- set word = 6 if (flat[i:i + 6] | lower) == "вопрос" else (5 if (flat[i:i + 5] | lower) == "ответ" else 0) -%}
{%- set colon = 1 if flat[i + word:i + word + 1] == ":" else (2 if flat[i + word:i + word + 2] == " :" else 0) -%}
{%- set word_start = i == 0 or not (flat[i - 1].isalnum() or flat[i - 1] == "_") -%}
{%- if word and colon and word_start -%}
{%- set scan.out = scan.out ~ flat[i:i + word] ~ " -" -%}
{%- set scan.resume = i + word + colon -%}
{%- else -%}
{%- set scan.out = scan.out ~ flat[i] -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{{- scan.out -}}
{%- endif -%}
{%- endmacro -%}
{%- set talk = namespace(persona_answer=(persona.answer if persona else none), turns=[], lines=[]) -%}
{%- for message in messages -%}
{%- if message.role == "system" -%}
{%- set talk.persona_answer = message.content -%}
{%- else -%}
{%- set talk.turns = talk.turns + [message.content] -%}
{%- endif -%}
{%- endfor -%}
{%- set turns = talk.turns[-max_turns:] if max_turns else talk.turns -%}
{%- set reply_at = (turns | length) if add_generation_prompt else (turns | length) - 1 -%}
{%- if talk.persona_answer is not none -%}
{%- set talk.lines = ["Вопрос: " ~ one_line(persona.question if persona else "Кто ты?"),
                      "Ответ: " ~ one_line(talk.persona_answer)] -%}
{%- endif -%}
{%- if facts -%}
{%- set talk.lines = talk.lines + ["Вопрос: Что ты обо мне знаешь?", "Ответ: " ~ one_line(facts)] -%}
{%- endif -%}
{%- for turn in turns -%}
{%- set talk.lines = talk.lines + [("Ответ: " if (reply_at - loop.index0) % 2 == 0 else "Вопрос: ") ~ one_line(turn)] -%}
{%- endfor -%}
{{- talk.lines | join("\n") -}}
{%- if add_generation_prompt -%}
{{- ("\n" if talk.lines else "") ~ "Ответ:" -}}
{%- endif -%}
"""
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


def chat_template(persona, max_turns):
    """CHAT_TEMPLATE with the folder's persona and turn window as the defaults a request may override."""
    persona_literal = "none" if persona is None else json.dumps(persona, ensure_ascii=False)  # JSON is Jinja
    return (f"{{%- set default_persona = {persona_literal} -%}}\n"
            f"{{%- set default_max_turns = {int(max_turns)} -%}}\n" + CHAT_TEMPLATE)


def prepare_folder_tokenizer(tokenizer, window, persona):
    """The tokenizer as the folder saves it for readers outside the kit: the chat template, and text
    tokenized as the prompt rule does wherever it is loaded, so that a server tokenizing the prompt's
    text gets the kit's ids: a typed "</s>" stays text (split_special_tokens) and nothing is added
    around the text (no BOS, no EOS)."""
    tokenizer.chat_template = chat_template(persona, window["max_turns"])
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True  # tokenizer_config.json keeps init arguments only
    tokenizer.add_bos_token = False  # the setters rewrite tokenizer.json's post-processor, where it lives now
    tokenizer.add_eos_token = False
    return tokenizer


def set_sampling_defaults(model):
    """generation_config.json gets the chat's sampling settings, so that a server samples as the chat
    does (transformers serve starts every request from this file, vLLM takes its defaults from it). The
    repetition penalty and n-gram blocking stay out: transformers applies them to the prompt too."""
    model.generation_config.update(**{key: GENERATION[key] for key in SAMPLING_KEYS})
    return model


# ----------------------------------------------------------------------------
# bigger models on small GPUs (LoRA, 16 bits, checkpointing, 8-bit AdamW), and past one GPU (DeepSpeed)

def package_installed(name):
    """Whether pip installed `name`: its metadata, not an import spec, since the repository's own
    deepspeed/ folder of configs would pass for a package where the real one is missing."""
    import importlib.metadata

    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_training_flags(args):
    """The one-line errors of the flags that only make sense together, or need a package."""
    if args.lora and args.from_scratch:
        raise UserError("--lora adapts a trained model; with --from-scratch there is nothing to adapt (drop one)")
    if args.save_adapter and not args.lora:
        raise UserError("--save-adapter keeps the LoRA adapter of a --lora run; add --lora")
    if args.lora_r < 1 or args.lora_alpha <= 0:
        raise UserError(f"--lora-r {args.lora_r} --lora-alpha {args.lora_alpha}: both must be positive")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout {args.lora_dropout}: must be at least 0 and below 1")
    if args.optim_8bit and args.deepspeed:
        raise UserError("--optim-8bit with --deepspeed: ZeRO already splits (or offloads) the AdamW state; drop one")
    if args.optim_8bit and not package_installed("bitsandbytes"):
        raise UserError("--optim-8bit needs the bitsandbytes package, which is not installed "
                        "(pip install bitsandbytes), or drop --optim-8bit")
    if args.deepspeed:
        if not os.path.isfile(args.deepspeed):
            raise UserError(f"{args.deepspeed}: DeepSpeed config not found (the kit ships deepspeed/zero2.json and "
                            f"deepspeed/zero3_offload.json)")
        try:
            with open(args.deepspeed, encoding="utf-8") as f:
                config = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{args.deepspeed}: not a JSON DeepSpeed config ({first_line(exc)})")
        if not isinstance(config, dict):
            raise UserError(f"{args.deepspeed}: not a JSON DeepSpeed config (expected an object)")
        if not package_installed("deepspeed"):
            raise UserError("--deepspeed needs the deepspeed package, which is not installed (pip install deepspeed)")


def lora_config(args, new_token_ids):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS, bias="none",
                      fan_in_fan_out=True,  # GPT-2's Conv1D keeps its weight as in x out
                      # the rows of the tokens fix_special_tokens added (the pad), and with them the tied LM
                      # head's: d parameters a token, not the whole V x d table that modules_to_save would train
                      trainable_token_indices=list(new_token_ids) or None)


@contextlib.contextmanager
def peft_quietly():
    """peft reads model.is_gradient_checkpointing, which transformers 5 deprecates: a FutureWarning a model."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def slim_adapter_saves(model):
    """The Trainer's checkpoints hold the adapters and the token rows only: peft, seeing a resized vocabulary
    (the added pad), would add both whole embedding tables to each (about 400 MB for ruGPT-3 medium) and look
    the base up on the hub at every save, while the rows it needs are in the adapter already. The Trainer
    cannot pass peft's flag, so the model's own save_pretrained carries it."""
    import functools

    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def apply_lora(model, args, new_token_ids, source):
    """The model with LoRA adapters on every block's c_attn, c_proj and c_fc; only they (and the rows of
    new_token_ids) train."""
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    layers = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, Conv1D)}
    if not set(LORA_TARGETS) <= layers:
        raise UserError(f"{source}: --lora adapts GPT-2 blocks ({', '.join(LORA_TARGETS)}), which this "
                        f"{model.config.model_type} model does not have")
    with peft_quietly():
        return slim_adapter_saves(get_peft_model(model, lora_config(args, new_token_ids)))


def resume_lora(base, checkpoint):
    """A --lora run's checkpoint holds the adapter, and its adapter_config.json the token rows: back onto
    the base (resized to the run's tokenizer), trainable."""
    from peft import PeftModel

    with peft_quietly():
        return slim_adapter_saves(PeftModel.from_pretrained(base, checkpoint, is_trainable=True))


def describe_memory_settings(args, precision):
    settings = [(precision or "fp32") + (" (frozen weights in 16 bits)" if args.lora and precision and
                                         not args.deepspeed else "")]
    settings += ["gradient checkpointing"] * args.gradient_checkpointing + ["8-bit AdamW"] * args.optim_8bit
    settings += [f"DeepSpeed {args.deepspeed}"] if args.deepspeed else []
    return "precision: " + ", ".join(settings)


def describe_lora(model):
    trainable, total = model.get_nb_trainable_parameters()
    rows = model.peft_config["default"].trainable_token_indices
    added = f", with the rows of {len(rows)} added token(s)" if rows else ""
    return (f"LoRA r={model.peft_config['default'].r} on {', '.join(LORA_TARGETS)}: {trainable:,} trainable "
            f"parameters of {total:,} ({100 * trainable / total:.2f}%){added}")


def mixed_precision(device):
    """"bf16" on a GPU that computes in bf16 (compute capability 8: A100, A10, L4, RTX 30xx and later),
    "fp16" with loss scaling on one that does not (T4, V100), None on a CPU. The hardware generation
    decides: torch.cuda.is_bf16_supported() says yes on a T4 too, where bf16 is emulated and slow."""
    import torch

    if device != "cuda":
        return None
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


def cast_frozen_weights(model, precision):
    """Under --lora on a GPU the frozen weights in 16 bits (2 bytes a parameter instead of 4) and what trains
    in fp32, as mixed precision wants; the saved folder is merged onto an fp32 base all the same."""
    import torch
    from peft import cast_mixed_precision_params

    cast_mixed_precision_params(model, torch.bfloat16 if precision == "bf16" else torch.float16)
    return model


def checkpointing_arguments(enabled):
    """TrainingArguments keywords for gradient checkpointing, non-reentrant (the same loss, and no inputs that
    must require grad under --lora). transformers 5 calls it activation_checkpointing and warns on the old
    name, which earlier versions use: the name this version has."""
    import dataclasses

    from transformers import TrainingArguments

    if not enabled:
        return {}
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: True, f"{key}_kwargs": {"use_reentrant": False}}


def launch_alone(args):
    """`python <script> --deepspeed CONFIG` (or accelerate launch without --use_deepspeed) on one GPU: the
    environment a launcher gives its one process, without which DeepSpeed looks for MPI and stops."""
    if not args.deepspeed or "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    print("--deepspeed with no launcher: one process", flush=True)


def check_deepspeed_engaged(trainer, args):
    """accelerate launch --cpu drops DeepSpeed without a word (measured): stop instead of training without it."""
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise UserError(f"--deepspeed {args.deepspeed}: the launcher turned DeepSpeed off (accelerate launch --cpu "
                        f"does); launch without --cpu, with torchrun or the deepspeed launcher")


def upcast_saved_weights(folder):
    """The saved weights in fp32: DeepSpeed saves the 16-bit ones it computes with, transformers 5 loads a
    folder in the dtype it was saved in, and the chat's int8 path fails on a bf16 folder (measured)."""
    import torch
    from safetensors.torch import load_file, save_file

    changed = False
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".safetensors"):
            continue
        tensors = load_file(path)
        if all(t.dtype == torch.float32 or not t.is_floating_point() for t in tensors.values()):
            continue
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}, tmp,
                  metadata={"format": "pt"})
        os.replace(tmp, path)
        changed = True
    config_path = os.path.join(folder, "config.json")
    if changed and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config.pop("torch_dtype", None)
        write_json_atomic(config_path, dict(config, dtype="float32"))
    return changed


def merge_lora(args, tokenizer, adapter_dir, adapter_copy=None):
    """The trained adapter merged into a fresh fp32 copy of the base on the CPU: a plain GPT-2 model.

    From the saved adapter rather than the live model, so one way serves one process, DDP and ZeRO-3
    (whose live weights are split across processes). adapter_copy: where --save-adapter keeps it."""
    from peft import PeftModel

    if args.deepspeed:  # while a ZeRO-3 config is alive, from_pretrained would build the base split, empty
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    base, _ = load_pretrained(args.model)
    base, _, _ = fix_special_tokens(base, tokenizer)  # the run's tokenizer: the same rows as in training
    with peft_quietly():
        model = PeftModel.from_pretrained(set_sampling_defaults(base), adapter_dir)
    if adapter_copy:
        model.save_pretrained(adapter_copy, save_embedding_layers=False)  # as the checkpoints: no tables
    return model.merge_and_unload()


def save_final_model(trainer, args, tokenizer, final_tmp):
    """The output folder's model into final_tmp, fp32 whatever the launcher. Every process calls it:
    ZeRO-3 gathers the weights there; only the main one writes."""
    if not args.lora:
        trainer.save_model(final_tmp)
        if trainer.is_world_process_zero():
            upcast_saved_weights(final_tmp)
        return
    adapter_tmp = final_tmp + "-adapter"
    trainer.save_model(adapter_tmp)  # the best adapter: the Trainer loaded it at the end
    if trainer.is_world_process_zero():
        adapter_copy = os.path.join(final_tmp, ADAPTER_DIR) if args.save_adapter else None
        merged = merge_lora(args, tokenizer, adapter_tmp, adapter_copy)
        merged.save_pretrained(final_tmp)
        tokenizer.save_pretrained(final_tmp)
        shutil.rmtree(adapter_tmp)


# ----------------------------------------------------------------------------
# output folder

def complete_checkpoint(folder, adapter=False):
    """Newest checkpoint-N/ whose save finished (trainer_state.json is written last), else None; with
    adapter=True, of a --lora run, whose checkpoints hold the adapter instead of the model."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(folder, name)
        has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
        weights = has("adapter_config.json") and has("adapter_model.safetensors") if adapter else \
            has("config.json") and (has("model.safetensors") or has("model.safetensors.index.json"))
        if match and has("trainer_state.json") and weights:
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def resume_checkpoint(out, lora):
    """The checkpoint --resume continues from: the newest complete one of the kind this run saves."""
    checkpoint = complete_checkpoint(out, adapter=lora)
    if checkpoint is None and complete_checkpoint(out, adapter=not lora):
        raise UserError(f"{out}: --resume: its checkpoints are of a run {'without' if lora else 'with'} --lora; "
                        f"{'drop' if lora else 'add'} --lora as that run had it")
    if checkpoint is None:
        raise UserError(f"{out}: --resume found no complete checkpoint-N/ folder to continue from")
    return checkpoint


def check_output_dir(out):
    """Refuse to clear a folder that is not a model folder of this kit."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UserError(f"{out}: exists and is not a folder; choose another --output")
    names = os.listdir(out)
    ours = "chat_config.json" in names or any(re.fullmatch(r"checkpoint-\d+", n) for n in names)
    if names and not ours:
        raise UserError(f"{out}: folder holds other files (no chat_config.json); choose another --output")


def clear_previous_run(out):
    """Remove an earlier run's model and checkpoints, so that a chat script or --resume
    never mixes them with this run's tokenizer."""
    if not os.path.isdir(out):
        return
    removed = False
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if re.fullmatch(r"checkpoint-\d+", name) or name in (FINAL_TMP, FINAL_TMP + "-adapter", ADAPTER_DIR):
            shutil.rmtree(path)
            removed = True
        elif os.path.isfile(path) and (MODEL_FILE_RE.match(name) or name in RUN_FILES):
            os.remove(path)
            removed = True
    if removed:
        print(f"{out}: replaced the model and checkpoints of an earlier run", flush=True)


def write_json_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def publish_folder(src, dest):
    """Move the files of `src` into `dest`, config.json last, and remove `src`.

    A chat script takes the top level only when config.json and the weights are
    both there, so config.json goes first out and last in: a crash mid-way leaves
    the newest checkpoint in charge instead of a half-written model."""
    old_config = os.path.join(dest, "config.json")
    if os.path.exists(old_config):
        os.remove(old_config)
    names = sorted(os.listdir(src), key=lambda n: n == "config.json")
    for name in names:
        if os.path.isdir(os.path.join(dest, name)):  # a folder (adapter/) replaces the old one whole
            shutil.rmtree(os.path.join(dest, name))
        os.replace(os.path.join(src, name), os.path.join(dest, name))
    os.rmdir(src)


def save_tokenizer_and_chat_config(tokenizer, config, out):
    """Written at the start, so that every checkpoint-N/ can be chatted with at once."""
    tmp = os.path.join(out, f".tokenizer-tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
    write_json_atomic(os.path.join(out, "chat_config.json"), config)


def plot_training_curves(log_history, path):
    """Training loss, validation loss and grad-norm by step: the curves to stop before over-fitting."""
    # The Figure class, not pyplot: no backend to choose, so a notebook keeps its own (Agg would blank its plots).
    from matplotlib.figure import Figure

    def series(key):
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(8, 6))
    ax_loss, ax_grad = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(*series("loss"), label="training loss")
    ax_loss.plot(*series("eval_answer_loss"), "o-", label="validation loss (answer tokens)")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_grad.plot(*series("grad_norm"), color="tab:green")
    ax_grad.set_ylabel("grad norm")
    ax_grad.set_xlabel("optimizer step")
    ax_grad.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def show_in_notebook(png_path):
    """Show a saved chart in the notebook cell running this script (pasted or %run); elsewhere the file is all."""
    if "ipykernel" in sys.modules:
        from IPython.display import Image, display

        display(Image(filename=png_path))


# ----------------------------------------------------------------------------
# training

def pick_device(device):
    import torch

    if device not in DEVICES:  # a DEVICE set in the defaults block, which argparse does not check
        raise UserError(f"--device {device!r}: must be one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def training_arguments(args, device, lr):
    from transformers import TrainingArguments

    precision = mixed_precision(device)
    return TrainingArguments(
        output_dir=args.output,
        use_cpu=device != "cuda",
        bf16=precision == "bf16",
        fp16=precision == "fp16",            # with dynamic loss scaling
        deepspeed=args.deepspeed,            # its "auto" values are filled from these arguments
        **({"optim": "adamw_bnb_8bit"} if args.optim_8bit else {}),
        **checkpointing_arguments(args.gradient_checkpointing),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr,
        warmup_steps=WARMUP,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,          # the best model must be a saved checkpoint
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="answer_loss",  # token-weighted: what perplexity.py reports
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # --resume keeps early stopping's patience
        logging_steps=args.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=False,          # logits go to answer_nll_sums, which keeps two numbers a row
        remove_unused_columns=False,
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,    # every GPT-2 weight (or adapter) takes part in each step
    )


def make_collator(tokenizer, device):
    """Pads each batch to its longest example: input_ids with pad, labels with -100.

    The Seq2Seq collator is used because it pads precomputed labels as they are;
    the language-modelling one would rebuild them from input_ids."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8 if device == "cuda" else None)


def answer_nll_sums(logits, labels):
    """Per validation row, (sum of the NLL of its answer tokens and EOS, their count):
    the two numbers a token-weighted loss needs, instead of vocabulary-sized logits."""
    import torch
    import torch.nn.functional as F

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    sums = []
    for row_logits, row_labels in zip(logits, labels):  # a row at a time: logits in fp32 are large
        targets = row_labels[1:]
        nll = F.cross_entropy(row_logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        sums.append(torch.stack([nll, (targets != IGNORE_INDEX).sum().float()]))
    return torch.stack(sums)


def token_weighted_loss(prediction):
    """answer_loss: the total NLL of the answer tokens over their count, as perplexity.py
    counts it (Trainer's eval_loss is a mean of batch means, which short answers sway)."""
    sums = prediction.predictions.reshape(-1, 2)
    return {"answer_loss": float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))}


def make_callbacks(args):
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=args.patience)]


def prepare_model(args, train_rows, max_turns, persona):
    """(model, tokenizer, where they came from, lines on the special tokens) for a fresh run or a resumed
    one; with --lora the model carries its adapters (resumed: the checkpoint's, on --model)."""
    from transformers import AutoTokenizer, set_seed

    set_seed(args.seed)  # before the model and the adapters: the pad row and LoRA's A matrices are random
    if args.resume_from and not args.lora:
        # the checkpoint's own tokenizer: a retrained BPE might number tokens differently
        source = args.resume_from
        model, tokenizer = load_pretrained(source)
    elif args.from_scratch:
        source = "a new model (--from-scratch)"
        model, tokenizer = build_from_scratch(train_rows, args, max_turns, persona)
    else:
        source = args.model
        model, tokenizer = load_pretrained(source)
        if args.resume_from:  # a --lora checkpoint: the adapter and the run's tokenizer, the base is --model
            tokenizer = AutoTokenizer.from_pretrained(args.resume_from)
    vocabulary_before = len(tokenizer)
    model, tokenizer, notes = fix_special_tokens(model, tokenizer)
    set_sampling_defaults(model)
    if args.lora:
        model = resume_lora(model, args.resume_from) if args.resume_from else \
            apply_lora(model, args, range(vocabulary_before, len(tokenizer)), source)
    return model, tokenizer, source, notes


def run(args, train_rows, val_rows, max_turns, persona):
    """Train and write the output folder; returns the Trainer (tests look at its state)."""
    import math

    from transformers import Trainer

    check_training_flags(args)
    voice = read_voice(args.data_dir)
    device = pick_device(args.device)
    check_output_dir(args.output)
    args.resume_from = resume_checkpoint(args.output, args.lora) if args.resume else None
    model, tokenizer, source, notes = prepare_model(args, train_rows, max_turns, persona)
    precision = mixed_precision(device)
    if args.lora and precision and not args.deepspeed:  # DeepSpeed casts the model itself
        cast_frozen_weights(model, precision)
    window = training_window(model, args.max_length, max_turns)
    prepare_folder_tokenizer(tokenizer, window, persona)
    train_set, train_skipped = encode_examples(tokenizer, train_rows, window, "encoding train", persona)
    val_set, val_skipped = encode_examples(tokenizer, val_rows, window, "encoding val", persona)
    with_facts = facts_exchanges(tokenizer, train_rows, window, persona)
    if not train_set or not val_set:
        raise UserError(f"no {'training' if not train_set else 'validation'} example fits in "
                        f"--max-length {window['max_length']} tokens; raise --max-length")
    lr = args.lr or (LR_FROM_SCRATCH if args.from_scratch else LR_LORA if args.lora else LR_PRETRAINED)

    launch_alone(args)
    targs = training_arguments(args, device, lr)
    is_main = targs.process_index == 0
    if is_main:
        print(f"model: {source}, {model.num_parameters() / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}",
              flush=True)
        print("special tokens: " + "; ".join(notes), flush=True)
        if args.lora:
            print(describe_lora(model), flush=True)
        print(describe_memory_settings(args, precision), flush=True)
        print(f"examples: {len(train_set)} train, {len(val_set)} val (at most {window['max_length']} tokens, "
              f"prompts at most {window['context_tokens']} and {window['max_turns']} turns; skipped because the "
              f"answer leaves no room: {train_skipped} train, {val_skipped} val)", flush=True)
        if any(row_parts(row)[2] for row in train_rows):
            print(f"facts exchange (the data's facts column): in {with_facts} of {len(train_rows)} training "
                  f"prompts; chat_config.json records facts {'true' if with_facts else 'false'}", flush=True)
        if voice:
            print(f"voice: {', '.join(f'{n} ({k})' for k, n in zip(voice['keys'], voice['names']))}, from "
                  f"{os.path.join(args.data_dir, VOICE_FILE)}; chat_config.json records it", flush=True)
        if not args.resume_from:
            clear_previous_run(args.output)
        os.makedirs(args.output, exist_ok=True)
        save_tokenizer_and_chat_config(tokenizer, chat_config(window, persona, with_facts > 0, voice), args.output)

    trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=make_collator(tokenizer, device), processing_class=tokenizer,
                      callbacks=make_callbacks(args), compute_metrics=token_weighted_loss,
                      preprocess_logits_for_metrics=answer_nll_sums)
    check_deepspeed_engaged(trainer, args)
    trainer.train(resume_from_checkpoint=args.resume_from)

    # every process takes part (sharded models gather here); only the main one writes
    final_tmp = os.path.join(args.output, FINAL_TMP)
    if trainer.is_world_process_zero() and os.path.isdir(final_tmp):
        shutil.rmtree(final_tmp)
    save_final_model(trainer, args, tokenizer, final_tmp)
    if trainer.is_world_process_zero():
        publish_folder(final_tmp, args.output)
        trainer.state.save_to_json(os.path.join(args.output, "trainer_state.json"))
        plot_training_curves(trainer.state.log_history, os.path.join(args.output, "training_curves.png"))
        show_in_notebook(os.path.join(args.output, "training_curves.png"))
        # the trainer validates at the last step too, so the best metric covers the whole run
        loss = trainer.state.best_metric
        summary = "no validation ran" if loss is None else \
            f"best validation loss on answer tokens {loss:.4f} (token-weighted, as perplexity.py counts; " \
            f"perplexity {math.exp(min(loss, 50)):.2f})"
        print(f"done: step {trainer.state.global_step}, {summary}, from "
              f"{trainer.state.best_model_checkpoint}; model in {args.output}/", flush=True)
    leave_process_group(trainer)
    return trainer


def leave_process_group(trainer):
    """Wait for every process, then take the process group down before the interpreter exits: a
    torchrun process that exits with gloo's threads still running can abort (SIGABRT, "terminate
    called without an active exception") after its work is saved, and torchrun then fails the run.
    One process alone keeps its group, so that a caller in the same process may train again."""
    import torch.distributed as dist

    trainer.accelerator.wait_for_everyone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------
# command line

def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_common_arguments(parser, output, model, max_length=MAX_LENGTH):
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder of the data splits (default %(default)s)")
    parser.add_argument("--output", default=output, help="model folder to write (default %(default)s)")
    parser.add_argument("--model", default=model,
                        help="hub name or local GPT-2-style folder to fine-tune (default %(default)s); ruGPT-3: "
                             "ai-forever/rugpt3{small,medium,large}_based_on_gpt2")
    parser.add_argument("--from-scratch", action="store_true", default=FROM_SCRATCH,
                        help="train a new GPT-2 model and BPE tokenizer on the data instead of --model")
    parser.add_argument("--n-layer", type=positive_int, default=N_LAYER)
    parser.add_argument("--n-head", type=positive_int, default=N_HEAD)
    parser.add_argument("--n-embd", type=positive_int, default=N_EMBD)
    parser.add_argument("--vocab-size", type=positive_int, default=VOCAB_SIZE)
    parser.add_argument("--n-positions", type=positive_int, default=N_POSITIONS)
    parser.add_argument("--device", choices=DEVICES, default=DEVICE)
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help="optimizer steps; overrides --epochs")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="per device")
    parser.add_argument("--grad-accum", type=positive_int, default=GRAD_ACCUM)
    parser.add_argument("--lr", type=float, default=LR,
                        help=f"learning rate (default {LR_PRETRAINED} fine-tuning, {LR_FROM_SCRATCH} from scratch)")
    parser.add_argument("--max-length", type=positive_int, default=max_length,
                        help="tokens per example, prompt + answer + EOS (default %(default)s)")
    parser.add_argument("--rows", type=positive_int, default=ROWS, help="use the first N training rows")
    parser.add_argument("--val-rows", type=positive_int, default=VAL_ROWS)
    parser.add_argument("--eval-steps", type=positive_int, default=EVAL_STEPS,
                        help="validate and save a checkpoint every N optimizer steps")
    parser.add_argument("--logging-steps", type=positive_int, default=LOGGING_STEPS)
    parser.add_argument("--patience", type=positive_int, default=PATIENCE,
                        help="stop after N validations without improvement")
    parser.add_argument("--save-total-limit", type=positive_int, default=SAVE_TOTAL_LIMIT)
    parser.add_argument("--resume", action="store_true", default=RESUME,
                        help="continue from the newest complete checkpoint")
    parser.add_argument("--no-persona", action="store_true", default=NO_PERSONA,
                        help="write persona: null into chat_config.json")
    parser.add_argument("--seed", type=int, default=SEED)
    # bigger models on small GPUs, and past one GPU
    parser.add_argument("--lora", action="store_true", default=LORA,
                        help=f"train LoRA adapters (and the rows of added tokens) instead of every weight; the "
                             f"saved model has them merged in (learning rate {LR_LORA} unless --lr)")
    parser.add_argument("--lora-r", type=positive_int, default=LORA_R, help="adapter rank (default %(default)s)")
    parser.add_argument("--lora-alpha", type=float, default=LORA_ALPHA,
                        help="adapter updates are scaled by alpha / r (default %(default)s)")
    parser.add_argument("--lora-dropout", type=float, default=LORA_DROPOUT, help="(default %(default)s)")
    parser.add_argument("--save-adapter", action="store_true", default=SAVE_ADAPTER,
                        help=f"with --lora, also keep the adapter alone in <output>/{ADAPTER_DIR}/")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=GRADIENT_CHECKPOINTING,
                        help="recompute activations in the backward pass: less memory, about a third slower")
    parser.add_argument("--optim-8bit", action="store_true", default=OPTIM_8BIT,
                        help="AdamW with 8-bit state (bitsandbytes): 10 instead of 16 bytes a parameter")
    parser.add_argument("--deepspeed", default=DEEPSPEED, metavar="CONFIG",
                        help="DeepSpeed config (deepspeed/zero2.json, deepspeed/zero3_offload.json); launch with "
                             "accelerate launch, torchrun or deepspeed")
    # learning from the bot's ratings (the feedback block)
    parser.add_argument("--feedback", default=FEEDBACK, metavar="PARQUET",
                        help="train --model further on the ratings in this file (create_dataset.py --feedback writes "
                             "data/feedback_train.parquet) instead of on the data splits; the new model goes to --output, by default <model>_feedback")
    parser.add_argument("--feedback-val", default=FEEDBACK_VAL, metavar="PARQUET",
                        help="ratings for the figures before and after (default: feedback_val.parquet beside --feedback)")
    parser.add_argument("--feedback-loss", choices=FEEDBACK_LOSSES, default=FEEDBACK_LOSS,
                        help="kto: every rated reply (default); dpo: the pairs of a reply and the one 🔄 replaced")
    parser.add_argument("--feedback-beta", type=float, default=FEEDBACK_BETA,
                        help="how far the model may move from --model (higher: less; default %(default)s)")
    parser.add_argument("--feedback-epochs", type=float, default=FEEDBACK_EPOCHS,
                        help=f"epochs over the ratings (default %(default)s; learning rate {FEEDBACK_LR} unless --lr)")
    # the deepspeed launcher passes --local_rank=N; torch.distributed's LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
# ==== end of block blocks/trainer.py ====


# ==== block blocks/feedback.py: generated, edit the source and run `make blocks` ====
"""Learning from ratings: a model folder trained further on the bot's 👍/👎 with TRL's KTOTrainer (or DPOTrainer
on the 🔄 pairs), and the liked-share and perplexity figures before and after.

A block: blocks/build.py writes this file into the scripts that list it (make blocks), after the
trainer block, whose loading, LoRA, precision and publishing code it reuses. It imports nothing
itself; its host script imports what it uses and defines the FEEDBACK_* defaults.

The rows come from create_dataset.py --feedback: `prompt` (the prompt rule's text as the bot served
it, ending at "Ответ:"), `completion` (the reply with its leading space) and `label`, or `chosen` and
`rejected` for a pair. What TRL trains on is checked against the prompt rule, row by row: TRL
tokenizes the text itself and appends EOS as a string, so it is given a copy of the folder's tokenizer
that reads "</s>" as the EOS id (the saved one reads it as text, as the chat does), and a row whose
ids TRL would build differently (a "</s>" a user typed, a prompt the bot served with another
tokenizer) is left out and counted. The reference model is the source folder, loaded explicitly
(TRL's own default reloads whatever path the config names); under --lora it is the same weights with
the adapters switched off. The new folder gets the source's tokenizer files byte for byte and its
chat_config.json with a "feedback" record added."""

FEEDBACK_LOSSES = ("kto", "dpo")
FEEDBACK_KEEP = ("chat_config.json", "trainer_state.json", "training_curves.png")  # not copied as tokenizer files
FEEDBACK_SCORE_BATCH = 16


def feedback_val_path(path):
    """data/feedback_train.parquet -> data/feedback_val.parquet, where create_dataset.py writes it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, name.replace("_train", "_val")) if "_train" in name else None


def read_feedback(path, limit=None):
    """The rows of a feedback parquet as dicts (prompt, completion, label, chosen, rejected, prompt_ids)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise UserError(f"{path}: feedback file not found (create_dataset.py --feedback BOT.sqlite3 writes it)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({first_line(exc)})")
    missing = {"prompt", "completion", "label", "chosen", "rejected"} - set(table.column_names)
    if missing:
        raise UserError(f"{path}: no column {', '.join(sorted(missing))} (create_dataset.py --feedback writes "
                        f"prompt, completion, label, chosen, rejected)")
    rows = table.to_pylist()
    return rows[:limit] if limit else rows


def trl_tokenizer(folder):
    """The folder's tokenizer as TRL must see it: TRL appends the EOS as text and tokenizes prompt and
    prompt + completion; with split_special_tokens (how the kit saves its tokenizers, so a typed "</s>"
    stays text) that EOS would become the characters "</s>". Only the copy given to TRL differs."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, split_special_tokens=False)


def kit_exchange_ids(tokenizer, prompt, completion):
    """(prompt ids, completion ids) by the prompt rule: the prompt's text as plain text, the reply with
    its first word's space, then the EOS id."""
    return encode_text(tokenizer, prompt), answer_ids(tokenizer, completion)


def trl_exchange_ids(trl_tok, prompt, completion):
    """(prompt ids, completion ids) the way TRL 1.16 builds them from text: EOS appended as a string,
    prompt and prompt + completion tokenized apart, the completion from where the two part."""
    text = completion if completion.endswith(trl_tok.eos_token) else completion + trl_tok.eos_token
    prompt_ids = trl_tok(text=prompt)["input_ids"]
    whole = trl_tok(text=prompt + text)["input_ids"]
    shared = 0
    while shared < min(len(prompt_ids), len(whole)) and prompt_ids[shared] == whole[shared]:
        shared += 1
    return prompt_ids[:shared], whole[shared:]


def feedback_text(completion):
    """A reply as the completion TRL appends to the prompt: the prompt rule's turn, after its space."""
    return " " + prepare_turn(completion or "")


def feedback_examples(tokenizer, trl_tok, rows, loss, max_length):
    """The TRL rows (text) whose ids TRL would build as the prompt rule does, and counts of those left out."""
    examples, dropped = [], {"tokenized differently": 0, "served with other ids": 0, "too long": 0}
    for row in rows:
        if loss == "kto":
            if row.get("completion") is None or row.get("label") is None:
                continue
            replies = [feedback_text(row["completion"])]
        else:
            if row.get("chosen") is None or row.get("rejected") is None:
                continue
            replies = [feedback_text(row["chosen"]), feedback_text(row["rejected"])]
        kit = [kit_exchange_ids(tokenizer, row["prompt"], reply) for reply in replies]
        served = row.get("prompt_ids")
        if served is not None and list(served) != kit[0][0]:
            dropped["served with other ids"] += 1
            continue
        if any(trl_exchange_ids(trl_tok, row["prompt"], reply) != ids for reply, ids in zip(replies, kit)):
            dropped["tokenized differently"] += 1
            continue
        if any(len(p) + len(c) > max_length for p, c in kit):
            dropped["too long"] += 1
            continue
        if loss == "kto":
            examples.append({"prompt": row["prompt"], "completion": replies[0], "label": bool(row["label"])})
        else:
            examples.append({"prompt": row["prompt"], "chosen": replies[0], "rejected": replies[1]})
    return examples, dropped


def check_trl_ids(dataset, examples, tokenizer, loss):
    """TRL's tokenized rows against the prompt rule's ids; UserError naming the first that differs (a TRL
    version that tokenizes another way must not train silently on other ids)."""
    keys = ("completion_ids",) if loss == "kto" else ("chosen_ids", "rejected_ids")
    texts = ("completion",) if loss == "kto" else ("chosen", "rejected")
    for i, (row, example) in enumerate(zip(dataset, examples)):
        for key, text in zip(keys, texts):
            got = list(row["prompt_ids"]) + list(row[key])
            want = sum(kit_exchange_ids(tokenizer, example["prompt"], example[text]), [])
            if got != want:
                raise UserError(f"TRL tokenized feedback row {i} differently from the prompt rule "
                                f"({len(got)} ids, the rule gives {len(want)}); not training on other ids")


def reply_nll(model, tokenizer, rows, device, batch_size=FEEDBACK_SCORE_BATCH):
    """Per rated row, (NLL of the reply's tokens and EOS after its prompt, their count), by the kit's ids."""
    import torch

    built = [kit_exchange_ids(tokenizer, row["prompt"], feedback_text(row["completion"])) for row in rows]
    sums = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(built), batch_size):
            chunk = built[start:start + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                ids[i, :len(p) + len(c)] = torch.tensor(p + c)
                labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
            mask = torch.arange(width)[None, :] < torch.tensor([len(p) + len(c) for p, c in chunk])[:, None]
            logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits.float().cpu()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                    ignore_index=IGNORE_INDEX, reduction="none")
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
            sums += [(float(n), int(k)) for n, k in zip(nll.sum(1), counts)]
    return sums


def feedback_figures(model, tokenizer, rows, device):
    """On rated rows: "liked_share", the share of (👍 reply, 👎 reply) combinations in which the model gives
    the 👍 one the higher mean log-likelihood per token (0.5: it cannot tell them apart), and the
    perplexity of the 👍 and of the 👎 replies."""
    import math

    rated = [row for row in rows if row.get("completion") is not None and row.get("label") is not None]
    if not rated:
        return None
    scores = reply_nll(model, tokenizer, rated, device)
    liked = [-n / k for (n, k), row in zip(scores, rated) if row["label"]]
    disliked = [-n / k for (n, k), row in zip(scores, rated) if not row["label"]]

    def perplexity(label):
        picked = [(n, k) for (n, k), row in zip(scores, rated) if bool(row["label"]) == label]
        return math.exp(sum(n for n, _ in picked) / max(sum(k for _, k in picked), 1)) if picked else None

    share = None
    if liked and disliked:
        ranked = sorted([(s, 1) for s in liked] + [(s, 0) for s in disliked])
        wins, below, i = 0.0, 0, 0
        while i < len(ranked):  # ties count half
            j = i
            while j < len(ranked) and ranked[j][0] == ranked[i][0]:
                j += 1
            tied_liked = sum(label for _, label in ranked[i:j])
            wins += tied_liked * below + 0.5 * tied_liked * (j - i - tied_liked)
            below += (j - i) - tied_liked
            i = j
        share = wins / (len(liked) * len(disliked))
    return {"liked_share": share, "liked_perplexity": perplexity(True), "disliked_perplexity": perplexity(False),
            "rows": len(rated)}


def describe_figures(figures):
    if figures is None:
        return "no rated validation rows"
    share = "n/a (needs both 👍 and 👎)" if figures["liked_share"] is None else f"{figures['liked_share']:.3f}"
    ppl = lambda value: "n/a" if value is None else f"{value:.2f}"  # noqa: E731
    return (f"liked share {share}, perplexity of 👍 replies {ppl(figures['liked_perplexity'])}, of 👎 replies "
            f"{ppl(figures['disliked_perplexity'])} ({figures['rows']} rated rows)")


def feedback_source(folder):
    """The folder to start from: a finished model folder of the kit (the one the bot served)."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: model folder not found (--feedback starts from the folder the bot served)")
    for name in ("config.json", "chat_config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{folder}: no {name}; --feedback starts from a finished model folder of the kit")
    with open(os.path.join(folder, "chat_config.json"), encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as exc:
            raise UserError(f"{folder}/chat_config.json: not JSON ({first_line(exc)})")
    return config


def copy_tokenizer_files(src, dest):
    """The source's tokenizer files as they are (not re-saved: a round trip through save_pretrained may
    rewrite them), so the new folder tokenizes exactly as the served one did."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.startswith(".") and not MODEL_FILE_RE.match(name) \
                and name not in FEEDBACK_KEEP:
            shutil.copy2(path, os.path.join(dest, name))


def feedback_config(args, device, lr, loss, max_length, desirable_weight=1.0):
    """KTOConfig / DPOConfig with the settings that move a small model without wrecking it (measured:
    lr 2e-5, beta 0.1, 2 epochs), TRL's GPU-minded defaults (bf16 everywhere, gradient checkpointing,
    lr 1e-6) replaced by the kit's, and no checkpoints: the run is short and writes its folder at the end."""
    from trl import DPOConfig, KTOConfig

    precision = mixed_precision(device)
    common = dict(
        output_dir=os.path.join(args.output, FINAL_TMP + "-run"), use_cpu=device != "cuda",
        bf16=precision == "bf16", fp16=precision == "fp16", deepspeed=args.deepspeed,
        **({"optim": "adamw_bnb_8bit"} if args.optim_8bit else {}),
        # TRL's default is on; transformers 5 names it activation_checkpointing and warns on the old name
        **{"gradient_checkpointing": None, **(checkpointing_arguments(True) if args.gradient_checkpointing
                                              else {"activation_checkpointing": False})},
        num_train_epochs=args.feedback_epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, save_strategy="no", eval_strategy="no", logging_steps=args.logging_steps,
        report_to="none", seed=args.seed, dataloader_num_workers=0, max_length=max_length, beta=args.feedback_beta,
        disable_dropout=True,
    )
    if loss == "kto":
        # sequential: KTO estimates its KL term from each batch's neighbours, so the rows go in the (shuffled)
        # order they are given
        return KTOConfig(**common, desirable_weight=desirable_weight, train_sampling_strategy="sequential")
    return DPOConfig(**common)


def check_feedback_flags(args):
    if args.feedback_loss not in FEEDBACK_LOSSES:
        raise UserError(f"--feedback-loss {args.feedback_loss!r}: must be one of {', '.join(FEEDBACK_LOSSES)}")
    if args.from_scratch:
        raise UserError("--feedback trains a model folder further; --from-scratch has nothing to start from")
    if args.resume:
        raise UserError("--feedback runs are short and keep no checkpoints; run it again instead of --resume")
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise UserError(f"--output {args.output}: the folder the bot may be serving; write the new model to "
                        f"another folder and compare the two (evaluate.py) before switching")
    if args.feedback_loss == "kto" and args.batch_size < 2:
        raise UserError("--batch-size 1: KTO estimates its KL term from the other rows of a batch; use 2 or more")


def run_feedback(args):
    """Train args.model on the ratings in args.feedback and write args.output; returns the TRL trainer."""
    import random

    from transformers import AutoConfig, AutoTokenizer, set_seed
    from trl import DPOTrainer, KTOTrainer

    if args.output == OUTPUT_DIR:  # the fine-tuning default: beside the source instead, never over it
        args.output = os.path.normpath(args.model) + "_feedback"
    check_training_flags(args)
    check_feedback_flags(args)
    loss = args.feedback_loss
    source_config = feedback_source(args.model)
    device = pick_device(args.device)
    check_output_dir(args.output)
    train_rows = read_feedback(args.feedback)
    val_path = args.feedback_val or feedback_val_path(args.feedback)
    val_rows = read_feedback(val_path, args.val_rows) if val_path and os.path.isfile(val_path) else []
    try:  # the tokenizers and the config first: the data's faults are told before the weights load
        tokenizer, trl_tok = AutoTokenizer.from_pretrained(args.model), trl_tokenizer(args.model)
        positions = context_size(AutoConfig.from_pretrained(args.model))
    except (OSError, ValueError) as exc:
        raise UserError(f"{args.model}: cannot load its tokenizer or config ({first_line(exc)})")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        raise UserError(f"{args.model}: the tokenizer's pad is missing or is EOS; --feedback trains folders the "
                        f"kit's trainers wrote")
    max_length = min(int(source_config.get("max_length") or positions), positions)
    examples, dropped = feedback_examples(tokenizer, trl_tok, train_rows, loss, max_length)
    random.Random(args.seed).shuffle(examples)  # the export is shuffled; a hand-made file may not be
    if args.rows:
        examples = examples[:args.rows]
    liked = sum(1 for e in examples if e.get("label"))
    disliked = len(examples) - liked
    if loss == "kto" and not (liked and disliked):
        raise UserError(f"{args.feedback}: {liked} 👍 and {disliked} 👎 usable rows; KTO needs both")
    if loss == "dpo" and not examples:
        raise UserError(f"{args.feedback}: no usable pairs (chosen, rejected): DPO learns from replies 🔄 replaced; "
                        f"use --feedback-loss kto")
    desirable_weight = disliked / liked if loss == "kto" else 1.0
    set_seed(args.seed)
    model, tokenizer = load_pretrained(args.model)
    ref_model = None if args.lora else load_pretrained(args.model)[0]
    lr = args.lr or (FEEDBACK_LR_LORA if args.lora else FEEDBACK_LR)
    precision = mixed_precision(device)
    if args.lora:
        model = apply_lora(model, args, [], args.model)
        if precision and not args.deepspeed:
            cast_frozen_weights(model, precision)
    launch_alone(args)
    fconfig = feedback_config(args, device, lr, loss, max_length, desirable_weight)
    is_main = fconfig.process_index == 0
    left_out = ", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none"
    if is_main:
        what = f"{liked} 👍, {disliked} 👎, desirable_weight {desirable_weight:.3f}" if loss == "kto" else \
            f"{len(examples)} pairs"
        print(f"feedback: {loss.upper()} from {args.model} (the reference model, loaded as it is): {what}; "
              f"rows left out: {left_out}; lr {lr}, beta {args.feedback_beta}, {args.feedback_epochs:g} epochs",
              flush=True)
        if args.lora:
            print(describe_lora(model), flush=True)
        print(describe_memory_settings(args, precision), flush=True)
    before = None
    if is_main and val_rows:  # the model where it trains (the Trainer would move it there anyway)
        before = feedback_figures(model if args.deepspeed else model.to(device), tokenizer, val_rows, device)
    if is_main:
        print(f"before, on {val_path}: {describe_figures(before)}", flush=True)
        clear_previous_run(args.output)
        os.makedirs(args.output, exist_ok=True)
        # the folder is the kit's from now on: a crashed run can be run again into it
        write_json_atomic(os.path.join(args.output, "chat_config.json"), source_config)
    from datasets import Dataset

    trainer_class = KTOTrainer if loss == "kto" else DPOTrainer
    trainer = trainer_class(model=model, ref_model=ref_model, args=fconfig, train_dataset=Dataset.from_list(examples),
                            processing_class=trl_tok)
    check_trl_ids(trainer.train_dataset, examples, tokenizer, loss)
    trainer.train()

    final_tmp = os.path.join(args.output, FINAL_TMP)
    if trainer.is_world_process_zero():
        for stale in (final_tmp, fconfig.output_dir, final_tmp + "-adapter"):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        if args.lora:
            adapter_tmp = final_tmp + "-adapter"
            trained.save_pretrained(adapter_tmp, save_embedding_layers=False)
            trained = merge_lora(args, tokenizer, adapter_tmp)
            shutil.rmtree(adapter_tmp)
        trained.save_pretrained(final_tmp)
        upcast_saved_weights(final_tmp)
        copy_tokenizer_files(args.model, final_tmp)
        after = feedback_figures(trained.to(device), tokenizer, val_rows, device) if val_rows else None
        record = {"loss": loss, "from": os.path.abspath(args.model), "file": os.path.abspath(args.feedback),
                  "rows": len(examples), "liked": liked if loss == "kto" else None,
                  "disliked": disliked if loss == "kto" else None, "learning_rate": lr, "beta": args.feedback_beta,
                  "epochs": args.feedback_epochs, "desirable_weight": desirable_weight, "lora": bool(args.lora),
                  "validation_before": before, "validation_after": after}
        earlier = source_config.get("feedback")
        config = dict(source_config, feedback=record if not earlier else
                      dict(record, earlier=earlier if isinstance(earlier, list) else [earlier]))
        write_json_atomic(os.path.join(final_tmp, "chat_config.json"), config)
        publish_folder(final_tmp, args.output)
        trainer.state.save_to_json(os.path.join(args.output, "trainer_state.json"))
        if os.path.isdir(fconfig.output_dir):
            shutil.rmtree(fconfig.output_dir)
        print(f"after: {describe_figures(after)}", flush=True)
        print(f"done: step {trainer.state.global_step}; model in {args.output}/ (tokenizer files and "
              f"chat_config.json as in {args.model}, with a \"feedback\" record); compare the two with "
              f"evaluate.py --model {args.model} {args.output} before switching the bot", flush=True)
    leave_process_group(trainer)
    return trainer
# ==== end of block blocks/feedback.py ====


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
