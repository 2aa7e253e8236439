.PHONY: setup run test lint bench

setup:
	scripts/setup.sh --dev --system

run:
	scripts/run-local.sh

test:
	scripts/test.sh

lint:
	scripts/setup.sh --dev
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench:
	scripts/setup.sh --dev
	.venv/bin/python -m bench
