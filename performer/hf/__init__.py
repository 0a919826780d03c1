"""Performer exports in Hugging Face transformers, tokenizers and PEFT.

    import performer.hf  # registers the classes with transformers' Auto classes
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained("runs/tiny/export")
    tokenizer = AutoTokenizer.from_pretrained("runs/tiny/export")

Plain ``import performer`` registers them too, without importing transformers itself: at once if
transformers is already imported, else right after it is (performer/autoregister.py). Without
performer imported, ``trust_remote_code=True`` opens an export through its remote-code files,
which import this package where it is installed, and the export's copy of it elsewhere
(performer/hf_files.py).

Needs the ``hf`` extra (transformers 5, tokenizers, peft, accelerate); the core package and the
trainer never import it.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

if Version(transformers.__version__).major != 5:
    raise ImportError(
        f"performer.hf needs transformers 5 (found {transformers.__version__}): pip install 'performer-pretrain[hf]'"
    )

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from performer import hf_files  # noqa: E402
from performer.hf.configuration import PerformerConfig  # noqa: E402
from performer.hf.modeling import (  # noqa: E402
    PerformerCache,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerPreTrainedModel,
)
from performer.hf.tokenization import PerformerTokenizerFast  # noqa: E402


def register() -> None:
    """Register the config, both models and the tokenizer with transformers' Auto classes (idempotent)."""
    AutoConfig.register(hf_files.MODEL_TYPE, PerformerConfig, exist_ok=True)
    AutoModelForSeq2SeqLM.register(PerformerConfig, PerformerForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(PerformerConfig, PerformerForCausalLM, exist_ok=True)
    AutoTokenizer.register(PerformerConfig, fast_tokenizer_class=PerformerTokenizerFast, exist_ok=True)


register()

__all__ = [
    "PerformerCache",
    "PerformerConfig",
    "PerformerForCausalLM",
    "PerformerForConditionalGeneration",
    "PerformerPreTrainedModel",
    "PerformerTokenizerFast",
    "register",
]
