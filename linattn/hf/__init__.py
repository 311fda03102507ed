"""Hugging Face transformers integration (the `hf` extra: pip install "linattn[hf]").

Importing this module registers model_type "linattn" with AutoConfig and
AutoModelForCausalLM, so a saved model loads with the Auto classes:

    import linattn.hf  # registers the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/hf")
    tok = AutoTokenizer.from_pretrained("out/hf")
    ids = tok("def main(", return_tensors="pt")
    print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))

    LinAttnConfig       LMConfig's fields as a PretrainedConfig
    LinAttnForCausalLM  PreTrainedModel + GenerationMixin around linattn.models.CausalLM
    LinAttnCache        the per-layer recurrent states generate() carries
    export_run          a `linattn train` run directory -> a save_pretrained directory
    byte_tokenizer, task_tokenizer   the tokenizers saved beside a model
"""
try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as e:  # the core package works without it; this module does not
    raise ImportError("linattn.hf needs transformers 5.x: pip install 'linattn[hf]'") from e

from .cache import LinAttnCache
from .configuration import LinAttnConfig
from .export import export_run, load_any, save_model
from .modeling import LinAttnCausalLMOutput, LinAttnForCausalLM
from .tokenizer import byte_tokenizer, task_tokenizer, tokenizer_for

AutoConfig.register(LinAttnConfig.model_type, LinAttnConfig, exist_ok=True)
AutoModelForCausalLM.register(LinAttnConfig, LinAttnForCausalLM, exist_ok=True)

__all__ = ["LinAttnConfig", "LinAttnForCausalLM", "LinAttnCache", "LinAttnCausalLMOutput",
           "export_run", "load_any", "save_model", "byte_tokenizer", "task_tokenizer", "tokenizer_for"]
