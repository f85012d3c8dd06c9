"""Model loading: registry (`registry`), offline real-model fetchers (`smollm2`), byte tokenizer, and one declarative
adapter per architecture family (`adapters`). Import submodules directly; nothing is re-exported here so that a
submodule name never shadows a notebook-API function of the same name (see `esa_pipeline.core.__init__`)."""
