"""The user facts block (long-term memory, issue 14) at the extractor level: what users say about
themselves is found on the labelled set at the quality the issue asks for; negations, questions and
other people's facts give none; a later statement replaces an earlier one; the answer to
"Что ты обо мне знаешь?" is inflected; /forget finds a fact by any form of a word; the cheap look
at a message's words that skips most messages never changes what is found; and every script that
holds the block holds the same one (tests/test_blocks.py: the generator's check).

The block is tested as create_dataset.py holds it (importing it loads neither torch nor a model)."""
import json
import random
import re

import pyarrow.parquet as pq
import pytest

import create_dataset as facts
import system_prompt as memory  # the /memory and /forget commands: the memory_commands block

MIN_PRECISION, MIN_RECALL = 0.9, 0.8   # the targets


@pytest.fixture(scope="module")
def labelled(repo_root):
    lines = (repo_root / "tests" / "fixtures" / "user_facts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def precision_recall(rows):
    tp = fp = fn = 0
    for row in rows:
        expected = {(kind, facts.fold(value)) for kind, value in row["facts"]}
        found = {(kind, facts.fold(value)) for kind, value in facts.extract_user_facts(row["text"])}
        tp, fp, fn = tp + len(expected & found), fp + len(found - expected), fn + len(expected - found)
    return tp / (tp + fp), tp / (tp + fn)


def every_grammar_everywhere(text):
    """The extraction without the look at the words: all grammars over the whole message."""
    text = " ".join(text.split())
    return facts.facts_in_message(text, {grammar: [(0, len(text))] for grammar in facts.EXTRACTORS})


def test_the_labelled_set_is_large_and_covers_every_kind(labelled):
    assert len(labelled) >= 80
    assert {kind for row in labelled for kind, _ in row["facts"]} == set(facts.FACT_KINDS)
    assert sum(1 for row in labelled if not row["facts"]) >= 20  # messages that state nothing
    assert {row["split"] for row in labelled} == {"main", "heldout", "heldout2"}


@pytest.mark.parametrize("split", ["main", "heldout2"])
def test_extraction_meets_the_precision_and_recall_targets(labelled, split):
    precision, recall = precision_recall([row for row in labelled if row["split"] == split])
    assert precision >= MIN_PRECISION and recall >= MIN_RECALL, (precision, recall)


def test_the_main_facts_in_normal_form():
    found = facts.extract_user_facts("привет меня зовут настей мне 25 я из казани работаю программистом")
    assert found == [("name", "Настя"), ("city", "Казань"), ("age", "25"), ("occupation", "программист")]
    assert facts.extract_user_facts("живу в нижнем новгороде") == [("city", "Нижний Новгород")]
    assert facts.extract_user_facts("обожаю котиков") == [("like", "котики")]
    assert facts.extract_user_facts("в субботу еду на дачу") == [("plan", "ехать на дачу (в субботу)")]


def test_the_case_after_the_preposition_picks_the_place():
    # "самару" is likelier the dative of Самар, but "в" takes the accusative or the locative.
    assert facts.extract_user_facts("я переехала в самару") == [("city", "Самара")]
    assert facts.extract_user_facts("живу в самаре") == [("city", "Самара")]
    assert facts.extract_user_facts("я из самары") == [("city", "Самара")]


@pytest.mark.parametrize("text", ["меня зовут не аня", "я не из москвы", "я уже не живу в самаре", "я не программист",
                                  "у меня нет кота", "я не замужем"])
def test_a_negation_is_not_a_fact(text):
    assert facts.extract_user_facts(text) == []


def test_a_negated_name_gives_way_to_the_right_one():
    assert facts.extract_user_facts("меня зовут не аня а катя") == [("name", "Катя")]


@pytest.mark.parametrize("text", ["а тебя как зовут?", "ты где живешь", "сколько тебе лет?", "а где я живу?",
                                  "ты любишь музыку?", "у тебя есть кот?", "ты знаешь как меня зовут?"])
def test_a_question_is_not_a_fact(text):
    assert facts.extract_user_facts(text) == []


def test_a_fact_before_a_question_counts():
    assert facts.extract_user_facts("я из питера а ты?") == [("city", "Питер")]
    assert facts.extract_user_facts("мне 20 а тебе?") == [("age", "20")]


@pytest.mark.parametrize("text, kinds_not_found", [
    ("мою сестру зовут оля", {"name"}),
    ("моя мама живет в сочи", {"city"}),
    ("моему сыну 5 лет", {"age"}),
    ("мой муж программист", {"occupation"}),
    ("ей нравится рок", {"like"}),
    ("она любит собак", {"like"}),
])
def test_other_peoples_facts_are_not_the_users(text, kinds_not_found):
    assert not {kind for kind, _ in facts.extract_user_facts(text)} & kinds_not_found


def test_a_relative_the_user_names_is_a_fact_about_the_user():
    assert facts.extract_user_facts("мою сестру зовут оля") == [("family", "сестра Оля")]


@pytest.mark.parametrize("text, expected", [
    ("у меня есть кот и мою сестру зовут оля", [("pet", "кот"), ("family", "сестра Оля")]),
    ("у меня есть кот и мой брат", [("pet", "кот"), ("family", "брат")]),
    ("у меня есть сестра и мой кот барсик", [("family", "сестра"), ("pet", "кот Барсик")]),
    ("у меня есть свой кот", [("pet", "кот")]),
    ("у меня есть кот и собака по кличке рекс", [("pet", "кот"), ("pet", "собака Рекс")]),
    ("у меня есть кот и сестра которую зовут оля", [("pet", "кот"), ("family", "сестра Оля")]),
])
def test_each_relative_in_a_list_without_my_and_with_its_own_name(text, expected):
    # Seen by a reviewer: "у тебя есть моя сестра" in the answer, and the name of the last
    # relative of a list lost.
    assert facts.extract_user_facts(text) == expected
    assert not {"мой", "моя", "свой"} & set(facts.render_facts_answer(expected).lower().split())


def test_my_own_name_after_a_pet_is_not_the_pets():
    assert facts.extract_user_facts("у меня есть кот и меня зовут аня") == [("name", "Аня"), ("pet", "кот")]
    assert facts.extract_user_facts("у меня есть кот и зовут меня аня") == [("name", "Аня"), ("pet", "кот")]
    assert facts.extract_user_facts("меня зовут аня у меня есть кот") == [("name", "Аня"), ("pet", "кот")]
    assert facts.extract_user_facts("меня зовут аня у меня кот по кличке барсик") == \
        [("name", "Аня"), ("pet", "кот Барсик")]


@pytest.mark.parametrize("text", ["я живу не в москве а в казани", "живу не в москве, а в казани"])
def test_a_corrected_city_gives_the_right_one(text):
    assert facts.extract_user_facts(text) == [("city", "Казань")]


def test_a_later_statement_replaces_an_earlier_one():
    stored = facts.merge_user_facts([], facts.extract_user_facts("меня зовут аня я из казани"))
    stored = facts.merge_user_facts(stored, facts.extract_user_facts("теперь я живу в самаре"))
    assert stored == [("name", "Аня"), ("city", "Самара")]


def test_likes_accumulate_up_to_the_cap_and_flip_to_dislikes():
    stored = facts.merge_user_facts([], [("like", "пицца"), ("like", "суши")])
    stored = facts.merge_user_facts(stored, [("dislike", "пицца")])
    assert stored == [("like", "суши"), ("dislike", "пицца")]
    many = [("like", f"вещь {i}") for i in range(facts.MAX_VALUES_PER_KIND + 3)]
    stored = facts.merge_user_facts(stored, many)
    likes = [value for kind, value in stored if kind == "like"]
    assert likes == [value for _, value in many[-facts.MAX_VALUES_PER_KIND:]]


def test_a_named_relative_replaces_the_unnamed_one():
    stored = facts.merge_user_facts([], [("family", "сестра")])
    stored = facts.merge_user_facts(stored, [("family", "сестра Оля")])
    stored = facts.merge_user_facts(stored, [("family", "сестра")])
    assert stored == [("family", "сестра Оля")]
    stored = facts.merge_user_facts([], [("family", "младшая сестра")])
    assert facts.merge_user_facts(stored, [("family", "сестра Оля")]) == [("family", "младшая сестра Оля")]
    two_brothers = facts.merge_user_facts([("family", "брат Саша")], [("family", "брат Миша")])
    assert two_brothers == [("family", "брат Саша"), ("family", "брат Миша")]


def test_the_answer_is_inflected():
    answer = facts.render_facts_answer(facts.extract_user_facts("меня зовут аня я из казани мне 25"))
    assert answer == "Тебя зовут Аня, ты живёшь в Казани, тебе 25 лет."
    assert facts.render_facts_answer([("city", "Нижний Новгород")]) == "Ты живёшь в Нижнем Новгороде."
    assert facts.render_facts_answer([("city", "Владивосток")]) == "Ты живёшь во Владивостоке."
    assert facts.render_facts_answer([("age", "21")]) == "Тебе 21 год."
    assert facts.render_facts_answer([("age", "23")]) == "Тебе 23 года."
    assert facts.render_facts_answer([("like", "пицца"), ("like", "котики"), ("like", "итальянская кухня")]) == \
        "Ты любишь пиццу, котиков и итальянскую кухню."
    assert facts.render_facts_answer([("plan", "ехать на дачу (в субботу)")]) == "В субботу ты едешь на дачу."
    assert facts.render_facts_answer([("occupation", "в школе")]) == "Ты работаешь в школе."
    assert facts.render_facts_answer([]) == facts.NO_FACTS_ANSWER


def test_the_answer_names_the_user_first_and_their_plans_last():
    # The prompt rule cuts the facts exchange clause by clause from its end (facts_that_fit in the
    # prompt rule block), so this order decides what a tight prompt keeps.
    stored = [("plan", "ехать на дачу (в субботу)"), ("like", "пицца"), ("city", "Казань"), ("name", "Аня")]
    clauses = facts.render_facts_answer(stored).rstrip(".").split(", ")
    assert clauses[:2] == ["Тебя зовут Аня", "ты живёшь в Казани"]
    assert "в субботу" in clauses[-1] and "пиццу" in clauses[-2]


def test_the_memory_list_has_one_fact_a_line():
    stored = [("name", "Аня"), ("city", "Казань"), ("like", "пицца")]
    assert memory.render_facts_list(stored).splitlines() == ["имя: Аня", "город: Казань", "нравится: пицца"]


@pytest.mark.parametrize("word, removed", [
    ("казани", [("city", "Казань")]),        # any form of the word
    ("Казань", [("city", "Казань")]),
    ("город", [("city", "Казань")]),         # the label /memory shows
    ("пиццу", [("like", "пицца")]),
    ("дачу", [("plan", "ехать на дачу (в субботу)")]),
    ("самара", []),
])
def test_forget_removes_the_facts_matching_a_word(word, removed):
    stored = [("name", "Аня"), ("city", "Казань"), ("like", "пицца"), ("plan", "ехать на дачу (в субботу)")]
    kept, gone = memory.forget_user_facts(stored, word)
    assert gone == removed
    assert kept == [fact for fact in stored if fact not in removed]


@pytest.mark.parametrize("word, removed", [
    ("в", []),                               # a preposition is in many facts and names none
    ("на", []),
    ("и", []),
    ("не", []),                              # not even the label "не нравится"
    ("мне", []),
    (",", []),
    ("Аня,", [("name", "Аня")]),             # punctuation typed around the word
    ("«казани»", [("city", "Казань")]),
    ("дачу.", [("plan", "ехать на дачу (в субботу)")]),
])
def test_forget_ignores_function_words_and_punctuation(word, removed):
    stored = [("name", "Аня"), ("city", "Казань"), ("dislike", "пицца"), ("plan", "ехать на дачу (в субботу)")]
    kept, gone = memory.forget_user_facts(stored, word)
    assert gone == removed
    assert kept == [fact for fact in stored if fact not in removed]


def test_no_grammar_repeats_an_optional_item(repo_root):
    # yargy's parser drops matches at random (it depends on memory layout) when a
    # repeatable item can match nothing: .optional().repeatable() gave three different
    # outputs over the labelled set in eight runs; .repeatable().optional() gave one.
    assert ".optional().repeatable(" not in (repo_root / "blocks" / "user_facts.py").read_text(encoding="utf-8")


def test_words_that_are_not_a_fact_of_the_user():
    # Seen on real dialogues: a relative or pet spoken to, a punctuation mark taken for a
    # pet's name, "во мне" taken for an age, a plan said with "не".
    assert facts.extract_user_facts("Сын мой, ты отрёкся от сатаны?") == []
    assert facts.extract_user_facts("Да моя собачка, судя по всему") == [("pet", "собачка")]
    assert facts.extract_user_facts("Вообще-то во мне 56") == []
    assert facts.extract_user_facts("Сегодня не могу") == []
    assert facts.extract_user_facts("Мне нравится твоя улыбка") == []


def test_a_quote_mark_is_no_part_of_a_plan():
    assert facts.extract_user_facts('Одевайся, милая. У меня через месяц "Аида".') == [("plan", "аида (через месяц)")]


def test_a_grammar_match_without_a_value_gives_no_fact():
    # Seen on real dialogues, where they raised StopIteration: "внучек" is a kin word only in a
    # rarer reading, and an infinitive after a listed object is no object.
    assert facts.extract_user_facts("Дорогой мой внучек, я уже и последнюю-то не помню!") == []
    assert facts.extract_user_facts("Вот люблю мужские руки рассматривать, для меня сразу всё ясно.") == \
        [("like", "мужские руки")]


def test_the_look_at_the_words_skips_messages_that_state_nothing():
    assert facts.sentences_worth_parsing("Да ладно, не может быть!") == {}
    assert facts.sentences_worth_parsing("я тебя люблю") == {"like": [(0, 12)]}
    text = "Привет. Меня зовут Аня! А ты кто?"
    assert facts.sentences_worth_parsing(text) == {"name": [(7, 22)]}   # " Меня зовут Аня"
    assert facts.extract_user_facts(text) == [("name", "Аня")]


def test_the_look_at_the_words_knows_what_pymorphy3_guesses():
    # "свого" is in no dictionary; pymorphy3 guesses свой, so the grammars take it for "мой".
    text = "Так иди же, обними свого папу, сынок!"
    assert facts.sentences_worth_parsing(text)
    assert facts.extract_user_facts(text) == every_grammar_everywhere(text) != []


def test_the_look_at_the_words_never_changes_what_is_found(labelled, sample_path):
    texts = [row["text"] for row in labelled]
    texts += [turn for line in sample_path.read_text(encoding="utf-8").splitlines() if line.strip()
              for turn in json.loads(line)["sample"]]
    found = [facts.extract_user_facts(text) for text in texts]
    assert sum(map(bool, found)) > 200
    assert found == [every_grammar_everywhere(text) for text in texts]


@pytest.mark.shared_data
def test_real_dialogues_read_without_error_and_as_without_the_look(shared_data):
    # Turns nobody wrote for this test: every grammar on the whole message gives what the
    # extractor gives, and nothing raises.
    dialogues = pq.read_table(shared_data / "anekdot_dialogues.parquet", columns=["sample"])
    turns = [turn for sample in dialogues.column("sample").to_pylist() for turn in sample or [] if turn]
    texts = random.Random(14).sample(turns, 1500)
    found = [facts.extract_user_facts(text) for text in texts]
    assert sum(map(bool, found)) >= 10
    assert found == [every_grammar_everywhere(text) for text in texts]

