"""The one prompt rule: the same block of code in every script that builds prompts,
the same token ids for a conversation in training, chat, perplexity.py and
evaluate.py for every tokenizer layout ruGPT-3 is known in, with and without a
persona; special tokens chosen from the vocabulary; decoding that never looks at
the prompt."""
import json
import re
import unicodedata

import pytest
import torch

import evaluate
import perplexity
import system_prompt as sp
import train_medium_context as tm
import train_transformer as tt

torch.set_num_threads(1)

PERSONA = tt.PERSONA
BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

# Conversations (turns oldest first, the question last) and the answer, with what the rule must handle:
# a label inside a turn, a special token's spelling typed by a user, decomposed Unicode, stray whitespace,
# and conversations that the turn window or the token budget must cut.
CONVERSATIONS = [
    (["Привет! Меня зовут Аня, я живу в Казани.", "Очень приятно, Аня!", "привет </s> Вопрос: кто ты"],
     "Я помощник, а тебя зовут Аня."),
    (["Ответ: сам\nотвечу", "Хорошо.", "Ещ\u0435\u0308 раз:\tкак   дела?"], "Всё хорошо, спасибо."),
    (["Какая завтра погода?"], "Обещают дождь и ветер, возьми зонт."),
    ([f"Реплика номер {i}, довольно длинная, про погоду и ужин." for i in range(9)], "Давай закажем пиццу."),
    (["Старый вопрос", "Старый ответ", " ".join(f"слово{i}" for i in range(150)) + " а где ключи?"],
     "На полке у двери."),
]


def test_chat_config_keeps_its_old_keys_and_records_the_rule():
    window = {"max_turns": 16, "context_tokens": 320, "max_length": 384, "max_new_tokens": 64}
    config = tm.chat_config(window, PERSONA)
    assert (config["format_version"], config["question_label"], config["answer_label"], config["turn_separator"]) \
        == (1, "Вопрос: ", "Ответ: ", "\n")
    assert config["prompt_rule"] == tt.PROMPT_RULE == 2
    assert (config["max_turns"], config["context_tokens"], config["max_length"]) == (16, 320, 384)
    assert config["context_tokens"] + config["generation"]["max_new_tokens"] == config["max_length"]


# ---------------------------------------------------------------- the rule itself
def test_the_prompt_ends_at_the_colon_and_the_answer_keeps_its_space():
    assert tt.prompt_text(["Как дела?"]) == "Вопрос: Как дела?\nОтвет:"
    assert tt.prompt_text(["a", "b"]) == "Ответ: a\nВопрос: b\nОтвет:"
    assert tt.prompt_text(["a", "b", "c"], PERSONA) == (
        "Вопрос: Кто ты?\nОтвет: Я дружелюбный помощник. Отвечаю коротко и по делу.\n"
        "Вопрос: a\nОтвет: b\nВопрос: c\nОтвет:")
    assert tt.prompt_text(["c"], PERSONA, facts="Тебя зовут Аня.") == (
        "Вопрос: Кто ты?\nОтвет: Я дружелюбный помощник. Отвечаю коротко и по делу.\n"
        "Вопрос: Что ты обо мне знаешь?\nОтвет: Тебя зовут Аня.\nВопрос: c\nОтвет:")


def test_a_turn_is_one_normalised_line_without_labels():
    assert tt.prepare_turn("  Ответ: сам\nотвечу\u00a0 \t Вопрос :да ") == "Ответ - сам отвечу Вопрос -да"
    decomposed = "Ещ\u0435\u0308 раз"
    assert tt.prepare_turn(decomposed) == unicodedata.normalize("NFC", decomposed) == "Ещё раз"


# ---------------------------------------------------------------- tokenizer layouts
def train_bpe(specials, extra_last=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [tt.prompt_text(turns, PERSONA) + " " + answer for turns, answer in CONVERSATIONS]
    texts += [tt.prompt_text(turns) + " " + answer for turns, answer in CONVERSATIONS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


def write_layout(folder, specials, tokenizer_config, last_token=None):
    """A pretrained-model folder as people download it: vocab.json + merges.txt, a
    tokenizer_config.json in a given layout and a tiny GPT-2 whose config ids need not match."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True)
    bpe = train_bpe(specials)
    bpe.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    if last_token:  # GPT-2 keeps <|endoftext|> as its vocabulary's last id (50256)
        vocab[last_token] = len(vocab)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder, vocab


# name: (special tokens of the vocabulary, tokenizer_config.json, a token appended last,
#        expected EOS, BOS and pad (None: a new pad token added))
LAYOUTS = {
    # ruGPT-3's current files: <pad> 0, <s> 1, </s> 2, <unk> 3, all declared
    "rugpt3": (BASE_SPECIALS, {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
                               "pad_token": "<pad>", "unk_token": "<unk>"}, None, "</s>", "<s>", "<pad>"),
    # the authors' notebook: EOS <|endoftext|>, the vocabulary's last id (50256 there), no pad declared
    "eos_50256": (BASE_SPECIALS, {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                                  "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, "<|endoftext|>",
                  "<|endoftext|>", "<|endoftext|>", "<pad>"),
    # the public ruGPT-3 XL conversion: <|endoftext|> 1 is EOS, <s> 2 BOS, add_bos_token false
    "xl_conversion": (["<pad>", "<|endoftext|>", "<s>", "<unk>"],
                      {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
                       "unk_token": "<unk>", "add_bos_token": False}, None, "<|endoftext|>", "<s>", "<pad>"),
    # a vocabulary with </s> and a config that declares no EOS: transformers would add a new <|endoftext|>
    "no_eos_declared": (BASE_SPECIALS, {"tokenizer_class": "GPT2Tokenizer"}, None, "</s>", "<s>", "<pad>"),
    # plain GPT-2: one special token for everything, no pad anywhere: the one case that adds a token
    "gpt2": (["<|endoftext|>"], {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                                 "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, None,
             "<|endoftext|>", "<|endoftext|>", None),
    # a config that asks for BOS on every encoding: prompts must still start without it
    "add_bos_token": (BASE_SPECIALS, {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
                                      "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True},
                      None, "</s>", "<s>", "<pad>"),
}


@pytest.fixture(scope="module")
def kit_folders(tmp_path_factory):
    """For every layout: the pretrained folder, and a kit model folder made from it by the
    trainer's own code (special tokens chosen, tokenizer and chat_config.json saved), with
    and without a persona."""
    root = tmp_path_factory.mktemp("layouts")
    made = {}
    for name, (specials, config, last, *_) in LAYOUTS.items():
        source, vocab = write_layout(root / name / "source", specials, config, last)
        for persona in (PERSONA, None):
            model, tokenizer = tt.load_pretrained(str(source))
            model, tokenizer, notes = tt.fix_special_tokens(model, tokenizer)
            window = tm.training_window(model, 256, 4)
            out = root / name / ("persona" if persona else "plain")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / "chat_config.json").write_text(json.dumps(tm.chat_config(window, persona), ensure_ascii=False),
                                                  encoding="utf-8")
            made[name, persona is not None] = {"source": source, "vocab": vocab, "model": model,
                                               "tokenizer": tokenizer, "notes": notes, "window": window,
                                               "persona": persona, "folder": out}
    return made


@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_tokens_come_from_the_vocabulary(layout, kit_folders):
    made = kit_folders[layout, True]
    tokenizer, vocab, model = made["tokenizer"], made["vocab"], made["model"]
    *_, eos, bos, pad = LAYOUTS[layout]
    assert tokenizer.eos_token == eos and tokenizer.eos_token_id == vocab[eos]
    assert tokenizer.bos_token == bos and tokenizer.bos_token_id == vocab[bos]
    if pad is None:  # added: a new id past the vocabulary, and an embedding row for it
        assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id >= len(vocab)
        assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
        assert "added" in made["notes"][2]
    else:
        assert tokenizer.pad_token == pad and tokenizer.pad_token_id == vocab[pad]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert made["notes"][0].startswith(f"EOS {eos!r} id {vocab[eos]}")
    if layout == "no_eos_declared":
        # transformers' default <|endoftext|> is passed over: a new token the model never saw
        assert "'<|endoftext|>' is not in its vocabulary" in made["notes"][0]
        assert "<|endoftext|>" not in vocab


def test_a_vocabulary_without_any_eos_is_refused(tmp_path):
    source, _ = write_layout(tmp_path / "src", ["<pad>", "<unk>"], {"tokenizer_class": "GPT2Tokenizer",
                                                                    "pad_token": "<pad>", "unk_token": "<unk>"})
    model, tokenizer = tt.load_pretrained(str(source))
    with pytest.raises(tt.UserError, match="no EOS in its vocabulary"):
        tt.fix_special_tokens(model, tokenizer)


def chat_ids(folder, turns):
    chat = sp.open_model_folder(folder, "cpu")
    settings = sp.resolve_settings(sp.parse_args(["--model", str(folder)]), chat)
    assert settings["warnings"] == []  # a folder of this kit, read with its own settings
    return sp.chat_prompt_ids(turns, settings, chat["tokenizer"]), chat["tokenizer"]


@pytest.mark.parametrize("persona", [True, False], ids=["persona", "no_persona"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_chat_perplexity_and_evaluate_give_the_same_ids(layout, persona, kit_folders):
    made = kit_folders[layout, persona]
    folder, tokenizer, window = made["folder"], made["tokenizer"], made["window"]
    rows = [{"dialogue_id": i, "turns": turns, "answer": answer} for i, (turns, answer) in enumerate(CONVERSATIONS)]
    _, ppl_tokenizer, _, ppl_settings = perplexity.load_model(folder, "cpu")
    ppl_built, _ = perplexity.build_scoring_examples(ppl_tokenizer, rows, ppl_settings)
    _, eval_tokenizer, _, eval_settings = evaluate.load_model(folder, "cpu")
    eval_built, _ = evaluate.build_scoring_examples(eval_tokenizer, rows, eval_settings)
    eval_budget = min(eval_settings["context_tokens"], eval_settings["n_positions"] - evaluate.MAX_NEW_TOKENS)
    cut = 0
    for row, ppl, ev in zip(rows, ppl_built, eval_built):
        example = tm.encode_example(tokenizer, row["turns"], row["answer"], window, made["persona"])
        prompt_length = example["labels"].count(tt.IGNORE_INDEX)
        prompt = example["input_ids"][:prompt_length]
        # perplexity.py and evaluate.py score exactly the training example
        assert ppl["ids"] == ev["ids"] == example["input_ids"]
        assert ppl["answer_start"] == ev["answer_start"] == prompt_length
        # the chat and evaluate's replies are given exactly the training prompt
        ids, chat_tokenizer = chat_ids(folder, row["turns"])
        assert ids == prompt
        assert evaluate.reply_prompt(eval_tokenizer, row["turns"], eval_settings, eval_budget) == prompt
        # the rule: no BOS, no EOS in a prompt, the answer is " " + answer + EOS, the prompt ends at the colon
        assert tokenizer.eos_token_id not in prompt and prompt[0] != tokenizer.bos_token_id
        assert example["input_ids"][prompt_length:] == tt.encode_text(tokenizer, " " + tt.prepare_turn(row["answer"])) \
            + [tokenizer.eos_token_id]
        assert chat_tokenizer.decode(ids).endswith("\nОтвет:")
        assert len(prompt) <= window["context_tokens"]
        lines = chat_tokenizer.decode(ids).count("\n") + 1
        cut += lines < 2 * persona + len(row["turns"]) + 1  # fewer lines than persona, turns and label
    assert cut >= 2  # the window (4 turns) and the budget did cut some conversations


def test_special_token_spelling_stays_text(kit_folders):
    for (layout, persona), made in kit_folders.items():
        tokenizer = made["tokenizer"]
        ids, _ = chat_ids(made["folder"], ["привет </s> Вопрос: кто ты <|endoftext|> <s>"])
        special = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
        assert not special & set(ids), layout
        assert tokenizer.decode(ids).endswith("привет </s> Вопрос - кто ты <|endoftext|> <s>\nОтвет:")


def test_a_tokenizer_that_adds_bos_still_gets_prompts_without_it(kit_folders):
    made = kit_folders["add_bos_token", True]
    tokenizer = made["tokenizer"]
    assert tokenizer("Вопрос")["input_ids"][0] == tokenizer.bos_token_id  # what the old chat call did
    ids, _ = chat_ids(made["folder"], ["Как дела?"])
    assert ids[0] != tokenizer.bos_token_id
    assert ids == tt.encode_text(tokenizer, tt.prompt_text(["Как дела?"], PERSONA))


# ---------------------------------------------------------------- fitting a conversation
def test_fitting_keeps_the_newest_turns_and_never_cuts_the_answer(kit_folders):
    tokenizer = kit_folders["rugpt3", True]["tokenizer"]
    turns = [f"Реплика {i} про погоду" for i in range(12)] + ["Последний вопрос"]
    whole = tt.encode_text(tokenizer, tt.prompt_text(turns[-5:], PERSONA))
    assert tt.fit_prompt(tokenizer, turns, 5, 10_000, PERSONA) == whole  # the turn window
    budget = len(whole) - 1
    kept = tt.fit_prompt(tokenizer, turns, 5, budget, PERSONA)
    assert kept == tt.encode_text(tokenizer, tt.prompt_text(turns[-4:], PERSONA))  # the oldest went first
    # a long answer leaves less room to the prompt; the answer itself is whole
    answer = "Завтра обещают дождь и ветер, возьми зонт и тёплую куртку."
    target = tt.answer_ids(tokenizer, answer)
    max_length = budget + len(target) - 5
    prompt, whole_answer = tt.encode_exchange(tokenizer, turns, answer, 5, budget, max_length, PERSONA)
    assert whole_answer == target and target[-1] == tokenizer.eos_token_id
    assert len(prompt) <= budget - 5 and len(prompt) + len(target) <= max_length
    assert tokenizer.decode(target[:-1]) == " " + answer
    persona_only = len(tt.encode_text(tokenizer, tt.prompt_text([""], PERSONA)))
    assert tt.encode_exchange(tokenizer, turns, answer, 5, budget, persona_only + len(target) - 1, PERSONA) is None


def test_an_overlong_question_keeps_its_end_from_a_word(kit_folders):
    tokenizer = kit_folders["rugpt3", True]["tokenizer"]
    question = " ".join(f"слово{i}" for i in range(200)) + " а где ключи?"
    ids = tt.fit_prompt(tokenizer, ["Старый вопрос", "Старый ответ", question], 16, 80, PERSONA)
    text = tokenizer.decode(ids)
    assert len(ids) <= 80 and text.endswith(" а где ключи?\nОтвет:") and "Старый" not in text
    kept = text.split("\n")[2][len("Вопрос: "):]
    assert question.endswith(" " + kept) and re.fullmatch(r"слово\d+", kept.split()[0])
    persona_only = len(tt.encode_text(tokenizer, tt.prompt_text([""], PERSONA)))
    assert tt.fit_prompt(tokenizer, [question], 16, persona_only - 1, PERSONA) is None


def test_facts_come_first_after_the_persona_and_only_when_they_fit(kit_folders):
    tokenizer = kit_folders["rugpt3", True]["tokenizer"]
    facts = "Тебя зовут Аня, ты живёшь в Казани."
    turns = ["Привет!", "Привет.", "Как меня зовут?"]
    text = tokenizer.decode(tt.fit_prompt(tokenizer, turns, 16, 10_000, PERSONA, facts))
    assert text == tt.prompt_text(turns, PERSONA, facts)
    tight = len(tt.encode_text(tokenizer, tt.prompt_text(["Как меня зовут?"], PERSONA, facts)))
    text = tokenizer.decode(tt.fit_prompt(tokenizer, turns, 16, tight, PERSONA, facts))
    assert text == tt.prompt_text(["Как меня зовут?"], PERSONA, facts)  # the facts outrank older turns
    small = len(tt.encode_text(tokenizer, tt.prompt_text(["Как меня зовут?"], PERSONA))) + 1
    assert "Что ты обо мне знаешь?" not in tokenizer.decode(tt.fit_prompt(tokenizer, turns, 16, small, PERSONA,
                                                                              facts))


MANY_FACTS = [("name", "Аня"), ("city", "Казань"), ("age", "25"), ("occupation", "программист"),
              ("pet", "кот Барсик"), ("like", "корейские дорамы"), ("like", "кофе"), ("dislike", "запах сигарет"),
              ("plan", "ехать на дачу (в субботу)")]


def test_training_and_chat_cut_the_facts_exchange_alike(kit_folders):
    """Where the facts do not all fit, training (the facts column's text) and the chat (the user's stored
    facts) cut the exchange the same way, to the same ids: plans and likes go, the name stays."""
    made = kit_folders["rugpt3", True]
    tokenizer, window = made["tokenizer"], made["window"]
    whole = sp.render_facts_answer(MANY_FACTS)  # what create_dataset.py writes into the facts column
    turns, answer = ["Привет, я тут.", "Привет!", "Что посоветуешь на вечер?"], "Посмотри дораму."
    header = len(tt.encode_text(tokenizer, tt.prompt_text([""], PERSONA)))
    full = len(tt.encode_text(tokenizer, tt.prompt_text([""], PERSONA, whole)))
    cut_seen = 0
    for budget in range(header + 12, full + 40, 3):
        tight = dict(window, context_tokens=budget)
        example = tm.encode_example(tokenizer, turns, answer, tight, PERSONA, whole)
        trained = example["input_ids"][:example["labels"].count(tt.IGNORE_INDEX)]
        effective = min(budget, window["max_length"] - len(tt.answer_ids(tokenizer, answer)))
        settings = {"max_turns": window["max_turns"], "budget": effective, "persona": PERSONA, "facts_exchange": True}
        assert sp.chat_prompt_ids(turns, settings, tokenizer, MANY_FACTS) == trained, budget
        text = tokenizer.decode(trained)
        if "Что ты обо мне знаешь?" in text and "в субботу" not in text:
            cut_seen += 1
            assert "Тебя зовут Аня" in text  # the name goes last
    assert cut_seen >= 3  # budgets where the exchange was kept but cut


def test_prompt_window_reads_training_and_warns_when_widened():
    config = {"prompt_rule": 2, "max_turns": 4, "context_tokens": 192}
    assert tt.prompt_window(config, 2048, 64) == (4, 192, [])
    assert tt.prompt_window(config, 2048, 64, max_turns=2, context_tokens=100) == (2, 100, [])
    turns, budget, notes = tt.prompt_window(config, 2048, 64, max_turns=8, context_tokens=1000)
    assert (turns, budget) == (8, 1000) and len(notes) == 2
    assert "--max-turns 8" in notes[0] and "4 turns" in notes[0] and "--context-tokens 1000" in notes[1]
    assert tt.prompt_window(config, 256, 128)[1] == 128  # the reply's room comes first
    old = {"max_turns": 1, "context_tokens": 1984}  # written by the kit before this rule
    _, _, notes = tt.prompt_window(old, 2048, 64)
    assert len(notes) == 1 and "older kit" in notes[0] and "\n" not in notes[0]
    assert tt.prompt_window(None, 512, 64) == (tt.DEFAULT_MAX_TURNS, 448, [])


# ---------------------------------------------------------------- decoding on the reply only
def test_ngram_blocking_and_penalty_look_at_the_reply_only():
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    prompt = [5, 6, 7, 9]
    scores = torch.zeros(1, 20)
    scores[0, 7] = scores[0, 5] = 2.0
    generation = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3}
    processors = sp.reply_processors(generation, len(prompt))
    reply_so_far = torch.tensor([prompt + [5, 6]])
    # transformers' own processors ban 7 (5 6 7 is in the prompt) and penalize 5 and 7
    whole = NoRepeatNGramLogitsProcessor(3)(reply_so_far, scores.clone())
    assert whole[0, 7] == float("-inf")
    assert RepetitionPenaltyLogitsProcessor(1.5)(reply_so_far, scores.clone())[0, 7] < 2.0
    out = scores.clone()
    for processor in processors:
        out = processor(reply_so_far, out)
    assert out[0, 7] == 2.0  # the question's words may be repeated
    assert out[0, 5] == pytest.approx(2.0 / 1.5)  # 5 is in the reply: penalized
    # inside the reply itself blocking still works
    looped = torch.tensor([prompt + [5, 6, 7, 5, 6]])
    out = scores.clone()
    for processor in processors:
        out = processor(looped, out)
    assert out[0, 7] == float("-inf")


@pytest.mark.parametrize("raw, expected", [
    ("Хороший вопрос: погода будет тёплой.", "Хороший вопрос: погода будет тёплой."),
    ("Мой ответ: да.", "Мой ответ: да."),
    ("Да.\nВопрос: а ты?", "Да.\n"),
    ("Ответ: Да.\n  ответ : нет", " Да.\n"),
])
def test_a_reply_is_cut_only_at_a_label_that_starts_a_line(raw, expected):
    assert sp.cut_at_next_turn(raw) == evaluate.cut_at_next_turn(raw) == expected


def test_the_chat_stops_at_a_label_that_starts_a_line():
    assert sp.STOP_STRINGS == ["\nВопрос:", "\nОтвет:"]

