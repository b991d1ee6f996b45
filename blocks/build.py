"""Write the shared blocks into the scripts that use them, or check that they are there unchanged.

The kit's scripts import nothing of the kit, so that one file pasted into a notebook cell runs
alone. Code that several scripts need lives once, as a file of this folder, and this generator
writes it into each script that lists it (SQLite's amalgamation: edit the source, ship one file).

    python blocks/build.py                 # (make blocks) rewrite every script's generated region
    python blocks/build.py tg_bot.py       # only these scripts
    python blocks/build.py --check         # exit 1, naming the script and the command, when a copy differs

A script's generated region starts at the banner line below and ends before the script's
`if __name__ == "__main__":` footer; inside it each block stands between the two markers that
name its source. Everything a notebook user reads or sets (the docstring, the defaults block,
the script's own code and `main`) comes before the region.

The check also reads each block and each script's own part with `ast` for the names their
top-level statements evaluate while the script is imported (decorators, default values, base
classes, module-level expressions): each must be defined before it, by the script's own part or an
earlier block, or the pasted cell would stop with a NameError.
"""
import argparse
import ast
import builtins
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_DIR = "blocks"

# The blocks each script holds, in the order they are written into it.
HOSTS = {
    "create_dataset.py": ["user_facts", "ratings"],
    "train_transformer.py": ["prompt_rule", "trainer", "feedback"],
    "train_medium_context.py": ["prompt_rule", "trainer", "feedback"],
    "perplexity.py": ["prompt_rule", "model_folders", "scoring"],
    "evaluate.py": ["prompt_rule", "decoding", "model_folders", "scoring", "metrics"],
    "pytorch_chatbot.py": ["lstm", "metrics"],
    "tensorflow_chatbot.py": ["lstm", "metrics"],
    "system_prompt.py": ["prompt_rule", "decoding", "user_facts", "memory_commands", "chat", "batcher", "ratings"],
    "tg_bot.py": ["prompt_rule", "decoding", "user_facts", "memory_commands", "chat", "batcher", "ratings"],
}

BANNER = [
    "# " + "=" * 98,
    "# Generated blocks: shared code that blocks/build.py writes into every script that needs it.",
    "# Do not edit it here: change the block's source in blocks/, then run `make blocks`",
    "# (`python blocks/build.py`); the suite fails while a copy differs from its source.",
    "# " + "=" * 98,
]
FOOTER = 'if __name__ == "__main__":'


def start_marker(name):
    return f"# ==== block {BLOCK_DIR}/{name}.py: generated, edit the source and run `make blocks` ===="


def end_marker(name):
    return f"# ==== end of block {BLOCK_DIR}/{name}.py ===="


class BuildError(Exception):
    """A script or block this generator cannot work with: one line, exit 1."""


def read_lines(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read().split("\n")


def block_source(name, root):
    path = os.path.join(root, BLOCK_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise BuildError(f"{BLOCK_DIR}/{name}.py: block not found")
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def split_host(script, lines):
    """(own part, generated region, footer) of a script's lines."""
    banner = [i for i, line in enumerate(lines) if line == BANNER[1]]
    footer = [i for i, line in enumerate(lines) if line == FOOTER]
    if len(banner) != 1:
        raise BuildError(f"{script}: {'no' if not banner else 'more than one'} generated-blocks banner "
                         f"('{BANNER[1]}')")
    if not footer:
        raise BuildError(f"{script}: no `{FOOTER}` footer to write the blocks before")
    start, end = banner[0] - 1, footer[-1]
    if start < 0 or lines[start] != BANNER[0] or end < start:
        raise BuildError(f"{script}: the generated-blocks banner is not where the generator writes it")
    return lines[:start], lines[start:end], lines[end:]


def generated_region(names, root):
    region = list(BANNER) + [""]
    for name in names:
        region += ["", start_marker(name)] + block_source(name, root) + [end_marker(name), ""]
    return region + [""]


def blocks_in(region):
    """The block names a script's region holds, by its markers, in order."""
    prefix = f"# ==== block {BLOCK_DIR}/"
    return [line[len(prefix):].split(".py", 1)[0] for line in region if line.startswith(prefix)]


# ---------------------------------------------------------------- names read at import time

def defined_names(tree):
    """Names a module's top-level statements bind (through if/try/with/for bodies too)."""
    names = set()
    for node in tree.body if isinstance(tree, ast.Module) else tree:
        for sub in walk_top_level(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                for alias in sub.names:
                    names.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                names.add(sub.id)
            elif isinstance(sub, ast.ExceptHandler) and sub.name:
                names.add(sub.name)
    return names


def walk_top_level(node):
    """ast.walk that does not enter function bodies, lambdas or class bodies' functions."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # evaluated when the def runs: decorators, defaults, annotations; not the body
            args = current.args
            stack.extend(current.decorator_list + args.defaults + [d for d in args.kw_defaults if d])
            continue
        if isinstance(current, ast.Lambda):
            stack.extend(current.args.defaults + [d for d in current.args.kw_defaults if d])
            continue
        stack.extend(ast.iter_child_nodes(current))


def names_read_at_import(statements):
    """[(name, line)] that top-level statements load before defining them themselves."""
    known, reads = set(), []
    for node in statements:
        for sub in walk_top_level(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in known:
                reads.append((sub.id, sub.lineno))
        known |= defined_names([node])
    # a comprehension's own variables are bound inside it
    return [(name, line) for name, line in reads if not bound_in_comprehension(statements, name)]


def bound_in_comprehension(statements, name):
    for node in statements:
        for sub in walk_top_level(node):
            if isinstance(sub, ast.comprehension):
                for target in ast.walk(sub.target):
                    if isinstance(target, ast.Name) and target.id == name:
                        return True
    return False


BUILTIN_NAMES = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__builtins__"}


def check_import_time_names(script, own, names, root):
    """Each name a block (or the script's own part) reads at import time is defined before it."""
    try:
        own_tree = ast.parse("\n".join(own))
    except SyntaxError as exc:
        raise BuildError(f"{script}: line {exc.lineno}: the part before the generated blocks does not parse")
    defined = BUILTIN_NAMES | set()
    later = {}
    trees = []
    for name in names:
        try:
            tree = ast.parse("\n".join(block_source(name, root)))
        except SyntaxError as exc:
            raise BuildError(f"{BLOCK_DIR}/{name}.py: line {exc.lineno}: does not parse")
        trees.append((name, tree))
        for bound in defined_names(tree):
            later.setdefault(bound, name)
    problems = []
    own_defined = defined_names(own_tree)
    for read, line in names_read_at_import(own_tree.body):
        if read not in own_defined and read not in BUILTIN_NAMES and read in later:
            problems.append(f"{script}: line {line} reads {read} at import time, but only "
                            f"{BLOCK_DIR}/{later[read]}.py defines it, after the script's own part")
    defined |= own_defined
    for name, tree in trees:
        block_defined = defined_names(tree)
        for read, line in names_read_at_import(tree.body):
            if read not in defined and read not in block_defined:
                problems.append(f"{BLOCK_DIR}/{name}.py: line {line} reads {read} at import time, "
                                f"which {script} does not define before the block")
        defined |= block_defined
    return problems


# ---------------------------------------------------------------- build and check

def build(root=ROOT, check=False, only=None):
    """Rewrite (or, with check, compare) every host's region (or those in only); returns the problems found."""
    problems = []
    unknown = sorted(set(only or ()) - set(HOSTS))
    if unknown:
        return [f"{', '.join(unknown)}: not a script listed in {BLOCK_DIR}/build.py HOSTS"]
    for script, names in HOSTS.items():
        if only and script not in only:
            continue
        path = os.path.join(root, script)
        if not os.path.isfile(path):
            problems.append(f"{script}: script not found")
            continue
        lines = read_lines(path)
        try:
            own, region, footer = split_host(script, lines)
            wanted = generated_region(names, root)
            problems += check_import_time_names(script, own, names, root)
        except BuildError as exc:
            problems.append(str(exc))
            continue
        if region == wanted:
            continue
        if check:
            held = blocks_in(region)
            if held != names:
                problems.append(f"{script}: holds the blocks {held}, not {names}; run `make blocks`")
            else:
                differ = [n for n in names if blocks_region(region, n) != block_source(n, root)]
                what = ", ".join(f"{BLOCK_DIR}/{n}.py" for n in differ) or "the banner"
                problems.append(f"{script}: its copy of {what} differs from the source; "
                                f"edit the source in {BLOCK_DIR}/ and run `make blocks`")
        else:
            write_atomic(path, "\n".join(own + wanted + footer))
            print(f"{script}: wrote {', '.join(names)}")
    problems += strays(root)
    return problems


def blocks_region(region, name):
    try:
        start = region.index(start_marker(name)) + 1
        end = region.index(end_marker(name), start)
    except ValueError:
        return None
    return region[start:end]


def strays(root):
    """A block marker in a script that is not a host leaves the check silently: refuse it."""
    problems = []
    for entry in sorted(os.listdir(root)):
        if entry.endswith(".py") and entry not in HOSTS:
            if any(line.startswith(f"# ==== block {BLOCK_DIR}/") or line == BANNER[1]
                   for line in read_lines(os.path.join(root, entry))):
                problems.append(f"{entry}: holds generated blocks but is not listed in {BLOCK_DIR}/build.py HOSTS")
    return problems


def write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="blocks/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a copy differs")
    parser.add_argument("--root", default=ROOT, help="the repository (default: this file's)")
    parser.add_argument("scripts", nargs="*", help="only these scripts (default: every script in HOSTS)")
    args = parser.parse_args(argv)
    problems = build(args.root, check=args.check, only=[os.path.basename(s) for s in args.scripts])
    for problem in problems:
        print(f"blocks/build.py: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
