"""evaluate.py: the metrics, the memory probe, the LSTM prediction interface
(through a fake predictor script that follows the contract) and the comparison
reports, on a tiny random transformers model."""
import json
import math
import re
import textwrap

import pandas as pd
import pytest
import torch

import evaluate
import perplexity
import train_transformer
from tiny_model import CHAT_CONFIG, build_tiny_model

torch.set_num_threads(1)

ROWS = [
    (1, ["Привет! Как дела?"], "Привет, всё хорошо, спасибо."),
    (1, ["Привет! Как дела?", "Привет, всё хорошо, спасибо.", "Что делаешь вечером?"],
     "Собираюсь в кино с друзьями, потом домой."),
    (2, ["Какая завтра погода?"], "Обещают дождь и ветер."),
    (3, ["Что приготовить на ужин?", "Сделай макароны с сыром.", "А ещё что-нибудь?", "Можно салат.",
         "Какой салат?"], "Греческий: огурцы, помидоры, сыр и маслины."),
]

# A stand-in for pytorch_chatbot.py / tensorflow_chatbot.py that follows the prediction interface:
# it repeats the reference as its reply, and for a probe question repeats the conversation it was given.
FAKE_PREDICTOR = textwrap.dedent('''
    import argparse, json, sys
    from pathlib import Path
    p = argparse.ArgumentParser()
    p.add_argument("mode"); p.add_argument("--model"); p.add_argument("--questions")
    p.add_argument("--predictions"); p.add_argument("--seed"); p.add_argument("--device")
    a = p.parse_args()
    Path(a.model, "argv.json").write_text(json.dumps(sys.argv[1:]))
    if Path(a.model, "fail").exists():
        print("fake_chatbot.py: error: the weights are broken", file=sys.stderr)
        sys.exit(1)
    out = []
    for i, line in enumerate(Path(a.questions).read_text(encoding="utf-8").splitlines()):
        q = json.loads(line)
        ref = q["reference"]
        reply = ref if ref is not None else " ".join(q["context"] + [q["question"]])
        n = len(ref.split()) + 1 if ref is not None else None
        out.append({"id": q["id"], "reply": reply, "ended_with_eos": i % 2 == 0, "ms": 2.0 + i,
                    "reply_tokens": len(reply.split()), "reference_nll": None if n is None else 1.5 * n,
                    "reference_tokens": n, "reference_chars": None if ref is None else len(ref) + 1})
    Path(a.predictions).write_text("".join(json.dumps(o, ensure_ascii=False) + "\\n" for o in out),
                                   encoding="utf-8")
''')


def write_split(folder, rows, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{"dialogue_id": d, "context": c, "answer": a} for d, c, a in rows],
                         columns=["dialogue_id", "context", "answer"])
    frame.to_parquet(folder / f"context_{split}.parquet")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture
def fake_scripts(tmp_path):
    script = tmp_path / "fake_chatbot.py"
    script.write_text(FAKE_PREDICTOR, encoding="utf-8")
    return {"lstm_pytorch": script, "lstm_keras": script}


def lstm_folder(path, kind="lstm_pytorch"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"kit_model": kind, "format_version": 1}), encoding="utf-8")
    return path


def options(scripts=None, **extra):
    base = {"device": "cpu", "seed": 0, "max_new_tokens": 3, "max_turns": None, "batch_size": 4,
            "progress": False, "scripts": scripts or evaluate.LSTM_SCRIPTS, "data": "test", "probe": "probe"}
    base.update(extra)
    return base


# ---------------------------------------------------------------- metrics
def test_word_tokeniser_is_the_agreed_one():
    assert evaluate.words("Привет, Мир! Как-то так...") == ["привет", ",", "мир", "!", "как", "-", "то",
                                                            "так", ".", ".", "."]


def test_bleu_of_identical_reply_is_one_and_of_unrelated_near_zero():
    references = ["Завтра обещают дождь и сильный ветер, возьми зонт.", "Сделай макароны с сыром на ужин."]
    assert evaluate.corpus_bleu4(references, references) == pytest.approx(1.0)
    unrelated = ["Кошка спит на тёплом подоконнике весь день.", "Поезд отправляется в семь утра."]
    assert evaluate.corpus_bleu4(unrelated, references) < 0.05
    half = ["Завтра обещают дождь и сильный ветер.", "Поезд отправляется в семь утра."]
    assert 0.05 < evaluate.corpus_bleu4(half, references) < 1.0


def test_unigram_f1_and_distinct_n():
    # blocks/metrics.py, shared with the LSTM scripts, scores token lists: here evaluate.py's word tokens
    def f1(reply, reference):
        return evaluate.unigram_f1(evaluate.words(reply), evaluate.words(reference))

    assert f1("Привет, друг", "привет друг ,") == pytest.approx(1.0)
    # reply: да да нет (3), reference: да нет нет нет (4); overlap 2 -> P 2/3, R 2/4
    assert f1("да да нет", "да нет нет нет") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert f1("кот", "пёс") == 0.0
    assert f1(". . !", "Да, конечно.") == 0.0
    replies = [evaluate.words(reply) for reply in ["да да да", "да нет"]]
    assert evaluate.distinct_n(replies, 1) == pytest.approx(2 / 5)
    assert evaluate.distinct_n(replies, 2) == pytest.approx(2 / 3)  # (да,да) x2 + (да,нет); none across replies
    # the comparison's figures are these, computed on the words of the replies and references
    records = [{"reply": "Привет, друг", "reference": "привет друг ,", "ended_with_eos": True, "ms": 1.0,
                "reply_tokens": 2},
               {"reply": "да да нет", "reference": "да нет нет нет", "ended_with_eos": False, "ms": 2.0,
                "reply_tokens": 3}]
    figures = evaluate.reply_metrics(records)
    assert figures["unigram_f1"] == pytest.approx((1.0 + 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)) / 2)
    assert figures["distinct_1"] == pytest.approx(5 / 6)  # привет , друг да нет: 5 of 6 unigrams


def test_reply_metrics_weight_perplexity_by_tokens():
    records = [
        {"reply": "a b", "reference": "a b", "ended_with_eos": True, "ms": 10.0, "reply_tokens": 2,
         "reference_nll": 2.0, "reference_tokens": 1, "reference_chars": 4},
        {"reply": "c", "reference": "d", "ended_with_eos": False, "ms": 30.0, "reply_tokens": 4,
         "reference_nll": 6.0, "reference_tokens": 9, "reference_chars": 12},
    ]
    m = evaluate.reply_metrics(records)
    assert m["answer_perplexity"] == pytest.approx(math.exp(8.0 / 10))  # not exp(mean(2/1, 6/9))
    assert m["bits_per_char"] == pytest.approx(8.0 / math.log(2) / 16)
    assert m["eos_share"] == 0.5 and m["ms_median"] == 20.0 and m["mean_words"] == 1.5
    assert m["tokens_per_s"] == pytest.approx(6 / 0.040)
    assert m["ms_p95"] == pytest.approx(29.0)


# ---------------------------------------------------------------- memory probe
def test_probe_scores_a_reply_with_and_without_the_fact():
    forms = ["Казан"]
    assert evaluate.probe_hit("Ты живёшь в Казани.", forms)
    assert evaluate.probe_hit("КАЗАНЬ, конечно", forms)
    assert not evaluate.probe_hit("Ты живёшь в Москве.", forms)
    assert not evaluate.probe_hit("Мне сказали, что в Москве.", ["казал"])  # a form must start a word
    assert evaluate.probe_hit("Какого цвета? Жёлтого!", ["желт"])  # ё and е are one letter here


def test_shipped_probe_is_russian_and_each_fact_is_two_or_more_turns_back(repo_root):
    probe = evaluate.load_probe(repo_root / "data" / "memory_probe.jsonl")
    assert len(probe) >= 12
    assert len({item["id"] for item in probe}) == len(probe)
    for item in probe:
        turns = item["turns"]
        assert len(turns) % 2 == 1  # user, bot, ..., the final user question
        assert all(re.search(r"[а-яё]", t, re.I) for t in turns)
        assert not evaluate.probe_hit(turns[-1], item["fact"]), item["id"]  # the question gives no answer
        assert not evaluate.probe_hit(turns[-2], item["fact"]), item["id"]
        assert evaluate.fact_distance(item) >= 2, item["id"]


def test_probe_conversation_is_built_like_the_chat(tiny):
    _, tokenizer, _, settings = evaluate.load_model(tiny, "cpu")
    assert settings["max_turns"] == CHAT_CONFIG["max_turns"]  # the window training recorded
    turns = ["Добрый вечер!", "Добрый вечер!", "Меня зовут Тимофей.", "Приятно познакомиться!",
             "Как меня зовут?"]
    persona = CHAT_CONFIG["persona"]
    settings["max_turns"] = 5  # --max-turns 5
    ids = evaluate.reply_prompt(tokenizer, turns, settings, CHAT_CONFIG["context_tokens"])
    assert tokenizer.decode(ids) == (
        f"Вопрос: {persona['question']}\nОтвет: {persona['answer']}\n"
        "Вопрос: Добрый вечер!\nОтвет: Добрый вечер!\nВопрос: Меня зовут Тимофей.\n"
        "Ответ: Приятно познакомиться!\nВопрос: Как меня зовут?\nОтвет:")
    # One token short: the oldest turn goes, and the labels still count back from the answer.
    short = tokenizer.decode(evaluate.reply_prompt(tokenizer, turns, settings, len(ids) - 1))
    assert short == (f"Вопрос: {persona['question']}\nОтвет: {persona['answer']}\n"
                     "Ответ: Добрый вечер!\nВопрос: Меня зовут Тимофей.\n"
                     "Ответ: Приятно познакомиться!\nВопрос: Как меня зовут?\nОтвет:")
    settings["max_turns"] = 2  # --max-turns 2
    capped = tokenizer.decode(evaluate.reply_prompt(tokenizer, turns, settings, 1000))
    assert "Тимофей" not in capped and capped.endswith("Ответ: Приятно познакомиться!\nВопрос: Как меня зовут?\nОтвет:")


def test_probe_prompts_agree_with_system_prompt(tiny, repo_root):
    system_prompt = pytest.importorskip("system_prompt")

    _, tokenizer, _, settings = evaluate.load_model(tiny, "cpu")
    chat = system_prompt.open_model_folder(tiny, "cpu")
    persona_only = len(evaluate.encode_text(tokenizer, evaluate.prompt_text([""], settings["persona"])))
    for item in evaluate.load_probe(repo_root / "data" / "memory_probe.jsonl"):
        for budget in (persona_only + 16, persona_only + 40, persona_only + 70, 192):
            chat_settings = system_prompt.resolve_settings(system_prompt.parse_args(
                ["--model", str(tiny), "--context-tokens", str(budget)]), chat)
            ours = evaluate.reply_prompt(tokenizer, item["turns"], settings, budget)
            assert ours == system_prompt.chat_prompt_ids(item["turns"], chat_settings, chat["tokenizer"]), \
                (item["id"], budget)


# ---------------------------------------------------------------- models
def test_answer_perplexity_agrees_with_perplexity_py(tiny, tmp_path):
    data = write_split(tmp_path / "data", ROWS)
    examples, _ = evaluate.load_split(data, "test", rows=3, seed=7)
    probe = [{"id": "p", "turns": ["Я живу в Казани.", "Понятно.", "Где я живу?"], "fact": ["Казан"]}]
    row = evaluate.evaluate_model(tiny, examples, probe, options())
    assert row["status"] == "ok", row["error"]
    reference = perplexity.evaluate_perplexity(tiny, data, rows=3, seed=7, batch_size=2, progress=False)
    assert row["scored_tokens"] == reference["answer_tokens"]
    assert row["answer_perplexity"] == pytest.approx(reference["answer_perplexity"], rel=1e-6)
    assert row["bits_per_char"] == pytest.approx(reference["bits_per_char"], rel=1e-6)
    assert row["rows"] == 3 and row["memory_probe_dialogues"] == 1


def test_lstm_folder_goes_through_its_script(tmp_path, fake_scripts, repo_root):
    data = write_split(tmp_path / "data", ROWS)
    examples, _ = evaluate.load_split(data, "test", rows=0, seed=0)
    probe = evaluate.load_probe(repo_root / "data" / "memory_probe.jsonl")
    folder = lstm_folder(tmp_path / "lstm_pytorch")
    row = evaluate.evaluate_model(folder, examples, probe, options(fake_scripts, seed=5, max_turns=4))
    assert row["status"] == "ok", row["error"]
    argv = json.loads((folder / "argv.json").read_text())
    assert argv[0] == "eval" and argv[argv.index("--seed") + 1] == "5" and argv[argv.index("--device") + 1] == "cpu"
    assert row["bleu4"] == pytest.approx(1.0)  # the fake repeats the references
    assert row["answer_perplexity"] == pytest.approx(math.exp(1.5))
    assert row["eos_share"] == pytest.approx(0.5)
    # The fake repeats the conversation it was given, cut by --max-turns 4 to the newest 4 turns:
    # a fact 4 turns back is out of its reach, a fact 2 turns back is in it.
    near = sum(1 for item in probe if evaluate.fact_distance(item) <= 2)
    assert row["memory_probe_hits"] == near < len(probe)
    whole = evaluate.evaluate_model(folder, examples, probe, options(fake_scripts))
    assert whole["memory_probe_hits"] == len(probe)  # without --max-turns every turn is passed on


def test_comparison_has_a_row_per_model_and_survives_failures(tiny, tmp_path, fake_scripts, repo_root, capsys):
    data = write_split(tmp_path / "data", ROWS)
    reports = tmp_path / "reports"
    pytorch_dir = lstm_folder(tmp_path / "lstm_pytorch")
    keras_dir = lstm_folder(tmp_path / "lstm_keras", "lstm_keras")
    (keras_dir / "fail").touch()
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join((repo_root / "data" / "memory_probe.jsonl").read_text(encoding="utf-8")
                               .splitlines()[:3]) + "\n", encoding="utf-8")
    models = [str(tiny), str(pytorch_dir), str(keras_dir), str(not_a_model)]
    code = evaluate.main(["--model", *models, "--data-dir", str(data), "--output", str(reports), "--probe",
                          str(probe), "--max-new-tokens", "3", "--device", "cpu", "--quiet"], scripts=fake_scripts)
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate.py: error:")]
    assert len(err) == 2
    assert str(keras_dir) in err[0] and "the weights are broken" in err[0]
    assert str(not_a_model) in err[1]

    result = json.loads((reports / "comparison.json").read_text(encoding="utf-8"))
    assert [row["model"] for row in result["models"]] == models
    assert [row["status"] for row in result["models"]] == ["ok", "ok", "error", "error"]
    assert [row["kind"] for row in result["models"][:3]] == ["transformers", "lstm_pytorch", "lstm_keras"]
    assert result["models"][1]["bleu4"] == pytest.approx(1.0)
    md = (reports / "comparison.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in table] == models + ["research write-up †"]
    assert "0.0101" in table[-1] and "6.63" in table[-1] and "30.18" in table[-1]
    assert "the weights are broken" in table[2]
    assert (reports / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(reports.glob("*.tmp-*"))


def test_global_bad_input_writes_nothing(tiny, tmp_path, capsys):
    reports = tmp_path / "reports"
    empty = write_split(tmp_path / "empty", [])
    assert evaluate.main(["--model", str(tiny), "--data-dir", str(empty), "--output", str(reports)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "context_test.parquet" in err[0] and "empty" in err[0]

    data = write_split(tmp_path / "data", ROWS)
    assert evaluate.main(["--model", str(tmp_path / "nowhere"), "--data-dir", str(data), "--output",
                          str(reports), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"evaluate.py: error: {tmp_path / 'nowhere'}: no such model folder"
    assert not reports.exists()

    bad_probe = tmp_path / "probe.jsonl"
    bad_probe.write_text('{"id": "x", "turns": ["один"]}\n', encoding="utf-8")
    assert evaluate.main(["--model", str(tiny), "--data-dir", str(data), "--probe", str(bad_probe)]) == 1
    assert str(bad_probe) in capsys.readouterr().err
    assert not reports.exists()


def test_missing_tokenizer_is_a_row_error(tiny, tmp_path):
    import shutil

    broken = tmp_path / "no_tok"
    shutil.copytree(tiny, broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    data = write_split(tmp_path / "data", ROWS)
    examples, _ = evaluate.load_split(data, "test", rows=0, seed=0)
    row = evaluate.evaluate_model(broken, examples, [], options())
    assert row["status"] == "error" and str(broken) in row["error"] and "tokenizer" in row["error"]


def test_prompt_constants_match_the_contract():
    assert (evaluate.QUESTION_LABEL, evaluate.ANSWER_LABEL, evaluate.TURN_SEPARATOR) == (
        perplexity.QUESTION_LABEL, perplexity.ANSWER_LABEL, perplexity.TURN_SEPARATOR) == ("Вопрос: ", "Ответ: ", "\n")
    assert evaluate.LABEL_PATTERN.pattern == perplexity.LABEL_PATTERN.pattern == r"(?i)\b(вопрос|ответ)\s*:"


def test_replies_may_repeat_the_prompts_words(tiny, tmp_path):
    """Greedy evaluation with the chat's n-gram blocking: a model that copies the question
    must be free to, as in the chat (transformers' own blocking would ban it)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteriaList

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    _, tokenizer, _, settings = evaluate.load_model(tiny, "cpu")
    ids = evaluate.reply_prompt(tokenizer, ["Как перезагрузить телефон?"], settings, 192)
    copy = evaluate.encode_text(tokenizer, " Как перезагрузить телефон")
    # a stand-in model whose every step puts its weight on the next token of the question's words, then EOS
    original_forward, steps = model.forward, []

    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        nxt = copy[len(steps)] if len(steps) < len(copy) else tokenizer.eos_token_id
        steps.append(nxt)
        out.logits[:, -1, :] = 0.0
        out.logits[:, -1, nxt] = 10.0
        return out

    model.forward = forward
    config = GenerationConfig(max_new_tokens=len(copy) + 2, do_sample=False, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    text, ended, _, _ = evaluate.generate_reply(model, tokenizer, ids, config, {"no_repeat_ngram_size": 3,
                                                                                "repetition_penalty": 1.15},
                                                StoppingCriteriaList(), "cpu")
    assert text == "Как перезагрузить телефон" and ended


@pytest.mark.parametrize("flag", [["--max-turns", "0"], ["--context-tokens", "0"]])
def test_a_window_of_nothing_is_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--model", "m"] + flag)
    assert exit_info.value.code == 2 and flag[0] in capsys.readouterr().err


def test_generation_prompts_carry_the_facts_of_a_model_trained_with_them(tiny, tmp_path, monkeypatch):
    """The split's facts column (issue 14) goes into the reply prompts, as the trainer put it into training
    prompts, for a folder whose chat_config.json says "facts": true; for another, nothing changes."""
    facts = "Тебя зовут Аня, ты живёшь в Казани."
    rows = [(5, ["Меня зовут Аня, я живу в Казани.", "Очень приятно, Аня!", "Какая завтра погода?"],
             "Обещают дождь.", facts),
            (6, ["Привет! Как дела?"], "Привет, всё хорошо, спасибо.", "")]
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame([{"dialogue_id": d, "context": c, "answer": a, "facts": f} for d, c, a, f in rows]
                 ).to_parquet(data / "context_test.parquet")
    examples, _ = evaluate.load_split(data, "test", rows=0, seed=0)
    with_facts = build_tiny_model(tmp_path / "f", chat_config={**CHAT_CONFIG, "facts": True})
    prompts = []
    generate = evaluate.generate_reply

    def recording(model, tokenizer, ids, *rest):
        prompts.append(ids)
        return generate(model, tokenizer, ids, *rest)

    monkeypatch.setattr(evaluate, "generate_reply", recording)
    for folder, given in ((with_facts, [facts, None]), (tiny, [None, None])):
        prompts.clear()
        row = evaluate.evaluate_model(folder, examples, [], options())
        assert row["status"] == "ok", row["error"]
        assert row["rows_with_facts"] == sum(bool(f) for f in given)
        _, tokenizer, _, settings = evaluate.load_model(folder, "cpu")
        budget = min(settings["context_tokens"], settings["n_positions"] - options()["max_new_tokens"])
        replies = prompts[1:]  # after the untimed warm-up
        assert len(replies) == len(rows)
        for (_, turns, _, _), fact, ids in zip(rows, given, replies):
            assert ids == train_transformer.fit_prompt(tokenizer, turns, settings["max_turns"], budget,
                                                       CHAT_CONFIG["persona"], fact)
            assert ("Что ты обо мне знаешь?" in tokenizer.decode(ids)) == bool(fact)
