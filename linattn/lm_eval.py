"""lm-evaluation-harness adapter: `python -m linattn.lm_eval ...` is lm-eval's own CLI with the
model "linattn" registered (extra `lm_eval`: pip install "linattn[lm_eval]").

    python -m linattn.lm_eval --model linattn --model_args pretrained=out/hf \\
        --tasks lambada_openai --device cuda --batch_size 32

`pretrained` is a model directory (`linattn export`) or a `linattn train` run directory.
The model is lm-eval's HFLM on LinAttnForCausalLM (linattn.hf): loglikelihood requests run
the chunked forward, generate_until requests run transformers' generate() with the
recurrent-state cache (left-padded batches supported). max_length defaults to the model's
max_seq_len, and add_bos_token to False (lm-eval prefixes "<bos>" itself where a request
has no context, so loglikelihood_rolling scores exactly the bytes). Tasks whose data lives on the Hugging Face Hub need network access; a task
defined by a local YAML (dataset_path: json with data_files) runs offline (see
tests/hf/test_lm_eval.py and the README).
"""
from __future__ import annotations

import sys

MODEL_NAME = "linattn"


def _register():
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    import linattn.hf  # noqa: F401  (registers model_type "linattn" with the Auto classes)
    from linattn.hf.export import is_hf_dir, load_any

    class LinAttnLM(HFLM):
        """HFLM over a linattn model directory or run directory (see the module docstring)."""

        def __init__(self, pretrained, device: str | None = None, max_length: int | None = None, **kwargs):
            import torch

            if device in (None, "auto"):
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if isinstance(pretrained, str) and not is_hf_dir(pretrained):
                model, tokenizer = load_any(pretrained, device)  # a run directory
                kwargs.setdefault("tokenizer", tokenizer)
                pretrained = model
            elif isinstance(pretrained, str):
                from transformers import AutoConfig

                max_length = max_length or AutoConfig.from_pretrained(pretrained).max_seq_len
            if not isinstance(pretrained, str):
                max_length = max_length or pretrained.config.max_seq_len
            kwargs.setdefault("backend", "causal")
            # lm-eval puts its own prefix token ("<bos>") before rolling windows and empty
            # contexts; the tokenizer adding one too would score a second "<bos>"
            kwargs.setdefault("add_bos_token", False)
            super().__init__(pretrained=pretrained, device=device, max_length=max_length, **kwargs)

    return register_model(MODEL_NAME)(LinAttnLM)


LOCAL_ONLY_FLAG = "--local_tasks_only"


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "linattn" model registered (argv: sys.argv[1:]).

    One flag of its own: --local_tasks_only reads task definitions from --include_path alone,
    skipping the index of lm-eval's built-in tasks (thousands of YAML files, ~20 s)."""
    from contextlib import nullcontext
    from functools import partial
    from unittest import mock

    _register()
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    local_only = LOCAL_ONLY_FLAG in argv
    saved_argv = sys.argv
    sys.argv = [sys.argv[0], *(a for a in argv if a != LOCAL_ONLY_FLAG)]
    manager = lm_eval.tasks.TaskManager
    try:
        with (mock.patch.object(lm_eval.tasks, "TaskManager", partial(manager, include_defaults=False))
              if local_only else nullcontext()):
            cli_evaluate()
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
