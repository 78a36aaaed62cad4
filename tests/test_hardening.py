"""Hostile but realistic input: secrets on the command line, damaged study folders, inputs that
would crash or exhaust the machine. Each must be one line (exit 2) and lose nothing recorded."""

from __future__ import annotations

import sys

from lorasweep.study.folder import describe_environment


def test_recorded_command_line_hides_secrets(monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "lorasweep", "run", "s.yaml", "--storage", "postgresql://me:pw1@db/x",
        "--storage=postgresql+psycopg2://me:p%40w2@db:5432/x", "--set",
        "task.dataset=https://u:pw3@example.org/data.jsonl", "--set", "model.hf_token=pw4",
        "HF_TOKEN=pw5", "--api-key", "pw6", "--set", "train.steps=5"])
    command = describe_environment()["command"]
    assert not any(f"pw{i}" in arg for arg in command for i in range(1, 7)), command
    assert command[4] == "postgresql://me:***@db/x"
    assert command[-1] == "train.steps=5", "what holds no secret is kept as given"
