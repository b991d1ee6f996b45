"""The chat: loading a model folder, the prompt window, generating replies; the console chat and the bot.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""

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
SERVER_KEY_ENV = "OPENAI_API_KEY"  # the server's key where --server-key is not given


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 1."""


class ServerError(Exception):
    """The inference server is down, slow, or answered with an error: the reply is an apology."""


def chat_prompt_ids(history, settings, tokenizer, facts=()):
    """The prompt's token ids for `history` (turns oldest first, alternating user/bot, the
    last the user's new message): the prompt rule with the model's turn window and budget,
    the ids the model is fed as they are. `facts`, what the user said about themselves
    ((kind, value) pairs), become the facts exchange after the persona when the model was
    trained with one (settings["facts_exchange"]): the answer create_dataset.py's facts
    column holds, cut by the prompt rule as training cut it."""
    answer = render_facts_answer(facts) if facts and settings.get("facts_exchange") else None
    return fit_prompt(tokenizer, history, settings["max_turns"], settings["budget"], settings["persona"], answer)


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


def unfinished_lora_run(folder):
    """Whether a folder with no model is a --lora run that has not finished: its
    checkpoint-N/ folders hold the adapter only, and the merged model comes at the end."""
    return any((path / "adapter_config.json").is_file() for path in Path(folder).glob("checkpoint-*"))


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
    if not checkpoints and unfinished_lora_run(folder):
        raise UserError(f"{folder}: a --lora run that has not finished: its checkpoint-N/ folders hold the "
                        f"adapter only, and the merged model is saved when it ends (--resume --lora continues it)")
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


def int8_activations_full_range():
    """Whether torch's int8 kernel (fbgemm, the x86 engine) may round activations to all 8 bits.
    With VNNI instructions its products add up in 32 bits; without them pairs of products add
    up in 16 bits, which full-range activations can overflow, hence torch's default of 7 bits
    (reduce_range). On GPT-2 those 7 bits gave three times the logit error of 8 (issue 23);
    the output layer over the vocabulary was not the cause. Read from /proc/cpuinfo; elsewhere
    than on Linux, the safe default."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    # fbgemm takes its 32-bit kernel on AVX-512 VNNI only; AVX-VNNI (Alder Lake and later, without
    # AVX-512) still runs the AVX2 kernel with 16-bit pair sums
    return re.search(r"\bavx512_vnni\b", flags) is not None


def full_range_forward(layer, x):
    """A dynamic int8 linear layer's forward with its activations rounded to 8 bits instead of 7:
    the same packed weights and kernel, so the same bytes read a token."""
    return torch.ops.quantized.linear_dynamic(x, layer._packed_params._packed_params, False)


def quantize_int8(model):
    """Every linear layer (the output layer too) with int8 weights, one scale per
    output row, and activations quantized on the fly: a quarter of the weight
    bytes that each generated token must read, which is what bounds a CPU. The
    activations get all 8 bits where the CPU adds the products in 32 bits (VNNI),
    torch's 7 elsewhere."""
    model = conv1d_to_linear(model)
    with warnings.catch_warnings():
        # torch 2.13 ships this API but marks it deprecated in favour of the torchao
        # package (see deploy/README.md); choose_quantization falls back where it is gone.
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)
    if int8_activations_full_range():
        for module in model.modules():
            if type(module) is torch.ao.nn.quantized.dynamic.Linear:
                module.forward = functools.partial(full_range_forward, module)
    return model


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
    return {"generation": generation, "persona": persona,
            "facts_exchange": chat["chat_config"].get("facts") is True, "max_turns": max_turns, "budget": budget,
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
        return server_reply(chat["server"], settings, prompt, on_text)
    ids = generate_ids(chat, settings, [prompt], [on_text])[0]
    return decode_reply(chat["tokenizer"], ids)


class ServerKeyError(ServerError):
    """The inference server refused the key (HTTP 401 or 403)."""


def server_base_url(url):
    """--server as the base the routes are added to ("/v1/completions"); a UserError unless it is an HTTP URL."""
    base = url.rstrip("/").removesuffix("/v1")
    if not re.match(r"https?://[^/\s]+", base):
        raise UserError(f"--server {url!r}: expected the base URL of an OpenAI-compatible server, such as "
                        f"http://127.0.0.1:8000")
    return base


def server_call(server, method, route, **options):
    """One HTTP request to the server with its key; ServerKeyError when the key is refused."""
    response = requests.request(method, server["url"] + route, headers=server["headers"],
                                timeout=(SERVER_CONNECT_SECONDS, server["timeout"]), **options)
    if response.status_code in (401, 403):
        response.close()
        raise ServerKeyError(f"{server['url']} refused the key (HTTP {response.status_code}): "
                             + ("--server-key is not the server's key" if server["headers"] else
                                "give the server's key with --server-key (or OPENAI_API_KEY)"))
    return response


def open_server(url, tokenizer, timeout, generation=None, key=None):
    """The inference server that runs the model (an OpenAI-compatible one: llama.cpp's
    llama-server, vLLM, transformers serve): its address, the model it serves (GET /v1/models,
    sent with every request), how it takes a prompt (probe_server), and notes for the caller to
    show: penalties of the generation settings it cannot apply, a server that does not answer
    yet, or one that takes text only and counts a prompt otherwise than the kit. `key` (else
    $OPENAI_API_KEY) goes as "Authorization: Bearer"; a key the server refuses is a UserError."""
    base = server_base_url(url)
    key = key or os.environ.get(SERVER_KEY_ENV) or None
    server = {"url": base, "timeout": float(timeout), "model": None, "owner": None, "eos_token": tokenizer.eos_token,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "notes": [],
              "tokenizer": tokenizer, "headers": {"Authorization": f"Bearer {key}"} if key else {},
              "prompt_form": None, "sampling_fields": None}
    generation = generation or {}
    if float(generation.get("repetition_penalty") or 1.0) != 1.0 or int(generation.get("no_repeat_ngram_size") or 0):
        server["notes"].append("the repetition penalty and n-gram blocking of the generation settings are not sent to "
                               "the server: its own would count the prompt's words too (see deploy/README.md)")
    try:
        server["notes"].extend(probe_server(server))
    except ServerKeyError as error:
        raise UserError(f"--server {error}") from None
    except ServerError as error:
        server["notes"].append(f"--server {base}: no answer as an OpenAI-compatible server ({error}); every reply is "
                               f"an apology until it answers")
    return server


def served_model(server):
    """The id of the model the server serves (GET /v1/models), sent with every request, and who
    says it serves it ("llamacpp", "vllm"...); None while the server does not say."""
    try:
        with server_call(server, "GET", "/v1/models") as listed:
            listed.raise_for_status()
            entry = listed.json()["data"][0]
        server["owner"] = entry.get("owned_by")
        return entry["id"]
    except (requests.RequestException, ValueError, LookupError, TypeError, AttributeError):
        return None


def probe_server(server):
    """How the server takes a prompt, learnt once with the probe prompt and max_tokens 1, and
    remembered in server["prompt_form"] ("ids" or "text") and server["sampling_fields"] ("top
    level": top_k and min_p beside temperature, as llama-server and vLLM take them; "generation
    config": inside transformers serve's generation_config JSON, as it refuses unknown fields).
    Token ids are used where the server counts exactly their number: it then reads the prompt as
    the kit built it. Else text, with a note where the server's tokenizer counts the probe
    otherwise (a BOS added, a typed "</s>" read as the end of text). The notes are returned;
    ServerError when no form is taken, ServerKeyError when the key is refused."""
    if server["model"] is None:
        server["model"] = served_model(server)
        if server["model"] is None:
            raise ServerError("GET /v1/models names no model")
    ids = encode_text(server["tokenizer"], PROBE_PROMPT)
    probe = {"max_new_tokens": 1, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    failures = []
    for form, fields in (("ids", "top level"), ("ids", "generation config"), ("text", "top level"),
                         ("text", "generation config")):
        body = completion_body(server, probe, ids if form == "ids" else PROBE_PROMPT, fields, stream=False)
        try:
            with server_call(server, "POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    failures.append(f"{form} prompt, {fields}: HTTP {answer.status_code} {answer.text[:120]!r}")
                    continue
                counted = answer.json()["usage"]["prompt_tokens"]
        except ServerKeyError:
            raise
        except (requests.RequestException, ValueError, LookupError, TypeError) as error:
            raise ServerError(f"{type(error).__name__}: {error}") from None
        if form == "ids" and counted != len(ids):
            failures.append(f"ids prompt: {counted} tokens counted for {len(ids)} ids")
            continue
        server["prompt_form"], server["sampling_fields"] = form, fields
        if form == "text" and counted != len(ids):
            return [f"--server {server['url']} takes prompts as text only and counts {counted} tokens in one where "
                    f"the kit counts {len(ids)}: its tokenizer adds a BOS or reads a user's '</s>' as the end of "
                    f"text; serve a model folder whose tokenizer_config.json has \"split_special_tokens\": true"]
        return []
    raise ServerError("; ".join(failures))


def server_summary(server):
    """The start line's words for the server: where it is, what it serves, how prompts go."""
    how = {"ids": "prompts sent as token ids", "text": "prompts sent as text"}.get(server["prompt_form"],
                                                                                "not answering yet")
    return f"server {server['url']} serves {server['model'] or 'a model not known yet'}; {how}"


def completion_body(server, generation, prompt, fields, stream=True):
    """A /v1/completions request: the prompt (token ids or text), the reply's length, every
    sampling setting and the label stop strings. fields "top level": temperature, top_p, top_k
    (0: off; llama-cpp-python's server refuses -1) and min_p 0 beside the prompt, as llama-server
    (whose own defaults are top_k 40 and min_p 0.05) and vLLM take them; llama-server is also told
    the kit's order, temperature before top_p (its own puts it last). fields "generation config":
    transformers serve, which refuses fields it does not know and samples only when its
    generation_config says so (which replaces the folder's: the EOS and pad ids go with it). The
    penalties are left out: the servers would count the prompt's tokens too."""
    sample, length = bool(generation["do_sample"]), int(generation["max_new_tokens"])
    temperature, top_p = float(generation["temperature"]), float(generation["top_p"])
    top_k = int(generation.get("top_k") or 0)
    body = {"prompt": prompt, "max_tokens": length, "temperature": temperature if sample else 0.0,
            "top_p": top_p if sample else 1.0, "stop": STOP_STRINGS, "stream": stream}
    if fields == "top level":
        body.update(top_k=top_k if sample and top_k > 0 else 0, min_p=0.0)
        if sample and server.get("owner") == "llamacpp":
            body["samplers"] = ["top_k", "temperature", "top_p"]
        if generation.get("min_new_tokens"):
            body["min_tokens"] = int(generation["min_new_tokens"])  # vLLM's name; fixed-length replies, for benchmarks
    else:
        config = {"do_sample": sample, "max_new_tokens": length, "eos_token_id": server["eos_token_id"],
                  "pad_token_id": server["pad_token_id"]}
        if sample:
            config.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            del body["top_p"]
        if generation.get("min_new_tokens"):
            config["min_new_tokens"] = int(generation["min_new_tokens"])  # fixed-length replies, for benchmarks
        body["generation_config"] = json.dumps(config)
    if server["model"]:
        body["model"] = server["model"]
    return body


def server_body(server, settings, prompt, prompt_text=None):
    """The streamed /v1/completions request for a prompt (its token ids, or its text), in the form
    the server was found to take (probe_server): the ids themselves where it takes them, else the
    text (prompt_text where the caller has it decoded already: a tokenizer is not shared between
    threads)."""
    if not isinstance(prompt, str) and server["prompt_form"] != "ids":
        prompt = prompt_text if prompt_text is not None else server["tokenizer"].decode(prompt)
    return completion_body(server, settings["generation"], prompt, server["sampling_fields"] or "generation config")


def server_pieces(server, body):
    """The text pieces of a streamed /v1/completions answer as they come. Closing the generator
    closes the connection, which stops the server writing (a request not streamed would run to
    its end after the client gave up). ServerError when the server does not take the connection,
    answers with an error (an HTTP error, or an error event inside a 200 stream), or the reply is
    not complete within server["timeout"] seconds, its wait in the server's queue included. A
    request refused as malformed (400, 422) makes the next reply probe the server again: another
    kind of server may have taken the address."""
    deadline = time.monotonic() + server["timeout"]
    try:
        with server_call(server, "POST", "/v1/completions", json=body, stream=True) as response:
            if response.status_code != 200:
                if response.status_code in (400, 422):
                    server["prompt_form"] = None
                raise ServerError(f"{server['url']}: HTTP {response.status_code} {response.text[:200]!r}")
            for line in response.iter_lines():
                if time.monotonic() > deadline:
                    raise ServerError(f"{server['url']}: no complete reply within {server['timeout']:g} s")
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":  # vLLM and llama-server end a stream so; transformers serve closes it
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


def server_reply(server, settings, prompt, on_text=None, prompt_text=None):
    """The cleaned reply to a prompt (its token ids; text is sent as it is) from the inference
    server, read as it is streamed: on_text, if given, gets the visible text as it grows, and
    the stream is closed as soon as the model starts the next turn, which the cleaning would cut
    anyway. The same cleaning as in this process, so both give the same reply for the same
    continuation. A server that did not answer at the start is probed first."""
    if server["prompt_form"] is None:
        probe_server(server)
    raw, shown = "", ""
    pieces = server_pieces(server, server_body(server, settings, prompt, prompt_text))
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


def describe_voice(chat_config):
    """Whose turns the model learnt to write (chat_config.json "voice": {"keys", "names"}, from
    create_dataset.py --as), as the start line shows it: "говорит как: Вадим Петров"; None where
    the data was everyone's or the record is not one."""
    voice = chat_config.get("voice")
    if not isinstance(voice, dict):
        return None
    names = [str(name) for name in voice.get("names") or [] if str(name).strip()]
    keys = [str(key) for key in voice.get("keys") or [] if str(key).strip()]
    return f"говорит как: {', '.join(names or keys)}" if names or keys else None


def add_prompt_flags(parser):
    """The flags of the persona, the generation settings and the prompt window, which the console
    chat and the bot take alike; their defaults are the host script's defaults block."""
    parser.add_argument("--persona", default=PERSONA,
                        help="the bot's answer to the persona question (default: chat_config.json)")
    parser.add_argument("--no-persona", action="store_true", default=NO_PERSONA,
                        help="no persona exchange in the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=TOP_P)
    parser.add_argument("--repetition-penalty", type=float, default=REPETITION_PENALTY, help="must be >= 1.0")
    parser.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS,
                        help="prompt budget in tokens (default: chat_config.json, what the model was trained with)")
    parser.add_argument("--max-turns", type=int, default=MAX_TURNS,
                        help="turns of the conversation in the prompt, the new message included (default: "
                             "chat_config.json, what the model was trained with)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
