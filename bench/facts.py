"""How well and how fast the user facts block (long-term memory, issue 14) finds what users say
about themselves.

Quality: precision and recall per kind of fact on tests/fixtures/user_facts.jsonl, each part of the
set on its own: "main" was written before the extractor (which was then built with it in view),
"heldout" after its first draft (and then fixed against), "heldout2" after that and measured once
with the extractor frozen: the honest figure.

Speed, as ratios to a baseline timed in the same process: reading the same message with pymorphy3
alone (yargy's plain tokenizer, then pymorphy3's analyses of each word: the least an extractor
over words must do). Timed on the labelled messages (nearly all state facts) and, where
../shared/data is present, on real dialogue turns (most state nothing, and the block skips them
after a look at their words); there also every grammar run over the whole message, as the block
did before that look, and the share of turns that were parsed at all.

The block is read out of a script between its markers (create_dataset.py; later also
system_prompt.py and tg_bot.py) and run on its own, so torch is never loaded; --source points at
another file holding it (an older draft, for a before/after run).

    python bench/facts.py                        # about a minute on 2 cores
    python bench/facts.py --turns 0              # the labelled set only
    python bench/facts.py --source other.py --show-misses --output reports/facts.json

A fact counts as found when its kind and value match the labelled one, values compared without
case and with ё read as е.
"""
import argparse
import functools
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- defaults
SOURCE = REPO / "create_dataset.py"
FIXTURE = REPO / "tests" / "fixtures" / "user_facts.jsonl"
CORPUS = REPO.parent / "shared" / "data" / "anekdot_dialogues.parquet"
TURNS = 2000         # real turns timed (0: none)
REPEATS = 3          # passes over the labelled set for the warm timing; the median pass counts
SEED = 14
BLOCK_START = "# --- user facts:"
BLOCK_END = "# --- end of the user facts block"
SPLIT_ORDER = ("main", "heldout", "heldout2")


def load_block(path):
    """The user facts block of `path` as a namespace, without importing the rest of the script."""
    text = Path(path).read_text(encoding="utf-8")
    start = re.search(f"^{re.escape(BLOCK_START)}", text, re.MULTILINE).start()
    namespace = {"functools": functools, "re": re, "__name__": "user_facts_block"}
    exec(compile(text[start:text.index(BLOCK_END, start)], str(path), "exec"), namespace)
    return namespace


def read_fixture(path):
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["facts"] = [tuple(fact) for fact in row["facts"]]
    return rows


def read_turns(path, count, seed):
    import pyarrow.parquet as pq
    samples = pq.read_table(path, columns=["sample"]).column("sample").to_pylist()
    turns = [turn for sample in samples for turn in sample or [] if turn]
    return random.Random(seed).sample(turns, min(count, len(turns)))


def score(rows, extract, fold):
    """Counts of true positives, false positives and false negatives per kind, and the misses."""
    counts, misses = {}, []
    for row in rows:
        expected = {(kind, fold(value)) for kind, value in row["facts"]}
        found = {(kind, fold(value)) for kind, value in extract(row["text"])}
        for kind, _ in expected | found:
            counts.setdefault(kind, [0, 0, 0])
        for kind, _ in expected & found:
            counts[kind][0] += 1
        for kind, _ in found - expected:
            counts[kind][1] += 1
        for kind, _ in expected - found:
            counts[kind][2] += 1
        if expected != found:
            misses.append({"text": row["text"], "missed": sorted(expected - found), "wrong": sorted(found - expected)})
    return counts, misses


def ratios(tp, fp, fn):
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / (tp + fn) if tp + fn else 1.0)


def rss_mib():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def clear_caches(tools):
    """Forget every analysis the block keeps, so that the next pass is as a new process's."""
    tools["parse"].cache_clear()
    tokenizer = tools["tokenizer"]
    for cached in (getattr(type(tokenizer), "tokens", None), getattr(type(tokenizer.morph), "__call__", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def seconds_per_text(function, texts, repeats=1):
    """The median over `repeats` passes of the seconds one text takes."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            function(text)
        passes.append((time.perf_counter() - start) / len(texts))
    return statistics.median(passes)


def quality(block, rows, report):
    extract, fold = block["extract_user_facts"], block["fold"]
    misses = []
    for split in sorted({row["split"] for row in rows}, key=SPLIT_ORDER.index):
        part = [row for row in rows if row["split"] == split]
        counts, split_misses = score(part, extract, fold)
        misses += split_misses
        print(f"\n{split}: {len(part)} messages, {sum(len(row['facts']) for row in part)} facts")
        print(f"{'kind':<12}{'facts':>6}{'found':>7}{'precision':>11}{'recall':>8}")
        per_kind = {}
        for kind in block["FACT_KINDS"]:
            if kind in counts:
                tp, fp, fn = counts[kind]
                precision, recall = ratios(tp, fp, fn)
                per_kind[kind] = {"tp": tp, "fp": fp, "fn": fn, "precision": round(precision, 3),
                                  "recall": round(recall, 3)}
                print(f"{kind:<12}{tp + fn:>6}{tp + fp:>7}{precision:>11.3f}{recall:>8.3f}")
        tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
        precision, recall = ratios(tp, fp, fn)
        print(f"{'all':<12}{tp + fn:>6}{tp + fp:>7}{precision:>11.3f}{recall:>8.3f}")
        report["splits"][split] = {"messages": len(part), "precision": round(precision, 3),
                                   "recall": round(recall, 3), "tp": tp, "fp": fp, "fn": fn, "kinds": per_kind}
    return misses


def speed(block, tools, texts, repeats, whole_messages):
    """Baseline, extraction from cold caches, extraction warm (and every grammar everywhere), in
    seconds a text."""
    from yargy.tokenizer import Tokenizer
    plain, morph = Tokenizer(), tools["morph"]
    baseline = seconds_per_text(lambda text: [morph.parse(token.value) for token in plain(text)], texts, repeats)
    extract = block["extract_user_facts"]
    clear_caches(tools)
    cold = seconds_per_text(extract, texts)
    warm = seconds_per_text(extract, texts, repeats)
    figures = {"baseline_ms": baseline * 1000, "cold_ms": cold * 1000, "warm_ms": warm * 1000,
               "cold_ratio": cold / baseline, "warm_ratio": warm / baseline}
    if whole_messages and "facts_in_message" in block:
        def every_grammar(text):
            text = " ".join(text.split())
            return block["facts_in_message"](text, {grammar: [(0, len(text))] for grammar in block["EXTRACTORS"]})
        every = seconds_per_text(every_grammar, texts)
        figures.update({"every_grammar_ms": every * 1000, "every_grammar_ratio": every / baseline})
    return {key: round(value, 3) for key, value in figures.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(SOURCE), help="a file holding the user facts block")
    parser.add_argument("--input", default=str(FIXTURE), help="the labelled messages (jsonl)")
    parser.add_argument("--corpus", default=str(CORPUS), help="dialogues (parquet, a 'sample' column) for real turns")
    parser.add_argument("--turns", type=int, default=TURNS, help="real turns to time (0: none)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--output", default=None, help="also write the figures here (json)")
    parser.add_argument("--show-misses", action="store_true", help="print each message scored wrong")
    args = parser.parse_args(argv)

    rss_before = rss_mib()
    start = time.perf_counter()
    block = load_block(args.source)
    tools = block["load_fact_tools"]()
    load_seconds = time.perf_counter() - start
    rss_loaded = rss_mib()
    rows = read_fixture(args.input)
    report = {"source": args.source, "messages": len(rows), "load_seconds": round(load_seconds, 3),
              "rss_mib_added_by_load": round(rss_loaded - rss_before, 1), "splits": {}}
    print(f"{len(rows)} labelled messages from {args.input}; the block from {args.source}")
    misses = quality(block, rows, report)

    labelled = speed(block, tools, [row["text"] for row in rows], args.repeats, whole_messages=False)
    report["labelled_speed"] = labelled
    print(f"\ntime a message, as a multiple of reading it with pymorphy3 alone "
          f"(on this machine {labelled['baseline_ms']:.2f} ms):")
    print(f"  labelled messages: {labelled['cold_ratio']:.1f}x first pass, {labelled['warm_ratio']:.1f}x repeated")
    corpus = Path(args.corpus)
    if args.turns and corpus.is_file():
        turns = read_turns(corpus, args.turns, args.seed)
        real = speed(block, tools, turns, args.repeats, whole_messages=True)
        if "sentences_worth_parsing" in block:
            parsed = sum(bool(block["sentences_worth_parsing"](" ".join(turn.split()))) for turn in turns)
            real["parsed_share"] = round(parsed / len(turns), 3)
        real["turns_with_facts"] = sum(bool(block["extract_user_facts"](turn)) for turn in turns)
        report["real_turns"] = {"turns": len(turns), "corpus": str(corpus), **real}
        print(f"  {len(turns)} real turns ({corpus.name}; baseline {real['baseline_ms']:.2f} ms): "
              f"{real['cold_ratio']:.1f}x first pass, {real['warm_ratio']:.1f}x repeated", end="")
        if "every_grammar_ratio" in real:
            print(f"; every grammar over every message: {real['every_grammar_ratio']:.1f}x")
            print(f"  parsed at all: {real.get('parsed_share', 1.0):.1%} of the turns; "
                  f"facts in {real['turns_with_facts']} of them")
        else:
            print()
    elif args.turns:
        print(f"  real turns: skipped ({corpus} is absent)")
    report["rss_mib_after_run"] = round(rss_mib(), 1)
    print(f"loading took {load_seconds:.2f} s and {rss_loaded - rss_before:.0f} MiB")
    if args.show_misses:
        for miss in misses:
            print(f"  {miss['text']!r}: missed {miss['missed']}, wrong {miss['wrong']}")
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
