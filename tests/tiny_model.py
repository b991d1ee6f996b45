"""A tiny GPT-2 model folder shaped like the kit's trained ones, for tests of
the scripts that read model folders (chat, bot, evaluation).

Its weights are random: it exercises loading, prompting and generation, not
quality. The tokenizer is a byte-level BPE trained on a few Russian lines, with
the special tokens of ruGPT-3's current files.
"""
import json
from pathlib import Path

TRAINING_LINES = [
    "Вопрос: Привет! Как дела?", "Ответ: Привет, всё хорошо, спасибо.",
    "Вопрос: Какая завтра погода?", "Ответ: Обещают дождь и ветер.",
    "Вопрос: Что приготовить на ужин?", "Ответ: Сделай макароны с сыром.",
    "Вопрос: Меня зовут Аня, я живу в Казани.", "Ответ: Очень приятно, Аня!",
    "Вопрос: Как перезагрузить телефон?", "Ответ: Зажми кнопку питания на десять секунд.",
]

CHAT_CONFIG = {
    "format_version": 1,
    "prompt_rule": 2,  # the kit's prompt rule the folder is for (readers warn about a folder without it)
    "question_label": "Вопрос: ",
    "answer_label": "Ответ: ",
    "turn_separator": "\n",
    "persona": {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."},
    "context_tokens": 192,
    "max_turns": 16,  # the context trainer's window: the budget, not the window, cuts the tests' chats
    "generation": {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                   "top_k": 50, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3},
}


def build_tiny_tokenizer(lines=TRAINING_LINES, vocab_size=400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_tiny_model(folder, lines=TRAINING_LINES, n_positions=256, seed=0, chat_config=None):
    """Write a loadable model folder (config, safetensors, tokenizer, generation
    config, chat_config.json) and return its path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(lines)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = dict(CHAT_CONFIG if chat_config is None else chat_config)
    (folder / "chat_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


# One conversation in the kit's prompt format (the persona first), for build_parrot_model.
PARROT_TEXT = ("Вопрос: Кто ты?\nОтвет: Я дружелюбный помощник. Отвечаю коротко и по делу.\n"
               "Вопрос: Привет! Как дела?\nОтвет: Привет, всё хорошо, спасибо.\n"
               "Вопрос: Какая завтра погода?\nОтвет: Обещают дождь и ветер.")
PARROT_QUESTION = "Привет! Как дела?"
PARROT_ANSWER = "Привет, всё хорошо, спасибо."


def build_parrot_model(folder, steps=300, seed=0, chat_config=None):
    """The tiny model trained on PARROT_TEXT until it knows it by heart (about a second): asked
    PARROT_QUESTION after the persona, greedy decoding writes PARROT_ANSWER and then goes on to
    write the next question itself ("\\nВопрос: ..."), which a chat must cut. Its replies are
    known in advance, so two ways of running it (in-process, a server) can be compared."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder = build_tiny_model(folder, seed=seed, chat_config=chat_config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder)
    ids = torch.tensor([tokenizer(PARROT_TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    return folder
