"""llama.cpp's GGUF format: block types, mixes, importance matrices, conversion, safe reading and writing.

The modules import each other in layers (``tests/test_gguf_imports.py`` checks it), bottom up:

* ``names`` (tensor names and rotary layout), ``_base``/``_blockops``/``native`` (block-type
  registry, float32-exact operations, the optional C quantizers), ``llamacpp`` (llama.cpp itself
  through llama-cpp-python, when installed: its tokenizer and its logits);
  ``lowbit.models.architectures`` (the supported families) sits beside them;
* the block types (``quants`` and the ``*quants`` modules it registers), ``mixes`` (per-tensor
  types of llama.cpp's mixes), ``writer``/``reader`` (files), ``imatrix`` (importance matrices);
* ``sources`` (a GGUF file or Hugging Face folder seen as GGUF tensors), ``vocab`` (tokenizer
  metadata), ``plan`` (the types of a file to write and the checks before writing);
* ``convert`` (:func:`~lowbit.gguf.convert.quantize_to_gguf`: the writing);
* ``from_quantized`` (calibrated codes written as GGUF blocks through ``convert``'s hooks).
"""
