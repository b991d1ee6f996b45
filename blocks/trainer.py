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
