"""Mixed precision to a budget: per-tensor sensitivity (:mod:`.sensitivity`), the allocator
(:mod:`.allocate`) and the GGUF route (:mod:`.gguf_auto`, ``lowbit quantize --to auto``)."""
