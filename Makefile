.PHONY: setup run test lint bench image

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= swagger2mcp-ops:$(VERSION)
BASE_IMAGE ?= python:3.11-slim-bookworm

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
	.venv/bin/lint-imports
	.venv/bin/mypy
	.venv/bin/python -m tasks.settings_doc

bench:
	scripts/setup.sh --dev
	.venv/bin/python -m bench

# The image for docker/kubernetes work pools and workers (Dockerfile); override IMAGE and BASE_IMAGE.
image:
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --tag $(IMAGE) .
