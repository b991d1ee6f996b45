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
