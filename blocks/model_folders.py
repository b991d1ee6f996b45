"""Model folders: finding the weights of a transformers folder of the kit (or its newest complete
checkpoint) and loading its model, tokenizer and prompt settings, for perplexity.py and evaluate.py.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses, and defines UserError and
resolve_weights(folder) (the weights folder, or a UserError in its own words; newest_weights helps)."""

def has_weights(folder):
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def read_json(path):
    """A JSON object from a model folder's file (config.json, chat_config.json); a UserError otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def unfinished_lora_run(folder):
    """Whether a folder with no model is a --lora run that has not finished: its
    checkpoint-N/ folders hold the adapter only, and the merged model comes at the end."""
    return any((path / "adapter_config.json").is_file() for path in Path(folder).glob("checkpoint-*"))


def newest_weights(folder):
    """The folder itself if it holds weights, else its newest complete checkpoint-N/, else None."""
    folder = Path(folder)
    if has_weights(folder):
        return folder
    checkpoints = [p for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit() and has_weights(p)
                   and (p / "trainer_state.json").is_file()]  # written last by Trainer
    if not checkpoints and unfinished_lora_run(folder):
        raise UserError(f"{folder}: a --lora run that has not finished: its checkpoint-N/ folders hold the "
                        f"adapter only, and the merged model is saved when it ends (--resume --lora continues it)")
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


def pick_device(name):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return name


def load_model(folder, device, max_turns=None, context_tokens=None):
    """Model, tokenizer and prompt settings (the chat's generation settings too) of a transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    weights_dir = resolve_weights(folder)
    config = read_json(weights_dir / "config.json")
    if "model_type" not in config:
        raise UserError(f"{folder}: {weights_dir / 'config.json'} has no model_type; not a transformers model")
    tokenizer_dir = next((d for d in (weights_dir, folder) if any(
        (d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))), None)
    if tokenizer_dir is None:
        raise UserError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json) beside the weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # a broken tokenizer file surfaces as many exception types
        raise UserError(f"{tokenizer_dir}: cannot load the tokenizer ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no eos_token")
    try:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"{weights_dir}: cannot load the model ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    model.to(device).eval()
    chat = read_chat_config(folder, weights_dir)
    n_positions = (getattr(model.config, "max_position_embeddings", None)
                   or getattr(model.config, "n_positions", None) or 1024)
    settings = prompt_settings(chat, int(n_positions), max_turns, context_tokens)
    settings["generation"] = (chat or {}).get("generation") or {}
    return model, tokenizer, weights_dir, settings
