"""pyloader inside engines: ``vllm`` (a model loader registered as ``load_format="pyloader"``) and
``transformers`` (``pyloader.from_pretrained``). Each imports its engine only when used."""
