# Every target creates .venv first when it is missing, so a fresh clone needs only `make <target>`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts

.PHONY: install test test-fast lint format demo serve bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pyright

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -rfE

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m modeconn.demo --out $(ARTIFACTS)

serve: $(STAMP)
	$(BIN)/python -m modeconn.demo --out $(ARTIFACTS) --if-missing --quiet
	$(BIN)/python -m modeconn --quiet serve-build $(ARTIFACTS)
	@echo "Docs: http://127.0.0.1:3000/   (OpenAPI: /docs.json; served paths: curl http://127.0.0.1:3000/paths)"
	MODECONN_ARTIFACTS=$(abspath $(ARTIFACTS)) BENTOML_DO_NOT_TRACK=True \
		$(BIN)/bentoml serve service.service:ModeConnService --host 127.0.0.1 --port 3000

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick --no-write

clean:
	rm -rf $(ARTIFACTS) build .pytest_cache .ruff_cache
