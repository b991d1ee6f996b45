"""perplexity.py: token-weighted perplexity of the answer and of the sequence,
checked against an independent computation on a tiny random model."""
import json
import math
import shutil

import pandas as pd
import pytest
import torch

import perplexity
import train_transformer
from tiny_model import CHAT_CONFIG, build_tiny_model

torch.set_num_threads(1)

# Dialogue rows of the context split: the turns before the answer (the question last) and the answer.
ROWS = [
    (1, ["Привет! Как дела?"], "Привет, всё хорошо, спасибо."),
    (1, ["Привет! Как дела?", "Привет, всё хорошо, спасибо.", "Что делаешь вечером?"],
     "Собираюсь в кино с друзьями, потом домой."),
    (2, ["Какая завтра погода?"], "Обещают дождь."),
    (3, ["Что приготовить на ужин?", "Сделай макароны с сыром.", "А ещё что-нибудь?", "Можно салат.",
         "Какой салат?"], "Греческий: огурцы, помидоры, сыр и маслины. Быстро и вкусно."),
    (4, ["Как перезагрузить телефон?"], "Зажми кнопку питания на десять секунд."),
]
PERSONA = CHAT_CONFIG["persona"]

# Rows of a context split with create_dataset.py's facts column (issue 14): the rendered answer to
# "Что ты обо мне знаешь?" from what the user side stated earlier; "" where nothing; the last too long to
# fit beside the persona in the 192-token budget, so the prompt rule leaves that exchange out.
FACTS = "Тебя зовут Аня, ты живёшь в Казани."
FACT_ROWS = [
    (5, ["Меня зовут Аня, я живу в Казани.", "Очень приятно, Аня!", "Какая завтра погода?"], "Обещают дождь.",
     FACTS),
    (6, ["Привет! Как дела?"], "Привет, всё хорошо, спасибо.", ""),
    (7, ["Что приготовить на ужин?"], "Сделай макароны с сыром.", "Ты любишь " + "очень " * 80 + "длинные истории."),
]


def write_split(folder, rows, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{"dialogue_id": d, "context": c, "answer": a} for d, c, a in rows],
                         columns=["dialogue_id", "context", "answer"])
    frame.to_parquet(folder / f"context_{split}.parquet")
    return folder


def write_split_with_facts(folder, rows, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"dialogue_id": d, "context": c, "answer": a, "facts": f} for d, c, a, f in rows],
                 columns=["dialogue_id", "context", "answer", "facts"]).to_parquet(folder / f"context_{split}.parquet")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def tiny_with_facts(tmp_path_factory):
    """The tiny model (same weights and tokenizer) in a folder whose training showed the facts exchange."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "f", chat_config={**CHAT_CONFIG, "facts": True})


def expected_prompt(turns):
    """The contract's prompt, spelled out by hand: persona, turns labelled back from the answer,
    the answer label without its space (the answer carries it)."""
    lines = ["Вопрос: " + PERSONA["question"], "Ответ: " + PERSONA["answer"]]
    for back, turn in enumerate(reversed(turns)):
        lines.insert(2, ("Вопрос: " if back % 2 == 0 else "Ответ: ") + turn)
    return "\n".join(lines) + "\nОтвет:"


def independent_answer_nll(folder, rows):
    """Per row: (sum of NLL of answer + EOS, count), one unpadded sequence at a time via the model's own loss,
    the window cut to the folder's max_turns as the chat does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for _, turns, answer in rows:
        turns = turns[-CHAT_CONFIG["max_turns"]:]
        prompt = tokenizer(expected_prompt(turns))["input_ids"]  # every row fits the 192-token budget whole
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.no_grad():
            mean_loss = model(input_ids=ids, labels=labels).loss.item()  # mean over the len(target) labels
        out.append((mean_loss * len(target), len(target)))
    return out


def test_prompt_constants_match_the_contract():
    assert (perplexity.QUESTION_LABEL, perplexity.ANSWER_LABEL, perplexity.TURN_SEPARATOR) == (
        "Вопрос: ", "Ответ: ", "\n")
    assert perplexity.prepare_turn("Ответ: да. вопрос :нет") == "Ответ - да. вопрос -нет"
    assert perplexity.prepare_turn("  Ответ: две\nстроки ") == "Ответ - две строки"  # one turn, one line


def test_prompt_labels_count_back_from_the_answer(tiny):
    _, tokenizer, _, settings = perplexity.load_model(tiny, "cpu")
    assert (settings["max_turns"], settings["context_tokens"]) == (CHAT_CONFIG["max_turns"], 192)
    turns = ["Привет!", "Привет, как дела?", "Хорошо. Что делаешь?"]
    rows = [{"turns": turns, "answer": "Ничего."}]
    [built], _ = perplexity.build_scoring_examples(tokenizer, rows, settings)
    assert tokenizer.decode(built["ids"]) == expected_prompt(turns) + " Ничего.</s>"
    assert built["answer_start"] == len(tokenizer(expected_prompt(turns))["input_ids"])
    assert built["sequence_start"] == len(tokenizer(expected_prompt([])[:-len("Ответ:")])["input_ids"])


def test_the_trained_turn_window_is_kept_and_a_flag_may_widen_it(tiny, tmp_path):
    lines = []
    report = perplexity.evaluate_perplexity(tiny, write_split(tmp_path / "d", ROWS), rows=0, progress=False,
                                            max_turns=20, warn=lines.append)
    assert report["max_turns"] == 20 and len(lines) == 1 and "--max-turns 20" in lines[0]
    narrow = perplexity.evaluate_perplexity(tiny, tmp_path / "d", rows=0, progress=False, max_turns=1,
                                            warn=lines.append)
    assert len(lines) == 1 and narrow["sequence_tokens"] < report["sequence_tokens"]
    assert narrow["answer_tokens"] == report["answer_tokens"]


def test_perplexity_equals_exp_of_token_weighted_mean_nll(tiny, tmp_path):
    data = write_split(tmp_path / "data", ROWS)
    report = perplexity.evaluate_perplexity(tiny, data, rows=0, batch_size=3, progress=False)
    per_row = independent_answer_nll(tiny, ROWS)
    total_nll = sum(n for n, _ in per_row)
    total_tokens = sum(c for _, c in per_row)
    assert report["answer_tokens"] == total_tokens
    assert report["answer_perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    chars = sum(len(a) + 1 for _, _, a in ROWS)
    assert report["answer_chars"] == chars
    assert report["bits_per_char"] == pytest.approx(total_nll / math.log(2) / chars, rel=1e-5)
    # The research's way (a mean of per-row means) gives a different number on rows of unequal length.
    per_row_mean = math.exp(sum(n / c for n, c in per_row) / len(per_row))
    assert abs(per_row_mean - report["answer_perplexity"]) > 1e-3 * report["answer_perplexity"]


def test_padding_and_batch_size_do_not_change_the_figures(tiny, tmp_path):
    data = write_split(tmp_path / "data", ROWS)
    one = perplexity.evaluate_perplexity(tiny, data, rows=0, batch_size=1, progress=False)
    many = perplexity.evaluate_perplexity(tiny, data, rows=0, batch_size=5, progress=False)
    for key in ("answer_perplexity", "sequence_perplexity", "bits_per_char"):
        assert one[key] == pytest.approx(many[key], rel=1e-5)


def test_answer_perplexity_ignores_the_prompt_tokens(tiny, tmp_path):
    short = write_split(tmp_path / "short", ROWS)
    reworded = [(d, c[:-1] + [c[-1] + " Ответь, пожалуйста, подробно и не торопясь, мне очень важно."], a)
                for d, c, a in ROWS]
    long = write_split(tmp_path / "long", reworded)
    a = perplexity.evaluate_perplexity(tiny, short, rows=0, progress=False)
    b = perplexity.evaluate_perplexity(tiny, long, rows=0, progress=False)
    assert a["answer_tokens"] == b["answer_tokens"]
    assert a["answer_chars"] == b["answer_chars"]
    assert b["sequence_tokens"] > a["sequence_tokens"]  # the sequence figure does count the question


def test_sequence_figure_leaves_the_persona_out(tiny, tmp_path):
    data = write_split(tmp_path / "data", ROWS)
    with_persona = perplexity.evaluate_perplexity(tiny, data, rows=0, progress=False)
    without = perplexity.evaluate_perplexity(tiny, data, rows=0, progress=False, use_persona=False)
    # Without a persona the first dialogue token cannot be scored (nothing precedes it): one token a row.
    assert with_persona["sequence_tokens"] == without["sequence_tokens"] + len(ROWS)
    assert with_persona["answer_tokens"] == without["answer_tokens"]


def test_newest_complete_checkpoint_is_used(tmp_path):
    folder = tmp_path / "run"
    build_tiny_model(folder / "checkpoint-5", seed=1)
    build_tiny_model(folder / "checkpoint-10", seed=2)
    for step in (5, 10):
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}", encoding="utf-8")
    (folder / "checkpoint-20").mkdir()  # an interrupted save: no weights
    build_tiny_model(folder / "checkpoint-30", seed=3)  # weights, but no trainer_state.json (written last)
    shutil.copy(folder / "checkpoint-10" / "chat_config.json", folder / "chat_config.json")
    data = write_split(tmp_path / "data", ROWS)
    via_folder = perplexity.evaluate_perplexity(folder, data, rows=0, progress=False)
    direct = perplexity.evaluate_perplexity(folder / "checkpoint-10", data, rows=0, progress=False)
    assert via_folder["weights"] == str(folder / "checkpoint-10")
    assert via_folder["answer_perplexity"] == pytest.approx(direct["answer_perplexity"], rel=1e-6)
    assert direct["model"] == "run-checkpoint-10"


def test_main_writes_json_and_markdown(tiny, tmp_path, capsys):
    data = write_split(tmp_path / "data", ROWS)
    reports = tmp_path / "reports"
    code = perplexity.main(["--model", str(tiny), "--data-dir", str(data), "--output", str(reports),
                            "--rows", "3", "--device", "cpu"])
    assert code == 0
    report = json.loads((reports / "perplexity_m.json").read_text(encoding="utf-8"))
    assert report["rows_scored"] == 3 and report["answer_perplexity"] > 1
    md = (reports / "perplexity_m.md").read_text(encoding="utf-8")
    assert f"{report['answer_perplexity']:.2f}" in md
    out = capsys.readouterr().out
    assert "answer perplexity" in out and "reading:" in out


def check_user_error(capsys, argv, *fragments):
    code = perplexity.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("perplexity.py: error: ")
    for fragment in fragments:
        assert fragment in err[0]


def test_bad_inputs_give_one_line_and_write_nothing(tiny, tmp_path, capsys):
    data = write_split(tmp_path / "data", ROWS)
    reports = tmp_path / "reports"
    common = ["--data-dir", str(data), "--output", str(reports), "--device", "cpu"]

    check_user_error(capsys, ["--model", str(tmp_path / "nowhere")] + common, "nowhere", "no such model folder")

    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(tiny, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    check_user_error(capsys, ["--model", str(no_tokenizer)] + common, str(no_tokenizer), "tokenizer")

    lstm = tmp_path / "lstm"
    lstm.mkdir()
    (lstm / "config.json").write_text('{"kit_model": "lstm_pytorch", "format_version": 1}', encoding="utf-8")
    check_user_error(capsys, ["--model", str(lstm)] + common, str(lstm), "LSTM")

    empty = write_split(tmp_path / "empty", [])
    check_user_error(capsys, ["--model", str(tiny), "--data-dir", str(empty), "--output", str(reports)],
                     "context_test.parquet", "empty")
    check_user_error(capsys, ["--model", str(tiny), "--data-dir", str(tmp_path / "nodata"), "--output",
                              str(reports)], "context_test.parquet", "not found")
    assert not reports.exists()


@pytest.mark.parametrize("flag", [["--max-turns", "0"], ["--context-tokens", "0"], ["--max-turns", "-2"]])
def test_a_window_of_nothing_is_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        perplexity.parse_args(["--model", "m"] + flag)
    assert exit_info.value.code == 2 and flag[0] in capsys.readouterr().err


def trainer_ids(tokenizer, settings, turns, answer, facts=None):
    """prompt + answer ids of one exchange as train_transformer.py encodes it for training."""
    prompt, target = train_transformer.encode_exchange(tokenizer, turns, answer, settings["max_turns"],
                                                       settings["context_tokens"], settings["max_length"], PERSONA,
                                                       facts)
    return prompt, prompt + target


def test_the_facts_column_reaches_the_prompts_of_a_model_trained_with_it(tiny, tiny_with_facts, tmp_path):
    data = write_split_with_facts(tmp_path / "data", FACT_ROWS)
    examples, _ = perplexity.load_split(data, "test", 0, 0)
    _, tokenizer, _, settings = perplexity.load_model(tiny_with_facts, "cpu")
    built, skipped = perplexity.build_scoring_examples(tokenizer, examples, settings)
    assert skipped == 0
    for (_, turns, answer, facts), row in zip(FACT_ROWS, built):
        prompt, ids = trainer_ids(tokenizer, settings, turns, answer, facts)
        assert row["ids"] == ids and row["answer_start"] == len(prompt)
    assert tokenizer.decode(built[0]["ids"]) == (
        f"Вопрос: {PERSONA['question']}\nОтвет: {PERSONA['answer']}\nВопрос: Что ты обо мне знаешь?\nОтвет: {FACTS}\n"
        "Вопрос: Меня зовут Аня, я живу в Казани.\nОтвет: Очень приятно, Аня!\nВопрос: Какая завтра погода?\n"
        "Ответ: Обещают дождь.</s>")
    assert [row["facts"] for row in built] == [True, False, False]  # none for "", and the long one did not fit
    # The sequence figure leaves the facts out, as it does the persona.
    assert built[0]["sequence_start"] == len(perplexity.encode_text(tokenizer, perplexity.header_text(PERSONA, FACTS)))
    assert built[2]["sequence_start"] == len(perplexity.encode_text(tokenizer, perplexity.header_text(PERSONA)))

    # A folder whose chat_config.json does not say "facts": true was trained without the exchange: none here.
    _, _, _, plain = perplexity.load_model(tiny, "cpu")
    built_plain, _ = perplexity.build_scoring_examples(tokenizer, examples, plain)
    for (_, turns, answer, _), row in zip(FACT_ROWS, built_plain):
        assert row["ids"] == trainer_ids(tokenizer, plain, turns, answer)[1]
        assert "Что ты обо мне знаешь?" not in tokenizer.decode(row["ids"])

    with_facts = perplexity.evaluate_perplexity(tiny_with_facts, data, rows=0, progress=False)
    without = perplexity.evaluate_perplexity(tiny, data, rows=0, progress=False)
    assert (with_facts["rows_with_facts"], without["rows_with_facts"]) == (1, 0)
    assert with_facts["sequence_tokens"] == without["sequence_tokens"]  # the same weights, the same dialogue spans
    assert with_facts["answer_tokens"] == without["answer_tokens"]
    assert with_facts["answer_perplexity"] != without["answer_perplexity"]  # the facts are in the context


def test_a_split_without_the_facts_column_is_scored_without_them_and_says_so(tiny, tiny_with_facts, tmp_path):
    data = write_split(tmp_path / "data", ROWS)  # today's files: no facts column
    lines = []
    report = perplexity.evaluate_perplexity(tiny_with_facts, data, rows=0, progress=False, warn=lines.append)
    plain = perplexity.evaluate_perplexity(tiny, data, rows=0, progress=False, warn=lines.append)
    assert report["rows_with_facts"] == 0 and report["answer_perplexity"] == pytest.approx(plain["answer_perplexity"])
    assert len(lines) == 1 and "facts column" in lines[0] and "context_test.parquet" in lines[0]
