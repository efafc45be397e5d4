"""The helpers of ``examples/ppo.py``: the embedded tiny model, the rewards, and the metrics log's reader and plot.

``ppo.py`` imports this file from its own folder (it puts the folder on ``sys.path`` when it is loaded by path), so
``python examples/ppo.py`` and ``accelerate launch examples/ppo.py`` find it wherever they are started.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ppo_fast import PPOConfig

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_MODEL_CONFIG = ASSETS / "tiny_model_config.json"
TINY_VOCAB = ASSETS / "tiny_vocab.txt"
DEFAULT_PROMPTS = ASSETS / "prompts.txt"
DEFAULT_LEXICON = ASSETS / "sentiment_lexicon.json"
# The tiny model's weights depend on this seed only (not on --seed), so every run and every process builds the
# same "pretrained" model, and a run resumed elsewhere rebuilds the reference it started from.
TINY_MODEL_SEED = 1234
TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")  # ids 0, 1, 2, as in tiny_model_config.json
REWARD_TASKS = ("sentiment-analysis", "text-classification")


# --------------------------------------------------------------------------------------------------- the model
def build_tiny_tokenizer() -> Any:
    """A word-level tokenizer over ``assets/tiny_vocab.txt`` (whitespace-separated words; ids 0/1/2 are
    pad/unk/eos), so the embedded model needs no download."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = [w for w in TINY_VOCAB.read_text().split() if w not in TINY_SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate([*TINY_SPECIAL_TOKENS, *dict.fromkeys(words)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", model_max_length=128
    )


def build_tiny_model(tokenizer: Any) -> Any:
    """The tiny GPT-2 of ``assets/tiny_model_config.json``, initialised from ``TINY_MODEL_SEED``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads(TINY_MODEL_CONFIG.read_text())
    spec["vocab_size"] = len(tokenizer)  # the word list is the source of truth for the vocabulary
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream belongs to --seed: leave it untouched
        torch.manual_seed(TINY_MODEL_SEED)
        return AutoModelForCausalLM.from_config(config)


def ensure_tiny_model(directory: Path) -> tuple[Any, Any]:
    """The embedded model and tokenizer: loaded from ``directory`` if an earlier run saved them there, else built
    (deterministically, so every process gets the same weights without waiting for another) and saved by the
    first process of the machine, written to a temporary directory and renamed, so no process reads half a save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (directory / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny_model-", dir=directory.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:  # another run got there first: its files are the same
            shutil.rmtree(tmp, ignore_errors=True)
    # As if loaded from there: a LoRA adapter saved later records it as its base model.
    model.name_or_path = model.config.name_or_path = str(directory)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------- rewards
def parse_reward_spec(spec: str) -> tuple[str, str | None]:
    """``'lexicon'`` -> (lexicon, None); ``'lexicon:<file>'`` -> (lexicon, file); ``'<task>:<model>'`` or
    ``'<model>'`` -> (task, model), the task defaulting to text-classification."""
    if spec == "lexicon":
        return "lexicon", None
    if spec.startswith("lexicon:"):
        return "lexicon", spec[len("lexicon:") :]
    for task in REWARD_TASKS:
        if spec.startswith(task + ":"):
            return task, spec[len(task) + 1 :]
    return "text-classification", spec


class LexiconReward:
    """Sentiment from a word lexicon: ``(positive - negative words) / words`` of the response, in [-1, 1] (0 for a
    response without words). Transparent and instant, so the curve shows PPO, not the reward model."""

    def __init__(self, path: str | os.PathLike | None = None):
        lexicon = json.loads(Path(path or DEFAULT_LEXICON).read_text())
        self.positive = {w.lower() for w in lexicon["positive"]}
        self.negative = {w.lower() for w in lexicon["negative"]}

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for text in responses:
            words = re.findall(r"[a-z']+", text.lower())
            pos = sum(w in self.positive for w in words)
            neg = sum(w in self.negative for w in words)
            out.append((pos - neg) / len(words) if words else 0.0)
        return out


def join_text(prompt: str, response: str) -> str:
    """``prompt + response``, with a space between when neither side has one: BPE tokenizers (GPT-2's) decode a
    response with its leading space, word-level ones (the tiny model's) without."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        return prompt + " " + response
    return prompt + response


class PipelineReward:
    """A sequence-classification model run as a transformers pipeline on prompt + response (TRL's IMDB recipe);
    the reward is the raw logit (``function_to_apply="none"``) of ``label``."""

    def __init__(self, task: str, model: str, label: str | None, batch_size: int, device: Any, trust_remote_code: bool):
        from transformers import pipeline

        self.pipe = pipeline(task, model=model, device=device, trust_remote_code=trust_remote_code)
        labels = list(self.pipe.model.config.id2label.values())
        if label is None:
            label = "POSITIVE" if "POSITIVE" in labels else labels[-1]
        if label not in labels:
            raise SystemExit(f"ppo.py: error: argument --reward_label: {label!r} is not one of the model's {labels}")
        self.label = label
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [join_text(p, r) for p, r in zip(prompts, responses)]
        outputs = self.pipe(texts, top_k=None, function_to_apply="none", batch_size=self.batch_size, truncation=True)
        return [float(next(o["score"] for o in out if o["label"] == self.label)) for out in outputs]


def build_reward(config: PPOConfig, script: Any, accelerator: Any) -> Callable[[list[str], list[str]], list[float]]:
    """``--reward_model`` as a function of (prompts, responses); ``script`` is ppo.py's ``ScriptArguments``."""
    import ppo_fast

    kind, arg = parse_reward_spec(config.reward_model)
    if kind == "lexicon":
        return LexiconReward(arg)
    # Each process runs the whole reward model next to DeepSpeed's engine, never inside it, so it must be built
    # unsharded. Under ZeRO-3, TRL's guide wraps this in deepspeed_plugin.zero3_init_context_manager(enable=False),
    # but with transformers 5 that no longer stops sharding: transformers decides on deepspeed.zero.Init from the
    # registered HfDeepSpeedConfig's stage, which accelerate keeps at 3. ppo_fast.zero3_init_disabled also lifts
    # that registration for the duration (see ppo_fast/trainer/distributed.py); without ZeRO-3 it does nothing.
    with ppo_fast.zero3_init_disabled(accelerator):
        try:
            return PipelineReward(
                kind, arg, script.reward_label, script.reward_batch_size, accelerator.device, script.trust_remote_code
            )
        except OSError as e:
            raise SystemExit(f"ppo.py: error: argument --reward_model {arg}: {e}") from e


# --------------------------------------------------------------------------------------------------- outputs
PLOTTED = (("env/reward_mean", "reward (mean)"), ("objective/kl", "KL to reference"), ("ppo/loss/total", "PPO loss"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Reward (with its std band), KL and loss per step as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed (servers, CI)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "ppo.py: matplotlib is not installed, so no plot (pip install 'ppo_fast[examples]')", stacklevel=2
        )
        return False
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, PLOTTED):
        values = [r.get(key, math.nan) for r in records]
        ax.plot(steps, values, marker="." if len(steps) < 40 else None)
        if key == "env/reward_mean":
            std = [r.get("env/reward_std", 0.0) for r in records]
            ax.fill_between(
                steps, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)], alpha=0.2
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_comparison_plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Several runs' reward (mean, with its std band) and KL per step on shared axes, one line per run, as a PNG;
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "ppo.py: matplotlib is not installed, so no plot (pip install 'ppo_fast[examples]')", stacklevel=2
        )
        return False
    shown = PLOTTED[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.2), constrained_layout=True)
    for label, records in runs.items():
        steps = [r["step"] for r in records]
        for ax, (key, title) in zip(axes, shown):
            values = [r.get(key, math.nan) for r in records]
            (line,) = ax.plot(steps, values, label=label)
            if key == "env/reward_mean":
                std = [r.get("env/reward_std", 0.0) for r in records]
                lo, hi = [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)]
                ax.fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
