"""Fine-tuning one selection: :class:`TrainSettings` (the one parameter object, validated once) and
:func:`fine_tune` (every weight, or LoRA adapters through peft, with ``transformers.Trainer``).

The same base model, settings and seed for every selection; the model's chat template renders
(user: instruction + input, assistant: output) and only the assistant tokens carry loss
(:mod:`daar_ops.evaluation.encoding`).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from daar_ops.causal_lm import load_causal_lm
from daar_ops.core import native_bf16, resolve_device
from daar_ops.evaluation.encoding import encode_records, pad_batch

FINETUNE_MODES = ("auto", "full", "lora")
BF16_MODES = ("auto", "yes", "no")
# "auto" fine-tunes every weight of a model below this many parameters on a CPU, LoRA otherwise
FULL_FINETUNE_MAX_PARAMS = 1_000_000_000
# why the evaluation's tokenizer needs a chat template (load_causal_lm says it when one has none)
RESPONSE_ONLY = "response-only training"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainSettings:
    """Identical for every selection of one comparison; part of each run's fingerprint (its field
    names and values: adding, renaming or re-defaulting a field retrains every finished run).

    Defaults are the CPU instrument chosen by the positive controls (docs/evaluation.md): a full
    fine-tune of SmolLM2-135M, lr 1e-4 cosine with 10% warm-up, batch 8, 2 epochs, 128 training
    tokens, batches grouped by length, loss at 256 tokens. ``gpu_paper()`` is the 7B LoRA setting.
    Every field is checked once, when the settings are made (:meth:`validate`).
    """

    max_length: int = 128  # training tokens per example (prompt + answer)
    epochs: float = 2.0
    max_steps: int = -1  # > 0 caps the optimizer steps (overrides epochs)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_fraction: float = 0.1
    scheduler: str = "cosine"  # a transformers.SchedulerType
    weight_decay: float = 0.0
    # "full": every weight is trained; "lora": adapters (peft); "auto": full for models under
    # FULL_FINETUNE_MAX_PARAMS parameters on a CPU, LoRA otherwise (resolved per run).
    finetune: str = "auto"
    group_by_length: bool = True  # batches of similar length (transformers' LengthGroupedSampler)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # peft's shorthand: every linear layer but the LM head
    # > 0: adapters only on the top N decoder layers. Autograd then stops N layers down, which
    # saves most of the backward pass; 0: every layer (the usual LoRA).
    lora_top_layers: int = 0
    bf16: str = "auto"  # "auto": where the device has native bf16; "yes" / "no"
    eval_batch_size: int = 8
    eval_max_length: int = 256  # tokens per evaluated example (0: max_length)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A ``ValueError`` naming the first field out of its range."""
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"TrainSettings.{name} must be {rule}, got "
                                 f"{getattr(self, name)!r}")

        for name, low in (("max_length", 1), ("batch_size", 1), ("grad_accum", 1),
                          ("lora_r", 1), ("eval_batch_size", 1), ("lora_top_layers", 0),
                          ("eval_max_length", 0)):
            check(_is_int(getattr(self, name)) and getattr(self, name) >= low, name,
                  f"an int >= {low}")
        check(_is_int(self.max_steps), "max_steps", "an int (> 0 caps the steps)")
        for name in ("epochs", "lr", "lora_alpha"):
            check(_is_number(getattr(self, name)) and getattr(self, name) > 0, name, "> 0")
        check(_is_number(self.warmup_fraction) and 0 <= self.warmup_fraction <= 1,
              "warmup_fraction", "in [0, 1]")
        check(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0")
        check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout",
              "in [0, 1)")
        check(self.finetune in FINETUNE_MODES, "finetune", f"one of {FINETUNE_MODES}")
        check(self.bf16 in BF16_MODES, "bf16", f"one of {BF16_MODES}")
        check(isinstance(self.group_by_length, bool), "group_by_length", "a bool")
        check(bool(self.lora_targets) and isinstance(self.lora_targets, (str, list, tuple)),
              "lora_targets", "peft's target_modules (a name, a list of names or 'all-linear')")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        check(self.scheduler in schedulers, "scheduler", f"one of {schedulers}")

    @classmethod
    def gpu_paper(cls, **overrides: Any) -> "TrainSettings":
        """DaaR's fine-tuning scale on a GPU: 3 epochs, lr 1e-4, LoRA r 64, 1,024 tokens."""
        base = dict(max_length=1024, eval_max_length=1024, epochs=3.0, batch_size=16, lr=1e-4,
                    lora_r=64, lora_alpha=128, eval_batch_size=16, finetune="lora",
                    warmup_fraction=0.05)
        base.update(overrides)
        return cls(**base)

    @property
    def eval_length(self) -> int:
        return self.eval_max_length if self.eval_max_length > 0 else self.max_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def use_bf16(settings: TrainSettings, device: str) -> bool:
    """bf16 autocast: ``settings.bf16`` "yes", or "auto" where ``device`` has it natively
    (:func:`daar_ops.core.native_bf16`)."""
    return settings.bf16 == "yes" or (settings.bf16 == "auto" and native_bf16(device))


def weights_dtype(device: str) -> str:
    """The precision frozen weights are stored in: bfloat16 on a CUDA device with native bf16
    (a 7B model in fp32 would need 28 GB), float32 elsewhere."""
    return "bfloat16" if device.startswith("cuda") and native_bf16(device) else "float32"


def count_parameters(model: str) -> int:
    """Parameters of ``model`` from its config alone (built on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from daar_ops.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return int(sum(p.numel() for p in lm.parameters()))


def resolve_finetune(settings: TrainSettings, model: str, device: str) -> str:
    """"full" or "lora" for this model on this device (``settings.finetune`` "auto" decides by
    size: a full fine-tune on a CPU below :data:`FULL_FINETUNE_MAX_PARAMS`)."""
    if settings.finetune != "auto":
        return settings.finetune
    device = resolve_device(device)
    small = count_parameters(model) < FULL_FINETUNE_MAX_PARAMS
    return "full" if small and device == "cpu" else "lora"


def resolved_settings(settings: TrainSettings, model: str, device: str) -> dict[str, Any]:
    """What "auto" became on this machine: goes into every run's fingerprint, so fp32 and bf16
    runs (or full and LoRA runs) are never paired in one comparison."""
    device = resolve_device(device)
    return {"bf16": use_bf16(settings, device),
            "finetune": resolve_finetune(settings, model, device),
            "device_type": "cuda" if device.startswith("cuda") else device}


@dataclass
class FineTuneResult:
    model: Any  # the tuned model (the peft model with LoRA), in eval mode
    train_loss: float
    steps: int
    train_examples: int
    train_tokens: int
    answer_tokens: int
    seconds: float
    tokens_per_second: float
    finetune: str = "lora"
    bf16: bool = False
    tokenizer: Any = None  # the base model's (with a pad token)


def training_steps(settings: TrainSettings, n_examples: int) -> int:
    """Optimizer steps: ``max_steps`` when > 0, else ``epochs`` passes over the examples."""
    per_step = settings.batch_size * settings.grad_accum
    return (settings.max_steps if settings.max_steps > 0
            else max(1, math.ceil(n_examples / per_step * settings.epochs)))


def fine_tune(model: str, records: Sequence[Mapping[str, Any]], settings: TrainSettings,
              seed: int, work_dir: str | Path, device: str = "cpu", progress: bool = True,
              adapter_dir: str | Path | None = None) -> FineTuneResult:
    """Fine-tune ``model`` on ``records`` with ``transformers.Trainer``: every weight
    (``finetune`` "full") or LoRA adapters (peft), as :func:`resolve_finetune` decides.

    bf16 is autocast where :func:`use_bf16` says so (the weights and the optimizer state stay
    fp32, except a LoRA base on a bf16 GPU, stored in bf16). The seed fixes the initialisation of
    the adapters, dropout and data order. With ``adapter_dir`` the trained adapter (LoRA) or the
    whole model (full) is saved there (for lm-eval or reuse); otherwise nothing is written but
    logs.
    """
    import torch
    from transformers import Trainer, set_seed

    device = resolve_device(device)
    set_seed(seed)
    bf16 = use_bf16(settings, device)
    mode = resolve_finetune(settings, model, device)
    # On a GPU with bf16 the frozen LoRA base weights are stored in bf16; trained weights (LoRA's,
    # or all of them) stay fp32 under autocast.
    base, tokenizer = load_causal_lm(
        model, device, "bfloat16" if bf16 and device.startswith("cuda") and mode == "lora"
        else "float32", trainable=True, chat_template_for=RESPONSE_ONLY)
    examples = encode_records(tokenizer, records, settings.max_length)
    if not examples:
        raise ValueError("no training example has answer tokens")
    set_seed(seed)
    lm = _with_adapters(base, settings) if mode == "lora" else base.train()
    steps = training_steps(settings, len(examples))
    pad_id = tokenizer.pad_token_id
    trainer = Trainer(model=lm, args=_training_arguments(settings, steps, seed, work_dir, bf16,
                                                         device, progress),
                      train_dataset=examples, data_collator=lambda batch: pad_batch(batch, pad_id))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    per_step = settings.batch_size * settings.grad_accum
    seen = min(len(examples), steps * per_step)  # examples the first pass covered
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    trained_tokens = tokens_per_epoch * (steps * per_step) / len(examples)
    if adapter_dir is not None:
        lm.save_pretrained(str(adapter_dir))
    lm.eval()
    del trainer
    torch.set_grad_enabled(True)
    return FineTuneResult(
        model=lm, train_loss=float(output.training_loss), steps=steps, train_examples=seen,
        train_tokens=int(trained_tokens),
        answer_tokens=sum(sum(t != -100 for t in e["labels"]) for e in examples),
        seconds=seconds, tokens_per_second=trained_tokens / max(seconds, 1e-9), finetune=mode,
        bf16=bf16, tokenizer=tokenizer)


def _with_adapters(base: Any, settings: TrainSettings) -> Any:
    """``base`` with LoRA adapters (peft): on every linear layer, or on the top
    ``lora_top_layers`` decoder layers only."""
    import torch
    from peft import LoraConfig, get_peft_model

    n_layers = int(base.config.num_hidden_layers)
    layers = (list(range(max(0, n_layers - settings.lora_top_layers), n_layers))
              if settings.lora_top_layers > 0 else None)
    targets: Any = settings.lora_targets
    if layers is not None and targets == "all-linear":
        # peft takes layers_to_transform only with a list of module names: the linear layers'.
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                          if isinstance(module, torch.nn.Linear) and ".layers." in name})
    return get_peft_model(base, LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM"))


def _training_arguments(settings: TrainSettings, steps: int, seed: int, work_dir: str | Path,
                        bf16: bool, device: str, progress: bool) -> Any:
    """``transformers.TrainingArguments`` of one run (no checkpoints, no reporting)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(work_dir) / "trainer"), per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, max_steps=steps,
        learning_rate=settings.lr, lr_scheduler_type=settings.scheduler,
        warmup_steps=int(round(settings.warmup_fraction * steps)),
        weight_decay=settings.weight_decay, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        bf16=bf16, use_cpu=device == "cpu", dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        remove_unused_columns=False, disable_tqdm=not progress, optim="adamw_torch")
