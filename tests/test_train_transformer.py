"""train_transformer.py: prompt and labels, tokenizer hygiene, over-fitting a tiny
model from scratch, resuming, and the one-line errors for bad input."""
import csv
import json
import os

import pytest
import torch

import train_transformer as tt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, above all on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# 20 distinct questions with short answers the tiny model has to learn by heart
PAIRS = [
    ("Привет! Как дела?", "Привет, всё хорошо."),
    ("Какая завтра погода?", "Обещают дождь."),
    ("Что приготовить на ужин?", "Сделай макароны с сыром."),
    ("Ты сделал домашку?", "Почти, осталась одна задача."),
    ("Во сколько выезжаем?", "Поезд в семь утра."),
    ("Кажется, я заболел.", "Выпей чаю и ложись спать."),
    ("Где мои ключи?", "На полке у двери."),
    ("Пойдём в кино?", "Давай, в субботу вечером."),
    ("Сколько стоит билет?", "Двести рублей."),
    ("Как зовут твою собаку?", "Её зовут Жучка."),
    ("Ты любишь кофе?", "Да, с молоком."),
    ("Когда начнётся встреча?", "В десять, в большой переговорке."),
    ("Что купить в магазине?", "Хлеб, молоко и яйца."),
    ("Какой сегодня день?", "Сегодня пятница."),
    ("Почему ты опоздал?", "Автобус сломался."),
    ("Где ближайшая аптека?", "За углом, напротив банка."),
    ("Можно взять твою ручку?", "Конечно, бери."),
    ("Ты идёшь на тренировку?", "Нет, у меня болит нога."),
    ("Что читаешь?", "Детектив про старого сыщика."),
    ("Как перезагрузить телефон?", "Зажми кнопку питания."),
]

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
    """(reply text, whether it ended with EOS) for greedy decoding of one question."""
    inputs = tokenizer(tt.build_prompt([question], tt.PERSONA), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in new
    if stopped:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new), stopped


def one_line_error(capfd):
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("train_transformer.py: error: ")
    return err[0]


# ---------------------------------------------------------------------------- prompt

def test_prompt_labels_count_back_from_the_answer():
    assert tt.build_prompt(["Как дела?"]) == "Вопрос: Как дела?\nОтвет: "
    assert tt.build_prompt(["a", "b"]) == "Ответ: a\nВопрос: b\nОтвет: "
    assert tt.build_prompt(["a", "b", "c"]) == "Вопрос: a\nОтвет: b\nВопрос: c\nОтвет: "
    persona = {"question": "Кто ты?", "answer": "Бот."}
    assert tt.build_prompt(["b"], persona) == "Вопрос: Кто ты?\nОтвет: Бот.\nВопрос: b\nОтвет: "


def test_labels_inside_user_text_are_neutralised():
    assert tt.build_prompt(["Скажи ОТВЕТ: да"]) == "Вопрос: Скажи ОТВЕТ - да\nОтвет: "
    assert tt.neutralise_labels("вопрос : зачем? Ответ:нет") == "вопрос - зачем? Ответ -нет"


# ---------------------------------------------------------------------------- labels and tokens

@pytest.fixture(scope="module")
def tokenizer():
    texts = [tt.build_prompt([q]) + a for q, a in PAIRS]
    return tt.train_tokenizer(texts, vocab_size=400, model_max_length=128)


def test_pad_eos_bos_are_distinct_tokens_of_the_rugpt3_layout(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_batch_labels_are_masked_exactly_on_prompt_and_padding_and_carry_eos(tokenizer):
    pairs = [PAIRS[0], PAIRS[12], ("Да?", "Нет.")]
    examples = [tt.encode_example(tokenizer, [q], a, max_length=128) for q, a in pairs]
    batch = tt.make_collator(tokenizer, "cpu")(examples)
    width = batch["input_ids"].shape[1]
    assert width == max(len(e["input_ids"]) for e in examples)       # padded to the batch, not to 128
    for row, (q, a) in enumerate(pairs):
        prompt_len = len(tt.encode_text(tokenizer, tt.build_prompt([q])))
        answer = tt.encode_text(tokenizer, a) + [tokenizer.eos_token_id]
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
    example = tt.encode_example(tokenizer, [question], answer, max_length=40)
    assert len(example["input_ids"]) <= 40
    answer_ids = tt.encode_text(tokenizer, answer) + [tokenizer.eos_token_id]
    assert example["input_ids"][-len(answer_ids):] == answer_ids
    assert [x for x in example["labels"] if x != -100] == answer_ids
    prompt = tokenizer.decode(example["input_ids"][:-len(answer_ids)])
    assert prompt.startswith("Вопрос: ") and prompt.endswith("Где ключи?\nОтвет: ")
    # an answer longer than the whole budget is skipped, never cut
    assert tt.encode_example(tokenizer, ["Да?"], "очень длинный ответ " * 30, max_length=40) is None


# ---------------------------------------------------------------------------- loading models

def write_tokenizer_files(folder, special_tokens, tokenizer_config, eos_id_in_config):
    """A local model folder with GPT-2-style vocab.json/merges.txt tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([tt.build_prompt([q]) + a for q, a in PAIRS], trainers.BpeTrainer(
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
    model, tokenizer = tt.fix_special_tokens(model, tokenizer, str(folder))
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
    model, tokenizer = tt.fix_special_tokens(model, tokenizer, str(folder))
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == vocab + 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_from_scratch_model_uses_the_tokenizer_ids(tmp_path):
    args = tt.parse_args(TINY)
    model, tokenizer = tt.build_from_scratch([([q], a) for q, a in PAIRS], args)
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


def test_output_folder_has_chat_config_curves_and_generation_ids(overfit_model):
    from transformers import GenerationConfig

    config = json.loads((overfit_model / "chat_config.json").read_text(encoding="utf-8"))
    assert config["format_version"] == 1
    assert (config["question_label"], config["answer_label"], config["turn_separator"]) == \
        ("Вопрос: ", "Ответ: ", "\n")
    assert config["context_tokens"] == 128 - config["generation"]["max_new_tokens"] == 64
    assert config["max_turns"] == 1 and config["persona"]["question"] == "Кто ты?"
    assert (overfit_model / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generation = GenerationConfig.from_pretrained(overfit_model)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 0)
    state = json.loads((overfit_model / "trainer_state.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h][:2] == [75, 150]
    assert any("grad_norm" in h for h in state["log_history"])
    assert not (overfit_model / tt.FINAL_TMP).exists()
    # every checkpoint is a model folder a chat script can load
    checkpoints = sorted(overfit_model.glob("checkpoint-*"))
    assert checkpoints and all((c / "tokenizer.json").is_file() for c in checkpoints)


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
    from transformers import GPT2Config, GPT2LMHeadModel

    broken = tt.train_tokenizer([tt.build_prompt([q]) + a for q, a in PAIRS], 400, 128)
    broken.eos_token = None
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(broken), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(tt.UserError, match="no eos_token"):
        tt.fix_special_tokens(model, broken, "somewhere")


def test_training_prompt_is_the_prompt_the_chat_builds():
    """The model is trained on exactly the text system_prompt.py will show it."""
    import system_prompt as sp

    turns = ["Привет!\nКак  дела?", "Ответ: нормально", "А у тебя?"]
    for persona in (None, tt.PERSONA):
        chat = sp.render_prompt(persona, [sp.prepare_turn(t) for t in turns])
        assert tt.build_prompt(turns, persona) == chat


def test_persona_leads_the_training_prompt_and_is_not_scored():
    tokenizer = tt.train_tokenizer([tt.build_prompt([q], tt.PERSONA) + a for q, a in PAIRS], 400, 128)
    example = tt.encode_example(tokenizer, ["Как дела?"], "Хорошо.", 128, tt.PERSONA)
    prompt_len = len(tt.encode_text(tokenizer, tt.build_prompt(["Как дела?"], tt.PERSONA)))
    assert tokenizer.decode(example["input_ids"][:prompt_len]).startswith("Вопрос: Кто ты?")
    assert example["labels"][:prompt_len] == [tt.IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
