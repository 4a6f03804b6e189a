"""The public CLI: bad input fails fast with one line naming the field or file; a run end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(workdir, *overrides, devices=1, mode_args=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "fmjax.main", "--config", "configs/lm/tiny.py", "--workdir", str(workdir),
           "--config.eval.tasks=()", "--config.eval.datasets=()", *overrides]  # benchmarks: tests/eval
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# Files the cases below read, written into the test's tmp_path ("{tmp}" in overrides and messages).
GOOD = b'{"text": "a good line"}\n'
FILES = {
    "empty.txt": b"", "empty.jsonl": b"", "blank.txt": b"\n  \n\n",
    "latin1.txt": "first line\ncaf\u00e9\n".encode("latin-1"),
    "latin1.jsonl": GOOD + '{"text": "caf\u00e9"}\n'.encode("latin-1"),
    "bad_json.jsonl": GOOD + b"\n" + b'{"text": oops}\n' + GOOD,
    "no_field.jsonl": GOOD + b'{"body": "no text"}\n',
    "wrong_type.jsonl": GOOD + b'{"text": 42}\n',
    "not_object.jsonl": GOOD + b'["text"]\n',
    "a_file": b"",
    "broken_run/checkpoints": b"",  # a file where the checkpoints directory belongs
}


def write_files(tmp_path):
    for name, content in FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)


def jsonl(name: str) -> list[str]:
    return ["--config.data.source=jsonl", f"--config.data.path={{tmp}}/{name}"]


@pytest.mark.parametrize("overrides, devices, message", [
    # Config keys and types.
    (["--config.train.stepz=5"], 1, "--config.train.stepz: the config has no field 'stepz'"),
    (["--config.trian.steps=5"], 1, "--config.trian.steps: the config has no field 'trian'"),
    (["--config.train.steps=ten"], 1, "--config.train.steps=ten: invalid literal for int()"),
    (["--config.optim.lr=abc"], 1, "--config.optim.lr=abc: could not convert string to float: 'abc'"),
    (["--config.train.progress_bar=maybe"], 1, "--config.train.progress_bar=maybe: ('Non-boolean argument"),
    (["--config.optim.lora.targets=(1, 2)"], 1, "optim.lora.targets=(1, 2) must be a tuple of strings"),
    (["--config.sharding_rules=abc"], 1, "Type <class 'list'> of field config.sharding_rules is not supported"),
    (["--config.optim.lr=-0.1"], 1, "optim.lr=-0.1 must be > 0"),
    (["--config.model.attention=flash"], 1, "model.attention='flash'"),
    (["--config.mode=eval"], 1, "no committed checkpoint under"),
    # Meshes.
    (["--config.mesh.data=3"], 8, "mesh: data*fsdp*tensor = 3"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=-1"], 8,
     "only one of mesh.data/fsdp/tensor may be -1"),
    (["--config.mesh.fsdp=-2"], 8, "mesh.fsdp=-2: mesh sizes are positive integers or -1 (the rest)"),
    (["--config.mesh.tensor=16"], 8, "mesh.tensor=16 is more than the 8 devices available"),
    (["--config.train.batch_size=12"], 8, "train.batch_size=12 is not divisible by the data-parallel size"),
    # Data files.
    (["--config.data.source=text", "--config.data.path=/nonexistent/corpus.txt"], 1,
     "data.path='/nonexistent/corpus.txt' does not exist or is not a file"),
    (["--config.data.source=text", "--config.data.path={tmp}"], 1, "data.path='{tmp}' is a directory"),
    (["--config.data.source=text", "--config.data.path={tmp}/empty.txt"], 1,
     "data.path='{tmp}/empty.txt' contains no documents (the file is empty or blank)"),
    (["--config.data.source=text", "--config.data.path={tmp}/blank.txt"], 1,
     "data.path='{tmp}/blank.txt' contains no documents"),
    (jsonl("empty.jsonl"), 1, "data.path='{tmp}/empty.jsonl' contains no documents"),
    (jsonl("bad_json.jsonl"), 1, "{tmp}/bad_json.jsonl:3: not valid JSON (Expecting value)"),
    (jsonl("no_field.jsonl"), 1,
     "{tmp}/no_field.jsonl:2: has no field data.text_field='text'; the line has ['body']"),
    (jsonl("no_field.jsonl") + ["--config.data.text_field=body"], 1,
     "{tmp}/no_field.jsonl:1: has no field data.text_field='body'; the line has ['text']"),
    (jsonl("wrong_type.jsonl"), 1,
     "{tmp}/wrong_type.jsonl:2: field 'text' (data.text_field) is a number, not a string"),
    (jsonl("not_object.jsonl"), 1,
     "{tmp}/not_object.jsonl:2: has no field data.text_field='text'; the line is an array, not an object"),
    (["--config.data.source=text", "--config.data.path={tmp}/latin1.txt"], 1,
     "{tmp}/latin1.txt:2: not valid UTF-8 (invalid continuation byte at byte offset 3 of the line)"),
    (jsonl("latin1.jsonl"), 1, "{tmp}/latin1.jsonl:2: not valid UTF-8"),
    (["--config.data.source=wiki"], 1, "data.source='wiki'"),
    # The workdir.
    (["--workdir={tmp}/a_file/run"], 1, "--workdir={tmp}/a_file/run cannot be created: {tmp}/a_file is not a directory"),
    (["--workdir={tmp}/broken_run"], 1, "--workdir={tmp}/broken_run: {tmp}/broken_run/checkpoints is not a writable directory"),
    (["--workdir={tmp}/a_file"], 1, "--workdir={tmp}/a_file is not a directory"),
    # Evaluation.
    (["--config.eval.datasets=('wikitext2',)"], 1, "eval.datasets: 'wikitext2' is not one of"),
    (["--config.eval.tasks=('/nonexistent/task.jsonl',)"], 1, "eval.tasks: /nonexistent/task.jsonl is neither"),
    (["--config.init_from=/nonexistent/run"], 1, "init_from='/nonexistent/run': no such workdir"),
    (["--config=configs/nope.py"], 1, "No such file or directory: 'configs/nope.py'"),
])
def test_bad_input_fails_before_compilation_with_one_clear_line(tmp_path, overrides, devices, message):
    write_files(tmp_path)
    result = cli(tmp_path / "run", *(o.format(tmp=tmp_path) for o in overrides), devices=devices)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fmjax: error:") and message.format(tmp=tmp_path) in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_bad_records_reports_the_skipped_lines_once(tmp_path):
    """With data.skip_bad_records the bad lines are counted and reported; the run goes on (here to
    the next bad input, a mode=eval workdir without checkpoints, to stay before compilation)."""
    write_files(tmp_path)
    result = cli(tmp_path / "run", *(o.format(tmp=tmp_path) for o in jsonl("bad_json.jsonl")),
                 "--config.data.skip_bad_records=True", "--config.mode=eval")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("fmjax: warning:")]
    assert warnings == [f"fmjax: warning: skipped 1 malformed record of {tmp_path}/bad_json.jsonl (first: "
                        "line 3: not valid JSON (Expecting value)); data.skip_bad_records=True"], result.stderr
    assert "no committed checkpoint under" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_train_then_resume_then_eval_and_sample_through_the_cli(tmp_path):
    workdir = tmp_path / "run"
    common = ["--config.train.steps=12", "--config.train.log_every=4", "--config.train.ckpt_every=6",
              "--config.train.eval_every=6", "--config.train.eval_batches=2", "--config.task.sample_tokens=8",
              f"--config.data.cache_dir={tmp_path / 'cache'}"]
    result = cli(workdir, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "outputs:" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 12
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [4, 8, 12]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(train_records[-1])
    assert 0 < train_records[-1]["mfu"] < 1
    assert any("eval_perplexity" in r for r in records)
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6, 12]
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["step"] == 12 and results["perplexity"] > 1 and results["bits_per_byte"] > 0
    samples = (workdir / "samples" / "step_12.txt").read_text()
    assert samples.count("### prompt:") == 3

    again = cli(workdir, *common)  # finished run: resumes at step 12 and does nothing more
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(records)

    evaluated = cli(workdir, *common, "--config.mode=eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((workdir / "eval" / "results.json").read_text())["loss"] == pytest.approx(results["loss"], rel=1e-5)
