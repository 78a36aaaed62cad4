"""Write a tiny causal LM and a small text dataset into a folder, so that the TRL recipe
(train.py) and its study run offline on a CPU in seconds, with nothing from the hub.

The model is a 2-layer Llama (width 32) with random weights and MiniLM's tokenizer (it ships
inside lorasweep; [CLS] and [SEP] stand for the begin and end of a text); the data is 96 lines
of the Shakespeare genre set bundled with lorasweep, as a JSON lines file with a "text" column
(TRL's language-modelling format).

    python examples/external/trl_sft/make_tiny.py /tmp/trl-tiny
    # then /tmp/trl-tiny/model and /tmp/trl-tiny/data.jsonl are train.py's --model and --dataset
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorasweep.packaged_models import packaged_model_path

DATA = Path(__file__).resolve().parents[3] / "src" / "lorasweep" / "data" / "shakespeare_genre"


def make_tiny(folder: Path, rows: int = 96) -> tuple[Path, Path]:
    """The model's folder and the data file, written under `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path("minilm"))
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = folder / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = folder / "data.jsonl"
    with open(DATA / "train.jsonl") as source, open(data, "w") as out:
        for _, line in zip(range(rows), source, strict=False):
            out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    folder.mkdir(parents=True, exist_ok=True)
    model, data = make_tiny(folder)
    print(f"--model {model} --dataset {data}")


if __name__ == "__main__":
    main()
