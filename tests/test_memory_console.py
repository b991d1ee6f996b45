"""system_prompt.py's long-term memory (issue 14), end to end through --script: what the user says about
themselves is kept for the session, outlives the prompt's window and /reset, goes into every prompt as the
facts exchange when the model was trained with it, and is listed and deleted with /memory and /forget."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)

import system_prompt as sp  # noqa: E402

torch.set_num_threads(1)
PERSONA = tiny_model.CHAT_CONFIG["persona"]
INTRODUCTION = "Привет, меня зовут Аня, я из Казани"
ANYA_FROM_KAZAN = [("name", "Аня"), ("city", "Казань")]
FAST = ["--max-new-tokens", "2", "--seed", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def facts_model(tmp_path_factory):
    """A tiny model folder whose chat_config.json says it was trained with the facts exchange."""
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("facts") / "model",
                                       chat_config={**tiny_model.CHAT_CONFIG, "facts": True})


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A tiny model folder trained without it (chat_config.json has no "facts")."""
    assert "facts" not in tiny_model.CHAT_CONFIG
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture
def fed_prompts(monkeypatch):
    """The token ids of every prompt the model is given, as it is given them."""
    seen = []
    real = sp.generate_reply

    def recording(chat, settings, prompt, on_text=None):
        seen.append(list(prompt))
        return real(chat, settings, prompt, on_text)

    monkeypatch.setattr(sp, "generate_reply", recording)
    return seen


def chat_through_script(model, lines, tmp_path, capsys, *flags):
    """Play the lines with --script --show-prompt: (exit code, what the bot said, prompts shown, stderr)."""
    script = tmp_path / "chat.txt"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    code = sp.main(["--model", str(model), "--script", str(script), "--show-prompt", *FAST, *flags])
    captured = capsys.readouterr()
    said = []  # a reply of several lines goes on under the "Бот: " prefix, aligned after it
    for line in captured.out.splitlines():
        if line.startswith(sp.BOT_PREFIX):
            said.append(line[len(sp.BOT_PREFIX):])
        elif line.startswith(" " * len(sp.BOT_PREFIX)) and said:
            said[-1] += "\n" + line[len(sp.BOT_PREFIX):]
    prompts = [block.split("\n[/prompt]")[0] for block in captured.out.split("[prompt]\n")[1:]]
    return code, said, prompts, captured.err


def settings_of(model):
    chat = sp.open_model_folder(model, "cpu")
    return chat["tokenizer"], sp.resolve_settings(sp.parse_args(["--model", str(model), *FAST]), chat)


def test_name_and_city_outlive_forty_exchanges_and_reset(facts_model, tmp_path, capsys, fed_prompts):
    small_talk = [f"Расскажи что-нибудь интересное, номер {i}" for i in range(40)]
    lines = [INTRODUCTION] + small_talk + [sp.RESET_COMMAND, sp.MEMORY_COMMAND, "Что нового?"]
    code, said, prompts, err = chat_through_script(facts_model, lines, tmp_path, capsys)
    assert code == 0, err
    assert "note:" not in err  # the model was trained with the exchange: nothing to warn about
    assert len(prompts) == len(fed_prompts) == 42
    assert said[-3] == sp.RESET_NOTICE
    assert said[-2] == "имя: Аня\nгород: Казань"
    # The introduction left the prompt's window long ago; the facts exchange still carries it.
    assert "меня зовут" not in prompts[40] and "Тебя зовут Аня" in prompts[40] and "Казани" in prompts[40]
    last = prompts[-1]
    assert f"Вопрос: {sp.FACTS_QUESTION}\nОтвет: Тебя зовут Аня, ты живёшь в Казани." in last
    assert "Расскажи" not in last  # /reset forgot the conversation, not the user
    tokenizer, settings = settings_of(facts_model)
    # What the chat fed the model is what the prompt rule builds for these facts, token for token.
    assert fed_prompts[-1] == sp.chat_prompt_ids(["Что нового?"], settings, tokenizer, ANYA_FROM_KAZAN)
    assert fed_prompts[-1] == sp.encode_text(tokenizer, sp.prompt_text(
        ["Что нового?"], PERSONA, sp.render_facts_answer(ANYA_FROM_KAZAN)))
    assert tokenizer.decode(fed_prompts[-1]) == last


def test_forget_a_word_then_everything(facts_model, tmp_path, capsys):
    lines = [INTRODUCTION, "Как дела?", "/forget москва", "/forget казань", sp.MEMORY_COMMAND, "Какая погода?",
             sp.FORGET_COMMAND, sp.MEMORY_COMMAND, "Ну что?"]
    # Seed 3: the tiny model's replies to the first two lines are not the fallback, so both are kept.
    code, said, prompts, err = chat_through_script(facts_model, lines, tmp_path, capsys, "--seed", "3")
    assert code == 0, err
    assert f"Вопрос: {INTRODUCTION}\nОтвет: {said[0]}\n" in prompts[1], said
    assert said[2:5] == [sp.NOTHING_TO_FORGET_REPLY, f"{sp.FORGOT_SOME_REPLY}\nгород: Казань", "имя: Аня"]
    assert "Казан" in prompts[1]
    after_city = prompts[2]
    assert "Казан" not in after_city  # neither in the facts exchange nor in the exchange that said it
    assert "Тебя зовут Аня." in after_city
    assert "Вопрос: Как дела?\nОтвет: " in after_city  # the other exchanges stay
    assert said[6:8] == [sp.FORGOT_ALL_REPLY, sp.NO_FACTS_ANSWER]
    assert sp.FACTS_QUESTION not in prompts[3] and "Аня" not in prompts[3]


def test_forget_keeps_the_labels_counting_back_from_the_answer(facts_model):
    tokenizer, settings = settings_of(facts_model)
    session = sp.ConsoleChat({"tokenizer": tokenizer}, settings)
    session.history = ["Как дела?", "Хорошо.", "Я живу в Казани", "Понятно.", "А ты?", "Я бот."]
    session.facts = list(ANYA_FROM_KAZAN)
    assert session.forget("город") == [("city", "Казань")]
    assert session.facts == [("name", "Аня")]
    assert session.history == ["Как дела?", "Хорошо.", "А ты?", "Я бот."]


def test_no_memory_keeps_nothing(facts_model, tmp_path, capsys, monkeypatch):
    def no_extraction(text):
        raise AssertionError("memory is off, yet a line was read for facts")

    monkeypatch.setattr(sp, "extract_user_facts", no_extraction)
    lines = [INTRODUCTION, "Как дела?", sp.MEMORY_COMMAND, sp.FORGET_COMMAND, "/forget аня"]
    code, said, prompts, err = chat_through_script(facts_model, lines, tmp_path, capsys, "--no-memory")
    assert code == 0, err
    assert all(sp.FACTS_QUESTION not in prompt for prompt in prompts)
    assert prompts[0] == sp.prompt_text([INTRODUCTION], PERSONA)  # the persona, then the line: no exchange
    assert said[2:] == [sp.MEMORY_OFF_REPLY] * 3
    assert sp.parse_args([]).no_memory is sp.NO_MEMORY is False


def test_a_model_trained_without_facts_gets_no_exchange_and_a_note(plain_model, facts_model, tmp_path, capsys):
    lines = [INTRODUCTION, "Как дела?", sp.MEMORY_COMMAND]
    code, said, prompts, err = chat_through_script(plain_model, lines, tmp_path, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("system_prompt.py: note: ")]
    assert len(notes) == 1 and "not trained with the facts exchange" in notes[0], err
    assert all(sp.FACTS_QUESTION not in prompt for prompt in prompts)
    assert said[-1] == "имя: Аня\nгород: Казань"  # /memory works all the same
    _, _, _, err = chat_through_script(plain_model, lines, tmp_path, capsys, "--no-memory")
    assert "note:" not in err


def test_missing_packages_are_one_line_naming_no_memory(facts_model, tmp_path, capsys, monkeypatch):
    def missing():
        raise ImportError("No module named 'yargy'")

    monkeypatch.setattr(sp, "load_fact_tools", missing)
    code, said, _, err = chat_through_script(facts_model, [INTRODUCTION], tmp_path, capsys)
    assert code == 1 and not said
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("system_prompt.py: error: ")
    assert "yargy" in lines[0] and "--no-memory" in lines[0]
    code, said, _, err = chat_through_script(facts_model, [INTRODUCTION], tmp_path, capsys, "--no-memory")
    assert code == 0 and len(said) == 1, err


def test_typed_chat_tells_about_the_commands(facts_model, capsys, monkeypatch):
    typed = iter([INTRODUCTION, sp.MEMORY_COMMAND, "/forget аня", sp.MEMORY_COMMAND, "выход"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert sp.main(["--model", str(facts_model), *FAST]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sp.MEMORY_COMMAND in out[0] and sp.FORGET_COMMAND in out[0]
    said = [line for line in out if line.startswith(sp.BOT_PREFIX)]
    assert said[1:] == [sp.BOT_PREFIX + "имя: Аня", sp.BOT_PREFIX + sp.FORGOT_SOME_REPLY,
                        sp.BOT_PREFIX + "город: Казань"]
    assert " " * len(sp.BOT_PREFIX) + "имя: Аня" in out  # the forgotten fact, under "Забыл:"


def test_forget_takes_each_word_of_its_argument(facts_model, tmp_path, capsys):
    # As tg_bot.py's /forget: each word on its own, its punctuation stripped.
    told = "меня зовут аня я из казани"
    lines = [told, "/forget казань аня", sp.MEMORY_COMMAND, "Что нового?",
             told, "/forget Аня,", sp.MEMORY_COMMAND, "/forget , …", sp.MEMORY_COMMAND]
    code, said, prompts, err = chat_through_script(facts_model, lines, tmp_path, capsys)
    assert code == 0, err
    assert said[1:3] == [f"{sp.FORGOT_SOME_REPLY}\nимя: Аня\nгород: Казань", sp.NO_FACTS_ANSWER]
    assert "Аня" not in prompts[1] and "азан" not in prompts[1]  # nor the exchange that said them
    assert said[5:] == [f"{sp.FORGOT_SOME_REPLY}\nимя: Аня", "город: Казань",
                        sp.NOTHING_TO_FORGET_REPLY, "город: Казань"]  # only punctuation: not "forget all"
