"""Hugging Face remote code for OpenELM, written for elmctl (Apache-2.0), copied into every export.

``configuration_openelm.py`` and ``modeling_openelm.py`` are self-contained (they import only torch
and transformers, never elmctl) because ``elmctl.model.hf_export.write_hf_code`` copies them into an
exported folder, where ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads
them through the ``auto_map`` of ``config.json``. They are a subpackage so that setuptools ships them
and tests can import them directly; importing this package imports nothing (the CLI starts fast).
"""

FILES = ("configuration_openelm.py", "modeling_openelm.py")
