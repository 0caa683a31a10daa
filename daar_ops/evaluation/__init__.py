"""Judge a selection by the model fine-tuned on it: fine-tuning + per-domain held-out loss.

The loop behind ``daar-ops evaluate``, ``tools/eval_downstream.py`` and the sandbox hooks, one
module per step (every public name is importable from ``daar_ops.evaluation``):

1. :mod:`~daar_ops.evaluation.split`: pool records whose text hash falls below ``fraction`` are
   held out. The hash depends on the text only, so the split is the same for every method, every
   slice and every order of the pool, and :func:`drop_held_out` can strip held-out texts from
   any selection.
2. :mod:`~daar_ops.evaluation.finetune`: :func:`fine_tune` with :class:`TrainSettings` (the one
   parameter object, validated once): the same base model, full fine-tune or LoRA (``peft``),
   ``transformers.Trainer`` settings and seed for every selection; the model's chat template
   renders (user: instruction + input, assistant: output) and only the assistant tokens carry
   loss (:mod:`~daar_ops.evaluation.encoding`).
3. :mod:`~daar_ops.evaluation.scoring`: :func:`held_out_loss`, the mean negative log-likelihood
   per answer token and per final-answer token on each domain's held-out records (the evaluation
   may read the ground-truth ``domain``; selection never does).
4. :mod:`~daar_ops.evaluation.runs`: :func:`evaluate_selections`, every method x seed, resumable
   (a finished run's ``result.json`` whose :func:`run_fingerprint` matches is reused);
   :mod:`~daar_ops.evaluation.summary`: :func:`summarize` (method x domain table, delta vs random
   with a 95% t-interval over seeds, paired by seed), :func:`write_outputs` (JSON, CSV,
   Markdown, bar chart).
5. :mod:`~daar_ops.evaluation.comparison`: :func:`prepare_comparison`, the held-out sets, one
   slice and every method's selection of it; :mod:`~daar_ops.evaluation.controls`: the positive
   controls' selections from the ground-truth domain.
6. :mod:`~daar_ops.evaluation.benchmarks`: :func:`run_lm_eval`, optional benchmark accuracy
   through ``lm-eval`` (``pip install 'daar-ops[lm-eval]'``), meant for GPU users.
"""

from daar_ops.evaluation.benchmarks import (CODE_TASKS, PAPER_BENCHMARKS, evaluate_benchmarks,
                                            lm_eval_model_args, parse_tasks, run_lm_eval)
from daar_ops.evaluation.comparison import (ALL_SEEDS, DEFAULT_METHODS, MIX_FILE, RECIPE_METHODS,
                                            RECIPES, Comparison, ensure_daar_checkpoint,
                                            prepare_comparison, selection_mix)
from daar_ops.evaluation.controls import (CONTROL_DOUBLE, CONTROL_NAMES, CONTROL_RANDOM,
                                          CONTROL_SINGLE, CONTROL_SKEW, CONTROLS, SINGLE_DOMAIN,
                                          SKEW_DOMAIN, SKEW_SHARE, control_selections)
from daar_ops.evaluation.encoding import (chat_messages, encode_example, encode_records,
                                          final_answer_span, pad_batch)
from daar_ops.evaluation.finetune import (BF16_MODES, FINETUNE_MODES, FULL_FINETUNE_MAX_PARAMS,
                                          FineTuneResult, TrainSettings, count_parameters,
                                          fine_tune, resolve_finetune, resolved_settings,
                                          use_bf16, weights_dtype)
from daar_ops.evaluation.runs import (BASE, FULL, RANDOM, Selection, comparison_key,
                                      evaluate_selections, run_fingerprint, seeded_order,
                                      selection_for_seed, write_json_atomic)
from daar_ops.evaluation.scoring import held_out_loss, load_tuned
from daar_ops.evaluation.split import (TEXT_FIELDS, drop_held_out, eval_sets_digest,
                                       held_out_eval_sets, is_held_out, read_eval_sets,
                                       read_records, records_digest, split_held_out, text_hash,
                                       write_eval_sets)
from daar_ops.evaluation.summary import (format_table, plot_losses, summarize, t_interval,
                                         write_outputs)

__all__ = [
    "ALL_SEEDS", "BASE", "BF16_MODES", "CODE_TASKS", "CONTROLS", "CONTROL_DOUBLE", "CONTROL_NAMES",
    "MIX_FILE", "selection_mix",
    "CONTROL_RANDOM", "CONTROL_SINGLE", "CONTROL_SKEW", "Comparison", "DEFAULT_METHODS",
    "FINETUNE_MODES", "FULL", "FULL_FINETUNE_MAX_PARAMS", "FineTuneResult", "PAPER_BENCHMARKS",
    "RANDOM", "RECIPES", "RECIPE_METHODS", "SINGLE_DOMAIN", "SKEW_DOMAIN", "SKEW_SHARE",
    "Selection", "TEXT_FIELDS", "TrainSettings", "chat_messages", "comparison_key",
    "control_selections", "count_parameters", "drop_held_out", "encode_example", "encode_records",
    "ensure_daar_checkpoint", "eval_sets_digest", "evaluate_benchmarks", "evaluate_selections",
    "final_answer_span", "fine_tune", "format_table", "held_out_eval_sets", "held_out_loss",
    "is_held_out", "lm_eval_model_args", "load_tuned", "pad_batch", "parse_tasks", "plot_losses",
    "prepare_comparison", "read_eval_sets", "read_records", "records_digest", "resolve_finetune",
    "resolved_settings", "run_fingerprint", "run_lm_eval", "seeded_order", "selection_for_seed",
    "split_held_out", "summarize", "t_interval", "text_hash", "use_bf16", "weights_dtype",
    "write_eval_sets", "write_json_atomic", "write_outputs",
]
