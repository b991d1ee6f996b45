"""train_transformer.py: prompt and labels, tokenizer hygiene, over-fitting a tiny
model from scratch (and its answers coming back through the console chat), the
token-weighted closing figure, resuming with early stopping's patience, and the
one-line errors for bad input."""
import csv
import json
import os
import re

import pytest
import torch

import train_transformer as tt


# Tiny models run faster on one thread, above all on a CPU shared with other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")

# 20 distinct questions with short answers the tiny model has to learn by heart; most
# answers repeat words of their question, as an answer on topic does
PAIRS = [
    ("Привет! Как дела?", "Привет, дела хорошо."),
    ("Какая завтра погода?", "Завтра погода дождливая."),
    ("Что приготовить на ужин?", "На ужин приготовь макароны с сыром."),
    ("Ты сделал домашку?", "Домашку сделал почти всю."),
    ("Во сколько выезжаем?", "Выезжаем в семь утра."),
    ("Кажется, я заболел.", "Если заболел, выпей чаю и ложись спать."),
    ("Где мои ключи?", "Твои ключи на полке у двери."),
    ("Пойдём в кино?", "Пойдём в кино в субботу вечером."),
    ("Сколько стоит билет?", "Билет стоит двести рублей."),
    ("Как зовут твою собаку?", "Мою собаку зовут Жучка."),
    ("Ты любишь кофе?", "Кофе люблю с молоком."),
    ("Когда начнётся встреча?", "Встреча начнётся в десять."),
    ("Что купить в магазине?", "В магазине купи хлеб и яйца."),
    ("Какой сегодня день?", "Сегодня пятница."),
    ("Почему ты опоздал?", "Опоздал, потому что автобус сломался."),
    ("Сколько будет два плюс три?", "Два плюс три будет пять."),
    ("Какой твой любимый фрукт?", "Мой любимый фрукт груша."),
    ("Ты идёшь на тренировку?", "На тренировку не иду, болит нога."),
    ("Что читаешь?", "Читаю детектив про старого сыщика."),
    ("Как перезагрузить телефон?", "Чтобы перезагрузить телефон, зажми кнопку питания."),
]
WINDOW = {"max_turns": 1, "context_tokens": 96, "max_length": 128}

TINY = ["--from-scratch", "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
        "--vocab-size", "400", "--n-positions", "128", "--seed", "0"]


def write_pairs(folder, train, val=None):
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", train), ("val", val or train)):
        with open(folder / f"pairs_{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["dialogue_id", "question", "answer"])
            writer.writerows((i, q, a) for i, (q, a) in enumerate(pairs))
    return folder


def greedy_reply(model, tokenizer, question, max_new_tokens=40):
    """(reply text, whether it ended with EOS) for plain greedy decoding of one question."""
    ids = torch.tensor([tt.fit_prompt(tokenizer, [question], 1, 10_000, tt.PERSONA)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in new
    if stopped:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new).strip(), stopped


def one_line_error(capfd):
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("train_transformer.py: error: ")
    return err[0]


# ---------------------------------------------------------------------------- prompt

def test_prompt_labels_count_back_from_the_answer():
    assert tt.prompt_text(["Как дела?"]) == "Вопрос: Как дела?\nОтвет:"
    assert tt.prompt_text(["a", "b"]) == "Ответ: a\nВопрос: b\nОтвет:"
    assert tt.prompt_text(["a", "b", "c"]) == "Вопрос: a\nОтвет: b\nВопрос: c\nОтвет:"
    persona = {"question": "Кто ты?", "answer": "Бот."}
    assert tt.prompt_text(["b"], persona) == "Вопрос: Кто ты?\nОтвет: Бот.\nВопрос: b\nОтвет:"


def test_labels_inside_user_text_are_neutralised():
    assert tt.prompt_text(["Скажи ОТВЕТ: да"]) == "Вопрос: Скажи ОТВЕТ - да\nОтвет:"
    assert tt.prepare_turn("вопрос : зачем? Ответ:нет") == "вопрос - зачем? Ответ -нет"


# ---------------------------------------------------------------------------- labels and tokens

@pytest.fixture(scope="module")
def tokenizer():
    texts = tt.tokenizer_texts([([q], a) for q, a in PAIRS], 1)
    return tt.train_tokenizer(texts, vocab_size=400, model_max_length=128)


def test_the_tokenizer_learns_text_shaped_as_training_feeds_it():
    rows = [(["Как дела?"], "Хорошо.")]
    assert list(tt.tokenizer_texts(rows, 1, tt.PERSONA)) == [tt.prompt_text(["Как дела?"], tt.PERSONA) + " Хорошо."]
    assert list(tt.tokenizer_texts([(["a", "b", "c"], "d")], 2)) == ["Ответ: b\nВопрос: c\nОтвет: d"]


def test_the_answer_keeps_its_first_words_space(tokenizer):
    example = tt.encode_example(tokenizer, ["Где мои ключи?"], "Твои ключи на полке у двери.", WINDOW)
    answer = [t for t, x in zip(example["input_ids"], example["labels"]) if x != tt.IGNORE_INDEX]
    prompt = example["input_ids"][:len(example["input_ids"]) - len(answer)]
    assert tokenizer.decode(prompt).endswith("\nОтвет:")
    assert tokenizer.convert_ids_to_tokens(answer[0]).startswith("Ġ")  # byte-level BPE's space
    assert answer == tt.encode_text(tokenizer, " Твои ключи на полке у двери.") + [tokenizer.eos_token_id]
    # the text is the same as the whole exchange's, so the chat's continuation is what training taught
    assert tokenizer.decode(example["input_ids"]) == "Вопрос: Где мои ключи?\nОтвет: Твои ключи на полке у двери.</s>"


def test_pad_eos_bos_are_distinct_tokens_of_the_rugpt3_layout(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_batch_labels_are_masked_exactly_on_prompt_and_padding_and_carry_eos(tokenizer):
    pairs = [PAIRS[0], PAIRS[12], ("Да?", "Нет.")]
    examples = [tt.encode_example(tokenizer, [q], a, WINDOW) for q, a in pairs]
    batch = tt.make_collator(tokenizer, "cpu")(examples)
    width = batch["input_ids"].shape[1]
    assert width == max(len(e["input_ids"]) for e in examples)       # padded to the batch, not to 128
    for row, (q, a) in enumerate(pairs):
        prompt_len = len(tt.encode_text(tokenizer, tt.prompt_text([q])))
        answer = tt.answer_ids(tokenizer, a)
        length = prompt_len + len(answer)
        labels = batch["labels"][row].tolist()
        assert labels[:prompt_len] == [-100] * prompt_len
        assert labels[prompt_len:length] == answer
        assert labels[length:] == [-100] * (width - length)
        assert tokenizer.eos_token_id in labels
        assert batch["input_ids"][row, length:].tolist() == [tokenizer.pad_token_id] * (width - length)
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)


def test_overlong_question_is_cut_from_the_left_and_the_answer_kept(tokenizer):
    question = "Раз два три четыре пять. " * 20 + "Где ключи?"
    answer = "На полке у двери."
    window = {"max_turns": 1, "context_tokens": 30, "max_length": 40}
    example = tt.encode_example(tokenizer, [question], answer, window)
    assert len(example["input_ids"]) <= 40
    answer_ids = tt.answer_ids(tokenizer, answer)
    assert example["input_ids"][-len(answer_ids):] == answer_ids
    assert [x for x in example["labels"] if x != -100] == answer_ids
    prompt = tokenizer.decode(example["input_ids"][:-len(answer_ids)])
    assert prompt.startswith("Вопрос: ") and prompt.endswith(" Где ключи?\nОтвет:")
    assert len(example["input_ids"]) - len(answer_ids) <= 30  # the prompt budget, as the chat's
    # an answer longer than the whole budget is skipped, never cut
    assert tt.encode_example(tokenizer, ["Да?"], "очень длинный ответ " * 30, window) is None


# ---------------------------------------------------------------------------- loading models

def write_tokenizer_files(folder, special_tokens, tokenizer_config, eos_id_in_config):
    """A local model folder with GPT-2-style vocab.json/merges.txt tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(tt.tokenizer_texts([([q], a) for q, a in PAIRS], 1), trainers.BpeTrainer(
        vocab_size=350, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}), encoding="utf-8")
    # like ruGPT-3's config, the ids in config.json need not match the tokenizer
    config = GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=eos_id_in_config, eos_token_id=eos_id_in_config)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder, bpe.get_vocab_size()


def test_rugpt3_layout_folder_loads_with_its_own_eos_and_pad(tmp_path):
    folder, vocab = write_tokenizer_files(
        tmp_path / "rugpt3like", ["<pad>", "<s>", "</s>", "<unk>"],
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": "<unk>"}, eos_id_in_config=349)
    model, tokenizer = tt.load_pretrained(str(folder))
    model, tokenizer, _ = tt.fix_special_tokens(model, tokenizer)
    assert "<|endoftext|>" not in tokenizer.get_vocab()
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 0
    assert model.get_input_embeddings().weight.shape[0] == vocab     # nothing added, nothing resized


def test_gpt2_layout_folder_gets_a_pad_of_its_own(tmp_path):
    folder, vocab = write_tokenizer_files(
        tmp_path / "gpt2like", ["<|endoftext|>"],
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}, eos_id_in_config=0)
    model, tokenizer = tt.load_pretrained(str(folder))
    model, tokenizer, notes = tt.fix_special_tokens(model, tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert "added" in notes[2]
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == vocab + 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_from_scratch_model_uses_the_tokenizer_ids(tmp_path):
    args = tt.parse_args(TINY)
    model, tokenizer = tt.build_from_scratch([([q], a) for q, a in PAIRS], args, 1)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer)


# ---------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory):
    """A tiny model trained from scratch on the 20 pairs until it knows them by heart."""
    root = tmp_path_factory.mktemp("overfit")
    data = write_pairs(root / "data", PAIRS)
    out = root / "model"
    rc = tt.main(TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "150",
                         "--eval-steps", "75", "--logging-steps", "25", "--batch-size", "20", "--lr", "3e-3"])
    assert rc == 0
    return out


def test_overfits_20_pairs_and_stops_on_eos(overfit_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(overfit_model)
    model = AutoModelForCausalLM.from_pretrained(overfit_model).eval()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    results = [greedy_reply(model, tokenizer, q) for q, _ in PAIRS]
    exact = sum(stopped and reply == a for (reply, stopped), (_, a) in zip(results, PAIRS))
    assert exact >= 18, results


def test_the_console_chat_gives_them_back_with_its_default_settings(overfit_model, tmp_path, capsys):
    """Sampling, repetition penalty 1.15 and n-gram blocking 3 of chat_config.json, int8 on a
    CPU: all the chat's defaults, one question at a time. Blocking n-grams over the prompt,
    as transformers' own processors do, broke most of these answers, which repeat their
    question's words."""
    import system_prompt as sp

    script = tmp_path / "questions.txt"
    script.write_text("\n/reset\n".join(q for q, _ in PAIRS) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert sp.main(["--model", str(overfit_model), "--script", str(script), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    replies = [line[len("Бот: "):] for line in captured.out.splitlines()
               if line.startswith("Бот: ") and line != "Бот: " + sp.RESET_NOTICE]
    assert len(replies) == len(PAIRS)
    exact = sum(reply == answer for reply, (_, answer) in zip(replies, PAIRS))
    assert exact >= 19, list(zip(replies, (a for _, a in PAIRS)))


def test_output_folder_has_chat_config_curves_and_generation_ids(overfit_model):
    from transformers import GenerationConfig

    config = json.loads((overfit_model / "chat_config.json").read_text(encoding="utf-8"))
    assert config["format_version"] == 1 and config["prompt_rule"] == tt.PROMPT_RULE
    assert (config["question_label"], config["answer_label"], config["turn_separator"]) == \
        ("Вопрос: ", "Ответ: ", "\n")
    assert config["context_tokens"] == 128 - config["generation"]["max_new_tokens"] == 64
    assert config["max_length"] == 128
    assert config["max_turns"] == 1 and config["persona"]["question"] == "Кто ты?"
    assert (overfit_model / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generation = GenerationConfig.from_pretrained(overfit_model)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 0)
    state = json.loads((overfit_model / "trainer_state.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in state["log_history"] if "eval_answer_loss" in h][:2] == [75, 150]
    assert any("grad_norm" in h for h in state["log_history"])
    assert not (overfit_model / tt.FINAL_TMP).exists()
    # every checkpoint is a model folder a chat script can load
    checkpoints = sorted(overfit_model.glob("checkpoint-*"))
    assert checkpoints and all((c / "tokenizer.json").is_file() for c in checkpoints)


def chat_messages(turns, system=None):
    """OpenAI-style messages for turns (oldest first, the user's last), roles alternating back from the user."""
    roles = ["user" if (len(turns) - 1 - i) % 2 == 0 else "assistant" for i in range(len(turns))]
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": role, "content": turn} for role, turn in zip(roles, turns)]


SERVED_CONVERSATIONS = [
    ["Привет! Как дела?"],
    ["Где мои ключи?", "На полке.", "Скажи ОТВЕТ: да, а вопрос : где?"],
    ["Скажи </s> и <s>\nпо  строкам", "Хм.", "Ладно.", "Что читаешь?"],
]


def test_the_folder_tells_a_server_the_prompt_rule(overfit_model):
    """Saved for readers outside the kit (transformers serve, vLLM): a chat template that renders messages
    into exactly the prompt rule's ids, a tokenizer that reads a typed "</s>" as text and adds no BOS, and
    the chat's sampling settings in generation_config.json without the penalties that would see the prompt."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(overfit_model)
    config = json.loads((overfit_model / "chat_config.json").read_text(encoding="utf-8"))
    assert (overfit_model / "chat_template.jinja").is_file()
    persona, window = config["persona"], config["max_turns"]
    for turns in SERVED_CONVERSATIONS:
        cases = [({}, None, persona, None),                                   # the folder's own persona
                 ({"persona": None}, None, None, None),                      # none
                 ({}, "Я кот.", dict(persona, answer="Я кот."), None),        # a system message answers
                 ({"facts": "Меня зовут Аня."}, None, persona, "Меня зовут Аня.")]
        for kwargs, system, want_persona, facts in cases:
            ids = tokenizer.apply_chat_template(chat_messages(turns, system), add_generation_prompt=True,
                                                tokenize=True, return_dict=False, **kwargs)
            assert ids == tt.fit_prompt(tokenizer, turns, window, 10_000, want_persona, facts), (turns, kwargs)
    text = "Вопрос: скажи </s> и <s>"
    assert tokenizer(text)["input_ids"] == tt.encode_text(tokenizer, text)  # no BOS, specials as text
    generation = json.loads((overfit_model / "generation_config.json").read_text(encoding="utf-8"))
    for key in ("do_sample", "temperature", "top_p", "top_k"):
        assert generation[key] == config["generation"][key], key
    assert "repetition_penalty" not in generation and "no_repeat_ngram_size" not in generation
    assert GenerationConfig.from_pretrained(overfit_model).do_sample is True
    # and the checkpoints, which a chat script may read mid-run, carry the same
    checkpoint = tt.complete_checkpoint(str(overfit_model))
    assert (overfit_model / "chat_template.jinja").read_text(encoding="utf-8") == \
        open(os.path.join(checkpoint, "chat_template.jinja"), encoding="utf-8").read()


class StepRecorder:
    """Notes the step a run starts from and how many optimizer steps it takes."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.start = state.global_step

            def on_step_end(self, args, state, control, **kwargs):
                recorder.steps += 1

        self.callback, self.start, self.steps = Callback(), None, 0


def test_resume_continues_from_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "data", PAIRS)
    out = tmp_path / "model"
    common = TINY + ["--data-dir", str(data), "--output", str(out), "--eval-steps", "2", "--batch-size", "4",
                     "--save-total-limit", "5"]
    assert tt.main(common + ["--max-steps", "4"]) == 0
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    # a save cut short by a crash: no trainer_state.json, so it must not be resumed from
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "config.json").write_text("{}", encoding="utf-8")

    recorder = StepRecorder()
    make_callbacks = tt.make_callbacks
    monkeypatch.setattr(tt, "make_callbacks", lambda args: make_callbacks(args) + [recorder.callback])
    assert tt.main(common + ["--max-steps", "6", "--resume"]) == 0
    assert (recorder.start, recorder.steps) == (4, 2)
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 6


def test_the_closing_figure_is_the_token_weighted_validation_loss(tmp_path, capsys):
    """The loss printed at the end is perplexity.py's answer figure on the validation split:
    total NLL over total answer tokens, not Trainer's mean of batch means."""
    import perplexity

    # answers the training data has, then longer ones it has nothing like: rows of unequal weight
    val = PAIRS[:12] + [(q, "xq zv wj kx qz vw jq xq zv wj kx") for q, _ in PAIRS[12:]]
    data = write_pairs(tmp_path / "data", PAIRS, val)
    out = tmp_path / "model"
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "20", "--eval-steps", "20",
                           "--batch-size", "4", "--lr", "3e-3"]) == 0
    printed = re.search(r"validation loss on answer tokens (\d+\.\d+) .*perplexity (\d+\.\d+)",
                        capsys.readouterr().out)
    report = perplexity.evaluate_perplexity(out, data, split="val", rows=0, progress=False)
    assert report["rows_scored"] == len(PAIRS)
    assert float(printed.group(1)) == pytest.approx(report["answer_nll_per_token"], abs=1e-4)
    assert float(printed.group(2)) == pytest.approx(report["answer_perplexity"], abs=0.01)
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    [last_eval] = [h for h in state["log_history"] if "eval_answer_loss" in h]
    assert state["best_metric"] == last_eval["eval_answer_loss"]
    # the mean of five batch means is another number: a batch of short answers weighs as much as one of long
    assert abs(last_eval["eval_loss"] - last_eval["eval_answer_loss"]) > 1e-3


class CrashAfterSaving(Exception):
    pass


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    """Early stopping's patience counter goes into the checkpoint and comes back on --resume."""
    from transformers import TrainerCallback

    # the validation answers are nothing the training data has: their loss falls at first (the
    # model learns EOS and spaces), then rises, and early stopping ends the run
    val = [(q, "xq zv wj kx qz vw jq") for q, _ in PAIRS]
    data = write_pairs(tmp_path / "data", PAIRS, val)
    out = tmp_path / "model"
    common = TINY + ["--data-dir", str(data), "--output", str(out), "--eval-steps", "2", "--batch-size", "4",
                     "--save-total-limit", "50", "--patience", "2", "--max-steps", "60", "--lr", "3e-3"]
    assert tt.main(common) == 0
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [h["eval_answer_loss"] for h in state["log_history"] if "eval_answer_loss" in h]
    stop = state["global_step"]
    assert stop < 60 and losses[-1] > losses[-2] > min(losses)  # stopped early, by patience
    crash_step = stop - 2  # after one validation without improvement: the counter stands at 1

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == crash_step:
                raise CrashAfterSaving

    make_callbacks = tt.make_callbacks
    monkeypatch.setattr(tt, "make_callbacks", lambda args: make_callbacks(args) + [Crash()])
    with pytest.raises(CrashAfterSaving):
        tt.main(common)
    monkeypatch.setattr(tt, "make_callbacks", make_callbacks)
    assert tt.complete_checkpoint(str(out)).endswith(f"checkpoint-{crash_step}")
    assert tt.main(common + ["--resume"]) == 0
    resumed = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    assert resumed["global_step"] == stop


# ---------------------------------------------------------------------------- bad input

def test_missing_data_files(tmp_path, capfd):
    assert tt.main(TINY + ["--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m")]) == 1
    assert "pairs_train.csv: data file not found" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()


def test_data_file_of_the_wrong_kind(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = write_pairs(tmp_path / "data", PAIRS)
    pq.write_table(pa.table({"sample": [["a", "b"]]}), data / "pairs_train.csv")   # parquet under a .csv name
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m")]) == 1
    assert "pairs_train.csv" in one_line_error(capfd)
    write_pairs(data, PAIRS)
    (data / "pairs_val.csv").write_text("id,text\n1,привет\n", encoding="utf-8")
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m")]) == 1
    assert "pairs_val.csv: no column answer, question" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()


def test_the_folder_records_whose_voice_the_data_was(tmp_path, capfd):
    """create_dataset.py --as writes voice.json beside the splits; chat_config.json carries it as
    "voice" (null for everyone's turns), and a broken voice.json is one line before any training."""
    data = write_pairs(tmp_path / "data", PAIRS)
    out = tmp_path / "model"
    common = TINY + ["--data-dir", str(data), "--output", str(out), "--max-steps", "2", "--eval-steps", "2",
                     "--batch-size", "4"]
    assert tt.main(common) == 0
    assert json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["voice"] is None
    voice = {"keys": ["user111"], "names": ["Вадим Петров"]}
    (data / "voice.json").write_text(json.dumps(voice, ensure_ascii=False), encoding="utf-8")
    assert tt.main(common) == 0
    assert json.loads((out / "chat_config.json").read_text(encoding="utf-8"))["voice"] == voice
    assert "voice: Вадим Петров (user111)" in capfd.readouterr().out
    (data / "voice.json").write_text('{"keys": "user111"}', encoding="utf-8")
    assert tt.main(common + ["--output", str(tmp_path / "m")]) == 1
    assert "voice.json: expected" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()


def test_unreachable_hub_points_to_offline_options(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_pairs(tmp_path / "data", PAIRS)
    assert tt.main(["--data-dir", str(data), "--output", str(tmp_path / "m"), "--device", "cpu"]) == 1
    line = one_line_error(capfd)
    assert "ai-forever/rugpt3small_based_on_gpt2" in line and "unreachable" in line
    assert "--from-scratch" in line and "local model folder" in line
    assert not (tmp_path / "m").exists()


def test_folder_that_is_not_a_causal_lm(tmp_path, capfd):
    data = write_pairs(tmp_path / "data", PAIRS)
    lstm = tmp_path / "lstm_pytorch"
    lstm.mkdir()
    (lstm / "config.json").write_text(json.dumps({"kit_model": "lstm_pytorch", "format_version": 1}))
    assert tt.main(["--data-dir", str(data), "--output", str(tmp_path / "m"), "--model", str(lstm)]) == 1
    assert "not a transformers causal language model" in one_line_error(capfd)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert tt.main(["--data-dir", str(data), "--output", str(tmp_path / "m"), "--model", str(bert)]) == 1
    assert "'t5' is not a causal language model" in one_line_error(capfd)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tt.main(["--data-dir", str(data), "--output", str(tmp_path / "m"), "--model", str(empty)]) == 1
    assert "no config.json" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()


def test_resume_with_nothing_to_resume_and_a_bad_model_shape(tmp_path, capfd):
    data = write_pairs(tmp_path / "data", PAIRS)
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m"), "--resume"]) == 1
    assert "--resume found no complete checkpoint" in one_line_error(capfd)
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m"), "--n-embd", "33"]) == 1
    assert "--n-embd 33 must be a multiple of --n-head 2" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()


def test_output_folder_holding_something_else_is_left_alone(tmp_path, capfd):
    data = write_pairs(tmp_path / "data", PAIRS)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("мои заметки", encoding="utf-8")
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(out)]) == 1
    assert "choose another --output" in one_line_error(capfd)
    assert os.listdir(out) == ["notes.txt"]


def test_a_tokenizer_without_eos_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(tt.tokenizer_texts([([q], a) for q, a in PAIRS], 1), trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<pad>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    broken = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(broken), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(tt.UserError, match="no EOS in its vocabulary"):
        tt.fix_special_tokens(model, broken)


def test_persona_leads_the_training_prompt_and_is_not_scored():
    tokenizer = tt.train_tokenizer(tt.tokenizer_texts([([q], a) for q, a in PAIRS], 1, tt.PERSONA), 400, 128)
    example = tt.encode_example(tokenizer, ["Как дела?"], "Хорошо.", WINDOW, tt.PERSONA)
    prompt_len = len(tt.encode_text(tokenizer, tt.prompt_text(["Как дела?"], tt.PERSONA)))
    assert tokenizer.decode(example["input_ids"][:prompt_len]).startswith("Вопрос: Кто ты?")
    assert example["labels"][:prompt_len] == [tt.IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]


def test_a_defaults_block_device_outside_the_choices_is_one_line(tmp_path, capfd, monkeypatch):
    """argparse checks choices only on the command line; DEVICE set in the defaults block (a notebook) is checked too."""
    data = write_pairs(tmp_path / "data", PAIRS)
    monkeypatch.setattr(tt, "DEVICE", "tpu")
    argv = [a for a in TINY if a not in ("--device", "cpu")]
    assert tt.main(argv + ["--data-dir", str(data), "--output", str(tmp_path / "m")]) == 1
    assert "--device 'tpu': must be one of auto, cpu, cuda" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()
