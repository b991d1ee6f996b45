"""Fine-tune a GPT-2-style causal language model on question-answer pairs.

Reads data/pairs_{train,val}.csv (dialogue_id,question,answer) and writes
rugpt3_50k/: a save_pretrained folder (model, tokenizer, generation config),
chat_config.json, training_curves.png, trainer_state.json and the
checkpoint-N/ folders of the run.

Each pair becomes one example (prompt format of ../shared/DESIGN.md):

    Вопрос: <question>
    Ответ: <answer><EOS>

The loss covers only the answer and the tokenizer's own EOS, so the model
learns where to stop; pad is a token of its own (never EOS); batches are padded
to their longest example and grouped by length instead of padded to a fixed size.

Run it:
    # CPU, a tiny model and tokenizer built from the data (no internet needed)
    python train_transformer.py --from-scratch --device cpu --max-steps 300
    # GPU, ruGPT-3 small from the model hub (bf16/fp16 where the GPU has it)
    python train_transformer.py --device cuda --epochs 3 --batch-size 16
    # several GPUs: the same flags under torchrun or accelerate
    torchrun --nproc_per_node 4 train_transformer.py --epochs 3
    accelerate launch train_transformer.py --epochs 3
    # continue an interrupted run from its newest complete checkpoint:
    # the first run's flags plus --resume
    python train_transformer.py --from-scratch --device cpu --max-steps 600 --resume
"""
import argparse
import json
import math
import os
import re
import shutil
import sys

# ----------------------------------------------------------------------------
# defaults
DATA_DIR = "data"
OUTPUT_DIR = "rugpt3_50k"
MODEL_NAME = "ai-forever/rugpt3small_based_on_gpt2"
MAX_LENGTH = 256            # tokens per example: prompt + answer + EOS
EPOCHS = 3.0
MAX_STEPS = -1              # > 0 overrides --epochs
BATCH_SIZE = 16
GRAD_ACCUM = 1
LR_PRETRAINED = 5e-5
LR_FROM_SCRATCH = 1e-3      # a small model trained from random weights wants a larger step
WARMUP = 0.05               # share of the optimizer steps
WEIGHT_DECAY = 0.01
EVAL_STEPS = 200
LOGGING_STEPS = 20
PATIENCE = 3                # evaluations without improvement before stopping
SAVE_TOTAL_LIMIT = 2
VAL_ROWS = 2000             # validation rows used (evaluating all of a big split is slow)
SEED = 42
# --from-scratch model and tokenizer
N_LAYER, N_HEAD, N_EMBD = 4, 4, 256
VOCAB_SIZE = 8000
N_POSITIONS = 256
# chat_config.json
MAX_NEW_TOKENS = 64
MAX_TURNS = 1               # this model learns single question -> answer exchanges
PERSONA = {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."}
GENERATION = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
              "top_k": 50, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3}
# ----------------------------------------------------------------------------
# prompt contract (the same values in every transformer script; a test checks)
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
LABEL_RE = re.compile(r"(?i)\b(вопрос|ответ)\s*:")
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
IGNORE_INDEX = -100         # label value the loss skips

PROG = "train_transformer.py"
FINAL_TMP = ".final-tmp"
MODEL_FILE_RE = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
                           r"|model\.safetensors\.index\.json|pytorch_model.*\.bin|training_args\.bin)$")
RUN_FILES = {"chat_config.json", "training_curves.png", "trainer_state.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja"}


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


# --- mirrored in train_transformer.py and train_medium_context.py (tests/test_train_medium_context.py checks they agree)
# ----------------------------------------------------------------------------
# prompts and examples

def neutralise_labels(text):
    """Keep a turn that contains "Ответ:" from passing for a label of the prompt."""
    return LABEL_RE.sub(lambda m: m.group(1) + " -", text)


def prepare_turn(text):
    # A newline separates turns in the prompt, so a turn must be one line
    # (the chat scripts prepare turns the same way).
    return " ".join(neutralise_labels(text).split())


def build_prompt(turns, persona=None):
    """The prompt for context turns (oldest first), ending in the answer label.

    Labels are counted back from the answer, so the last turn is always a question."""
    lines = []
    if persona:
        lines += [QUESTION_LABEL + prepare_turn(persona["question"]),
                  ANSWER_LABEL + prepare_turn(persona["answer"])]
    n = len(turns)
    for i, turn in enumerate(turns):
        label = QUESTION_LABEL if (n - 1 - i) % 2 == 0 else ANSWER_LABEL
        lines.append(label + prepare_turn(turn))
    return TURN_SEPARATOR.join(lines) + TURN_SEPARATOR + ANSWER_LABEL


def encode_text(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def fit_question(tokenizer, question, budget, persona=None):
    """The longest end of `question` whose prompt fits in `budget` tokens (None if not even an empty one fits).

    The end is kept because the words nearest the answer matter most to it."""
    if len(encode_text(tokenizer, build_prompt([""], persona))) > budget:
        return None
    lo, hi = 0, len(question)           # invariant: question[hi:] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode_text(tokenizer, build_prompt([question[mid:]], persona))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return question[hi:].lstrip()


def encode_example(tokenizer, turns, answer, max_length, persona=None):
    """input_ids/attention_mask/labels for one example, or None when the answer alone is too long.

    Prompt and answer are tokenised apart, as at chat time the prompt ends with
    the label and the model continues from there. Overlong examples lose their
    oldest turns first, then the start of the question; the answer is never cut.
    The persona, when the model folder has one, leads every prompt as it will in chat."""
    answer_ids = encode_text(tokenizer, prepare_turn(answer)) + [tokenizer.eos_token_id]
    budget = max_length - len(answer_ids)
    turns = list(turns)
    prompt_ids = encode_text(tokenizer, build_prompt(turns, persona))
    while len(prompt_ids) > budget:
        if len(turns) > 1:
            turns = turns[1:]
        else:
            question = fit_question(tokenizer, turns[-1], budget, persona)
            if question is None:
                return None
            turns = [question]
        prompt_ids = encode_text(tokenizer, build_prompt(turns, persona))
    input_ids = prompt_ids + answer_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_examples(tokenizer, rows, max_length, desc, persona=None):
    """Encode (turns, answer) rows; returns the examples and how many were skipped."""
    from tqdm.auto import tqdm

    examples, skipped = [], 0
    for turns, answer in tqdm(rows, desc=desc, unit="ex", mininterval=2, disable=len(rows) < 5000):
        example = encode_example(tokenizer, turns, answer, max_length, persona)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


# ----------------------------------------------------------------------------
# data

# --- end of the mirrored part


def read_pairs(path, limit=None):
    """[(turns, answer)] from a pairs_*.csv file; turns is [question]."""
    import pandas as pd

    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found (create_dataset.py writes it)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", nrows=limit)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 CSV file")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise UserError(f"{path}: not a readable CSV file ({first_line(exc)})")
    missing = {"question", "answer"} - set(frame.columns)
    if missing:
        raise UserError(f"{path}: no column {', '.join(sorted(missing))} "
                        f"(expected dialogue_id,question,answer; got {','.join(map(str, frame.columns))})")
    rows = [([q], a) for q, a in zip(frame["question"], frame["answer"]) if q.strip() and a.strip()]
    if not rows:
        raise UserError(f"{path}: no question-answer pairs in the file")
    return rows


def load_splits(data_dir, rows, val_rows):
    train = read_pairs(os.path.join(data_dir, "pairs_train.csv"), limit=rows)
    val = read_pairs(os.path.join(data_dir, "pairs_val.csv"), limit=val_rows)
    return train, val


# ----------------------------------------------------------------------------
# model and tokenizer

# --- mirrored in train_transformer.py and train_medium_context.py (tests/test_train_medium_context.py checks they agree)
def first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def looks_like_hub_name(name):
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


def load_pretrained(name):
    """Model and tokenizer from a local folder or the model hub, as UserError when neither works."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    local = os.path.isdir(name)
    if not local and not looks_like_hub_name(name):
        raise UserError(f"{name}: model folder not found")
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        # a kit folder whose run has not finished: its newest complete checkpoint
        checkpoint = complete_checkpoint(name)
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
        model = AutoModelForCausalLM.from_pretrained(name, config=config)
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


def fix_special_tokens(model, tokenizer, source):
    """EOS from the tokenizer itself and a pad token of its own, written into the model's configs.

    With pad == EOS the collators mask EOS out of the labels and the model never
    learns to stop, which is why a separate <pad> is added where it is missing."""
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token is not None else None
    if eos_id is None or tokenizer.convert_ids_to_tokens(eos_id) != tokenizer.eos_token:
        raise UserError(f"{source}: the tokenizer has no eos_token in its vocabulary, so replies could never "
                        f"end; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": SPECIAL_TOKENS["pad_token"]})
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise UserError(f"{source}: the tokenizer's {SPECIAL_TOKENS['pad_token']} is its eos_token; "
                            f"pad must differ from EOS")
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "right"      # labels line up with input_ids; generation sets its own side
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer


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


def build_from_scratch(train_rows, args):
    """A GPT-2 model from a config and a tokenizer trained on the training texts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.n_embd % args.n_head:
        raise UserError(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    texts = (build_prompt(turns) + answer for turns, answer in train_rows)
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


def chat_config(model, max_turns, persona):
    n_positions = context_size(model.config)
    max_new = min(MAX_NEW_TOKENS, n_positions // 2)
    return {"format_version": 1, "question_label": QUESTION_LABEL, "answer_label": ANSWER_LABEL,
            "turn_separator": TURN_SEPARATOR, "persona": persona, "context_tokens": n_positions - max_new,
            "max_turns": max_turns, "generation": dict(GENERATION, max_new_tokens=max_new)}


# ----------------------------------------------------------------------------
# output folder

def complete_checkpoint(folder):
    """Newest checkpoint-N/ whose save finished (trainer_state.json is written last), else None."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(folder, name)
        has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
        if match and has("trainer_state.json") and has("config.json") and \
                (has("model.safetensors") or has("model.safetensors.index.json")):
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


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
        if re.fullmatch(r"checkpoint-\d+", name) or name == FINAL_TMP:
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax_loss.plot(*series("loss"), label="training loss")
    ax_loss.plot(*series("eval_loss"), "o-", label="validation loss (answers)")
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
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# training

def pick_device(device):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def training_arguments(args, device, lr):
    import torch
    from transformers import TrainingArguments

    cuda = device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=args.output,
        use_cpu=not cuda,
        bf16=bf16,
        fp16=cuda and not bf16,
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
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,           # keep eval from storing vocabulary-sized logits
        remove_unused_columns=False,
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,    # every GPT-2 weight takes part in each step
    )


def make_collator(tokenizer, device):
    """Pads each batch to its longest example: input_ids with pad, labels with -100.

    The Seq2Seq collator is used because it pads precomputed labels as they are;
    the language-modelling one would rebuild them from input_ids."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8 if device == "cuda" else None)


def make_callbacks(args):
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=args.patience)]


def prepare_model(args, train_rows):
    """(model, tokenizer, where they came from) for a fresh run or a resumed one."""
    from transformers import set_seed

    set_seed(args.seed)
    if args.resume_from:
        # the checkpoint's own tokenizer: a retrained BPE might number tokens differently
        source = args.resume_from
        model, tokenizer = load_pretrained(source)
    elif args.from_scratch:
        source = "a new model (--from-scratch)"
        model, tokenizer = build_from_scratch(train_rows, args)
    else:
        source = args.model
        model, tokenizer = load_pretrained(source)
    return (*fix_special_tokens(model, tokenizer, source), source)


def run(args, train_rows, val_rows, max_turns, persona):
    """Train and write the output folder; returns the Trainer (tests look at its state)."""
    from transformers import Trainer

    device = pick_device(args.device)
    check_output_dir(args.output)
    args.resume_from = None
    if args.resume:
        args.resume_from = complete_checkpoint(args.output)
        if args.resume_from is None:
            raise UserError(f"{args.output}: --resume found no complete checkpoint-N/ folder to continue from")
    model, tokenizer, source = prepare_model(args, train_rows)
    max_length = min(args.max_length, context_size(model.config))
    train_set, train_skipped = encode_examples(tokenizer, train_rows, max_length, "encoding train", persona)
    val_set, val_skipped = encode_examples(tokenizer, val_rows, max_length, "encoding val", persona)
    if not train_set or not val_set:
        raise UserError(f"no {'training' if not train_set else 'validation'} example fits in "
                        f"--max-length {max_length} tokens; raise --max-length")
    lr = args.lr or (LR_FROM_SCRATCH if args.from_scratch else LR_PRETRAINED)

    targs = training_arguments(args, device, lr)
    is_main = targs.process_index == 0
    if is_main:
        print(f"model: {source}, {model.num_parameters() / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}; "
              f"pad {tokenizer.pad_token!r} id {tokenizer.pad_token_id}, eos {tokenizer.eos_token!r} id "
              f"{tokenizer.eos_token_id}", flush=True)
        print(f"examples: {len(train_set)} train, {len(val_set)} val (max {max_length} tokens; skipped because "
              f"the answer alone is longer: {train_skipped} train, {val_skipped} val)", flush=True)
        if not args.resume_from:
            clear_previous_run(args.output)
        os.makedirs(args.output, exist_ok=True)
        save_tokenizer_and_chat_config(tokenizer, chat_config(model, max_turns, persona), args.output)

    trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=make_collator(tokenizer, device), processing_class=tokenizer,
                      callbacks=make_callbacks(args))
    trainer.train(resume_from_checkpoint=args.resume_from)

    # every process takes part (sharded models gather here); only the main one writes
    final_tmp = os.path.join(args.output, FINAL_TMP)
    if trainer.is_world_process_zero() and os.path.isdir(final_tmp):
        shutil.rmtree(final_tmp)
    trainer.save_model(final_tmp)
    if trainer.is_world_process_zero():
        publish_folder(final_tmp, args.output)
        trainer.state.save_to_json(os.path.join(args.output, "trainer_state.json"))
        plot_training_curves(trainer.state.log_history, os.path.join(args.output, "training_curves.png"))
        # the trainer validates at the last step too, so the best metric covers the whole run
        loss = trainer.state.best_metric
        summary = "no validation ran" if loss is None else \
            f"best validation loss on answers {loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f})"
        print(f"done: step {trainer.state.global_step}, {summary}, from "
              f"{trainer.state.best_model_checkpoint}; model in {args.output}/", flush=True)
    trainer.accelerator.wait_for_everyone()
    return trainer


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
    parser.add_argument("--model", default=model, help="hub name or local folder to fine-tune (default %(default)s)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train a new GPT-2 model and BPE tokenizer on the data instead of --model")
    parser.add_argument("--n-layer", type=positive_int, default=N_LAYER)
    parser.add_argument("--n-head", type=positive_int, default=N_HEAD)
    parser.add_argument("--n-embd", type=positive_int, default=N_EMBD)
    parser.add_argument("--vocab-size", type=positive_int, default=VOCAB_SIZE)
    parser.add_argument("--n-positions", type=positive_int, default=N_POSITIONS)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help="optimizer steps; overrides --epochs")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="per device")
    parser.add_argument("--grad-accum", type=positive_int, default=GRAD_ACCUM)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default {LR_PRETRAINED} fine-tuning, {LR_FROM_SCRATCH} from scratch)")
    parser.add_argument("--max-length", type=positive_int, default=max_length,
                        help="tokens per example, prompt + answer + EOS (default %(default)s)")
    parser.add_argument("--rows", type=positive_int, default=None, help="use the first N training rows")
    parser.add_argument("--val-rows", type=positive_int, default=VAL_ROWS)
    parser.add_argument("--eval-steps", type=positive_int, default=EVAL_STEPS,
                        help="validate and save a checkpoint every N optimizer steps")
    parser.add_argument("--logging-steps", type=positive_int, default=LOGGING_STEPS)
    parser.add_argument("--patience", type=positive_int, default=PATIENCE,
                        help="stop after N validations without improvement")
    parser.add_argument("--save-total-limit", type=positive_int, default=SAVE_TOTAL_LIMIT)
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--no-persona", action="store_true", help="write persona: null into chat_config.json")
    parser.add_argument("--seed", type=int, default=SEED)


# --- end of the mirrored part


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description="Fine-tune a causal LM on question-answer pairs.")
    add_common_arguments(parser, OUTPUT_DIR, MODEL_NAME)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        train_rows, val_rows = load_splits(args.data_dir, args.rows, args.val_rows)
        run(args, train_rows, val_rows, MAX_TURNS, None if args.no_persona else PERSONA)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
