"""Each script pasted whole into one notebook cell and run by a real Jupyter kernel, as Colab runs it.

A test reads a script's text, edits its defaults block as a notebook user would (`set_defaults`), and
runs it as a cell of a notebook (nbclient and ipykernel) in one folder shared by the whole module,
which starts with nothing but the bundled sample in data/. The stages run in the kit's order and each
test checks that its stage wrote what the next one reads; a bad input gives the one-line
`<script>: error: ...` in the cell, with no traceback and no exception. A probe cell before and after
checks that a script leaves the kernel as it found it (signal handlers, the matplotlib backend,
CUDA_VISIBLE_DEVICES, exception hooks), since a notebook keeps running after the cell.

Every one of the eleven scripts follows the notebook pattern (issue 10); a script that loses it fails
here, it is not skipped. Where a stage's own test did not produce its output (a test run alone with -k),
`produce` makes that output with the script's command line.
"""
import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample_dialogues.jsonl"
CELL_TIMEOUT = 300  # seconds for one cell; the slowest here trains a tiny model


LSTM_TINY = {"EMB_DIM": 16, "HIDDEN": 32, "EPOCHS": 2, "BATCH_SIZE": 32, "VOCAB_SIZE": 500,
             "DEVICE": "cpu", "THREADS": 1, "SEED": 7}
TRANSFORMER_TINY = {"FROM_SCRATCH": True, "N_LAYER": 1, "N_HEAD": 2, "N_EMBD": 32, "VOCAB_SIZE": 300,
                    "MAX_STEPS": 4, "EVAL_STEPS": 2, "LOGGING_STEPS": 1, "BATCH_SIZE": 8, "VAL_ROWS": 16,
                    "DEVICE": "cpu"}
LSTM_MODELS = {"pytorch_chatbot.py": "lstm_pytorch", "tensorflow_chatbot.py": "lstm_keras"}
TRANSFORMER_MODELS = {"train_transformer.py": "rugpt3_50k", "train_medium_context.py": "rugpt3_medium_CLEAN_model"}

# What each stage writes that a later one reads, and the command line that writes it for the stages
# whose cell test has not (not converted yet, or it failed): tiny sizes, as in the cells.
PRODUCE = {
    "parser_dataset.py": (["data/russian_dialogues.parquet"], ["--input", "data/sample_dialogues.jsonl"]),
    "cleaner_text.py": (["data/clean_dialogues.parquet", "data/clean_report.json"], []),
    "create_dataset.py": ([f"data/{kind}_{split}.{ext}" for kind, ext in (("pairs", "csv"), ("context", "parquet"))
                           for split in ("train", "val", "test")], []),
    "pytorch_chatbot.py": (["lstm_pytorch/config.json", "lstm_pytorch/model.pt"],
                           ["train", "--emb-dim", "16", "--hidden", "32", "--epochs", "2", "--batch-size", "32",
                            "--vocab-size", "500", "--device", "cpu", "--threads", "1", "--quiet"]),
    "tensorflow_chatbot.py": (["lstm_keras/config.json", "lstm_keras/model.keras"],
                              ["train", "--emb-dim", "16", "--hidden", "32", "--epochs", "2", "--batch-size", "32",
                               "--vocab-size", "500", "--device", "cpu", "--threads", "1", "--quiet"]),
    **{script: ([f"{folder}/config.json", f"{folder}/chat_config.json"],
                ["--from-scratch", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300",
                 "--max-steps", "4", "--eval-steps", "2", "--batch-size", "8", "--val-rows", "16", "--device", "cpu"])
       for script, folder in TRANSFORMER_MODELS.items()},
}
NEEDS = {  # the stages whose output a stage reads, in the order they run
    "parser_dataset.py": [],
    "cleaner_text.py": ["parser_dataset.py"],
    "create_dataset.py": ["parser_dataset.py", "cleaner_text.py"],
    "pytorch_chatbot.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py"],
    "tensorflow_chatbot.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py"],
    "train_transformer.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py"],
    "train_medium_context.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py"],
    "perplexity.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py", "train_transformer.py"],
    "evaluate.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py", "pytorch_chatbot.py",
                    "tensorflow_chatbot.py", "train_transformer.py", "train_medium_context.py"],
    "system_prompt.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py", "train_medium_context.py"],
    "tg_bot.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py", "train_transformer.py"],
    "export_gguf.py": ["parser_dataset.py", "cleaner_text.py", "create_dataset.py", "train_transformer.py"],
}

# The end every converted script has, word for word but for the argv of a pasted cell.
NOTEBOOK_ENDING = '''if __name__ == "__main__":
    if "__file__" in globals():  # `python <script> ...` or `%run <script> ...`: the flags given there
        sys.exit(main())
    # Pasted into a notebook cell, which has no __file__: the settings of the defaults block, never the
    # kernel's own argv, and no SystemExit, which a notebook shows as an exception (argparse prints why it stops).
    with contextlib.suppress(SystemExit):
        main({argv})
'''

# Run before and after a script's cells: what a script must leave as it found it in a live kernel.
PROBE = """import json as _json, os as _os, signal as _signal, sys as _sys, threading as _threading
import matplotlib as _matplotlib
print("kernel state: " + _json.dumps({
    "sigint": repr(_signal.getsignal(_signal.SIGINT)), "sigterm": repr(_signal.getsignal(_signal.SIGTERM)),
    "excepthook": repr(_sys.excepthook), "threading_excepthook": repr(_threading.excepthook),
    "matplotlib_backend": _matplotlib.get_backend(), "cuda_visible_devices": _os.environ.get("CUDA_VISIBLE_DEVICES"),
    "cwd": _os.getcwd()}))"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---- the harness ----------------------------------------------------------------------------------
def set_defaults(text, **values):
    """The script's text with `NAME = value` lines of its defaults block rewritten, as a notebook user edits them.

    The defaults block is the module-level code before the first function or class. Each name must be
    assigned there exactly once, alone on the left (`N_LAYER = 4`, not `N_LAYER, N_HEAD = 4, 4`), or the
    test fails here: a setting a notebook user needs is not where they will look for it.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    first_def = next((node.lineno for node in tree.body
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))), len(lines) + 1)
    assigned = {}
    for node in tree.body:
        if node.lineno < first_def and isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            assigned.setdefault(node.targets[0].id, []).append(node)
    for name, value in values.items():
        found = assigned.get(name, [])
        if len(found) != 1:
            pytest.fail(f"`{name} = ...` is assigned {len(found)} times (alone on its line) in the defaults block, "
                        f"not once; names there: {', '.join(sorted(assigned))}", pytrace=False)
        assert ast.literal_eval(repr(value)) == value, f"{name}: {value!r} is not a literal a user could type"
    for name in sorted(values, key=lambda n: -assigned[n][0].lineno):  # from the bottom: line numbers stay valid
        node = assigned[name][0]
        lines[node.lineno - 1:node.end_lineno] = [f"{name} = {values[name]!r}\n"]
    return "".join(lines)


def cell(script, **values):
    """The whole text of a script, its defaults set: what a user pastes into a cell."""
    return set_defaults((REPO / script).read_text(encoding="utf-8"), **values)


def kernel_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYDEVD_DISABLE_FILE_VALIDATION="1",
               JUPYTER_PLATFORM_DIRS="1")
    # As in a fresh notebook: the kernel picks its inline backend, and the GPU is not hidden, so the probe
    # sees a script that hides it.
    for name in ("MPLBACKEND", "CUDA_VISIBLE_DEVICES", "TELEGRAM_BOT_TOKEN", "TELEGRAM_API_URL"):
        env.pop(name, None)
    return env


def run_notebook(folder, sources, while_running=None):
    """Run the cells in one fresh kernel with `folder` as its working folder; the executed cells.

    while_running(client), if given, runs in a thread meanwhile (it may interrupt the kernel: client.km).
    """
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(folder)}})
    helper_errors = []
    if while_running is not None:
        def guarded():
            try:
                while_running(client)
            except BaseException as error:  # reported once the notebook is done
                helper_errors.append(error)

        helper = threading.Thread(target=guarded, daemon=True)
        helper.start()
    client.execute(env=kernel_env())
    if while_running is not None:
        helper.join(timeout=60)
        if helper_errors:
            raise helper_errors[0]
    return notebook.cells


def run_cells_typing(folder, sources, lines, timeout=CELL_TIMEOUT):
    """Run cells in one fresh kernel, a person typing `lines` one by one into their input() calls.

    nbclient offers no stdin, so this talks to the kernel through jupyter_client: the input requests
    come on its stdin channel. A source given as (text, False) runs as where nobody can type
    (nbconvert, papermill). Returns (each cell's outputs as nbformat-like dicts, the prompts input()
    showed). If the cells ask for more lines than given, the kernel is interrupted (input() raises
    KeyboardInterrupt), so a loop that does not stop shows as an extra prompt instead of a hung test.
    """
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(folder), env=kernel_env())
    cells, prompts, waiting = [], [], list(lines)

    def on_input(message):
        prompts.append(message["content"]["prompt"])
        if waiting:
            kc.input(waiting.pop(0))
        else:
            km.interrupt_kernel()

    def on_output(message):
        outputs = cells[-1]
        kind, content = message["header"]["msg_type"], message["content"]
        if kind == "stream":
            outputs.append({"output_type": "stream", "name": content["name"], "text": content["text"]})
        elif kind == "error":
            outputs.append({"output_type": "error", **content})
        elif kind in ("display_data", "execute_result"):
            outputs.append({"output_type": kind, "data": content["data"]})

    try:
        for source in sources:
            text, allow_stdin = source if isinstance(source, tuple) else (source, True)
            cells.append([])
            kc.execute_interactive(text, allow_stdin=allow_stdin, stdin_hook=on_input, output_hook=on_output,
                                   timeout=timeout)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return cells, prompts


def outputs_of(cell_or_outputs):
    return cell_or_outputs if isinstance(cell_or_outputs, list) else cell_or_outputs["outputs"]


def stream(cell_or_outputs, name):
    return "".join(output["text"] for output in outputs_of(cell_or_outputs)
                   if output["output_type"] == "stream" and output["name"] == name)


def describe(cell_or_outputs):
    """Every output of a cell as text, for assertion messages."""
    parts = []
    for output in outputs_of(cell_or_outputs):
        if output["output_type"] == "stream":
            parts.append(f"[{output['name']}] {output['text']}")
        elif output["output_type"] == "error":
            parts.append(f"[error] {output['ename']}: {output['evalue']}\n"
                         + ANSI.sub("", "\n".join(output.get("traceback", []))))
        else:
            parts.append(f"[{output['output_type']}] {sorted(output.get('data', {}))}")
    return "".join(parts)[-6000:]


def assert_no_exception(cell_or_outputs):
    """No error output (an exception, SystemExit included) and no traceback printed by anyone."""
    outputs = outputs_of(cell_or_outputs)
    assert not [o for o in outputs if o["output_type"] == "error"], describe(outputs)
    assert "Traceback" not in stream(outputs, "stdout") + stream(outputs, "stderr"), describe(outputs)


def assert_user_error(cell_or_outputs, script, *fragments):
    """The one-line `<script>: error: ...` naming what is wrong, and no exception or traceback."""
    assert_no_exception(cell_or_outputs)
    errors = [line for line in stream(cell_or_outputs, "stderr").splitlines()
              if line.startswith(f"{script}: error: ")]
    assert len(errors) == 1, describe(cell_or_outputs)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def kernel_state(cell):
    [line] = [line for line in stream(cell, "stdout").splitlines() if line.startswith("kernel state: ")]
    return json.loads(line[len("kernel state: "):])


def images(cell_or_outputs):
    return [o for o in outputs_of(cell_or_outputs)
            if o["output_type"] in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def produce(folder, script):
    """Make what `script` reads: each earlier stage's output that is not there yet, by that stage's command line."""
    for stage in NEEDS[script]:
        produce_output_of(folder, stage)


def produce_output_of(folder, stage):
    files, flags = PRODUCE[stage]
    if all((folder / name).exists() for name in files):
        return
    done = subprocess.run([sys.executable, str(REPO / stage), *flags], cwd=folder, env=kernel_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{stage} {' '.join(flags)}:\n{done.stderr[-3000:]}"
    missing = [name for name in files if not (folder / name).exists()]
    assert not missing, f"{stage} {' '.join(flags)} did not write {missing}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder for the whole row of stages, as a notebook's: at first only the bundled sample."""
    path = tmp_path_factory.mktemp("notebook")
    (path / "data").mkdir()
    shutil.copy(SAMPLE, path / "data" / SAMPLE.name)
    return path


# ---- the harness's own rules -----------------------------------------------------------------------
def test_set_defaults_rewrites_only_the_named_lines_and_refuses_unknown_names():
    text = 'import os\nMODE = "train"   # a comment\nEPOCHS = (\n    10)\nN_LAYER, N_HEAD = 4, 4\n\n' \
           'def main():\n    MODE = "other"\n'
    edited = set_defaults(text, MODE="eval", EPOCHS=2)
    assert edited == 'import os\nMODE = \'eval\'\nEPOCHS = 2\nN_LAYER, N_HEAD = 4, 4\n\n' \
                     'def main():\n    MODE = "other"\n'
    for name in ("N_LAYER", "NOT_THERE"):
        with pytest.raises(pytest.fail.Exception, match=name):
            set_defaults(text, **{name: 1})


@pytest.mark.parametrize("script", sorted(NEEDS))
def test_converted_script_ends_with_the_notebook_ending(script):
    text = (REPO / script).read_text(encoding="utf-8")
    ending = text[text.index('if __name__ == "__main__":'):]
    # The same lines everywhere, so that what the LSTM tests show of `%run` and `!python` (flags as on a
    # terminal) and of a pasted cell (the defaults block, no kernel argv, no SystemExit) holds for all.
    assert ending in (NOTEBOOK_ENDING.format(argv="[MODE]"), NOTEBOOK_ENDING.format(argv="[]")), ending
    assert "import contextlib" in text




# ---- 1-3: the data stages ----------------------------------------------------------------------------
def test_parser_dataset_in_a_cell(folder):
    """Pasted unchanged into a notebook in a folder that holds the sample, the cell reads the sample (INPUT's
    default); wrong settings in the block give one `parser_dataset.py: error:` line; %run takes flags."""
    script = "parser_dataset.py"
    cells = run_notebook(folder, [
        PROBE,
        cell(script, INPUT="data/no_such_file.jsonl"),
        cell(script, LIMIT=0),
        cell(script, PRESET="no_such_preset"),
        f"%run {REPO / script} --input data/sample_dialogues.jsonl --limit 5 --output data/first_five.parquet",
        cell(script),
        PROBE,
    ])
    assert_user_error(cells[1], script, "no_such_file.jsonl", "no such file", "INPUT")
    # argparse's own checks of the block's values name the script, not the kernel (ipykernel_launcher.py).
    assert_user_error(cells[2], script, "--limit must be positive")
    assert_user_error(cells[3], script, "no_such_preset", "russian_dialogues")
    assert_no_exception(cells[4])
    assert len(pd.read_parquet(folder / "data" / "first_five.parquet")) == 5
    assert_no_exception(cells[5])
    frame = pd.read_parquet(folder / "data" / "russian_dialogues.parquet")
    assert {"sample", "dialogue_id", "source"} <= set(frame.columns) and len(frame) > 100
    assert set(frame["source"]) == {"sample_dialogues.jsonl"}
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


def test_cleaner_text_in_a_cell(folder):
    script = "cleaner_text.py"
    produce(folder, script)
    cells = run_notebook(folder, [
        PROBE,
        cell(script, DEFAULT_INPUT="data/no_such_file.parquet"),
        cell(script, MIN_TURNS=1),
        cell(script, DEFAULT_OUTPUT="data/with_duplicates.parquet", DEFAULT_REPORT="reports/with_duplicates.json",
             KEEP_DUPLICATES=True),
        cell(script),
        PROBE,
    ])
    assert_user_error(cells[1], script, "no_such_file.parquet")
    assert_user_error(cells[2], script, "--min-turns")
    assert_no_exception(cells[3])
    report = json.loads((folder / "reports" / "with_duplicates.json").read_text(encoding="utf-8"))
    assert report["thresholds"]["dedupe"] is False
    assert_no_exception(cells[4])
    frame = pd.read_parquet(folder / "data" / "clean_dialogues.parquet")
    assert {"sample", "dialogue_id", "source"} <= set(frame.columns) and len(frame) > 100
    report = json.loads((folder / "data" / "clean_report.json").read_text(encoding="utf-8"))
    assert report["thresholds"]["dedupe"] is True
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


def test_create_dataset_in_a_cell(folder):
    script = "create_dataset.py"
    produce(folder, script)
    cells = run_notebook(folder, [
        PROBE,
        cell(script, DEFAULT_INPUT="data/no_such_file.parquet"),
        cell(script, ROWS=0),
        cell(script, ROWS=30, DEFAULT_OUTPUT="data_30"),
        cell(script),
        PROBE,
    ])
    assert_user_error(cells[1], script, "no_such_file.parquet")
    assert_user_error(cells[2], script, "--rows must be positive")
    assert_no_exception(cells[3])
    assert sum(len(pd.read_csv(folder / "data_30" / f"pairs_{split}.csv"))
               for split in ("train", "val", "test")) == 30
    assert_no_exception(cells[4])
    for split in ("train", "val", "test"):
        pairs = pd.read_csv(folder / "data" / f"pairs_{split}.csv")
        assert list(pairs.columns) == ["dialogue_id", "question", "answer"] and len(pairs) > 0
        context = pd.read_parquet(folder / "data" / f"context_{split}.parquet")
        assert list(context.columns) == ["dialogue_id", "context", "answer", "facts"] and len(context) > 0
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


# ---- 4-5: the LSTM baselines ---------------------------------------------------------------------
@pytest.mark.parametrize("script", ["pytorch_chatbot.py", "tensorflow_chatbot.py"])
def test_lstm_train_and_eval_in_cells(folder, script):
    """In one kernel, as a user goes: a wrong MODE, a wrong DEVICE, a missing folder, train, eval, chat where
    nobody can type, then the same script by %run and by !python with flags the defaults block does not have."""
    produce(folder, script)
    kit = LSTM_MODELS[script]  # the model folder's name and its kit_model
    test_rows = len(pd.read_csv(folder / "data" / "pairs_test.csv"))
    flags = "eval --report-dir {} --device cpu --threads 1 --quiet"
    cells = run_notebook(folder, [
        PROBE,
        cell(script, MODE="trian", **LSTM_TINY),
        cell(script, MODE="train", **{**LSTM_TINY, "DEVICE": "tpu"}),
        cell(script, MODE="train", DATA_DIR="no_such_folder", **LSTM_TINY),
        cell(script, MODE="train", **LSTM_TINY),
        cell(script, MODE="eval", DEVICE="cpu", THREADS=1),
        cell(script, MODE="chat", DEVICE="cpu", THREADS=1),
        f"%run {REPO / script} {flags.format('reports_run')}",
        f"!{sys.executable} {REPO / script} {flags.format('reports_shell')}",
        PROBE,
    ])
    assert_user_error(cells[1], script, "invalid choice", "trian")
    assert_user_error(cells[2], script, "--device 'tpu'", "must be one of")
    assert_user_error(cells[3], script, "no_such_folder/pairs_train.csv", "not found")
    assert not (folder / "no_such_folder").exists()

    assert_no_exception(cells[4])
    config = json.loads((folder / kit / "config.json").read_text(encoding="utf-8"))
    assert config["kit_model"] == kit
    # The defaults block, not the script's own defaults, set the run.
    assert (config["emb_dim"], config["hidden"], config["training"]["epochs"]) == (16, 32, 2)
    assert config["vocab_size"] <= 500
    assert "best val loss" in stream(cells[4], "stdout")

    assert_no_exception(cells[5])
    report = json.loads((folder / "reports" / f"{kit}.json").read_text(encoding="utf-8"))
    assert report["rows"] == test_rows and report["decoding"] == "greedy" and report["device"] == "cpu"
    assert 0 <= report["bleu4"] <= 1
    assert "BLEU-4" in stream(cells[5], "stdout")

    assert_user_error(cells[6], script, "cannot ask for input", "CHAT_SCRIPT")

    for done, reports in ((cells[7], "reports_run"), (cells[8], "reports_shell")):
        assert_no_exception(done)
        assert json.loads((folder / reports / f"{kit}.json").read_text(encoding="utf-8"))["rows"] == test_rows
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


@pytest.mark.parametrize("script", ["pytorch_chatbot.py", "tensorflow_chatbot.py"])
def test_lstm_chat_in_a_cell_reads_input_and_stops_on_vyhod(folder, script):
    produce(folder, script)
    produce_output_of(folder, script)  # the model, where the test before did not make it
    [outputs], prompts = run_cells_typing(folder, [cell(script, MODE="chat", DEVICE="cpu", THREADS=1)],
                                          ["Привет!", "", "Как дела?", "Выход"])
    assert_no_exception(outputs)
    assert prompts == ["Вы: "] * 4, prompts  # asked for each line and not once more after «выход»
    replies = [line for line in stream(outputs, "stdout").splitlines() if line.startswith("Бот:")]
    assert len(replies) == 2, describe(outputs)  # the empty line gets no reply


# ---- 6-7: the transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_transformer.py", "train_medium_context.py"])
def test_transformer_training_in_a_cell_shows_its_curves(folder, script):
    produce(folder, script)
    model = TRANSFORMER_MODELS[script]
    cells = run_notebook(folder, [PROBE, cell(script, DATA_DIR="no_such_folder", **TRANSFORMER_TINY),
                                  cell(script, **TRANSFORMER_TINY), PROBE])
    assert_user_error(cells[1], script, "no_such_folder")
    assert_no_exception(cells[2])
    for name in ("config.json", "chat_config.json", "model.safetensors", "training_curves.png"):
        assert (folder / model / name).is_file(), name
    assert images(cells[2]), describe(cells[2])  # the training curves, shown in the cell
    # The same backend as before: a script that forces Agg leaves every later plot of the notebook blank.
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


# ---- 8-9: measuring ----------------------------------------------------------------------------------
def test_perplexity_in_a_cell(folder):
    """The defaults block names the trainer's folder (MODEL); wrong settings in the block give one
    `perplexity.py: error:` line, DEVICE included (argparse checks choices only for flags); %run takes flags."""
    script = "perplexity.py"
    produce(folder, script)
    model = TRANSFORMER_MODELS["train_transformer.py"]
    cells = run_notebook(folder, [
        PROBE,
        cell(script, MODEL="no_such_model"),
        cell(script, DEVICE="tpu"),
        cell(script, MAX_TURNS=0),
        f"%run {REPO / script} --model {model} --rows 4 --device cpu --output reports_run",
        cell(script, ROWS=8, DEVICE="cpu"),
        PROBE,
    ])
    assert_user_error(cells[1], script, "no_such_model")
    assert_user_error(cells[2], script, "--device 'tpu'", "must be one of")
    assert_user_error(cells[3], script, "--max-turns")
    assert_no_exception(cells[4])
    assert json.loads((folder / "reports_run" / f"perplexity_{model}.json").read_text(encoding="utf-8"))[
        "rows_scored"] == 4
    assert_no_exception(cells[5])
    report = json.loads((folder / "reports" / f"perplexity_{model}.json").read_text(encoding="utf-8"))
    assert report["rows_scored"] == 8 and report["answer_perplexity"] > 1
    assert "answer perplexity" in stream(cells[5], "stdout")
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


def test_evaluate_in_a_cell_shows_its_chart(folder):
    """The defaults block's MODELS are the four folders the trainers write; the chart shows in the cell and the
    kernel keeps its matplotlib backend; wrong settings give one `evaluate.py: error:` line."""
    script = "evaluate.py"
    produce(folder, script)
    models = ["rugpt3_50k", "rugpt3_medium_CLEAN_model", "lstm_pytorch", "lstm_keras"]
    probe = REPO / "data" / "memory_probe.jsonl"
    # A pasted cell has no __file__ to find the LSTM scripts beside; in Colab they are in the current folder.
    common = {"ROWS": 6, "MAX_NEW_TOKENS": 8, "DEVICE": "cpu", "SCRIPTS_DIR": str(REPO), "PROBE_FILE": str(probe)}
    cells = run_notebook(folder, [
        PROBE,
        cell(script, DATA_DIR="no_such_folder", **common),
        cell(script, **{**common, "DEVICE": "tpu"}),
        cell(script, MODELS=[], **common),
        # One folder typed as a string, not a list, is that one folder (not one a letter).
        cell(script, **{**common, "MODELS": "rugpt3_50k", "ROWS": 2, "OUTPUT_DIR": "reports_one"}),
        f"%run {REPO / script} --model rugpt3_50k --rows 2 --max-new-tokens 4 --device cpu --quiet "
        f"--probe {probe} --output reports_run",
        cell(script, **common),
        PROBE,
    ])
    assert_user_error(cells[1], script, "no_such_folder")
    assert_user_error(cells[2], script, "--device 'tpu'", "must be one of")
    assert_user_error(cells[3], script, "--model")
    for done, reports in ((cells[4], "reports_one"), (cells[5], "reports_run")):
        assert_no_exception(done)
        result = json.loads((folder / reports / "comparison.json").read_text(encoding="utf-8"))
        assert [row["model"] for row in result["models"]] == ["rugpt3_50k"], reports
        assert result["models"][0]["status"] == "ok" and result["settings"]["rows"] == 2, result["models"]
    assert_no_exception(cells[6])
    result = json.loads((folder / "reports" / "comparison.json").read_text(encoding="utf-8"))
    assert [row["model"] for row in result["models"]] == models
    assert all(row["status"] == "ok" for row in result["models"]), result["models"]
    assert (folder / "reports" / "comparison.md").is_file() and (folder / "reports" / "comparison.png").is_file()
    assert images(cells[6]), describe(cells[6])  # the chart, shown in the cell
    # The same backend as before: a script that forces Agg leaves every later plot of the notebook blank.
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


def test_export_gguf_in_a_cell(folder):
    """The defaults block names the trainer's folder; the GGUF and its chat_config.json land beside it, and
    a wrong setting in the block is one `export_gguf.py: error:` line."""
    script = "export_gguf.py"
    produce(folder, script)
    model = TRANSFORMER_MODELS["train_transformer.py"]
    cells = run_notebook(folder, [
        PROBE,
        cell(script, MODEL="no_such_model"),
        cell(script, TYPE="q3"),
        cell(script, MODEL=model, TYPE="f16", OUTPUT="tiny.f16.gguf"),
        PROBE,
    ])
    assert_user_error(cells[1], script, "no_such_model")
    assert_user_error(cells[2], script, "q3")
    assert_no_exception(cells[3])
    assert "tokenizer check" in stream(cells[3], "stdout")
    assert (folder / "tiny.f16.gguf").stat().st_size > 0 and (folder / "tiny.f16.chat_config.json").is_file()
    assert kernel_state(cells[0]) == kernel_state(cells[-1])


# ---- 10-11: talking --------------------------------------------------------------------------------
def test_system_prompt_chat_in_a_cell(folder):
    script = "system_prompt.py"
    produce(folder, script)
    settings = {"DEFAULT_MODEL": "rugpt3_medium_CLEAN_model", "DEFAULT_DEVICE": "cpu", "MAX_NEW_TOKENS": 8,
                "THREADS": 1}
    (before, bad, nobody, outputs, after), prompts = run_cells_typing(
        folder, [PROBE, cell(script, **{**settings, "DEFAULT_MODEL": "no_such_model"}),
                 (cell(script, **settings), False), cell(script, **settings), PROBE],
        ["Привет! Меня зовут Илья.", "/reset", "/memory", "Как дела?", "выход"])
    assert_user_error(bad, script, "no_such_model")
    assert_user_error(nobody, script, "cannot ask for input", "CHAT_SCRIPT")
    assert_no_exception(outputs)
    assert len(prompts) == 5, prompts  # one input() a line, none after «выход»
    said = [line for line in stream(outputs, "stdout").splitlines() if line.startswith("Бот: ")]
    assert len(said) == 4, describe(outputs)  # two replies, the notice that the history was cleared, the memory
    assert "(история разговора очищена)" in said[1]
    assert said[2] == "Бот: имя: Илья"  # long-term memory outlives /reset in a cell too
    assert kernel_state(before) == kernel_state(after)


def test_system_prompt_web_chat_in_a_cell_shows_inline_and_stops_on_a_kernel_interrupt(folder):
    """WEB = True in the pasted cell: the page shows in the cell's output, answers through its own API, and
    the notebook's Stop button (a kernel interrupt) closes it cleanly and gives the kernel back."""
    import socket
    import time

    import requests

    gradio_client = pytest.importorskip("gradio_client")
    script = "system_prompt.py"
    produce(folder, script)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    page = cell(script, DEFAULT_MODEL="rugpt3_medium_CLEAN_model", DEFAULT_DEVICE="cpu", MAX_NEW_TOKENS=8,
                THREADS=1, WEB=True, PORT=port)
    answered = []

    def talk_then_stop(client):
        deadline = time.monotonic() + CELL_TIMEOUT
        while time.monotonic() < deadline:  # the kernel loads torch, gradio and the model first
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        answered.append(gradio_client.Client(url, verbose=False).predict("Привет! Меня зовут Илья.",
                                                                          api_name="/chat"))
        asyncio.run(client.km.interrupt_kernel())  # what the notebook's Stop button sends

    cells = run_notebook(folder, [PROBE, page, PROBE], while_running=talk_then_stop)
    assert_no_exception(cells[1])
    assert answered and answered[0][0].strip() and answered[0][1] == "имя: Илья", describe(cells[1])
    assert f"web chat on {url}" in stream(cells[1], "stderr"), describe(cells[1])
    assert "web chat stopped cleanly" in stream(cells[1], "stderr"), describe(cells[1])
    shown = [o for o in outputs_of(cells[1]) if o["output_type"] == "display_data" and "text/html" in o["data"]]
    assert shown and f"{port}" in shown[0]["data"]["text/html"], describe(cells[1])  # the page, inline
    assert kernel_state(cells[0]) == kernel_state(cells[-1])
    with pytest.raises(requests.RequestException):
        requests.get(url, timeout=5)  # the page is closed


def test_tg_bot_in_a_cell_answers_and_stops_on_a_kernel_interrupt(folder):
    """The bot pasted into a cell serves a fake Bot API until the notebook's Stop button (a kernel interrupt,
    SIGINT): it then stops cleanly, the cell ends without an exception, and the kernel gets its handlers back.
    Before that, a cell without the token and one with a wrong model folder each end in the one-line error."""
    script = "tg_bot.py"
    produce(folder, script)
    from fake_bot_api import FakeBotApi

    token = "123456:notebook-test-token"
    setup = f"import os\nos.environ['TELEGRAM_BOT_TOKEN'] = {token!r}\n"  # what a Colab user does from its secrets
    bot = cell(script, DEFAULT_MODEL="rugpt3_50k", DEFAULT_DEVICE="cpu", DEFAULT_DB="bot_history.sqlite3",
               DEFAULT_POLL_SECONDS=1, MAX_NEW_TOKENS=8, THREADS=1)
    with FakeBotApi(token) as api:
        setup += f"os.environ['TELEGRAM_API_URL'] = {api.url!r}\n"
        answered = []

        def talk_then_stop(client):
            api.push_text(chat_id=7, text="Привет!")
            answered.extend(api.wait_for_messages(7, count=1, timeout=CELL_TIMEOUT))
            asyncio.run(client.km.interrupt_kernel())  # what the notebook's Stop button sends

        no_model = cell(script, DEFAULT_MODEL="no_such_model", DEFAULT_DEVICE="cpu", DEFAULT_DB="bot_history.sqlite3")
        cells = run_notebook(folder, [PROBE, bot, setup, no_model, bot, PROBE], while_running=talk_then_stop)
    assert_user_error(cells[1], script, "TELEGRAM_BOT_TOKEN")  # the secret not set yet
    assert_user_error(cells[3], script, "no_such_model")
    assert answered and answered[0]["text"].strip(), describe(cells[4])
    assert_no_exception(cells[4])
    assert "stopped cleanly" in stream(cells[4], "stderr"), describe(cells[4])
    assert token not in describe(cells[4])
    assert (folder / "bot_history.sqlite3").is_file()
    assert kernel_state(cells[0]) == kernel_state(cells[-1])  # SIGINT is the kernel's again, hooks restored
