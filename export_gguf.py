"""Export a trained model folder to one GGUF file for llama.cpp (llama-server, llama-cpp-python, Ollama).

Reads a model folder as train_transformer.py and train_medium_context.py write it (a transformers
save_pretrained GPT-2 folder with chat_config.json; a training folder without weights of its own gives
its newest complete checkpoint-N/), or a folder holding a LoRA adapter (adapter_config.json), which is
merged onto its base first. Writes the GGUF with GPT-2 metadata, the tokenizer's vocabulary and merges
and the weights in f16 or q8_0 (q4_k_m through llama.cpp's own llama-quantize), and copies the folder's
chat_config.json beside it as <output without .gguf>.chat_config.json, so a chat script knows the
prompt rule. The GGUF carries no chat template: llama-server rejects the kit's Cyrillic one, and the
kit's chat sends token ids built by its own prompt rule anyway.

Before the file takes its name, the script reads it back: the tensors' names and shapes, and a
tokenizer rebuilt from the GGUF's vocabulary and merges must give the folder tokenizer's ids for a set
of texts (Cyrillic, runs of spaces, emoji, a typed "</s>", a prompt in the kit's format), with the
kit's rule that special tokens a user types stay text. Where llama-cpp-python is installed, llama.cpp's
own tokenizer must agree too.

Run it (CPU; no GPU is needed, nor the internet for a local folder):
    python export_gguf.py --model rugpt3_50k                         # rugpt3_50k.q8_0.gguf beside the folder
    python export_gguf.py --model rugpt3_medium_CLEAN_model --type f16 --output models/medium.f16.gguf
    python export_gguf.py --model rugpt3_50k --type q4_k_m           # needs llama.cpp's llama-quantize on PATH
    python export_gguf.py --model run/checkpoint-400                 # a --lora run's adapter checkpoint: merged
    python export_gguf.py --model run/adapter --base ai-forever/rugpt3small_based_on_gpt2
Then, for example:
    llama-server -m rugpt3_50k.q8_0.gguf --port 8080

In a notebook (Jupyter, Colab): paste this whole file into one cell, set the defaults block below
(MODEL, OUTPUT, TYPE, ...), run the cell. `%run export_gguf.py --flags` takes flags as above.

Map: find_weights (folder, checkpoint or adapter) -> load_model (LoRA merged) -> gguf_tensors (HF
names to GGUF names, Conv1D transposed) -> vocabulary -> write_gguf (f16 / q8_0; llama-quantize for
q4_k_m) -> check_gguf (tensors, tokenizer) -> os.replace, copy_chat_config.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

# ----------------------------------------------------------------------------
# defaults: every flag's default; in a notebook cell, set them here
MODEL = "rugpt3_50k"        # model folder (its newest complete checkpoint-N/ when it has no weights of its own)
OUTPUT = None               # the GGUF file; None: <MODEL>.<TYPE>.gguf beside the model folder
TYPE = "q8_0"               # "f16", "q8_0" (8.5 bits a weight) or "q4_k_m" (needs llama-quantize on PATH)
BASE = None                 # a LoRA adapter folder's base model; None: the adapter's base_model_name_or_path
QUANTIZE_BIN = "llama-quantize"  # llama.cpp's quantizer, for --type q4_k_m
# ----------------------------------------------------------------------------
TYPES = ("f16", "q8_0", "q4_k_m")
PROG = "export_gguf.py"
CHAT_CONFIG_NAME = "chat_config.json"
CHAT_CONFIG_SUFFIX = ".chat_config.json"
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's gpt2 graph uses tanh GELU
TOKENIZER_FILE = "tokenizer.json"
# The kit's prompt labels, as DESIGN.md spells them (chat_config.json's own labels win where present).
QUESTION_LABEL = "Вопрос: "
ANSWER_LABEL = "Ответ: "
TURN_SEPARATOR = "\n"
# Texts whose ids the GGUF's tokenizer must reproduce: what a chat sends, and what breaks tokenizers.
CHECK_TEXTS = [
    "Привет! Как дела?",
    "Меня зовут Аня, я живу в Казани. Ёжик съел щи — «вкусно»!",
    "много    пробелов   подряд\tи табуляция\n\nи две пустые строки\n\n\n",
    " пробел в начале и в конце ",
    "эмодзи 😀👍🏽 флаг 🇷🇺 и семья 👨‍👩‍👧",
    "пишу </s> и <pad> и <s> руками, это просто текст</s>",
    "English words, it's they're we'll I'd; digits 1234567890 and 3.14159",
    "слитноLatinКириллица123числа,,,!!!???",
    "й (NFD) и й, неразрывный\u00a0пробел, \u200bнулевой",
    "\u0000\u0001 управляющие символы \x7f",
]


class UserError(Exception):
    """A user's mistake: main prints it as one line and exits with 1."""


# ----------------------------------------------------------------------------
# the model folder

def read_json(path):
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a UTF-8 JSON file ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def has_weights(path):
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                             "pytorch_model.bin", "pytorch_model.bin.index.json"))


def has_adapter(path):
    return (path / "adapter_config.json").is_file() and any(
        (path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))


def find_weights(folder):
    """The folder itself when it holds a model or an adapter, else its newest complete checkpoint-N/
    (the Trainer writes trainer_state.json last, so a checkpoint without it was cut short)."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give a model folder, not a file)")
    if has_weights(folder) or has_adapter(folder):
        return folder
    checkpoints = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if step.isdigit() and (path / "trainer_state.json").is_file() and (has_weights(path) or has_adapter(path)):
            checkpoints.append((int(step), path))
    if not checkpoints:
        raise UserError(f"{folder}: not a model folder: no config.json with model weights, no LoRA adapter "
                        f"(adapter_config.json) and no complete checkpoint-N/ folder")
    return max(checkpoints)[1]


def check_architecture(config, source):
    """Only GPT-2 as llama.cpp runs it: other architectures need other metadata and tensor maps."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{source}: model_type {model_type!r} is not supported: {PROG} exports GPT-2 "
                        f"models (model_type 'gpt2'), as the kit trains them")
    activation = config.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise UserError(f"{source}: activation_function {activation!r}: llama.cpp's GPT-2 runs tanh GELU "
                        f"({', '.join(GPT2_ACTIVATIONS)}), so its answers would differ")
    for key, runnable in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                          ("add_cross_attention", False)):
        if config.get(key, runnable) != runnable:
            raise UserError(f"{source}: {key} = {config[key]}: llama.cpp's GPT-2 has no such variant")


def model_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json")
    return read_json(path)


def find_tokenizer_folder(candidates):
    for folder in candidates:
        if folder is not None and (Path(folder) / TOKENIZER_FILE).is_file():
            return Path(folder)
    return None


def load_model(weights, folder, base=None):
    """The model in fp32 on the CPU and the folder of its tokenizer. A LoRA adapter is merged onto its
    base (resized first to the adapter's tokenizer, whose added rows the adapter carries)."""
    import torch
    from transformers import GPT2LMHeadModel

    if not has_adapter(weights):
        check_architecture(model_config(weights), weights / "config.json")
        tokenizer_folder = find_tokenizer_folder([weights, Path(folder)])
        if tokenizer_folder is None:  # before the weights load: a mistake costs no time
            raise UserError(f"{weights}: no {TOKENIZER_FILE} beside the model (save the tokenizer with the model)")
        model = GPT2LMHeadModel.from_pretrained(weights, dtype=torch.float32)
        return model.eval(), tokenizer_folder

    adapter_config = read_json(weights / "adapter_config.json")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{weights / 'adapter_config.json'}: peft_type {adapter_config.get('peft_type')!r}: "
                        f"only LoRA adapters can be merged")
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{weights / 'adapter_config.json'}: names no base model; give it with --base")
    base_path = Path(base)
    if base_path.is_dir():
        base_path = find_weights(base_path)
        if has_adapter(base_path):
            raise UserError(f"{base_path}: the base of a LoRA adapter must be a model, not another adapter")
        check_architecture(model_config(base_path), base_path / "config.json")
        source = base_path
    else:
        source = base  # a hub name: transformers' cache, or the hub where it can be reached
    try:
        model = GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{weights}: cannot load the adapter's base {base!r} ({first_line}); give a local "
                        f"model folder with --base") from None
    check_architecture(model.config.to_dict(), base)
    # the adapter's own tokenizer, else its run's (the kit's <run>/adapter/), else the base's
    tokenizer_folder = find_tokenizer_folder([weights, Path(folder), weights.parent,
                                              base_path if base_path.is_dir() else None])
    if tokenizer_folder is not None:
        tokens = len(load_tokenizer(tokenizer_folder))
        if tokens > model.config.vocab_size:  # the run added a token (the pad): its row is in the adapter
            model.resize_token_embeddings(tokens, mean_resizing=False)
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates: noise, not news
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                    category=FutureWarning)
            merged = PeftModel.from_pretrained(model, weights).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{weights}: the adapter does not fit its base {base!r} ({str(error).splitlines()[0]})") \
            from None
    return merged.eval(), tokenizer_folder or (base_path if base_path.is_dir() else base)


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"{folder}: cannot load the tokenizer ({str(error).strip().splitlines()[0]})") from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise UserError(f"{folder}: the tokenizer has no tokenizer.json (a fast tokenizer is needed)")
    return tokenizer


# ----------------------------------------------------------------------------
# what goes into the GGUF

def gguf_tensors(model):
    """(GGUF name, fp32 numpy array) in the order of the file. HF GPT-2's Conv1D layers keep their
    weight as in x out; GGUF wants out x in like every nn.Linear, hence the transposes."""
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES

    def array(tensor, transpose=False):
        tensor = tensor.detach().float()
        return (tensor.t() if transpose else tensor).contiguous().numpy()

    gpt2 = model.transformer
    yield TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", array(gpt2.wte.weight)
    yield TENSOR_NAMES[T.POS_EMBD] + ".weight", array(gpt2.wpe.weight)
    for bid, block in enumerate(gpt2.h):
        for kind, module, conv1d in ((T.ATTN_NORM, block.ln_1, False), (T.ATTN_QKV, block.attn.c_attn, True),
                                     (T.ATTN_OUT, block.attn.c_proj, True), (T.FFN_NORM, block.ln_2, False),
                                     (T.FFN_UP, block.mlp.c_fc, True), (T.FFN_DOWN, block.mlp.c_proj, True)):
            name = TENSOR_NAMES[kind].format(bid=bid)
            yield name + ".weight", array(module.weight, transpose=conv1d)
            yield name + ".bias", array(module.bias)
    yield TENSOR_NAMES[T.OUTPUT_NORM] + ".weight", array(gpt2.ln_f.weight)
    yield TENSOR_NAMES[T.OUTPUT_NORM] + ".bias", array(gpt2.ln_f.bias)
    # Written even when tied to token_embd, as llama.cpp's converter does: older llama.cpp builds need it.
    yield TENSOR_NAMES[T.OUTPUT] + ".weight", array(model.lm_head.weight)


def tensor_type(name, array, file_type):
    """The GGML type of one tensor: norms, biases and the position table stay F32 (llama.cpp reads them
    so, and its converter keeps them), the rest takes the file's type; a row that is not a whole number
    of Q8_0 blocks falls back to F16."""
    import gguf

    if array.ndim < 2 or name.startswith("position_embd."):
        return gguf.GGMLQuantizationType.F32
    if file_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if array.shape[-1] % block == 0:
            return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def encoded_array(array, qtype):
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def vocabulary(tokenizer, vocab_size, source):
    """tokens, token types and merges as llama.cpp's BPE ("gpt2") tokenizer reads them. Special added
    tokens are CONTROL, which llama.cpp never matches in text it is not told to parse for them (the
    kit's rule: a typed "</s>" is text); other added tokens are USER_DEFINED, matched in text as
    transformers matches them."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{source}: a {model.get('type')} tokenizer: GGUF's gpt2 tokenizer is a byte-level BPE")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise UserError(f"{source}: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} rows")
    by_id = {index: token for token, index in vocab.items()}
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows past the tokenizer (padded tables): never produced
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(path, model, tokenizer, file_type, name, source):
    """The GGUF in f16 or q8_0 at path."""
    import gguf
    from tqdm.auto import tqdm

    config = model.config
    tokens, types, merges = vocabulary(tokenizer, config.vocab_size, source)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    # transformers 5 saves n_positions only; older GPT-2 configs may still carry n_ctx
    writer.add_context_length(getattr(config, "n_positions", None) or config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if file_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    # The kit's tokenizers are byte-level BPE with GPT-2's own split; llama.cpp knows that split as
    # "gpt-2", while a tokenizer trained on the user's data has a hash it does not recognise.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    # The kit's prompt rule adds nothing: no BOS in front, no EOS behind.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    shapes = {}
    for tensor_name, array in tqdm(list(gguf_tensors(model)), desc="tensors", unit="tensor"):
        qtype = tensor_type(tensor_name, array, file_type)
        writer.add_tensor(tensor_name, encoded_array(array, qtype), raw_dtype=qtype)
        shapes[tensor_name] = array.shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return shapes


def llama_quantize(binary, source, target, kind):
    """llama.cpp's own k-quants: the gguf package can pack Q8_0 but not choose the mixed K types."""
    result = subprocess.run([binary, str(source), str(target), kind.upper()], capture_output=True, text=True)
    if result.returncode != 0 or not Path(target).is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{binary} {kind.upper()} failed with exit code {result.returncode}: {last[0]}")


# ----------------------------------------------------------------------------
# reading the file back

def field_value(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tokenizer_from_gguf(reader):
    """A `tokenizers` byte-level BPE built from nothing but the GGUF's vocabulary and merges, reading
    text as llama.cpp's gpt-2 pre-tokenizer does; special tokens typed in text stay text."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in field_value(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens) if types[index] != gguf.TokenType.UNUSED}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == gguf.TokenType.USER_DEFINED]
    bpe.add_special_tokens(special)
    bpe.add_tokens(user)
    bpe.encode_special_tokens = True
    return bpe


def reference_ids(tokenizer, text):
    """The ids the kit's chat gives a text: nothing added, special tokens typed by the user as text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def llama_cpp_tokenizer(path):
    """llama.cpp's own tokenizer on the file (vocabulary only), where llama-cpp-python is installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    with native_stderr_silenced():  # llama.cpp warns about the context size of a vocabulary-only load
        model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text: model.tokenize(text.encode("utf-8"), add_bos=False, special=False)


@contextlib.contextmanager
def native_stderr_silenced():
    """C code writes to file descriptor 2 itself, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_texts(chat_config):
    question = chat_config.get("question_label", QUESTION_LABEL)
    answer = chat_config.get("answer_label", ANSWER_LABEL)
    separator = chat_config.get("turn_separator", TURN_SEPARATOR)
    persona = chat_config.get("persona") or {"question": "Кто ты?", "answer": "Помощник."}
    prompt = separator.join([question + persona["question"], answer + persona["answer"],
                             question + "Привет! Как дела? </s>", answer.rstrip()])
    return CHECK_TEXTS + [prompt, prompt + " Хорошо, спасибо." + separator + question.rstrip()]


def check_gguf(path, expected_shapes, config, tokenizer, texts, full_check=True):
    """Reads the file back: the architecture, every tensor's name and shape, and the tokenizer's ids on
    texts. Returns the lines to print; a mismatch is a UserError (the file is not kept)."""
    import gguf

    reader = gguf.GGUFReader(path)
    architecture = field_value(reader, "general.architecture")
    if architecture != "gpt2":
        raise UserError(f"{path}: reads back as architecture {architecture!r}, not 'gpt2'")
    for key, want in (("gpt2.block_count", config.n_layer), ("gpt2.embedding_length", config.n_embd),
                      ("gpt2.attention.head_count", config.n_head), ("gpt2.context_length", config.n_positions)):
        if field_value(reader, key) != want:
            raise UserError(f"{path}: {key} reads back as {field_value(reader, key)}, not {want}")
    # GGUF lists dimensions fastest first (ne0 = a row's length): numpy's order reversed
    read = {tensor.name: tuple(int(n) for n in reversed(tensor.shape.tolist())) for tensor in reader.tensors}
    if read != {name: tuple(shape) for name, shape in expected_shapes.items()}:
        missing = sorted(set(expected_shapes) - set(read))
        odd = sorted(name for name in read if name in expected_shapes and read[name] != tuple(expected_shapes[name]))
        raise UserError(f"{path}: the tensors read back differ: {len(read)} of {len(expected_shapes)}, "
                        f"missing {missing[:3]}, other shapes {odd[:3]}")
    lines = [f"tensor check: {len(read)}/{len(expected_shapes)} tensors with the right shapes"]
    if not full_check:
        return lines
    rebuilt = tokenizer_from_gguf(reader)
    checks = [("tokenizer check", lambda text: rebuilt.encode(text, add_special_tokens=False).ids)]
    llama = llama_cpp_tokenizer(path)
    if llama is not None:
        checks.append(("llama.cpp tokenizer check", llama))
    for label, encode in checks:
        differ = [text for text in texts if encode(text) != reference_ids(tokenizer, text)]
        line = f"{label}: {len(texts) - len(differ)}/{len(texts)} texts give the same ids"
        if differ:
            raise UserError(f"{path}: {line}; first that differs: {differ[0]!r} (the tokenizer's pre-tokenizer "
                            f"or normalizer is not GPT-2's byte-level one)")
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------
# the stage

def default_output(folder, file_type):
    folder = Path(folder).resolve()
    return folder.parent / f"{folder.name}.{file_type}.gguf"


def chat_config_target(output):
    return Path(output).with_suffix(CHAT_CONFIG_SUFFIX)


def find_chat_config(folder, weights):
    """chat_config.json of the weights' folder, or of the folder given, or (a checkpoint, an adapter/
    inside a run) of the folder above."""
    for candidate in (weights, Path(folder), weights.parent):
        if (candidate / CHAT_CONFIG_NAME).is_file():
            return candidate / CHAT_CONFIG_NAME
    return None


def replace_atomically(source_bytes, target):
    tmp = Path(f"{target}.tmp-{os.getpid()}")
    tmp.write_bytes(source_bytes)
    os.replace(tmp, target)


def export(folder, output, file_type, base=None, quantize_bin=QUANTIZE_BIN):
    """Writes the GGUF and its chat_config copy; returns the lines to print."""
    if file_type not in TYPES:  # a notebook's defaults block is not checked by argparse
        raise UserError(f"TYPE {file_type!r}: choose one of {', '.join(TYPES)}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("the gguf package is not installed (pip install gguf): it writes the file")
    binary = None
    if file_type == "q4_k_m":
        binary = shutil.which(quantize_bin)
        if binary is None:
            raise UserError(f"--type q4_k_m needs llama.cpp's {quantize_bin} on PATH (not found); "
                            f"--type q8_0 and f16 need nothing but the gguf package")
    weights = find_weights(folder)
    output = Path(output) if output else default_output(folder, file_type)
    if output.is_dir():
        raise UserError(f"{output}: is a folder; --output names the GGUF file to write")
    chat_config_path = find_chat_config(folder, weights)
    chat_config = read_json(chat_config_path) if chat_config_path else {}
    model, tokenizer_folder = load_model(weights, folder, base)
    tokenizer = load_tokenizer(tokenizer_folder)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{output}.tmp-{os.getpid()}")
    f16_tmp = Path(f"{output}.f16.tmp-{os.getpid()}")
    lines = [f"model: {weights}" + (" (LoRA adapter merged onto its base)" if has_adapter(weights) else "")]
    try:
        if binary:
            shapes = write_gguf(f16_tmp, model, tokenizer, "f16", Path(folder).resolve().name, weights)
            lines += check_gguf(f16_tmp, shapes, model.config, tokenizer, check_texts(chat_config))
            llama_quantize(binary, f16_tmp, tmp, file_type)
            lines += check_gguf(tmp, shapes, model.config, tokenizer, [], full_check=False)
        else:
            shapes = write_gguf(tmp, model, tokenizer, file_type, Path(folder).resolve().name, weights)
            lines += check_gguf(tmp, shapes, model.config, tokenizer, check_texts(chat_config))
        os.replace(tmp, output)
    finally:
        for path in (tmp, f16_tmp):
            path.unlink(missing_ok=True)
    parameters = sum(p.numel() for p in model.parameters())
    lines.append(f"wrote {output} ({file_type}, {parameters:,} parameters, {output.stat().st_size / 2**20:.1f} MiB)")
    if chat_config_path:
        target = chat_config_target(output)
        replace_atomically(chat_config_path.read_bytes(), target)
        lines.append(f"wrote {target} (the prompt rule for chat scripts; the GGUF has no chat template)")
    else:
        print(f"{PROG}: warning: no {CHAT_CONFIG_NAME} in {folder}: a chat script will use the kit's defaults",
              file=sys.stderr)
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description="Export a model folder to a GGUF file for llama.cpp.")
    parser.add_argument("--model", default=MODEL,
                        help="model folder (its newest complete checkpoint-N/ when it has no weights of its own), "
                             "or a LoRA adapter folder (default %(default)s)")
    parser.add_argument("--output", default=OUTPUT,
                        help="the GGUF file (default <model>.<type>.gguf beside the model folder); "
                             f"chat_config.json is copied to <output without .gguf>{CHAT_CONFIG_SUFFIX}")
    parser.add_argument("--type", default=TYPE, choices=TYPES,
                        help="f16, q8_0, or q4_k_m through llama.cpp's llama-quantize (default %(default)s)")
    parser.add_argument("--base", default=BASE,
                        help="a LoRA adapter's base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--quantize-bin", default=QUANTIZE_BIN,
                        help="llama.cpp's quantizer for --type q4_k_m (default %(default)s, found on PATH)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        lines = export(args.model, args.output, args.type, base=args.base, quantize_bin=args.quantize_bin)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main([])
