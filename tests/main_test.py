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


@pytest.mark.parametrize("overrides, devices, message", [
    (["--config.train.stepz=5"], 1, "--config.train.stepz: the config has no field 'stepz'"),
    (["--config.train.steps=ten"], 1, "--config.train.steps=ten: invalid literal for int()"),
    (["--config.mesh.data=3"], 8, "mesh: data*fsdp*tensor = 3"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=-1"], 8,
     "only one of mesh.data/fsdp/tensor may be -1"),
    (["--config.train.batch_size=12"], 8, "train.batch_size=12 is not divisible by the data-parallel size"),
    (["--config.data.source=text", "--config.data.path=/nonexistent/corpus.txt"], 1, "/nonexistent/corpus.txt"),
    (["--config.data.source=wiki"], 1, "data.source='wiki'"),
    (["--config.model.attention=flash"], 1, "model.attention='flash'"),
    (["--config.mode=eval"], 1, "no committed checkpoint under"),
    (["--config.eval.datasets=('wikitext2',)"], 1, "eval.datasets: 'wikitext2' is not one of"),
    (["--config.eval.tasks=('/nonexistent/task.jsonl',)"], 1, "eval.tasks: /nonexistent/task.jsonl is neither"),
])
def test_bad_input_fails_before_compilation_with_one_clear_line(tmp_path, overrides, devices, message):
    result = cli(tmp_path / "run", *overrides, devices=devices)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fmjax: error:") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


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
