"""examples/ppo.py: its flags (PPOConfig's plus the script's), its errors, and real runs of it on CPU: one process
end to end (log, plot, checkpoints, final model), a resume that continues exactly as the uninterrupted run, a user
model with a reward-model pipeline, a saved dataset and tensorboard, and two processes under ``accelerate launch``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ppo.py"
BIN = Path(sys.executable).parent
# Small enough for a couple of seconds per run on 2 cores, big enough for minibatches and several epochs.
TINY_RUN = ["--batch_size", "8", "--mini_batch_size", "4", "--max_new_tokens", "6", "--log_samples_every", "1"]


def _load_example():
    spec = importlib.util.spec_from_file_location("ppo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ppo_example"] = module  # dataclasses and HfArgumentParser resolve annotations through it
    spec.loader.exec_module(module)
    return module


ex = _load_example()
support = sys.modules["ppo_support"]  # the helpers ppo.py imports from its own folder


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _run(*args: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *map(str, args)],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def _metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _stats(record: dict) -> dict:
    """A step's statistics without wall-clock times."""
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(path / "model.safetensors")
    return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------- flags
def test_flags_parse(tmp_path):
    script, config = ex.parse_args(
        ["--log_with", "wandb", "--use_score_scaling", "--use_score_norm", "--score_clip", "0.5"]
        + ["--optimizer", "lion8bit", "--lr_scheduler", "cosine", "--warmup_steps", "3", "--output_dir", str(tmp_path)]
        + ["--kl_penalty", "abs", "--ppo_epochs", "2", "--max_new_tokens", "5", "--seed", "7"]
    )
    assert config.log_with == "wandb"
    assert config.use_score_scaling and config.use_score_norm and config.score_clip == 0.5
    assert (config.kl_penalty, config.ppo_epochs, config.seed) == ("abs", 2, 7)
    assert (script.optimizer, script.lr_scheduler, script.warmup_steps) == ("lion8bit", "cosine", 3)
    assert script.max_new_tokens == 5 and script.output_dir == str(tmp_path)
    # No model given: the tiny model's preset replaces the defaults that were not passed...
    assert config.batch_size == ex.TINY_PRESET["batch_size"] and config.learning_rate == ex.TINY_PRESET["learning_rate"]
    assert script.max_steps == ex.TINY_PRESET["max_steps"] and script.generation_batch_size == config.batch_size
    assert script.model_name_or_path is None and config.reward_model == "lexicon"
    assert config.model_name == "tiny-gpt2 (embedded)"


def test_flags_with_a_model_keep_trl_defaults(tmp_path):
    (tmp_path / "lm").mkdir()
    script, config = ex.parse_args(["--model_name", str(tmp_path / "lm"), "--steps", "1000", "--batch_size", "64"])
    assert script.model_name_or_path == config.model_name == str(tmp_path / "lm")  # TRL's spelling is an alias
    assert config.learning_rate == 1.41e-5 and config.init_kl_coef == 0.2  # TRL 0.11's defaults, no preset
    assert script.max_steps == 16  # -1: total_ppo_epochs = ceil(steps / batch_size), as TRL counts
    assert config.mini_batch_size == 64
    assert support.parse_reward_spec("sentiment-analysis:lvwerra/distilbert-imdb") == (
        "sentiment-analysis",
        "lvwerra/distilbert-imdb",
    )
    assert support.parse_reward_spec("/models/rm") == ("text-classification", "/models/rm")
    assert support.parse_reward_spec("lexicon:/x.json") == ("lexicon", "/x.json")


def test_resume_latest_finds_the_newest_complete_checkpoint(tmp_path):
    from ppo_fast.trainer.checkpoint import MANIFEST

    for step in (2, 10, 4, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 12:  # checkpoint-12 has no manifest: its save was cut off
            (tmp_path / f"checkpoint-{step}" / MANIFEST).write_text('{"format": 1, "files": {}}')
    (tmp_path / ".checkpoint-14.partial").mkdir()  # a save in progress
    script, _ = ex.parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert script.resume_from_checkpoint == str(tmp_path / "checkpoint-10")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--score_clip", "-1"], "argument --score_clip: score_clip must be > 0"),
        (["--score_clip", "abc"], "argument --score_clip/--score-clip: invalid float value: 'abc'"),
        (["--batch_size", "10", "--mini_batch_size", "3"], "argument --batch_size: batch_size (10) must be a multiple"),
        (["--optimizer", "adamx"], "argument --optimizer: invalid choice: 'adamx'"),
        (
            ["--lr_scheduler", "cosine_with_min_lr"],
            "argument --lr_scheduler/--lr-scheduler: invalid choice: 'cosine_with_min_lr'",
        ),
        (["--max_steps", "0"], "argument --max_steps: must be >= 1, or -1"),
        (["--max_new_tokens", "4", "--min_new_tokens", "5"], "argument --min_new_tokens: 5 is more than"),
        (["--model_name_or_path", "{tmp}/missing"], "argument --model_name_or_path: no such directory: {tmp}/missing"),
        (["--model_name_or_path", "./not/here"], "argument --model_name_or_path: no such directory: ./not/here"),
        (["--model_name_or_path", "{tmp}/file.txt"], "argument --model_name_or_path: {tmp}/file.txt is a file"),
        (["--model_name_or_path", "{tmp}", "--model_name", "gpt2"], "disagrees with TRL's spelling --model_name"),
        (["--tokenizer_name_or_path", "{tmp}"], "argument --tokenizer_name_or_path: needs --model_name_or_path"),
        (["--reward_model", "{tmp}/no_rm"], "argument --reward_model: no such directory: {tmp}/no_rm"),
        (["--reward_model", "lexicon:{tmp}/no.json"], "argument --reward_model: no such lexicon file"),
        (["--dataset", "{tmp}/prompts.jsonl"], "argument --dataset: no such file: {tmp}/prompts.jsonl"),
        (["--resume_from_checkpoint", "{tmp}/checkpoint-3"], "argument --resume_from_checkpoint: no such checkpoint"),
        (["--resume_from_checkpoint", "latest", "--output_dir", "{tmp}"], "'latest' but {tmp} has no checkpoint"),
        (
            ["--advantage_estimator", "grpo"],
            "argument --group_size: group_size must be >= 2 with advantage_estimator='grpo'",
        ),
        (["--advantage_estimator", "grpo", "--group_size", "5"], "argument --batch_size: batch_size (32, per process)"),
        (["--group_size", "4"], "argument --group_size: group_size must be 1 with advantage_estimator='gae'"),
        (["--compare_with", "{tmp}"], "argument --compare_with: {tmp} holds no metrics.jsonl"),
    ],
)
def test_bad_flags_exit_naming_the_flag(args, message, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as info:
        ex.parse_args(args)
    assert info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_uncached_hub_model_offline_is_a_flag_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        ex.parse_args(["--reward_model", "sentiment-analysis:someone/not-cached-anywhere"])
    err = capsys.readouterr().err
    assert "argument --reward_model: someone/not-cached-anywhere is not a local directory" in err
    assert "HF_HUB_OFFLINE" in err


def test_missing_model_fails_before_anything_heavy(monkeypatch, tmp_path, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(ex, "load_policy", must_not_run)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        ex.main(["--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(out)])
    assert info.value.code == 2
    assert "argument --model_name_or_path: no such directory" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------- pieces
def test_prompts_from_local_files(tmp_path):
    (tmp_path / "p.txt").write_text("the movie was\n\n  this film is  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n')
    (tmp_path / "p.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "q.json").write_text(json.dumps([{"question": "why"}]))
    (tmp_path / "p.csv").write_text("id,review\n1,great film\n2,dull plot\n")

    def load(name: str, text_field: str | None = None) -> list[str]:
        args = ["--dataset", str(tmp_path / name)] + (["--dataset_text_field", text_field] if text_field else [])
        script, _ = ex.parse_args(args)
        return ex.load_prompts(script)

    assert load("p.txt") == ["the movie was", "this film is"]
    assert load("p.jsonl") == ["a", "b"]
    assert load("p.json") == ["one", "two"]
    assert load("q.json", "question") == ["why"]
    assert load("p.csv") == ["great film", "dull plot"]
    with pytest.raises(SystemExit, match="record 0 has no field"):
        load("q.json")
    default = ex.load_prompts(ex.parse_args([])[0])
    assert len(default) == 64 and default[0] == "the movie was"


def test_tiny_tokenizer_covers_prompts_and_lexicon():
    tok = support.build_tiny_tokenizer()
    lexicon = json.loads(support.DEFAULT_LEXICON.read_text())
    words = " ".join(support.DEFAULT_PROMPTS.read_text().split() + lexicon["positive"] + lexicon["negative"])
    ids = tok(words)["input_ids"]
    assert tok.unk_token_id not in ids  # every prompt and lexicon word has its own id
    assert tok.decode(ids) == words
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert not set(lexicon["positive"]) & set(lexicon["negative"])


def test_lexicon_reward():
    reward = support.LexiconReward()
    assert reward(["p"] * 4, ["great fun !", "a boring mess", "the plot , great but dull", ""]) == pytest.approx(
        [1.0, -2 / 3, 0.0, 0.0]
    )
    assert support.join_text("the movie was", "great") == "the movie was great"
    assert support.join_text("The movie was", " great") == "The movie was great"


def test_optimizers_and_schedulers(tmp_path):
    import bitsandbytes as bnb

    from ppo_fast.optim import Lion, Lion8bit

    model = torch.nn.Linear(4, 2)
    expected = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adam8bit": bnb.optim.Adam8bit,
        "lion": Lion,
        "lion8bit": Lion8bit,
    }
    assert set(expected) == set(ex.OPTIMIZERS)
    for name, cls in expected.items():
        script, config = ex.parse_args(["--optimizer", name, "--learning_rate", "0.01", "--weight_decay", "0.1"])
        optimizer = ex.build_optimizer(script, config, model)
        assert type(optimizer) is cls, name
        assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.1
    for name in ex.LR_SCHEDULERS:
        script, config = ex.parse_args(["--lr_scheduler", name, "--max_steps", "10", "--warmup_steps", "2"])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = ex.build_scheduler(script, optimizer)
        if name == "none":
            assert scheduler is None
            continue
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        if name in ("linear", "cosine", "exponential", "polynomial"):
            assert lrs[-1] < lrs[2], (name, lrs)
        if "warmup" in name or name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
            assert lrs[0] == 0.0 and lrs[2] == 1.0, (name, lrs)


# ----------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """Four steps of the default (embedded model, lexicon reward), a checkpoint every two."""
    out = tmp_path_factory.mktemp("run_a")
    proc = _run("--output_dir", out, "--max_steps", "4", "--save_every", "2", *TINY_RUN)
    assert "step 4:" in proc.stdout + proc.stderr  # the sample printed with --log_samples_every
    return out


def test_end_to_end_writes_log_plot_checkpoints_and_model(run_a):
    from ppo_fast import AutoModelForCausalLMWithValueHead

    records = _metrics(run_a)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["samples"] == 8
        assert -1.0 <= r["env/reward_mean"] <= 1.0 and r["env/reward_std"] >= 0.0
        for key in ("objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/loss/value", "ppo/policy/clipfrac"):
            assert isinstance(r[key], float), key
        assert r["tokens/responses_len_mean"] <= 6
        assert support.LexiconReward()([r["sample"]["query"]], [r["sample"]["response"]]) == [
            pytest.approx(r["sample"]["reward"])
        ]
    assert records[0]["objective/kl"] == 0.0 and records[-1]["objective/kl"] != 0.0  # the policy moved
    png = (run_a / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (run_a / "tiny_model" / "config.json").is_file() and (run_a / "tiny_model" / "tokenizer.json").is_file()
    for step in (2, 4):
        state = json.loads((run_a / f"checkpoint-{step}" / "user_state.json").read_text())
        assert state["step"] == step and state["samples_seen"] == 8 * step

    # The final model loads as a policy with the value head it was trained to, and the LM weights with it.
    final = run_a / "final_model"
    model = AutoModelForCausalLMWithValueHead.from_pretrained(final)
    trained = _state_dict(run_a / "checkpoint-4")  # accelerate's copy of the model at step 4
    mid = _state_dict(run_a / "checkpoint-2")
    for key in ("v_head.summary.weight", "v_head.summary.bias"):
        torch.testing.assert_close(model.state_dict()[key], trained[key], rtol=0, atol=0)
        assert not torch.equal(trained[key], mid[key])  # it trained between the checkpoints
    for key, value in model.pretrained_model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)


def test_grpo_samples_groups_and_trains_without_the_value_head(run_a, tmp_path):
    """--advantage_estimator grpo --group_size 4: batch_size 8 counts responses (2 prompts x 4 per step), the value
    head does not train while the LM does, no value statistics are logged, and --compare_with plots both runs."""
    out = tmp_path / "grpo"
    _run("--output_dir", out, "--max_steps", "2", *TINY_RUN, "--advantage_estimator", "grpo", "--group_size", "4",
         "--compare_with", run_a, "--save_every", "1")  # fmt: skip
    records = _metrics(out)
    assert [r["samples"] for r in records] == [8, 8]
    assert all("ppo/loss/value" not in r and "ppo/val/error" not in r for r in records)
    assert all(isinstance(r["ppo/loss/policy"], float) for r in records)
    assert json.loads((out / "checkpoint-2" / "user_state.json").read_text())["samples_seen"] == 2 * 2  # prompts
    one, two = _state_dict(out / "checkpoint-1"), _state_dict(out / "checkpoint-2")
    for key in ("v_head.summary.weight", "v_head.summary.bias"):
        assert torch.equal(one[key], two[key]), key
    assert any(not torch.equal(one[k], two[k]) for k in one if not k.startswith("v_head."))
    png = (out / "comparison_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_resume_continues_as_the_uninterrupted_run(run_a, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(run_a / "metrics.jsonl", out / "metrics.jsonl")  # a log that ran past the checkpoint
    # As when resuming in the run's own directory: the embedded model is loaded from disk (run A built it in memory).
    shutil.copytree(run_a / "tiny_model", out / "tiny_model")
    built = (out / "tiny_model" / "model.safetensors").stat().st_mtime_ns
    proc = _run("--output_dir", out, "--max_steps", "4", *TINY_RUN, "--resume_from_checkpoint", run_a / "checkpoint-2")
    assert f"resumed from {run_a / 'checkpoint-2'} at step 2" in proc.stderr
    assert (out / "tiny_model" / "model.safetensors").stat().st_mtime_ns == built  # reused, not rebuilt
    uninterrupted, resumed = _metrics(run_a), _metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # steps 3-4 replaced, not appended
    assert resumed[:2] == uninterrupted[:2]
    for a, b in zip(uninterrupted[2:], resumed[2:]):
        assert a["time/step"] != b["time/step"]  # really computed again
        assert _stats(b) == _stats(a)  # same prompts, samples, rewards, losses, KL: bit for bit on CPU
    final_a, final_b = _state_dict(run_a / "final_model"), _state_dict(out / "final_model")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=0, msg=key)


def test_user_model_reward_pipeline_saved_dataset_tensorboard(run_a, tmp_path):
    import datasets
    from transformers import GPT2Config, GPT2ForSequenceClassification, pipeline

    tokenizer = support.build_tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, pad_token_id=0,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    datasets.Dataset.from_dict(
        {"review": ["the movie was", "the plot of this movie", "this film is"] * 2}
    ).save_to_disk(tmp_path / "prompts")
    out = tmp_path / "out"
    lr = 0.01
    _run(
        "--output_dir", out, "--model_name_or_path", run_a / "tiny_model",
        "--reward_model", f"sentiment-analysis:{tmp_path / 'rm'}", "--dataset", tmp_path / "prompts",
        "--log_with", "tensorboard", "--optimizer", "sgd", "--learning_rate", lr, "--lr_scheduler", "linear",
        "--max_steps", "2", "--batch_size", "4", "--max_new_tokens", "4", "--use_score_scaling",
    )  # fmt: skip
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["ppo/learning_rate"] for r in records] == pytest.approx([lr, lr / 2])  # linear over 2 steps
    assert records[0]["tokens/responses_len_mean"] <= 4
    pipe = pipeline("sentiment-analysis", model=str(tmp_path / "rm"))
    for r in records:
        s = r["sample"]
        assert s["query"] in ("the movie was", "the plot of this movie", "this film is")
        (scores,) = pipe([support.join_text(s["query"], s["response"])], top_k=None, function_to_apply="none")
        assert s["reward"] == pytest.approx(next(o["score"] for o in scores if o["label"] == "POSITIVE"), abs=1e-5)
    assert list(out.glob("trl/**/events.out.tfevents.*"))  # tensorboard under --output_dir/<tracker_project_name>
    assert not (out / "tiny_model").exists()  # the user's model was trained, not the embedded one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch(tmp_path):
    out = tmp_path / "ddp"
    launcher = shutil.which("accelerate", path=str(BIN)) or "accelerate"
    cmd = [launcher, "launch", "--config_file", str(REPO / "examples/accelerate_configs/cpu_ddp.yaml")]
    cmd += ["--num_processes", "2", "--main_process_port", str(_free_port()), str(EXAMPLE)]
    cmd += ["--output_dir", str(out), "--max_steps", "2", "--log_with", "wandb", *TINY_RUN]
    env = _env()
    env["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2]  # written once, by the main process
    assert [r["samples"] for r in records] == [16, 16]  # both processes' rewards, 8 each
    assert (out / "final_model" / "model.safetensors").is_file()
    assert list(out.glob("wandb/offline-run-*"))
