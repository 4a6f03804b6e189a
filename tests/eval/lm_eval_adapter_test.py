"""lm-evaluation-harness adapter: lm-eval tasks on local JSON files run end to end on a sharded fmjax
workdir and give the numbers fmjax's own harness gives (both score through one Scorer)."""
import os
import tempfile

# Before lm_eval (and datasets) load: no network, and the JSON datasets' cache stays out of $HOME.
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="fmjax-test-hf-datasets-"))

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import lm_eval  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api import registry  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from configs.lm import tiny  # noqa: E402
from fmjax.data import sources  # noqa: E402
from fmjax.eval import datasets, harness, lm_eval_adapter  # noqa: E402
from tests import workdirs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ["list", "dict", "tuple", "set", "string", "integer", "float", "module", "class", "function"]
CHOICES = ["a mutable sequence", "a mapping of keys", "an immutable sequence", "an unordered collection"]


def tiny_config(cache_dir):
    """configs/lm/tiny.py shrunk (one layer, 64 wide, the pydoc tokenizer of 512 pieces) on a
    2 x 2 x 2 (data, fsdp, tensor) mesh, so scoring runs sharded like training."""
    config = tiny.get_config()
    config.model.update(vocab_size=512, width=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
    config.data.update(seq_len=64, cache_dir=str(cache_dir), read_threads=0)
    config.train.update(batch_size=8, steps=4)
    config.mesh.update(data=-1, fsdp=2, tensor=2)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as training leaves it (config.json, tokenizer.model, checkpoints/3), holding random
    parameters drawn in numpy: initialising through the model would compile more than the tests."""
    path = tmp_path_factory.mktemp("run")
    workdirs.write_random_checkpoint(tiny_config(tmp_path_factory.mktemp("cache")), path)
    return path


@pytest.fixture(scope="module")
def lm(workdir):
    return lm_eval_adapter.FmjaxLM.from_workdir(str(workdir))


def mc_questions(subjects):
    return [{"context": f"Question: what is a Python {s}?\nAnswer:", "choices": CHOICES, "gold": i % len(CHOICES)}
            for i, s in enumerate(subjects)]


def documents(config, n=3, chars=900):
    """Held-out pydoc documents, cut to whole words; the first spans several 64-token windows."""
    split = sources.load_split(config, config.data.eval_split)
    return [split[i]["text"][:chars].rsplit(" ", 1)[0].strip() for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def task_yaml(name, files, output_type, **fields):
    """An lm-eval task on local JSON files (the `json` dataset builder; nothing is downloaded)."""
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {path}" for split, path in files.items()]
    lines += ["test_split: test", f"output_type: {output_type}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, workdir):
    """A folder of lm-eval tasks (multiple choice with a few-shot split, perplexity, generation)
    and the same multiple-choice questions as an fmjax task file."""
    folder = tmp_path_factory.mktemp("tasks")
    test = write_jsonl(folder / "mc_test.jsonl", mc_questions(SUBJECTS[:6]))
    shots = write_jsonl(folder / "mc_train.jsonl", mc_questions(SUBJECTS[6:]))
    (folder / "fmjax_mc.yaml").write_text(task_yaml(
        "fmjax_mc", {"train": shots, "test": test}, "multiple_choice", fewshot_split="train",
        doc_to_text="{{context}}", doc_to_choice="{{choices}}", doc_to_target="{{gold}}",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]))
    texts = documents(lm_eval_adapter.read_config(str(workdir)))
    docs = write_jsonl(folder / "docs.jsonl", [{"text": t} for t in texts])
    (folder / "fmjax_ppl.yaml").write_text(task_yaml(
        "fmjax_ppl", {"test": docs}, "loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
        metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]))
    answers = write_jsonl(folder / "gen.jsonl", [{"context": f"The {s} type is", "answer": "built in"}
                                                  for s in SUBJECTS[:4]])
    (folder / "fmjax_gen.yaml").write_text(task_yaml(
        "fmjax_gen", {"test": answers}, "generate_until", doc_to_text="{{context}}", doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match"}]))
    harness_file = write_jsonl(tmp_path_factory.mktemp("harness") / "mc.jsonl", mc_questions(SUBJECTS[:6]))
    # Only these tasks: indexing lm-eval's thousands of built-in task files takes seconds.
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return {"folder": str(folder), "manager": manager, "texts": texts, "harness_mc": harness_file}


def evaluate(lm, tasks, name, num_fewshot=None):
    return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tasks["manager"], num_fewshot=num_fewshot,
                                   bootstrap_iters=0, log_samples=True)


def sent_requests(results, name):
    """{request arguments: response} of every request lm-eval passed to the model."""
    return {tuple(args): resp[0] for sample in results["samples"][name]
            for args, resp in zip(sample["arguments"], sample["resps"])}


class Recording:
    """A scorer that remembers every (context, continuation) -> (logprob, greedy) it answered."""

    def __init__(self, scorer):
        self.scorer, self.answers = scorer, {}

    def text_loglikelihood(self, pairs):
        out = self.scorer.text_loglikelihood(pairs)
        self.answers.update(zip(pairs, out))
        return out


def test_zero_shot_multiple_choice_equals_fmjax_harness_request_by_request(lm, tasks):
    results = evaluate(lm, tasks, "fmjax_mc", num_fewshot=0)
    sent = sent_requests(results, "fmjax_mc")
    recording = Recording(lm.scorer)
    with lm.context():
        ours = harness.evaluate(harness.read_task(tasks["harness_mc"]), recording)
    assert set(sent) == set(recording.answers)  # the same prompts: lm-eval's format is fmjax's
    assert len(sent) == 6 * len(CHOICES) and len({logprob for logprob, _ in sent.values()}) > 1
    for pair, (logprob, greedy) in recording.answers.items():
        assert sent[pair][0] == pytest.approx(logprob, abs=1e-6) and sent[pair][1] == greedy, pair
    metrics = results["results"]["fmjax_mc"]
    assert metrics["acc,none"] == ours["acc"] and metrics["acc_norm,none"] == ours["acc_norm"]
    assert results["config"]["fmjax_step"] == 3


def test_few_shot_multiple_choice_scores_the_prompts_lm_eval_builds(lm, tasks):
    results = evaluate(lm, tasks, "fmjax_mc", num_fewshot=2)
    sent = sent_requests(results, "fmjax_mc")
    shots = {q["context"] + " " + q["choices"][q["gold"]] for q in mc_questions(SUBJECTS[6:])}
    for context, continuation in sent:
        *examples, question = context.split("\n\n")
        assert len(examples) == 2 and set(examples) <= shots and question.startswith("Question:")
        assert continuation[0] == " " and continuation[1:] in CHOICES
    with lm.context():
        direct = lm.scorer.text_loglikelihood(list(sent))
    for pair, (logprob, greedy) in zip(sent, direct):
        assert sent[pair][0] == pytest.approx(logprob, abs=1e-6) and sent[pair][1] == greedy, pair


def test_perplexity_task_equals_fmjax_datasets(lm, tasks):
    texts = tasks["texts"]
    assert len(lm.scorer.rolling_requests(texts[0])) > 1  # several windows
    results = evaluate(lm, tasks, "fmjax_ppl")
    with lm.context():
        ours = datasets.evaluate(texts, lm.scorer)
        per_doc = lm.scorer.rolling_loglikelihood(texts)
    sent = sent_requests(results, "fmjax_ppl")
    for text, (logprob, _) in zip(texts, per_doc):
        assert sent[(text,)] == pytest.approx(logprob, rel=1e-6)
    metrics = results["results"]["fmjax_ppl"]
    assert metrics["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-6)
    assert metrics["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-6)
    assert metrics["byte_perplexity,none"] == pytest.approx(2 ** ours["bits_per_byte"], rel=1e-6)


def test_generation_task_runs_greedy_until_the_stop_string(lm, tasks):
    results = evaluate(lm, tasks, "fmjax_gen")
    samples = sorted(results["samples"]["fmjax_gen"], key=lambda s: s["doc_id"])
    prompts = [s["arguments"][0][0] for s in samples]
    with lm.context():
        expected = lm.scorer.generate(prompts, max_new_tokens=8, stop=["\n"])
    assert [s["resps"][0][0] for s in samples] == expected
    assert "exact_match,none" in results["results"]["fmjax_gen"]


def test_an_empty_context_conditions_on_bos_as_lm_eval_expects(lm):
    tokenizer = lm.scorer.tokenizer
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("", " a class"), 0)])
    with lm.context():
        [(expected, _)] = lm.scorer.loglikelihood([([tokenizer.bos_id], tokenizer.encode(" a class"))])
    assert logprob == expected < 0


# The generation tests share one compiled shape: up to 4 prompts (4 rows on the 4-way data-parallel
# mesh), 16-token prompt and budget buckets.
def test_generate_until_groups_requests_by_settings_and_refuses_sampling(lm):
    def request(context, **gen_kwargs):
        return Instance("generate_until", {}, (context, gen_kwargs), 0)

    mixed = [request("The list", until=["\n"], max_gen_toks=4), request("A dict", until=["."], max_gen_toks=6),
             request("The set type", until=["\n"], max_gen_toks=4)]
    outputs = lm.generate_until(mixed)
    with lm.context():
        assert outputs[0::2] == lm.scorer.generate(["The list", "The set type"], max_new_tokens=4, stop=["\n"])
        assert outputs[1] == lm.scorer.generate(["A dict"], max_new_tokens=6, stop=["."])[0]
    assert lm.generation_settings({}) == (lm.scorer.max_len, [])  # budget capped at max_len; eos only
    for sampling in ({"do_sample": True, "temperature": 0.7}, {"temperature": 0.5}):
        with pytest.raises(ValueError, match="greedily only"):
            lm.generate_until([request("The list", until=["\n"], **sampling)])


def test_registered_as_fmjax_with_lm_eval_model_args(workdir):
    cls = registry.get_model("fmjax")
    assert cls is lm_eval_adapter.FmjaxLM and "hf" in registry.model_registry.keys()  # lm-eval's own stay
    model = cls.create_from_arg_string(f"workdir={workdir},batch_size=16,max_len=32,max_gen_toks=5",
                                       {"batch_size": 1, "device": "cpu"})
    assert (model.scorer.batch_size, model.scorer.max_len, model.max_gen_toks) == (16, 32, 5)
    assert cls.create_from_arg_string(f"workdir={workdir}", {"batch_size": 1}).scorer.batch_size == 8
    assert cls.create_from_arg_obj({"workdir": str(workdir)}, {"batch_size": "24"}).scorer.batch_size == 24
    assert model.rank == 0 and model.world_size == 1
    for args, message in [(f"workdir={workdir},batch_size=6", "multiple of the data-parallel size"),
                          (f"workdir={workdir},mesh.fsdp=3", "mesh"),
                          (f"workdir={workdir},model.nope=1", "no field 'model.nope'"),
                          (f"workdir={workdir},nope.width=1", "no field 'nope.width'"),
                          (f"workdir={workdir},data.seq_len=long", "data.seq_len='long'"),
                          ("batch_size=8", "workdir=DIR"),
                          (f"workdir={workdir}/missing", "no config.json")]:
        with pytest.raises(ValueError, match=message):
            cls.create_from_arg_string(args)


@pytest.mark.slow
def test_command_line_prints_the_table_and_writes_results(workdir, tasks, tmp_path, lm):
    output = tmp_path / "lm_eval.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "fmjax.eval.lm_eval_adapter", "--workdir", str(workdir), "--tasks", "fmjax_mc",
         "--include_path", tasks["folder"], "--num_fewshot", "0", "--limit", "4", "--output", str(output),
         "--bootstrap_iters", "0", "--model_args", "batch_size=16", "--no_default_tasks"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|fmjax_mc|" in result.stdout.replace(" ", "") and f"wrote {output}" in result.stdout
    written = json.loads(output.read_text())
    with lm.context():
        ours = harness.evaluate(harness.read_task(tasks["harness_mc"]), lm.scorer, limit=4)
    assert written["results"]["fmjax_mc"]["acc,none"] == ours["acc"]
    assert written["config"]["fmjax_batch_size"] == 16
