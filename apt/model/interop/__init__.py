"""Converting APT models to and from other formats.

    from apt.model.interop import from_hf, to_hf

    to_hf(model, "exported/")        # transformers loads it as LlamaForCausalLM
    model = from_hf("llama-folder/")  # a local Llama (or Mistral) checkpoint as an APTModel

Only ``safetensors`` and JSON are needed (``tokenizers`` for the tokenizer files, extra ``hf``);
``transformers`` itself is not imported. See docs/interop.md.
"""

from apt.model.interop.errors import InteropError
from apt.model.interop.hf import from_hf, to_hf

__all__ = ["InteropError", "from_hf", "to_hf"]
