"""LSTM encoder-decoder chatbot in Keras 3 (TensorFlow): the second of the kit's two baselines.

The same model as pytorch_chatbot.py, built with the Keras functional API:
an LSTM encoder returns its state (h, c), which starts an LSTM decoder; both
share one embedding. Teacher forcing is shifted by one step (the decoder reads
`<SOS> a1 ... an` and predicts `a1 ... an <EOS>`), and padding is masked out
of the loss through the embedding's mask. After training, the model is split
into an encoder model and a one-step decoder model for inference.

Data: `data/pairs_{train,val,test}.csv` (dialogue_id,question,answer) from
create_dataset.py. The model folder `lstm_keras/` holds config.json,
vocab.json and model.keras; chat and eval read everything from it.

Run it (CPU):
    python tensorflow_chatbot.py train --data-dir data --output lstm_keras
    python tensorflow_chatbot.py chat --model lstm_keras          # «выход» ends it
    python tensorflow_chatbot.py chat --model lstm_keras --script questions.txt
    python tensorflow_chatbot.py eval --model lstm_keras          # reports/lstm_keras.{json,md}
On a GPU (it must be visible to TensorFlow; --device cpu hides all GPUs):
    python tensorflow_chatbot.py train --device gpu --batch-size 256 --hidden 512
A single small LSTM gains nothing from several GPUs, so there is no
distributed launch; run one process per experiment instead.

For evaluate.py, eval also answers a JSONL file of questions:
    python tensorflow_chatbot.py eval --model lstm_keras --questions q.jsonl --predictions p.jsonl

In a notebook (Jupyter, Colab): paste this whole file into one cell, set MODE
and the rest in the defaults block below, and run the cell (chat mode asks
for your lines in the cell; «выход» ends it). `%run tensorflow_chatbot.py train
--epochs 3` and `!python tensorflow_chatbot.py train --epochs 3` take flags as above.

Map: the defaults block, then this script's own Keras code (the data, the model, training,
the model folder, inference, the train mode) and `main`; after them the generated blocks that
both LSTM scripts share: blocks/lstm.py (the tokeniser, reading the pairs and the folder's
config, the chat and eval modes, the command line, the report) and blocks/metrics.py (F1, distinct-n).
"""
import argparse
import contextlib
import json
import math
import os  # also TensorFlow's environment, set before it is imported (import_tensorflow)
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm  # a notebook gets its own kind of bar

SCRIPT = "tensorflow_chatbot.py"
KIT_MODEL = "lstm_keras"
FORMAT_VERSION = 1

# ---- defaults: every flag's default; in a notebook cell, set them here -----
MODE = "train"           # what a pasted notebook cell runs: "train", "chat" or "eval" (a command line names it)
DATA_DIR = "data"        # pairs_{train,val,test}.csv from create_dataset.py
MODEL_DIR = "lstm_keras"  # train writes it, chat and eval read it
REPORT_DIR = "reports"
DEVICE = "auto"          # "auto", "cpu" or "gpu" ("cuda" means "gpu")
THREADS = 0              # CPU threads for TensorFlow (0: its default)
QUIET = False            # True: no progress bars or per-epoch lines
ROWS = None              # read at most this many rows of each split (None: all)
EPOCHS = 10
BATCH_SIZE = 64          # as in the research
EMB_DIM = 128
HIDDEN = 256
VOCAB_SIZE = 10000       # including the four special tokens
MAX_LEN = 20             # tokens per question and per answer (incl. <EOS>); covers ~99% of turns
LEARNING_RATE = 1e-3
CLIP_NORM = 1.0          # gradient norm cap (Adam's clipnorm)
PATIENCE = 3             # epochs without a better validation loss before stopping (Keras EarlyStopping)
MAX_MINUTES = None       # stop training after this wall time, keeping the best weights (None: no limit)
CHAT_DECODING = "sample"  # "sample" or "greedy"
EVAL_DECODING = "greedy"
TEMPERATURE = 0.7        # as in the research
TOP_K = 50               # sample among the k likeliest words (0: all)
REPLY_MAX_LEN = None     # reply length cap in tokens (None: the model's MAX_LEN)
CHAT_SCRIPT = None       # chat: answer each line of this UTF-8 file instead of asking (None: ask)
QUESTIONS = None         # eval: a JSONL of questions to answer instead of the test split (evaluate.py's way)
PREDICTIONS = None       # eval: the JSONL the replies to QUESTIONS go to
SEED = 1337              # random, numpy and Keras, and the sampling generator of chat and eval

class UserError(Exception):
    """A mistake of the user's (a file, a folder, a flag): one line, exit code 1."""


# ---- data ------------------------------------------------------------------
def pairs_to_arrays(pairs, stoi, max_len):
    """Padded id matrices ([question, decoder input], target); id 0 is padding and masked."""
    from keras.utils import pad_sequences

    questions, dec_ins, targets = [], [], []
    for question, answer in pairs:
        dec_in, target = encode_answer(answer, stoi, max_len)
        questions.append(encode_question(question, stoi, max_len))
        dec_ins.append(dec_in)
        targets.append(target)
    pad = lambda seqs: pad_sequences(seqs, maxlen=max_len, padding="post", truncating="post", value=PAD_ID)
    return [pad(questions), pad(dec_ins)], pad(targets)


# ---- TensorFlow, imported late so that --help and errors are quick ---------
def import_tensorflow(device):
    """Import TF with the device choice applied: `cpu` hides every GPU before TF sees one."""
    # Not in a notebook kernel: the variable would hide the GPU from every later cell, torch's too.
    if device == "cpu" and "tensorflow" not in sys.modules and "ipykernel" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if device == "cpu":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already started in this process; nothing to hide any more
            pass
    elif device == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise UserError("--device gpu: no GPU is visible to TensorFlow")
    return tf


def set_threads(tf, threads):
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already set once in this process
            pass


def device_name(tf):
    return "gpu" if tf.config.get_visible_devices("GPU") else "cpu"


# ---- model -----------------------------------------------------------------
def build_model(vocab_size, emb_dim, hidden):
    import keras
    from keras import layers

    question = keras.Input(shape=(None,), dtype="int32", name="question")
    answer_in = keras.Input(shape=(None,), dtype="int32", name="answer_in")
    # mask_zero: the LSTMs skip padding and the loss ignores it (Keras carries the mask to the loss).
    embedding = layers.Embedding(vocab_size, emb_dim, mask_zero=True, name="embedding")
    _, state_h, state_c = layers.LSTM(hidden, return_state=True, name="encoder_lstm")(embedding(question))
    sequence, _, _ = layers.LSTM(hidden, return_sequences=True, return_state=True, name="decoder_lstm")(
        embedding(answer_in), initial_state=[state_h, state_c])
    logits = layers.Dense(vocab_size, name="logits")(sequence)
    return keras.Model([question, answer_in], logits, name=KIT_MODEL)


def compile_model(model, lr):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr, clipnorm=CLIP_NORM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def split_for_inference(model):
    """The trained model as an encoder model and a one-step decoder model sharing its layers."""
    import keras

    embedding = model.get_layer("embedding")
    decoder_lstm = model.get_layer("decoder_lstm")
    hidden = decoder_lstm.units
    question = keras.Input(shape=(None,), dtype="int32", name="question")
    _, state_h, state_c = model.get_layer("encoder_lstm")(embedding(question))
    encoder = keras.Model(question, [state_h, state_c], name="encoder")
    token = keras.Input(shape=(1,), dtype="int32", name="token")
    h_in = keras.Input(shape=(hidden,), name="h")
    c_in = keras.Input(shape=(hidden,), name="c")
    sequence, h_out, c_out = decoder_lstm(embedding(token), initial_state=[h_in, c_in])
    decoder = keras.Model([token, h_in, c_in], [model.get_layer("logits")(sequence), h_out, c_out], name="decoder")
    return encoder, decoder


# ---- training --------------------------------------------------------------
def seed_everything(seed):
    import keras

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def make_deadline_callback(max_minutes):
    import keras

    class StopAtDeadline(keras.callbacks.Callback):
        """Ends training after a wall time; the epoch in progress is still validated."""

        def __init__(self):
            super().__init__()
            self.deadline = time.monotonic() + max_minutes * 60
            self.hit = False

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() > self.deadline:
                self.hit = True
                self.model.stop_training = True

    return StopAtDeadline()


def train_model(args, train_pairs, val_pairs):
    """Train with early stopping on the validation loss; returns (model, itos, summary)."""
    import keras

    seed_everything(args.seed)
    itos = build_vocab([t for pair in train_pairs for t in pair], args.vocab_size)
    stoi = {tok: i for i, tok in enumerate(itos)}
    x_train, y_train = pairs_to_arrays(train_pairs, stoi, args.max_len)
    x_val, y_val = pairs_to_arrays(val_pairs, stoi, args.max_len)
    model = build_model(len(itos), args.emb_dim, args.hidden)
    compile_model(model, args.lr)
    print(f"train: {len(train_pairs)} pairs, val: {len(val_pairs)} pairs, vocabulary {len(itos)}, "
          f"{model.count_params():,} parameters, keras {keras.__version__}")
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True)
    callbacks = [early]
    deadline = make_deadline_callback(args.max_minutes) if args.max_minutes else None
    if deadline:
        callbacks.append(deadline)
    # Keras's live bar on a terminal or in a notebook; one line an epoch into a log file.
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() or "ipykernel" in sys.modules else 2)
    started = time.monotonic()
    stopped = "epochs"
    history = None
    try:
        history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs,
                            batch_size=args.batch_size, shuffle=True, callbacks=callbacks, verbose=verbose)
    except KeyboardInterrupt:
        stopped = "interrupted"
        print("interrupted: keeping the best weights so far", file=sys.stderr)
        if early.best_weights is not None:
            model.set_weights(early.best_weights)
    logs = history.history if history else {"loss": [], "val_loss": []}
    if deadline and deadline.hit:
        stopped = "time limit"
    elif early.stopped_epoch > 0:
        stopped = "early stopping"
    val_losses = logs.get("val_loss", [])
    best_epoch = int(np.argmin(val_losses)) + 1 if val_losses else 0
    summary = {"epochs_run": len(val_losses), "best_epoch": best_epoch,
               "best_val_loss": float(min(val_losses)) if val_losses else math.inf,
               "stopped_by": stopped, "seconds": round(time.monotonic() - started, 1),
               "history": [{"epoch": i + 1, "train_loss": float(t), "val_loss": float(v)}
                           for i, (t, v) in enumerate(zip(logs.get("loss", []), val_losses))]}
    return model, itos, summary


# ---- model folder ----------------------------------------------------------
def save_model_folder(folder, model, itos, config):
    tmp = new_model_folder(folder, itos, config)
    model.save(tmp / "model.keras")
    swap_in_folder(tmp, folder)


def load_model_folder(folder, tf):
    import keras

    folder = Path(folder)
    config = read_model_config(folder)
    for name in ("vocab.json", "model.keras"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: {name} is missing")
    try:
        itos = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        model = keras.saving.load_model(folder / "model.keras", compile=False)
    except Exception as err:  # Keras raises many kinds for a damaged or foreign file
        raise UserError(f"{folder}: model.keras does not load ({str(err).splitlines()[0][:200]})") from None
    if itos[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise UserError(f"{folder}/vocab.json: does not start with {SPECIAL_TOKENS}")
    return Bot(model, itos, config, tf)


# ---- inference -------------------------------------------------------------
class Bot:
    """A loaded model with its vocabulary: question text in, reply tokens out."""

    def __init__(self, model, itos, config, tf):
        self.model, self.itos, self.config, self.tf = model, itos, config, tf
        self.stoi = {tok: i for i, tok in enumerate(itos)}
        self.max_len = config["max_len"]
        self.device = device_name(tf)
        self.encoder, self.decoder = split_for_inference(model)
        # Compiled once per shape: an eager Keras call per word would cost more than the LSTM itself.
        self.encode_fn = tf.function(lambda q: self.encoder(q, training=False), reduce_retracing=True)
        self.step_fn = tf.function(lambda t, h, c: self.decoder([t, h, c], training=False), reduce_retracing=True)
        # The bot never says a padding, a start or an "unknown word" token.
        self.banned = np.array([PAD_ID, SOS_ID, UNK_ID])

    def reply_ids(self, text, max_len=None, greedy=True, temperature=TEMPERATURE, top_k=TOP_K, generator=None):
        """(ids of the reply without <EOS>, whether it ended with <EOS>)."""
        tf = self.tf
        generator = generator or np.random.default_rng()
        src = tf.constant([encode_question(text, self.stoi, self.max_len)], dtype=tf.int32)
        h, c = self.encode_fn(src)
        token = tf.constant([[SOS_ID]], dtype=tf.int32)
        reply = []
        for _ in range(max_len or self.max_len):
            logits, h, c = self.step_fn(token, h, c)
            logits = logits.numpy()[0, -1].astype(np.float64)
            logits[self.banned] = -np.inf
            if greedy:
                next_id = int(np.argmax(logits))
            else:
                logits = logits / max(temperature, 1e-6)
                if top_k and top_k < logits.size:
                    kth = np.partition(logits, -top_k)[-top_k]
                    logits = np.where(logits < kth, -np.inf, logits)
                probs = np.exp(logits - logits.max())
                next_id = int(generator.choice(probs.size, p=probs / probs.sum()))
            if next_id == EOS_ID:
                return reply, True
            reply.append(next_id)
            token = tf.constant([[next_id]], dtype=tf.int32)
        return reply, False

    def reply(self, text, **decoding):
        ids, ended = self.reply_ids(text, **decoding)
        return detokenize([self.itos[i] for i in ids]), ended

    def reference_nll(self, text, reference):
        """Sum of -log p (nats) of the reference's tokens and <EOS> under teacher forcing, and their count.

        The whole reference is scored, not cut at max_len, so that every model
        is charged for every token of the same text.
        """
        ref_ids = [self.stoi.get(tok, UNK_ID) for tok in tokenize(reference)]
        src = np.array([encode_question(text, self.stoi, self.max_len)], dtype=np.int32)
        dec_in = np.array([[SOS_ID] + ref_ids], dtype=np.int32)
        logits = np.asarray(self.model([src, dec_in], training=False), dtype=np.float64)[0]
        top = logits.max(axis=-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        target = ref_ids + [EOS_ID]
        return float(-log_probs[np.arange(len(target)), target].sum()), len(target)


def decoding_options(args, bot):
    return {"greedy": args.decoding == "greedy", "temperature": args.temperature, "top_k": args.top_k,
            "max_len": args.max_len or bot.max_len, "generator": np.random.default_rng(args.seed)}


# ---- evaluation ------------------------------------------------------------
def timed_reply(bot, text, options):
    started = time.perf_counter()
    ids, ended = bot.reply_ids(text, **options)  # .numpy() each step already waits for the device
    return ids, ended, (time.perf_counter() - started) * 1000


def warm_up(bot, questions, options):
    """The first calls trace the tf.functions, which is no reply's cost: two untimed replies first."""
    for question in questions[:2]:
        timed_reply(bot, question, options)


def runtime_info(bot, args):
    """What the eval report says of the run: the device, the threads asked for, TensorFlow's and Keras's versions."""
    import keras

    return {"device": bot.device, "threads": args.threads or None, "tensorflow": bot.tf.__version__,
            "keras": keras.__version__}


# ---- modes -----------------------------------------------------------------
def run_train(args):
    check_output_folder(args.output)
    data_dir = Path(args.data_dir)
    train_pairs = read_pairs(data_dir / "pairs_train.csv", args.rows)
    val_pairs = read_pairs(data_dir / "pairs_val.csv", args.rows)
    tf = import_tensorflow(args.device)
    set_threads(tf, args.threads)
    model, itos, summary = train_model(args, train_pairs, val_pairs)
    config = folder_config(args, itos, train_pairs, val_pairs, device_name(tf), summary)
    save_model_folder(args.output, model, itos, config)
    print(f"best val loss {summary['best_val_loss']:.4f} at epoch {summary['best_epoch']} "
          f"({summary['stopped_by']}); model saved to {args.output}")
    return model, itos, config


def open_model(args):
    read_model_config(args.model)  # a wrong folder fails before TensorFlow is even imported
    tf = import_tensorflow(args.device)
    set_threads(tf, args.threads)
    return load_model_folder(args.model, tf)


def parse_args(argv):
    parser = mode_parser("LSTM seq2seq chatbot (Keras 3): train, chat, eval.",
                         "CPU threads for TensorFlow (0: its default)")
    args = parser.parse_args(argv)
    if args.device == "cuda":  # one word for both LSTM scripts: "cuda" means "gpu" here
        args.device = "gpu"
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        {"train": run_train, "chat": run_chat, "eval": run_eval}[args.mode](args)
    except UserError as err:
        print(f"{SCRIPT}: error: {err}", file=sys.stderr)
        return 1
    return 0


# ==================================================================================================
# Generated blocks: shared code that blocks/build.py writes into every script that needs it.
# Do not edit it here: change the block's source in blocks/, then run `make blocks`
# (`python blocks/build.py`); the suite fails while a copy differs from its source.
# ==================================================================================================


# ==== block blocks/lstm.py: generated, edit the source and run `make blocks` ====
"""The LSTM baselines' shared half, for pytorch_chatbot.py and tensorflow_chatbot.py: the tokeniser and
its special tokens, reading the pairs and the model folder's config, the chat and eval modes around a
loaded bot, the command line and the eval report. Everything framework-bound stays in each script.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses, and defines SCRIPT, KIT_MODEL,
FORMAT_VERSION, UserError, the defaults block's settings, and these framework hooks: open_model(args),
the Bot (reply_ids, reply, reference_nll, itos), decoding_options(args, bot), timed_reply(bot, text,
options), warm_up(bot, questions, options) and runtime_info(bot, args) (the eval report's device,
threads and framework versions)."""

# ---- tokenisation: one for both LSTM scripts, so that their folders and figures compare ------------
PAD, SOS, EOS, UNK = "<PAD>", "<SOS>", "<EOS>", "<UNK>"
SPECIAL_TOKENS = [PAD, SOS, EOS, UNK]
PAD_ID, SOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# A word (letters/digits, inner hyphens and apostrophes kept: «ё-моё», «кто-то»)
# or a run of one repeated punctuation mark («...», «!!!») as one token.
TOKEN_PATTERN = r"\w+(?:[-']\w+)*|([^\w\s])\1*"
TOKEN_RE = re.compile(TOKEN_PATTERN)
NO_SPACE_BEFORE = re.compile(r"(?<=(\S)) ([.,!?;:…%»)\]}])")
NO_SPACE_AFTER = re.compile(r"([«(\[{]) ")
QUIT_WORD = "выход"
# "cuda" is pytorch_chatbot.py's word, "gpu" tensorflow_chatbot.py's: both work in both scripts.
DEVICES = ("auto", "cpu", "cuda", "gpu")
DECODINGS = ("greedy", "sample")


def tokenize(text):
    return [m.group(0) for m in TOKEN_RE.finditer(str(text).lower())]


def detokenize(tokens):
    text = " ".join(tokens)
    # The space stays between two tokens of one repeated mark (", ,"), or they would read back as one («,,»).
    text = NO_SPACE_BEFORE.sub(lambda m: m.group(0) if m.group(1) == m.group(2) else m.group(2), text)
    return NO_SPACE_AFTER.sub(r"\1", text)


def build_vocab(texts, vocab_size):
    counts = Counter(tok for text in texts for tok in tokenize(text))
    # Ties broken by the word itself so that the same data gives the same ids.
    words = sorted(counts, key=lambda w: (-counts[w], w))
    words = [w for w in words if w not in SPECIAL_TOKENS]
    return SPECIAL_TOKENS + words[: max(0, vocab_size - len(SPECIAL_TOKENS))]


def encode_question(text, stoi, max_len):
    """Question ids, keeping the LAST max_len tokens: the end of a long context matters most."""
    ids = [stoi.get(tok, UNK_ID) for tok in tokenize(text)][-max_len:]
    return ids or [UNK_ID]


def encode_answer(text, stoi, max_len):
    """(decoder input, target): `<SOS> a1..an` -> `a1..an <EOS>`, at most max_len each.

    An answer too long to fit gets no <EOS>: cutting it and then teaching
    "stop here" would teach the model to stop mid-sentence.
    """
    ids = [stoi.get(tok, UNK_ID) for tok in tokenize(text)]
    target = ids + [EOS_ID] if len(ids) < max_len else ids[:max_len]
    return [SOS_ID] + target[:-1], target


# ---- data ------------------------------------------------------------------
def read_pairs(path, rows=None):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (create_dataset.py writes the pairs_*.csv splits)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=rows, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except pd.errors.ParserError as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).strip().splitlines()[0]})") from None
    missing = [col for col in ("question", "answer") if col not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"expected dialogue_id,question,answer, found {','.join(map(str, frame.columns))}")
    pairs = [(q, a) for q, a in zip(frame["question"], frame["answer"]) if tokenize(q) and tokenize(a)]
    if not pairs:
        raise UserError(f"{path}: no question-answer rows with text in them")
    return pairs


def read_questions(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("question"), str):
            raise UserError(f"{path}:{number}: needs an \"id\" and a \"question\" string")
        records.append(record)
    return records


def read_script(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


# ---- model folder ----------------------------------------------------------
def read_model_config(folder):
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found (train one with `{SCRIPT} train`)")
    if not config_path.is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{config_path}: not valid JSON") from None
    kind = config.get("kit_model") if isinstance(config, dict) else None
    if kind is None:
        hint = " (a transformers folder: use system_prompt.py)" if isinstance(config, dict) and "model_type" in config else ""
        raise UserError(f"{folder}: not an {KIT_MODEL} folder{hint}")
    if kind != KIT_MODEL:
        raise UserError(f"{folder}: an {kind} folder, made by another script; {SCRIPT} reads {KIT_MODEL} folders")
    if config.get("format_version") != FORMAT_VERSION or config.get("token_pattern") != TOKEN_PATTERN:
        raise UserError(f"{folder}: format_version {config.get('format_version')!r} or tokeniser differs "
                        f"from this script's (format_version {FORMAT_VERSION}); retrain it with this version")
    return config


def check_output_folder(folder):
    """Refuse early (before training) to replace anything that is not one of our model folders."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is a file, not a model folder")
    if folder.is_dir() and any(folder.iterdir()):
        try:
            read_model_config(folder)
        except UserError:
            raise UserError(f"{folder}: exists and is not an {KIT_MODEL} model folder; "
                            f"refusing to overwrite it") from None


def folder_config(args, itos, train_pairs, val_pairs, device, summary):
    """config.json of a trained model folder: its kind, sizes, tokeniser, decoding and how it was trained."""
    return {"kit_model": KIT_MODEL, "format_version": FORMAT_VERSION,
            "vocab_size": len(itos), "emb_dim": args.emb_dim, "hidden": args.hidden, "max_len": args.max_len,
            "token_pattern": TOKEN_PATTERN, "lowercase": True, "special_tokens": SPECIAL_TOKENS,
            "decoding": {"temperature": TEMPERATURE, "top_k": TOP_K},
            "training": {"data_dir": str(Path(args.data_dir)), "train_pairs": len(train_pairs),
                         "val_pairs": len(val_pairs), "epochs": args.epochs, "batch_size": args.batch_size,
                         "lr": args.lr, "seed": args.seed, "device": device, **summary}}


def new_model_folder(folder, itos, config):
    """A fresh `<folder>.tmp-<pid>` beside the folder with config.json and vocab.json; the weights go in next."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp / "vocab.json").write_text(json.dumps(itos, ensure_ascii=False), encoding="utf-8")
    return tmp


def swap_in_folder(tmp, folder):
    """Swap whole folders so a reader never sees old weights with a new vocabulary."""
    folder = Path(folder)
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---- evaluation ------------------------------------------------------------
def reply_metrics(hypotheses, references, ended, ms):
    """The eval figures; hypotheses and references are token lists of the same tokeniser."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    bleu = corpus_bleu([[ref] for ref in references], hypotheses,
                       smoothing_function=SmoothingFunction().method1)
    return {"bleu4": bleu,
            "unigram_f1": float(np.mean([unigram_f1(h, r) for h, r in zip(hypotheses, references)])),
            "distinct_1": distinct_n(hypotheses, 1),
            "distinct_2": distinct_n(hypotheses, 2),
            "mean_reply_tokens": float(np.mean([len(h) for h in hypotheses])),
            "eos_rate": float(np.mean(ended)),
            "ms_median": float(np.median(ms)),
            "ms_p95": float(np.percentile(ms, 95))}


METRIC_LABELS = [
    ("bleu4", "BLEU-4 (corpus, nltk, smoothing method1)", "{:.4g}"),
    ("unigram_f1", "Unigram F1 (mean over replies)", "{:.4g}"),
    ("distinct_1", "Distinct-1", "{:.4g}"),
    ("distinct_2", "Distinct-2", "{:.4g}"),
    ("mean_reply_tokens", "Mean reply length, tokens", "{:.2f}"),
    ("eos_rate", "Replies ended with <EOS>", "{:.1%}"),
    ("ms_median", "Median ms per reply (batch 1)", "{:.2f}"),
    ("ms_p95", "95th percentile ms per reply", "{:.2f}"),
]


def report_table(report):
    lines = [f"# {KIT_MODEL}: {report['rows']} pairs of {report['data']}, {report['decoding']} decoding, "
             f"device {report['device']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {fmt.format(report[key])} |" for key, label, fmt in METRIC_LABELS]
    return "\n".join(lines) + "\n"


def write_text_atomic(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate_pairs(bot, args):
    """Replies to pairs_test.csv and their figures: reports/<kit model>.json and .md."""
    data_path = Path(args.data_dir) / "pairs_test.csv"
    pairs = read_pairs(data_path, args.rows)
    options = decoding_options(args, bot)
    warm_up(bot, [question for question, _ in pairs], options)
    hypotheses, references, ended, ms = [], [], [], []
    for question, answer in tqdm(pairs, desc="eval", disable=args.quiet):
        ids, stop, elapsed = timed_reply(bot, question, options)
        hypotheses.append([bot.itos[i] for i in ids])
        references.append(tokenize(answer))
        ended.append(stop)
        ms.append(elapsed)
    report = {"model": KIT_MODEL, "model_dir": str(args.model), "data": str(data_path), "rows": len(pairs),
              "decoding": args.decoding, **runtime_info(bot, args),
              **reply_metrics(hypotheses, references, ended, ms)}
    if args.decoding == "sample":
        report.update(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    table = report_table(report)
    report_dir = Path(args.report_dir)
    write_text_atomic(report_dir / f"{KIT_MODEL}.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    write_text_atomic(report_dir / f"{KIT_MODEL}.md", table)
    print(table, end="")
    print(f"written {report_dir / (KIT_MODEL + '.json')} and {report_dir / (KIT_MODEL + '.md')}")


def predict_file(bot, args, records):
    """The evaluate.py interface: JSONL questions in, JSONL greedy replies with timings and NLL out."""
    options = decoding_options(args, bot)
    warm_up(bot, [record["question"] for record in records], options)
    lines = []
    for record in tqdm(records, desc="predict", disable=args.quiet):
        text = " ".join([str(turn) for turn in record.get("context") or []] + [record["question"]])
        ids, ended, elapsed = timed_reply(bot, text, options)
        reference = record.get("reference")
        nll = tokens = chars = None
        if reference is not None:
            nll, tokens = bot.reference_nll(text, str(reference))
            chars = len(str(reference)) + 1
        lines.append(json.dumps({"id": record["id"], "reply": detokenize([bot.itos[i] for i in ids]),
                                 "ended_with_eos": ended, "ms": elapsed, "reply_tokens": len(ids),
                                 "reference_nll": nll, "reference_tokens": tokens, "reference_chars": chars},
                                ensure_ascii=False))
    write_text_atomic(args.predictions, "".join(line + "\n" for line in lines))
    print(f"{len(lines)} replies written to {args.predictions}")


# ---- modes -----------------------------------------------------------------
def run_chat(args):
    lines = read_script(args.script) if args.script else None
    bot = open_model(args)
    options = decoding_options(args, bot)
    if lines is not None:
        for line in lines:
            if line.strip().lower() == QUIT_WORD:
                break
            if line.strip():
                print(bot.reply(line, **options)[0], flush=True)
        return
    print(f"Модель {args.model} загружена. Пишите вопрос; «{QUIT_WORD}» — конец разговора.")
    while True:
        try:
            line = input("Вы: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except NotImplementedError:  # IPython's answer where no person can type (nbconvert, papermill)
            raise UserError("chat: this run cannot ask for input; "
                            "set CHAT_SCRIPT (--script) to a file of lines") from None
        if line.strip().lower() == QUIT_WORD:
            return
        if line.strip():
            print("Бот:", bot.reply(line, **options)[0] or "…", flush=True)


def run_eval(args):
    if args.questions or args.predictions:
        if not (args.questions and args.predictions):
            raise UserError("--questions and --predictions go together")
        records = read_questions(args.questions)
        predict_file(open_model(args), args, records)
    else:
        read_pairs(Path(args.data_dir) / "pairs_test.csv", 1)  # fail fast, before a model (or TensorFlow) loads
        evaluate_pairs(open_model(args), args)


def mode_parser(description, threads_help):
    """The command line of both LSTM scripts: a mode (train, chat, eval) and its flags, defaults from the
    defaults block."""
    parser = argparse.ArgumentParser(prog=SCRIPT, description=description)
    modes = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    # "cuda" and "gpu" are one choice, so that one word works for both LSTM scripts.
    common.add_argument("--device", default=DEVICE, choices=DEVICES)
    common.add_argument("--seed", type=int, default=SEED)
    common.add_argument("--threads", type=int, default=THREADS, help=threads_help)
    common.add_argument("--quiet", action="store_true", default=QUIET, help="no progress bars or per-epoch lines")
    decoding = argparse.ArgumentParser(add_help=False)
    decoding.add_argument("--model", default=MODEL_DIR, help="model folder made by `train`")
    decoding.add_argument("--temperature", type=float, default=TEMPERATURE)
    decoding.add_argument("--top-k", type=int, default=TOP_K, help="sample among the k likeliest words (0: all)")
    decoding.add_argument("--max-len", type=int, default=REPLY_MAX_LEN,
                          help="reply length cap in tokens (default: the model's)")

    train = modes.add_parser("train", parents=[common], help="train on pairs_train.csv, validate on pairs_val.csv")
    train.add_argument("--data-dir", default=DATA_DIR)
    train.add_argument("--rows", type=int, default=ROWS, help="read at most this many rows of each split")
    train.add_argument("--epochs", type=int, default=EPOCHS)
    train.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    train.add_argument("--emb-dim", type=int, default=EMB_DIM)
    train.add_argument("--hidden", type=int, default=HIDDEN)
    train.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    train.add_argument("--max-len", type=int, default=MAX_LEN, help="tokens kept per question and per answer")
    train.add_argument("--lr", type=float, default=LEARNING_RATE)
    train.add_argument("--patience", type=int, default=PATIENCE)
    train.add_argument("--max-minutes", type=float, default=MAX_MINUTES,
                       help="stop after this wall time, keeping the best weights")
    train.add_argument("--output", default=MODEL_DIR)

    chat = modes.add_parser("chat", parents=[common, decoding], help="console chat, or answer a file of lines")
    chat.add_argument("--decoding", default=CHAT_DECODING, choices=DECODINGS)
    chat.add_argument("--script", default=CHAT_SCRIPT,
                      help="answer each line of this UTF-8 file, one reply a line, and exit")

    evaluate = modes.add_parser("eval", parents=[common, decoding], help="metrics on pairs_test.csv")
    evaluate.add_argument("--decoding", default=EVAL_DECODING, choices=DECODINGS)
    evaluate.add_argument("--data-dir", default=DATA_DIR)
    evaluate.add_argument("--rows", type=int, default=ROWS, help="evaluate on at most this many test rows")
    evaluate.add_argument("--report-dir", default=REPORT_DIR)
    evaluate.add_argument("--questions", default=QUESTIONS,
                          help="JSONL of questions (evaluate.py interface); no report then")
    evaluate.add_argument("--predictions", default=PREDICTIONS, help="JSONL to write the replies to, with --questions")
    return parser


def check_args(args):
    for name in ("rows", "epochs", "batch_size", "emb_dim", "hidden", "vocab_size", "max_len", "patience"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "patience" else 1):
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {0 if name == 'patience' else 1}")
    if getattr(args, "vocab_size", 5) < 5:
        raise UserError(f"--vocab-size {args.vocab_size}: leaves no room for words beside the 4 special tokens")
    if getattr(args, "temperature", 1.0) <= 0:
        raise UserError(f"--temperature {args.temperature}: must be above 0 (use --decoding greedy instead)")
    # argparse checks choices only on the command line; a notebook sets these in the defaults block.
    for name, allowed in (("device", DEVICES), ("decoding", DECODINGS)):
        if getattr(args, name, allowed[0]) not in allowed:
            raise UserError(f"--{name} {getattr(args, name)!r}: must be one of {', '.join(allowed)}")
# ==== end of block blocks/lstm.py ====


# ==== block blocks/metrics.py: generated, edit the source and run `make blocks` ====
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
# ==== end of block blocks/metrics.py ====


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([MODE])
