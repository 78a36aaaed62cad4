"""PEFT config objects from a study's `peft_config` name and `peft:` arguments (method `peft`).

Built twice: when the study file loads, so an unknown class or argument fails before anything
runs (config/search.py), and when a trial attaches (methods/peft_passthrough.py). It sits beside
`variants.py`, below methods/, because the study file's schema, which the methods import, builds
it too. PEFT is imported only when a config is built.
"""

from __future__ import annotations

from typing import Any

# PEFT configs nested in another, which a study file gives as mappings.
NESTED_PEFT_CONFIGS = {"eva_config": "EvaConfig", "corda_config": "CordaConfig",
                       "lora_ga_config": "LoraGAConfig", "loftq_config": "LoftQConfig"}


def build_peft_config(class_name: str, arguments: dict[str, Any]) -> Any:
    """The PEFT config object a study's `peft_config` and `peft:` arguments describe."""
    import peft

    config_class = getattr(peft, class_name, None)
    if not (isinstance(config_class, type) and issubclass(config_class, peft.PeftConfig)):
        raise ValueError(f"peft_config '{class_name}' is not a PEFT config class (e.g. LoraConfig)")
    from peft.tuners.lora import config as lora_configs  # where CorDA's config lives

    built = {name: getattr(lora_configs, NESTED_PEFT_CONFIGS[name])(**value)
             if name in NESTED_PEFT_CONFIGS and isinstance(value, dict) else value
             for name, value in arguments.items()}
    return config_class(**built)
