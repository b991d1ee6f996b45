"""How often each cleaner rule is right, judged by a person on the real corpus.

Runs parser_dataset.py and then cleaner_text.py's rules over
../shared/data/anekdot_dialogues.parquet,
records every change each rule makes (the turn before and after that rule),
and writes a seeded sample of them, per rule, to a file for a person to judge.
Judged changes live in bench/clean_judgments.tsv (committed, so that every
figure can be traced to the rows behind it); the table of precision per rule
is computed from them. It also runs the cleaner a second time over its own
output and says how many dialogues the second pass changed (it should be 0).

    python bench/clean_precision.py                      # table + bench/results/clean_sample.tsv
    python bench/clean_precision.py --per-rule 150 --seed 7
    python bench/clean_precision.py --record bench/results/clean_sample.tsv

Judging: open the sample file, and in the `verdict` column write `1` where the
change is right (the turn is cleaner and nothing its author meant is lost) and
`0` where it is wrong; leave it empty to skip a row. `--record FILE` copies the
judged rows into the judgments file. A change is keyed by a hash of (rule,
before, after), so a judgment stays attached to its change when the rules move
on; rows whose change no longer happens are kept but no longer counted.

The `personal_data` rule (phones, e-mails, card numbers) almost never fires on
the joke corpus, so it is also judged on a written sample of Russian chat
lines, tests/fixtures/personal_data_chat.tsv: each line with what a person
wants the rule to make of it (`expected`, written before the rule ran on it),
its kind (phone, email, card, mixed, near_miss) and its set (`tune`: the rule
was written against these lines; `held_out`: written after, measured once,
then kept). A change there is right when it gives `expected`; the table says
how many changes were right, and how many lines with personal data were found.
"""
import argparse
import csv
import hashlib
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cleaner_text  # noqa: E402  (a bench may import the stages it measures)
import parser_dataset  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "anekdot_dialogues.parquet"
JUDGMENTS = ROOT / "bench" / "clean_judgments.tsv"
SAMPLE = ROOT / "bench" / "results" / "clean_sample.tsv"
PERSONAL_DATA_LINES = ROOT / "tests" / "fixtures" / "personal_data_chat.tsv"
PER_RULE = 200
SEED = 3016
TARGET = 0.98
FIELDS = ["rule", "key", "verdict", "before", "after", "note"]


def change_key(rule, before, after):
    return hashlib.blake2b(f"{rule}\x1f{before}\x1f{after}".encode(), digest_size=6).hexdigest()


def sample_rank(seed, key):
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def collect_changes(corpus, folder):
    """{rule: {key: (before, after, count)}} for one cleaner run over `corpus`;
    also the cleaner's report and the path of its output."""
    changes = defaultdict(dict)

    def trace(rule, before, after):
        key = change_key(rule, before, after)
        old = changes[rule].get(key)
        changes[rule][key] = (before, after, (old[2] if old else 0) + 1)

    raw, out = folder / "raw.parquet", folder / "clean.parquet"
    # The corpus goes through the parser first, as a user's data would.
    if parser_dataset.main(["--input", str(corpus), "--output", str(raw)]) != 0:
        raise SystemExit(f"parser_dataset.py failed on {corpus}")
    report = cleaner_text.clean_file(raw, out, folder / "report.json", trace=trace)
    return changes, report, out


def second_pass_changes(first_output, folder):
    """Dialogues that a second cleaner pass over the first pass's output changes or drops."""
    second = folder / "clean2.parquet"
    report = cleaner_text.clean_file(first_output, second, folder / "report2.json")
    a = pq.read_table(first_output, columns=["sample", "dialogue_id"]).to_pydict()
    b = pq.read_table(second, columns=["sample", "dialogue_id"]).to_pydict()
    after = dict(zip(b["dialogue_id"], b["sample"]))
    changed = sum(1 for i, turns in zip(a["dialogue_id"], a["sample"]) if after.get(i) != turns)
    return changed, report


def read_tsv(path):
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def write_tsv(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def draw_sample(changes, per_rule, seed):
    """The first `per_rule` distinct changes of each rule in a seeded hash order,
    so that a change keeps its place in the sample when other changes come and go."""
    sample = {}
    for rule, by_key in changes.items():
        keys = sorted(by_key, key=lambda k: sample_rank(seed, k))[:per_rule]
        sample[rule] = keys
    return sample


def record(sample_file, judgments_file):
    judged = {row["key"]: row for row in read_tsv(judgments_file)}
    added = 0
    for row in read_tsv(sample_file):
        verdict = (row.get("verdict") or "").strip()
        if verdict not in ("0", "1"):
            continue
        if row["key"] not in judged or judged[row["key"]]["verdict"] != verdict \
                or judged[row["key"]].get("note", "") != row.get("note", ""):
            added += 1
        judged[row["key"]] = row
    rows = sorted(judged.values(), key=lambda r: (r["rule"], r["key"]))
    write_tsv(judgments_file, rows)
    print(f"recorded {added} new or changed judgments; {len(rows)} in {judgments_file}")


def judge_written_sample(path):
    """Precision and recall of the personal_data rule on the written lines, per set:
    {set: (changes, right changes, lines with personal data, of them masked as expected)}."""
    figures = defaultdict(lambda: [0, 0, 0, 0])
    for row in read_tsv(path):
        after = cleaner_text.mask_personal_data(row["text"])
        numbers = figures[row["set"]]
        if after != row["text"]:
            numbers[0] += 1
            numbers[1] += after == row["expected"]
        if row["expected"] != row["text"]:
            numbers[2] += 1
            numbers[3] += after == row["expected"]
    return dict(figures)


def print_written_sample(path):
    figures = judge_written_sample(path)
    if not figures:
        print(f"\n{path} is absent: no written sample for personal_data")
        return
    print(f"\npersonal_data on the written chat lines ({path.name}):\n")
    print("| set | lines changed | right | precision | lines with personal data | found | recall |")
    print("|---|---|---|---|---|---|---|")
    total = [0, 0, 0, 0]
    for name in sorted(figures) + ["all"]:
        numbers = total if name == "all" else figures[name]
        if name != "all":
            total = [a + b for a, b in zip(total, numbers)]
        changed, right, pii, found = numbers
        precision = f"{right / changed:.3f}" if changed else "—"
        recall = f"{found / pii:.3f}" if pii else "—"
        print(f"| {name} | {changed} | {right} | {precision} | {pii} | {found} | {recall} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description="precision of each cleaner rule, judged by a person")
    parser.add_argument("--input", default=str(CORPUS))
    parser.add_argument("--per-rule", type=int, default=PER_RULE, help="changes sampled per rule")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--judgments", default=str(JUDGMENTS))
    parser.add_argument("--output", default=str(SAMPLE), help="the sample to judge")
    parser.add_argument("--record", metavar="FILE", help="copy the judged rows of FILE into --judgments")
    parser.add_argument("--personal-data-lines", default=str(PERSONAL_DATA_LINES),
                        help="the written chat lines the personal_data rule is judged on")
    args = parser.parse_args(argv)
    if args.record:
        record(args.record, args.judgments)
        return 0
    print_written_sample(Path(args.personal_data_lines))
    corpus = Path(args.input)
    if not corpus.is_file():
        print(f"skipped: {corpus} is absent (the corpus part needs ../shared/data)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        changes, report, first = collect_changes(corpus, tmp)
        second_changed, _ = second_pass_changes(first, tmp)

    judged = {row["key"]: row for row in read_tsv(args.judgments)}
    sample = draw_sample(changes, args.per_rule, args.seed)
    rows = []
    order = cleaner_text.RULE_NAMES + [f"cut:{r}" for r in cleaner_text.CUT_REASONS]
    print(f"{report['dialogues_in']} dialogues, {report['turns_in']} turns in; "
          f"{report['dialogues_out']} dialogues, {report['turns_out']} turns out; "
          f"second pass changed {second_changed} dialogues\n")
    print(f"| rule | turns changed on the corpus | sampled | judged | right | precision |")
    print(f"|---|---|---|---|---|---|")
    unjudged = 0
    for rule in order:
        count = sum(c for _, _, c in changes.get(rule, {}).values())
        keys = sample.get(rule, [])
        verdicts = [judged[k]["verdict"] for k in keys if k in judged]
        right = verdicts.count("1")
        unjudged += len(keys) - len(verdicts)
        precision = f"{right / len(verdicts):.3f}" if verdicts else "—"
        flag = " (below target)" if verdicts and right / len(verdicts) < TARGET else ""
        if count or rule in cleaner_text.RULE_NAMES:
            print(f"| {rule} | {count} | {len(keys)} | {len(verdicts)} | {right} | {precision}{flag} |")
        for key in keys:
            before, after, _ = changes[rule][key]
            known = judged.get(key, {})
            rows.append({"rule": rule, "key": key, "verdict": known.get("verdict", ""),
                         "before": before, "after": after, "note": known.get("note", "")})
    write_tsv(args.output, rows)
    print(f"\nsample of {len(rows)} changes ({unjudged} not judged yet) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
