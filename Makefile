# Two commands do everything on a fresh machine:
#   make demo   - every stage of the kit on the bundled sample, one after another
#   make test   - the test suite
# Both create .venv and install requirements.txt into it first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-all demo bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python parser_dataset.py --input data/sample_dialogues.jsonl
	$(BIN)/python cleaner_text.py
	$(BIN)/python create_dataset.py

clean:
	rm -rf .pytest_cache data/*.parquet data/*.csv data/clean_report.json
