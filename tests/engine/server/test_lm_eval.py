"""lm-evaluation-harness's local-completions model against the server (remote tokenizer through
/tokenizer_info and /tokenize) gives the loglikelihoods and accuracy of lm-eval's own hf backend
on the same model, over 20 CommonsenseQA questions (5 choices each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import ServerThread

lm_eval = pytest.importorskip("lm_eval")

NUM_QUESTIONS = 20
TOLERANCE = 2e-4  # absolute, on each choice's summed loglikelihood (fp32 on CPU on both sides)
TASK_YAML = Path(__file__).parent / "lm_eval_tasks" / "shrink_cqa_mc.yaml"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shared_data_dir) -> Path:
    source = shared_data_dir / "reasoning" / "cqa" / "cqa_test.json"  # one JSON object per line
    root = tmp_path_factory.mktemp("lm_eval_task")
    subset = root / "cqa_subset.jsonl"
    with open(source, encoding="utf-8") as f:
        subset.write_text("".join(next(f) for _ in range(NUM_QUESTIONS)), encoding="utf-8")
    (root / TASK_YAML.name).write_text(TASK_YAML.read_text().replace("CQA_SUBSET_JSONL", str(subset)))
    return root


def evaluate(task_dir: Path, model: str, model_args: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Our task alone (its YAML includes no built-in one): indexing lm-eval's own task YAMLs (~27,000 loads)
    # took most of the test's time, twice.
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=["shrink_cqa_mc"], task_manager=manager,
                           log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def per_choice_loglikelihoods(results: dict) -> list[list[float]]:
    samples = sorted(results["samples"]["shrink_cqa_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_local_completions_matches_hf_backend(task_dir, tiny_artifact, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with ServerThread(tiny_artifact, max_model_len=512) as s:
        served = evaluate(task_dir, "local-completions", {
            "base_url": s.url + "/v1/completions", "model": s.state.model_name, "tokenizer_backend": "remote",
            "num_concurrent": 1, "max_retries": 1,
        })
        assert s.wait_idle()
        success = s.state.metrics._success.labels(s.state.model_name, "length")._value.get()
        assert success == NUM_QUESTIONS * 5  # one echo request per choice reached the engine
    reference = evaluate(task_dir, "hf", {"pretrained": tiny_artifact, "dtype": "float32", "device": "cpu"})

    ours, theirs = per_choice_loglikelihoods(served), per_choice_loglikelihoods(reference)
    assert len(ours) == len(theirs) == NUM_QUESTIONS
    assert all(len(row) == 5 for row in ours)
    worst = max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b))
    print(f"largest loglikelihood difference: {worst:.2e}")
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=TOLERANCE)
    acc = served["results"]["shrink_cqa_mc"]["acc,none"]
    assert acc == reference["results"]["shrink_cqa_mc"]["acc,none"]
    json.dumps(served["results"])  # the results are plain data
