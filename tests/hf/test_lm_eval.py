"""The lm-evaluation-harness adapter on tasks built from local files (no hub access)."""
import json
import math
import sysconfig
from pathlib import Path

import torch

import linattn.hf as H
from linattn.lm_eval import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])

BPB_TASK = """task: linattn_local_bpb
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

GEN_TASK = """task: linattn_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def test_lm_eval_bits_per_byte_and_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = H.LinAttnForCausalLM(H.LinAttnConfig(d_model=16, n_layers=2, n_heads=2, mixer="gated_deltanet",
                                                 hybrid=1, max_seq_len=256, backend="torch")).eval()
    H.save_model(model, tmp_path / "model", H.byte_tokenizer())
    texts = [p.read_text()[:120] for p in sorted((STDLIB / "json").glob("*.py"))[:3]]
    (tmp_path / "bpb.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prompts = ["import ", "def f(x", "class A"]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "bpb.yaml").write_text(BPB_TASK.format(data=tmp_path / "bpb.jsonl"))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=tmp_path / "gen.jsonl"))

    main(["--model", "linattn", "--model_args", f"pretrained={tmp_path / 'model'}",
          "--tasks", "linattn_local_bpb,linattn_local_gen", "--include_path", str(tasks),
          "--local_tasks_only", "--device", "cpu", "--batch_size", "3", "--output_path", str(tmp_path / "out"), "--log_samples"])

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    # bits per byte as the model itself gives it: every byte predicted after "<bos>"
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[0] + [b + 1 for b in t.encode()]])
            logp = torch.log_softmax(model.model(ids)[0, :-1], -1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            n_bytes += len(t.encode())
    want = nll / n_bytes / math.log(2)
    got = results["linattn_local_bpb"]["bits_per_byte,none"]
    assert abs(got - want) <= 1e-5 * want
    # generate_until ran through generate() on a batch of 3 left-padded prompts: each
    # continuation is the greedy one of the prompt alone, cut at the first newline
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_linattn_local_gen_*.jsonl")).open()]
    tok = H.byte_tokenizer()
    for s in samples:
        prompt = s["doc"]["prompt"]
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=None)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == text
