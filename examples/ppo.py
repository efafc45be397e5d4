#!/usr/bin/env python
"""PPO on a causal language model with ppo_fast: generate, score, ``trainer.step``, repeat.

With no arguments it trains an embedded tiny GPT-2 (built on first use from ``examples/assets``, no download) to
write positive movie-review continuations, scored by a word lexicon; on 2 CPU cores it takes about 20 s and the mean
reward climbs from about 0 to 1.0.

    python examples/ppo.py
    python examples/ppo.py --advantage_estimator grpo --group_size 4   # GRPO: 4 responses per prompt, no value head
    python examples/ppo.py --log_with wandb --use_score_scaling --use_score_norm --score_clip 0.5
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/ppo.py \\
        --model_name_or_path gpt2 --reward_model sentiment-analysis:lvwerra/distilbert-imdb \\
        --dataset stanfordnlp/imdb --max_prompt_tokens 8

Flags are every ``PPOConfig`` field (TRL 0.11's names and defaults) plus this script's ``ScriptArguments``;
``--help`` lists them all. Without ``--model_name_or_path`` a few ``PPOConfig`` defaults are replaced by a preset
tuned for the tiny model (``TINY_PRESET``); flags you pass always win.

What a run writes under ``--output_dir``: ``metrics.jsonl`` (one JSON object per step: every scalar statistic of
``trainer.step`` under TRL's names, the reward mean/std, and one sample), ``training_curves.png`` (reward, KL and
loss per step), ``checkpoint-<step>/`` every ``--save_every`` steps, ``final_model/`` (loadable with
``AutoModelForCausalLMWithValueHead.from_pretrained``), ``tiny_model/`` when the embedded model is used, and
``comparison_curves.png`` with ``--compare_with OTHER_RUN_DIR`` (both runs' reward and KL on the same axes).

With ``--group_size N`` (a group estimator: grpo, dr_grpo, rloo, reinforce_pp_baseline) each process takes
``batch_size / N`` prompts per step and samples N responses to each, kept consecutive, so ``--batch_size`` counts
responses and every group stays on one process.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from ppo_fast import PPOConfig

# ppo_support.py sits next to this file. Run as a script (`python examples/ppo.py`, `accelerate launch`), Python
# has put this folder first on sys.path already; loaded by its path (importlib, as the tests do), it has not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_support import (  # noqa: E402
    DEFAULT_PROMPTS,
    build_reward,
    ensure_tiny_model,
    parse_reward_spec,
    read_metrics,
    write_comparison_plot,
    write_plot,
)

OPTIMIZERS = ("adam", "adamw", "sgd", "adam8bit", "lion", "lion8bit")
# transformers.get_scheduler's names that need nothing but warmup and total steps, plus torch's ExponentialLR.
LR_SCHEDULERS = (
    "none",
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "exponential",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEXT_FIELDS = ("query", "prompt", "text", "review", "content")

# PPOConfig's defaults are TRL's, sized for GPT-2 and 128-sample batches at lr 1.41e-5: the randomly initialised
# tiny model would barely move in a few minutes. Applied only when no model is given.
TINY_PRESET: dict[str, Any] = {
    "batch_size": 32,
    "mini_batch_size": 16,
    "learning_rate": 3e-3,
    "init_kl_coef": 0.02,
    "max_steps": 80,
    "max_new_tokens": 12,
}


@dataclass
class ScriptArguments:
    """This script's own flags (the rest are ``PPOConfig``'s)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM to train: a local directory or a hub name. Default: the embedded tiny GPT-2, built on "
            "first use under <output_dir>/tiny_model and reused. TRL's --model_name is accepted as an alias."
        },
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    dtype: str = field(
        default="auto", metadata={"help": "dtype of the loaded model's weights.", "choices": list(DTYPES)}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    num_shared_layers: int | None = field(
        default=None,
        metadata={"help": "Blocks (and embeddings) the frozen reference shares with the policy (default: none)."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the whole model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names for LoRA (default: peft's for the model)."}
    )

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a .txt file (one per line), a .json/.jsonl/.csv file of records (or JSON strings), or "
            "a `datasets` hub name. Default: examples/assets/prompts.txt. TRL's --query_dataset is an alias."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    dataset_text_field: str | None = field(
        default=None,
        metadata={"help": f"Field of the records holding the prompt (default: the first of {TEXT_FIELDS})."},
    )
    max_prompt_tokens: int = field(
        default=32, metadata={"help": "Prompts are cut to their first N tokens (reviews become review openings)."}
    )

    reward_label: str | None = field(
        default=None,
        metadata={
            "help": "Label of the reward model whose raw logit is the reward (default: POSITIVE if the model has "
            "it, else its last label)."
        },
    )
    reward_batch_size: int = field(default=16, metadata={"help": "Batch size of the reward pipeline."})

    max_new_tokens: int = field(default=32, metadata={"help": "Longest response, in tokens."})
    min_new_tokens: int | None = field(default=None, metadata={"help": "Shortest response (default: EOS may end it)."})
    top_k: int = field(default=0, metadata={"help": "Sampling top-k (0: off, TRL's setting)."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling top-p (1.0: off, TRL's setting)."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generate call (default: batch_size)."}
    )

    max_steps: int = field(
        default=-1,
        metadata={
            "help": "PPO steps (trainer.step calls) to run; -1: PPOConfig's total_ppo_epochs = ceil(steps / "
            "batch_size), as TRL counts."
        },
    )
    optimizer: str = field(
        default="adam",
        metadata={
            "help": "adam (the trainer's default), adamw, sgd, adam8bit (bitsandbytes), lion or lion8bit "
            "(ppo_fast.optim), at --learning_rate.",
            "choices": list(OPTIMIZERS),
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the optimizer."})
    lr_scheduler: str = field(
        default="none",
        metadata={
            "help": "Learning-rate schedule over max_steps, stepped once per PPO step: none, exponential (gamma "
            "--lr_gamma per step) or a transformers.get_scheduler name.",
            "choices": list(LR_SCHEDULERS),
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps of the schedules that have one."})
    lr_gamma: float = field(default=0.99, metadata={"help": "Decay per step of --lr_scheduler exponential."})

    output_dir: str = field(default="ppo_output", metadata={"help": "Where metrics, plots and models go."})
    save_every: int = field(
        default=0, metadata={"help": "Save a checkpoint every N steps (and at the end) to checkpoint-<step>; 0: never."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint-<step> directory to continue from, or 'latest' (the newest in output_dir)."},
    )
    torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "Intra-op CPU threads (torch.set_num_threads). Default: 1 with the embedded tiny model, whose ops "
            "are too small to split, else torch's default (OMP_NUM_THREADS)."
        },
    )
    log_samples_every: int = field(
        default=10, metadata={"help": "Print one (prompt, response, reward) every N steps; 0: never."}
    )
    compare_with: str | None = field(
        default=None,
        metadata={
            "help": "Another run's --output_dir: at the end, also plot this run's reward and KL next to that run's "
            "(from its metrics.jsonl) in <output_dir>/comparison_curves.png."
        },
    )

    def __post_init__(self) -> None:
        def at_least(name: str, lo: int) -> None:
            value = getattr(self, name)
            if value is not None and value < lo:
                raise ValueError(f"argument --{name}: must be >= {lo}, got {value}")

        for name, lo in (
            ("max_prompt_tokens", 1),
            ("reward_batch_size", 1),
            ("max_new_tokens", 1),
            ("min_new_tokens", 0),
            ("top_k", 0),
            ("generation_batch_size", 1),
            ("warmup_steps", 0),
            ("save_every", 0),
            ("log_samples_every", 0),
            ("num_shared_layers", 0),
            ("torch_threads", 1),
            ("lora_r", 1),
        ):
            at_least(name, lo)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"argument --max_steps: must be >= 1, or -1 for total_ppo_epochs; got {self.max_steps}")
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"argument --min_new_tokens: {self.min_new_tokens} is more than --max_new_tokens {self.max_new_tokens}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"argument --top_p: must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"argument --lr_gamma: must be in (0, 1], got {self.lr_gamma}")


# --------------------------------------------------------------------------------------------------- arguments
def build_parser() -> HfArgumentParser:
    """The parser of ``(ScriptArguments, PPOConfig)``. TRL's logging fields ``model_name`` / ``query_dataset`` /
    ``reward_model`` are the script's model alias, dataset alias and reward here, so their defaults change: None
    (unset) for the aliases, and the built-in lexicon for the reward, so no default ever needs the network."""
    parser = HfArgumentParser(
        (ScriptArguments, PPOConfig),
        prog="ppo.py",
        description="PPO on a causal LM with ppo_fast. Flags: this script's, then PPOConfig's (TRL 0.11's). Without "
        "--model_name_or_path the embedded tiny model is trained and these defaults change to a preset tuned for it: "
        + ", ".join(f"--{k} {v}" for k, v in TINY_PRESET.items())
        + ".",
    )
    parser.set_defaults(model_name=None, query_dataset=None, reward_model="lexicon")
    for action in parser._actions:  # the help of TRL's logging-only fields, as this script uses them
        if action.dest == "reward_model":
            action.help = (
                "The reward: 'lexicon' (built-in sentiment word lexicon, reward = (positive - negative words) / "
                "words of the response), 'lexicon:<file.json>' ({'positive': [...], 'negative': [...]}), or "
                "'[sentiment-analysis:|text-classification:]<model>' (a local or hub sequence-classification model "
                "run as a transformers pipeline on prompt + response; reward = the raw logit of --reward_label)."
            )
        elif action.dest == "model_name":
            action.help = "TRL's spelling of --model_name_or_path."
        elif action.dest == "query_dataset":
            action.help = "TRL's spelling of --dataset."
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[ScriptArguments, PPOConfig]:
    """Parse and check the command line; every error exits through argparse (status 2) naming its flag, before
    anything heavy (a model, a dataset, an Accelerator) is loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if namespace.model_name_or_path is None and namespace.model_name is None:
        parser.set_defaults(**TINY_PRESET)
    try:
        script, config = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        parser.error(_flag_message(str(e)))

    for ours, trls in (("model_name_or_path", "model_name"), ("dataset", "query_dataset")):
        a, b = getattr(script, ours), getattr(config, trls)
        if a is not None and b is not None and a != b:
            parser.error(f"argument --{ours}: {a!r} disagrees with TRL's spelling --{trls} {b!r}; pass one")
        setattr(script, ours, a if a is not None else b)
    config.model_name = script.model_name_or_path or "tiny-gpt2 (embedded)"
    config.query_dataset = script.dataset or str(DEFAULT_PROMPTS)

    error = (
        _check_source("model_name_or_path", script.model_name_or_path)
        or _check_source("tokenizer_name_or_path", script.tokenizer_name_or_path)
        or _check_tokenizer(script)
        or _check_reward(config.reward_model)
        or _check_dataset(script.dataset)
        or _check_resume(script)
    )
    if script.compare_with is not None and not (Path(script.compare_with) / "metrics.jsonl").is_file():
        error = (
            error or f"argument --compare_with: {script.compare_with} holds no metrics.jsonl (not a run's output_dir)"
        )
    if error:
        parser.error(error)
    if script.max_steps == -1:
        script.max_steps = config.total_ppo_epochs
    if script.generation_batch_size is None:
        script.generation_batch_size = config.batch_size
    return script, config


def _flag_message(message: str) -> str:
    """PPOConfig's ``PPOConfig: <field> must ...`` as argparse words it: ``argument --<field>: must ...``."""
    match = re.match(r"PPOConfig: (\w+) (.*)", message, re.S)
    if match:
        return f"argument --{match.group(1)}: {match.group(1)} {match.group(2)}"
    return message


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "~"))


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_source(flag: str, value: str | None) -> str | None:
    """None if ``value`` can be loaded (an existing local directory, or a hub name when downloads are allowed or it
    is cached), else the error message naming ``--flag``."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return None
    if os.path.exists(path):
        return f"argument --{flag}: {value} is a file; expected a model directory (with config.json) or a hub name"
    if not _is_hub_id(value):
        return f"argument --{flag}: no such directory: {value}"
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            return (
                f"argument --{flag}: {value} is not a local directory, and it is not in the hub cache while "
                "HF_HUB_OFFLINE is set (nothing can be downloaded)"
            )
    return None


def _check_reward(reward: str) -> str | None:
    kind, arg = parse_reward_spec(reward)
    if kind == "lexicon":
        if arg is not None and not os.path.isfile(arg):
            return f"argument --reward_model: no such lexicon file: {arg}"
        return None
    return _check_source("reward_model", arg)


def _check_tokenizer(script: ScriptArguments) -> str | None:
    if script.tokenizer_name_or_path is not None and script.model_name_or_path is None:
        return "argument --tokenizer_name_or_path: needs --model_name_or_path (the embedded model has its own)"
    return None


def _check_dataset(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    path = os.path.expanduser(dataset)
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return None  # a saved `datasets` dataset (load_from_disk) or a data directory: `datasets` decides
    if not _is_hub_id(dataset) or Path(dataset).suffix in (".txt", ".json", ".jsonl", ".csv"):
        return f"argument --dataset: no such file: {dataset}"
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        return (
            f"argument --dataset: {dataset} is not a local file; loading a hub dataset needs the `datasets` "
            "package (pip install 'ppo_fast[examples]')"
        )
    return None


def _check_resume(script: ScriptArguments) -> str | None:
    value = script.resume_from_checkpoint
    if value is None:
        return None
    if value == "latest":
        latest = latest_checkpoint(script.output_dir)
        if latest is None:
            return f"argument --resume_from_checkpoint: 'latest' but {script.output_dir} has no checkpoint-<step>"
        script.resume_from_checkpoint = latest
        return None
    if not os.path.isdir(value):
        return f"argument --resume_from_checkpoint: no such checkpoint directory: {value}"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-<step>`` directory of ``output_dir`` with the highest step, or None. A save that
    was cut off leaves no complete directory of that step (``save_checkpoint`` stages it under a hidden name and
    moves it into place last), so the one before it is taken."""
    from ppo_fast.trainer.checkpoint import is_complete

    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(m.group(1))
        for name in os.listdir(output_dir)
        if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and is_complete(os.path.join(output_dir, name))
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def load_policy(script: ScriptArguments, output_dir: Path) -> tuple[Any, Any]:
    """The policy (``AutoModelForCausalLMWithValueHead``, optionally with a LoRA adapter) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from ppo_fast import AutoModelForCausalLMWithValueHead

    kwargs: dict[str, Any] = {}
    if script.use_peft:
        from peft import LoraConfig

        targets = script.lora_target_modules
        kwargs["peft_config"] = LoraConfig(
            r=script.lora_r,
            lora_alpha=script.lora_alpha,
            lora_dropout=script.lora_dropout,
            target_modules=[t.strip() for t in targets.split(",")] if targets else None,
            task_type="CAUSAL_LM",
        )
    if script.model_name_or_path is None:
        base, tokenizer = ensure_tiny_model((output_dir / "tiny_model").resolve())
        if script.dtype != "auto":
            base = base.to(getattr(torch, script.dtype))
        policy = AutoModelForCausalLMWithValueHead.from_pretrained(base, **kwargs)
    else:
        load_kwargs = {"trust_remote_code": script.trust_remote_code}
        if script.dtype != "auto":
            load_kwargs["dtype"] = script.dtype
        try:
            policy = AutoModelForCausalLMWithValueHead.from_pretrained(
                script.model_name_or_path, **load_kwargs, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(
                script.tokenizer_name_or_path or script.model_name_or_path, trust_remote_code=script.trust_remote_code
            )
        except OSError as e:
            raise SystemExit(f"ppo.py: error: argument --model_name_or_path {script.model_name_or_path}: {e}") from e
    if tokenizer.pad_token_id is None:  # GPT-2 and Llama ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return policy, tokenizer


def check_lengths(script: ScriptArguments, model: Any) -> None:
    """A prompt plus its response must fit the model's positions (else an index error deep inside generate)."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and script.max_prompt_tokens + script.max_new_tokens > limit:
        raise SystemExit(
            f"ppo.py: error: --max_prompt_tokens {script.max_prompt_tokens} + --max_new_tokens "
            f"{script.max_new_tokens} is more than the model's {limit} positions"
        )


def build_optimizer(script: ScriptArguments, config: PPOConfig, model: Any) -> Any:
    """``--optimizer`` over the trainable parameters at ``--learning_rate``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = config.learning_rate, script.weight_decay
    name = script.optimizer
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise SystemExit("ppo.py: error: --optimizer adam8bit needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.Adam8bit(params, lr=lr, weight_decay=wd)
    from ppo_fast.optim import Lion, Lion8bit

    return (Lion if name == "lion" else Lion8bit)(params, lr=lr, weight_decay=wd)


def build_scheduler(script: ScriptArguments, optimizer: Any) -> Any:
    """``--lr_scheduler`` over ``max_steps`` PPO steps (the trainer steps it once per ``step()``)."""
    import torch

    if script.lr_scheduler == "none":
        return None
    if script.lr_scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=script.lr_gamma)
    from transformers import get_scheduler

    return get_scheduler(
        script.lr_scheduler, optimizer, num_warmup_steps=script.warmup_steps, num_training_steps=script.max_steps
    )


# --------------------------------------------------------------------------------------------------- prompts
def load_prompts(script: ScriptArguments) -> list[str]:
    """The prompt texts of ``--dataset`` (local files are read here; only a hub name imports ``datasets``)."""
    source = script.dataset
    if source is None:
        return _read_lines(DEFAULT_PROMPTS)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _read_lines(path)
        if suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".json":
            data = json.loads(path.read_text())
            records = data if isinstance(data, list) else data.get("data", data.get("prompts"))
            if not isinstance(records, list):
                raise SystemExit(f"ppo.py: error: --dataset {source}: expected a JSON list of records or strings")
        elif suffix == ".csv":
            import csv

            with path.open(newline="") as f:
                records = list(csv.DictReader(f))
        else:
            raise SystemExit(f"ppo.py: error: --dataset {source}: expected a .txt, .json, .jsonl or .csv file")
        return _texts(records, script.dataset_text_field, source)
    import datasets

    if path.is_dir() and (path / "dataset_info.json").exists():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[script.dataset_split]
    else:
        data = datasets.load_dataset(source, split=script.dataset_split)
    name = script.dataset_text_field or next((f for f in TEXT_FIELDS if f in data.column_names), None)
    if name is None or name not in data.column_names:
        raise SystemExit(
            f"ppo.py: error: --dataset {source}: no text field (columns {data.column_names}); pass --dataset_text_field"
        )
    return [t for t in data[name] if isinstance(t, str) and t.strip()]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _texts(records: list, text_field: str | None, source: str) -> list[str]:
    texts = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            texts.append(record)
            continue
        if not isinstance(record, dict):
            raise SystemExit(f"ppo.py: error: --dataset {source}: record {i} is neither a string nor an object")
        name = text_field or next((f for f in TEXT_FIELDS if f in record), None)
        if name is None or name not in record:
            raise SystemExit(
                f"ppo.py: error: --dataset {source}: record {i} has no field "
                f"{text_field or ' / '.join(TEXT_FIELDS)} (fields: {sorted(record)}); pass --dataset_text_field"
            )
        texts.append(str(record[name]))
    return [t.strip() for t in texts if t.strip()]


class PromptStream:
    """An endless, seeded stream of tokenized prompts: pass ``e`` is a fresh permutation seeded by ``(seed, e)``.

    Sample ``i`` of the stream depends only on ``i``, so a resumed run that restores ``samples_seen`` continues
    with exactly the prompts the uninterrupted run would have used, and each process takes its own slice of every
    global batch.
    """

    def __init__(self, texts: list[str], tokenizer: Any, max_tokens: int, seed: int):
        import torch

        self.texts, self.queries = [], []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
            if ids:
                self.texts.append(tokenizer.decode(ids))
                self.queries.append(torch.tensor(ids, dtype=torch.long))
        if not self.queries:
            raise SystemExit("ppo.py: error: --dataset: no prompt has any token")
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _index(self, i: int) -> int:
        import torch

        epoch, pos = divmod(i, len(self.queries))
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.queries), generator=g).tolist()}
        return self._perms[epoch][pos]

    def batch(self, start: int, size: int) -> tuple[list[str], list[Any]]:
        idx = [self._index(i) for i in range(start, start + size)]
        return [self.texts[i] for i in idx], [self.queries[i] for i in idx]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


# --------------------------------------------------------------------------------------------------- training
@dataclass
class Run:
    """One training run: what ``setup`` built, and how far into the prompt stream all processes have read
    (``samples_seen`` prompts; with ``group_size`` N each prompt gives N samples)."""

    script: ScriptArguments
    config: PPOConfig
    output_dir: Path
    trainer: Any
    tokenizer: Any
    reward_fn: Callable[[list[str], list[str]], list[float]]
    prompts: PromptStream
    samples_seen: int = 0

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


def main(argv: Sequence[str] | None = None) -> None:
    script, config = parse_args(argv)
    output_dir = Path(script.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    configure(script, config, output_dir)
    run = setup(script, config, output_dir)
    resume_or_start(run)
    t_start = time.perf_counter()
    train(run)
    finish(run, t_start)


def configure(script: ScriptArguments, config: PPOConfig, output_dir: Path) -> None:
    """Before anything is built: torch's CPU threads, and the trackers' files under ``--output_dir``."""
    import torch

    threads = script.torch_threads or (1 if script.model_name_or_path is None else None)
    if threads is not None:
        # Measured on 2 cores: with 2 threads the tiny model ran 15x slower as soon as another process wanted a
        # core (OpenMP's workers spin-wait at every barrier of ops that take microseconds); with 1, no slowdown.
        torch.set_num_threads(threads)

    if config.log_with is not None:
        # Tracker files go to the run's directory, not the working directory (tensorboard needs a directory).
        config.project_kwargs.setdefault("project_dir", str(output_dir))
        if config.log_with == "wandb":
            config.tracker_kwargs.setdefault("wandb", {}).setdefault("dir", str(output_dir))


def setup(script: ScriptArguments, config: PPOConfig, output_dir: Path) -> Run:
    """The policy, its optimizer and scheduler, the trainer, the reward and the prompts, seeded so that every
    process and a resumed run build the same ones."""
    from accelerate.utils import set_seed

    from ppo_fast import PPOTrainer

    # The value head is initialised from the global RNG, whose state at this point differs between processes and
    # runs (imported packages draw from it); seeded, every process and a resumed run rebuild the same policy and
    # reference (load_checkpoint checks the reference's weights).
    set_seed(config.seed)
    policy, tokenizer = load_policy(script, output_dir)
    check_lengths(script, policy)
    optimizer = build_optimizer(script, config, policy)
    lr_scheduler = build_scheduler(script, optimizer)
    trainer = PPOTrainer(
        config,
        policy,
        None,
        tokenizer,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        num_shared_layers=script.num_shared_layers,
    )
    # Same seed on every process would sample the same tokens for different prompts; offset it by the rank.
    set_seed(config.seed, device_specific=True)
    reward_fn = build_reward(config, script, trainer.accelerator)
    prompts = PromptStream(load_prompts(script), tokenizer, script.max_prompt_tokens, config.seed)
    return Run(script, config, output_dir, trainer, tokenizer, reward_fn, prompts)


def resume_or_start(run: Run) -> None:
    """With ``--resume_from_checkpoint``: the trainer and the prompt position restored, and the metrics log cut
    back to the checkpoint's step; else an empty metrics log."""
    trainer, script = run.trainer, run.script
    main_process = trainer.accelerator.is_main_process
    if script.resume_from_checkpoint:
        # After everything above: load_checkpoint also restores every process's RNG, which the setup consumed.
        state = trainer.load_checkpoint(script.resume_from_checkpoint) or {}
        world, per = trainer.accelerator.num_processes, run.config.batch_size // run.config.group_size
        run.samples_seen = int(state.get("samples_seen", trainer.current_step * per * world))
        if main_process:
            # Drop what a previous run logged after this checkpoint, so the log has each step once.
            kept = [r for r in read_metrics(run.metrics_path) if r["step"] <= trainer.current_step]
            run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            print(f"resumed from {script.resume_from_checkpoint} at step {trainer.current_step}", file=sys.stderr)
    elif main_process:
        run.metrics_path.write_text("")


def generation_kwargs(script: ScriptArguments) -> dict[str, Any]:
    """Sampling settings of ``trainer.generate``: TRL's (plain sampling) unless the flags say otherwise."""
    kwargs = dict(do_sample=True, top_k=script.top_k, top_p=script.top_p, max_new_tokens=script.max_new_tokens)
    if script.min_new_tokens is not None:
        kwargs["min_new_tokens"] = script.min_new_tokens
    return kwargs


def train(run: Run) -> None:
    """PPO steps up to ``--max_steps``, a checkpoint every ``--save_every`` of them and one at the end."""
    from tqdm.auto import tqdm

    trainer, script = run.trainer, run.script
    gen_kwargs = generation_kwargs(script)
    main_process = trainer.accelerator.is_main_process
    progress = tqdm(total=script.max_steps, initial=trainer.current_step, disable=not main_process, desc="PPO")
    last_saved = trainer.current_step
    while trainer.current_step < script.max_steps:
        ppo_step(run, gen_kwargs, progress)
        step = trainer.current_step
        if script.save_every and step % script.save_every == 0:
            save_checkpoint(run, step)
            last_saved = step
    progress.close()
    if script.save_every and last_saved != trainer.current_step:
        save_checkpoint(run, trainer.current_step)


def ppo_step(run: Run, gen_kwargs: dict[str, Any], progress: Any) -> None:
    """Generate for this process's slice of the next global batch, score, ``trainer.step``; the main process
    appends the step's record to the metrics log."""
    import torch

    trainer, script = run.trainer, run.script
    acc, n = trainer.accelerator, run.config.group_size
    per = run.config.batch_size // n  # prompts per process; each is sampled n times, the copies consecutive
    t_step = time.perf_counter()
    prompt_texts, queries = run.prompts.batch(run.samples_seen + acc.process_index * per, per)
    run.samples_seen += per * acc.num_processes
    prompt_texts = [t for t in prompt_texts for _ in range(n)]
    queries = [q for q in queries for _ in range(n)]
    responses = trainer.generate(queries, return_prompt=False, batch_size=script.generation_batch_size, **gen_kwargs)
    response_texts = run.tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = [torch.tensor(r, dtype=torch.float32) for r in run.reward_fn(prompt_texts, response_texts)]
    stats = trainer.step(queries, responses, rewards)
    if run.config.log_with is not None:
        trainer.log_stats(stats, {"query": prompt_texts, "response": response_texts}, rewards)
    all_rewards = acc.gather(torch.stack(rewards).to(acc.device)).float().cpu()
    if not acc.is_main_process:
        return
    step = trainer.current_step
    record: dict[str, Any] = {"step": step, "samples": int(all_rewards.numel())}
    record["env/reward_mean"] = float(all_rewards.mean())
    record["env/reward_std"] = float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0
    record.update({k: _finite(v) for k, v in stats.items() if isinstance(v, float)})
    record["time/step"] = time.perf_counter() - t_step
    record["sample"] = {"query": prompt_texts[0], "response": response_texts[0], "reward": float(rewards[0])}
    with run.metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    progress.set_postfix(reward=f"{record['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}")
    progress.update(1)
    if script.log_samples_every and step % script.log_samples_every == 0:
        progress.write(f"step {step}: {prompt_texts[0]!r} -> {response_texts[0]!r} (reward {float(rewards[0]):.2f})")


def save_checkpoint(run: Run, step: int) -> None:
    """``checkpoint-<step>`` (atomic), with the script's own position in the prompt stream as its user state."""
    state = {
        "step": step,
        "samples_seen": run.samples_seen,
        "num_processes": run.trainer.accelerator.num_processes,
        "batch_size": run.config.batch_size,
        "model_name_or_path": run.script.model_name_or_path,
    }
    run.trainer.save_checkpoint(run.output_dir / f"checkpoint-{step}", user_state=state)


def finish(run: Run, t_start: float) -> None:
    """The final model, the plot and a summary on stderr."""
    trainer, output_dir = run.trainer, run.output_dir
    trainer.save_pretrained(output_dir / "final_model")
    if trainer.accelerator.is_main_process:
        records = read_metrics(run.metrics_path)
        plotted = write_plot(records, output_dir / "training_curves.png") if records else False
        if records and run.script.compare_with is not None:  # each run labelled by its directory's name
            other = Path(run.script.compare_with).resolve()
            runs = {other.name: read_metrics(other / "metrics.jsonl"), output_dir.resolve().name: records}
            plotted = write_comparison_plot(runs, output_dir / "comparison_curves.png") and plotted
        elapsed = time.perf_counter() - t_start
        if records:
            k = max(1, min(5, len(records) // 2))
            first = sum(r["env/reward_mean"] for r in records[:k]) / k
            last = sum(r["env/reward_mean"] for r in records[-k:]) / k
            print(f"reward mean: first {k} steps {first:.3f} -> last {k} steps {last:.3f}", file=sys.stderr)
        print(
            f"{trainer.current_step} steps ({elapsed:.1f} s this run); wrote {run.metrics_path}"
            + (f", {output_dir / 'training_curves.png'}" if plotted else "")
            + f" and {output_dir / 'final_model'}",
            file=sys.stderr,
        )
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
