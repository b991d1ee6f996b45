"""LSTM encoder-decoder chatbot in PyTorch: the first of the kit's two baselines.

A word-level seq2seq model: an LSTM encoder reads the question, its final
state (h, c) starts an LSTM decoder that writes the answer word by word.
The decoder learns with teacher forcing shifted by one step: it reads
`<SOS> a1 ... an` and predicts `a1 ... an <EOS>`, padding masked out of the
loss, so the model learns both the next word and where an answer ends.

Data: `data/pairs_{train,val,test}.csv` (dialogue_id,question,answer) from
create_dataset.py. The model folder `lstm_pytorch/` holds config.json,
vocab.json and model.pt; chat and eval read everything from it.

Run it (CPU):
    python pytorch_chatbot.py train --data-dir data --output lstm_pytorch
    python pytorch_chatbot.py chat --model lstm_pytorch          # «выход» ends it
    python pytorch_chatbot.py chat --model lstm_pytorch --script questions.txt
    python pytorch_chatbot.py eval --model lstm_pytorch          # reports/lstm_pytorch.{json,md}
On a GPU:
    python pytorch_chatbot.py train --device cuda --batch-size 256 --hidden 512
A single small LSTM gains nothing from several GPUs, so there is no torchrun
launch; run one process per experiment instead.

For evaluate.py, eval also answers a JSONL file of questions:
    python pytorch_chatbot.py eval --model lstm_pytorch --questions q.jsonl --predictions p.jsonl

In a notebook (Jupyter, Colab): paste this whole file into one cell, set MODE
and the rest in the defaults block below, and run the cell (chat mode asks
for your lines in the cell; «выход» ends it). `%run pytorch_chatbot.py train
--epochs 3` and `!python pytorch_chatbot.py train --epochs 3` take flags as above.

Map: the defaults block, then this script's own PyTorch code (the data, the model, training,
the model folder, inference, the train mode) and `main`; after them the generated blocks that
both LSTM scripts share: blocks/lstm.py (the tokeniser, reading the pairs and the folder's
config, the chat and eval modes, the command line, the report) and blocks/metrics.py (F1, distinct-n).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from tqdm.auto import tqdm  # a notebook gets its own kind of bar

SCRIPT = "pytorch_chatbot.py"
KIT_MODEL = "lstm_pytorch"
FORMAT_VERSION = 1

# ---- defaults: every flag's default; in a notebook cell, set them here -----
MODE = "train"           # what a pasted notebook cell runs: "train", "chat" or "eval" (a command line names it)
DATA_DIR = "data"        # pairs_{train,val,test}.csv from create_dataset.py
MODEL_DIR = "lstm_pytorch"  # train writes it, chat and eval read it
REPORT_DIR = "reports"
DEVICE = "auto"          # "auto", "cpu" or "cuda"
THREADS = 0              # CPU threads for torch (0: its default)
QUIET = False            # True: no progress bars or per-epoch lines
ROWS = None              # read at most this many rows of each split (None: all)
EPOCHS = 10
BATCH_SIZE = 64          # as in the research
EMB_DIM = 128
HIDDEN = 256
VOCAB_SIZE = 10000       # including the four special tokens
MAX_LEN = 20             # tokens per question and per answer (incl. <EOS>); covers ~99% of turns
LEARNING_RATE = 1e-3
CLIP_NORM = 1.0          # gradient norm cap (torch.nn.utils.clip_grad_norm_)
PATIENCE = 3             # epochs without a better validation loss before stopping
MAX_MINUTES = None       # stop training after this wall time, keeping the best weights (None: no limit)
CHAT_DECODING = "sample"  # "sample" or "greedy"
EVAL_DECODING = "greedy"
TEMPERATURE = 0.7        # as in the research
TOP_K = 50               # sample among the k likeliest words (0: all)
REPLY_MAX_LEN = None     # reply length cap in tokens (None: the model's MAX_LEN)
CHAT_SCRIPT = None       # chat: answer each line of this UTF-8 file instead of asking (None: ask)
QUESTIONS = None         # eval: a JSONL of questions to answer instead of the test split (evaluate.py's way)
PREDICTIONS = None       # eval: the JSONL the replies to QUESTIONS go to
SEED = 1337              # random, numpy and torch, and the sampling generator of chat and eval

class UserError(Exception):
    """A mistake of the user's (a file, a folder, a flag): one line, exit code 1."""


# ---- data ------------------------------------------------------------------
class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs, stoi, max_len):
        self.items = []
        for question, answer in pairs:
            dec_in, target = encode_answer(answer, stoi, max_len)
            self.items.append((encode_question(question, stoi, max_len), dec_in, target))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(batch):
    src, dec_in, target = zip(*batch)
    as_tensors = lambda seqs: [torch.tensor(s, dtype=torch.long) for s in seqs]
    return (pad_sequence(as_tensors(src), batch_first=True, padding_value=PAD_ID),
            torch.tensor([len(s) for s in src], dtype=torch.long),
            pad_sequence(as_tensors(dec_in), batch_first=True, padding_value=PAD_ID),
            pad_sequence(as_tensors(target), batch_first=True, padding_value=PAD_ID))


# ---- model -----------------------------------------------------------------
class Seq2Seq(nn.Module):
    def __init__(self, vocab_size, emb_dim, hidden):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.encoder = nn.LSTM(emb_dim, hidden, batch_first=True)
        self.decoder = nn.LSTM(emb_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def encode(self, src, src_lengths):
        if src.size(0) == 1:  # a single question has no padding; packing would only cost time
            return self.encoder(self.embedding(src[:, : int(src_lengths[0])]))[1]
        # Packing makes the final state the one after the last real token, not after padding.
        packed = pack_padded_sequence(self.embedding(src), src_lengths.cpu(),
                                      batch_first=True, enforce_sorted=False)
        _, state = self.encoder(packed)
        return state

    def decode(self, dec_in, state):
        output, state = self.decoder(self.embedding(dec_in), state)
        return self.out(output), state

    def forward(self, src, src_lengths, dec_in):
        logits, _ = self.decode(dec_in, self.encode(src, src_lengths))
        return logits


def masked_loss(logits, target, reduction="mean"):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=PAD_ID, reduction=reduction)


# ---- training --------------------------------------------------------------
def pick_device(name):
    name = "cuda" if name == "gpu" else name  # the Keras script's word for the same thing
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def validation_loss(model, loader, device):
    model.eval()
    total, tokens = 0.0, 0
    for src, src_len, dec_in, target in loader:
        src, dec_in, target = src.to(device), dec_in.to(device), target.to(device)
        total += masked_loss(model(src, src_len, dec_in), target, reduction="sum").item()
        tokens += int((target != PAD_ID).sum())
    return total / max(tokens, 1)


def train_model(args, train_pairs, val_pairs, device):
    """Train with early stopping on the validation loss; returns (model, itos, history)."""
    seed_everything(args.seed)
    itos = build_vocab([t for pair in train_pairs for t in pair], args.vocab_size)
    stoi = {tok: i for i, tok in enumerate(itos)}
    loader_seed = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(PairDataset(train_pairs, stoi, args.max_len), batch_size=args.batch_size,
                                               shuffle=True, collate_fn=collate, generator=loader_seed)
    val_loader = torch.utils.data.DataLoader(PairDataset(val_pairs, stoi, args.max_len), batch_size=args.batch_size,
                                             collate_fn=collate)
    model = Seq2Seq(len(itos), args.emb_dim, args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
    best_loss, best_state, best_epoch, waited = math.inf, copy.deepcopy(model.state_dict()), 0, 0
    history, stopped = [], "epochs"
    started = time.monotonic()
    print(f"train: {len(train_pairs)} pairs, val: {len(val_pairs)} pairs, vocabulary {len(itos)}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device}")
    try:
        for epoch in range(1, args.epochs + 1):
            model.train()
            running, seen = 0.0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=args.quiet)
            for src, src_len, dec_in, target in bar:
                if deadline and time.monotonic() > deadline:
                    stopped = "time limit"
                    break
                src, dec_in, target = src.to(device), dec_in.to(device), target.to(device)
                loss = masked_loss(model(src, src_len, dec_in), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
                optimizer.step()
                running, seen = running + loss.item(), seen + 1
                bar.set_postfix(loss=f"{running / seen:.3f}", refresh=False)
            bar.close()
            if seen == 0:
                break
            val = validation_loss(model, val_loader, device)
            history.append({"epoch": epoch, "train_loss": running / seen, "val_loss": val, "batches": seen})
            improved = val < best_loss
            if improved:
                best_loss, best_state, best_epoch, waited = val, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                waited += 1
            if not args.quiet:
                print(f"epoch {epoch}: train loss {running / seen:.4f}, val loss {val:.4f}"
                      f"{' (best)' if improved else ''}, {time.monotonic() - started:.0f} s")
            if stopped != "epochs":
                break
            if waited >= args.patience:
                stopped = "early stopping"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
        print("interrupted: keeping the best weights so far", file=sys.stderr)
    model.load_state_dict(best_state)
    summary = {"epochs_run": len(history), "best_epoch": best_epoch, "best_val_loss": best_loss,
               "stopped_by": stopped, "seconds": round(time.monotonic() - started, 1), "history": history}
    return model, itos, summary


# ---- model folder ----------------------------------------------------------
def save_model_folder(folder, model, itos, config):
    tmp = new_model_folder(folder, itos, config)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
    swap_in_folder(tmp, folder)


def load_model_folder(folder, device):
    folder = Path(folder)
    config = read_model_config(folder)
    for name in ("vocab.json", "model.pt"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: {name} is missing")
    try:
        itos = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        model = Seq2Seq(len(itos), config["emb_dim"], config["hidden"])
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise UserError(f"{folder}: the weights do not load ({str(err).splitlines()[0][:200]})") from None
    if itos[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise UserError(f"{folder}/vocab.json: does not start with {SPECIAL_TOKENS}")
    model.to(device).eval()
    return Bot(model, itos, config, device)


def open_model(args):
    return load_model_folder(args.model, pick_device(args.device))


# ---- inference -------------------------------------------------------------
class Bot:
    """A loaded model with its vocabulary: question text in, reply tokens out."""

    def __init__(self, model, itos, config, device):
        self.model, self.itos, self.config, self.device = model, itos, config, device
        self.stoi = {tok: i for i, tok in enumerate(itos)}
        self.max_len = config["max_len"]
        # The bot never says a padding, a start or an "unknown word" token.
        self.banned = torch.tensor([PAD_ID, SOS_ID, UNK_ID], device=device)

    @torch.no_grad()
    def reply_ids(self, text, max_len=None, greedy=True, temperature=TEMPERATURE, top_k=TOP_K, generator=None):
        """(ids of the reply without <EOS>, whether it ended with <EOS>)."""
        src_ids = encode_question(text, self.stoi, self.max_len)
        src = torch.tensor([src_ids], device=self.device)
        state = self.model.encode(src, torch.tensor([len(src_ids)]))
        token = torch.full((1, 1), SOS_ID, dtype=torch.long, device=self.device)
        reply = []
        for _ in range(max_len or self.max_len):
            logits, state = self.model.decode(token, state)
            logits = logits[0, -1].float()
            logits[self.banned] = -math.inf
            if greedy:
                next_id = int(logits.argmax())
            else:
                logits = logits / max(temperature, 1e-6)
                if top_k and top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probs = F.softmax(logits, dim=-1).cpu()
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            if next_id == EOS_ID:
                return reply, True
            reply.append(next_id)
            token = torch.full((1, 1), next_id, dtype=torch.long, device=self.device)
        return reply, False

    def reply(self, text, **decoding):
        ids, ended = self.reply_ids(text, **decoding)
        return detokenize([self.itos[i] for i in ids]), ended

    @torch.no_grad()
    def reference_nll(self, text, reference):
        """Sum of -log p (nats) of the reference's tokens and <EOS> under teacher forcing, and their count.

        The whole reference is scored, not cut at max_len, so that every model
        is charged for every token of the same text.
        """
        ref_ids = [self.stoi.get(tok, UNK_ID) for tok in tokenize(reference)]
        src_ids = encode_question(text, self.stoi, self.max_len)
        src = torch.tensor([src_ids], device=self.device)
        dec_in = torch.tensor([[SOS_ID] + ref_ids], device=self.device)
        target = torch.tensor([ref_ids + [EOS_ID]], device=self.device)
        logits = self.model(src, torch.tensor([len(src_ids)]), dec_in)
        return masked_loss(logits.float(), target, reduction="sum").item(), len(ref_ids) + 1


def decoding_options(args, bot):
    return {"greedy": args.decoding == "greedy", "temperature": args.temperature, "top_k": args.top_k,
            "max_len": args.max_len or bot.max_len,
            "generator": torch.Generator().manual_seed(args.seed)}


# ---- evaluation ------------------------------------------------------------
def timed_reply(bot, text, options):
    started = time.perf_counter()
    ids, ended = bot.reply_ids(text, **options)
    if bot.device.type == "cuda":
        torch.cuda.synchronize()
    return ids, ended, (time.perf_counter() - started) * 1000


def warm_up(bot, questions, options):
    """First-call allocations are not a reply's cost: one untimed reply first."""
    for question in questions[:1]:
        timed_reply(bot, question, options)


def runtime_info(bot, args):
    """What the eval report says of the run: the device, torch's threads and version."""
    return {"device": str(bot.device), "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---- modes -----------------------------------------------------------------
def run_train(args):
    check_output_folder(args.output)
    data_dir = Path(args.data_dir)
    train_pairs = read_pairs(data_dir / "pairs_train.csv", args.rows)
    val_pairs = read_pairs(data_dir / "pairs_val.csv", args.rows)
    device = pick_device(args.device)
    model, itos, summary = train_model(args, train_pairs, val_pairs, device)
    config = folder_config(args, itos, train_pairs, val_pairs, str(device), summary)
    save_model_folder(args.output, model, itos, config)
    print(f"best val loss {summary['best_val_loss']:.4f} at epoch {summary['best_epoch']} "
          f"({summary['stopped_by']}); model saved to {args.output}")
    return model, itos, config


def parse_args(argv):
    parser = mode_parser("LSTM seq2seq chatbot (PyTorch): train, chat, eval.", "CPU threads for torch (0: its default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
