"""Optional: benchmark accuracy through ``lm-eval`` (``pip install 'daar-ops[lm-eval]'``), the
DaaR paper's seven benchmarks, meant for GPU users; code tasks run model-written code and are
refused unless allowed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from daar_ops.core import resolve_device, resolve_dtype
from daar_ops.evaluation.runs import BASE, write_json_atomic

# lm-eval task names of the paper's benchmarks (it used OpenCompass): NQ, TriviaQA, HellaSwag,
# GSM8K, MATH, MBPP, HumanEval. The two code tasks execute model-written code.
PAPER_BENCHMARKS = ("nq_open", "triviaqa", "hellaswag", "gsm8k", "minerva_math", "mbpp",
                    "humaneval")
CODE_TASKS = ("mbpp", "humaneval")


def parse_tasks(value: str | None, allow_code_execution: bool = False) -> list[str]:
    """The lm-eval task names of ``--lm-eval-tasks``; code tasks (they execute model-written
    code on this machine) are refused unless ``allow_code_execution``."""
    if not value:
        return []
    tasks = list(PAPER_BENCHMARKS) if value.strip() == "paper" else \
        [t.strip() for t in value.split(",") if t.strip()]
    code = [t for t in tasks if t in CODE_TASKS]
    if code and not allow_code_execution:
        raise ValueError(f"benchmark(s) {', '.join(code)} run code the model wrote on this "
                         f"machine; pass --allow-code-execution to run them (ideally in a "
                         f"sandbox), or leave them out of --lm-eval-tasks")
    return tasks


def lm_eval_model_args(model_path: str, adapter_dir: str | Path | None, dtype: str) -> str:
    """lm-eval's ``--model_args`` for the HF backend: the base model plus a peft adapter."""
    args = f"pretrained={model_path},dtype={dtype}"
    if adapter_dir is not None:
        args += f",peft={adapter_dir}"
    return args


def _lm_eval_args(model_path: str, saved: str | Path | None, dtype: str) -> str:
    """A saved LoRA adapter rides on the base model; a saved full fine-tune is the model."""
    if saved is not None and not (Path(saved) / "adapter_config.json").exists():
        return lm_eval_model_args(str(saved), None, dtype)
    return lm_eval_model_args(model_path, saved, dtype)


def run_lm_eval(model: str, adapter_dir: str | Path | None, tasks: Sequence[str],
                device: str = "cuda", limit: int | None = None,
                batch_size: str | int = "auto", allow_code_execution: bool = False
                ) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from ``lm_eval.simple_evaluate`` (needs ``pip install lm-eval``).

    Code tasks execute model-written code: refused unless ``allow_code_execution``."""
    code = [t for t in tasks if t in CODE_TASKS]
    if code and not allow_code_execution:
        raise ValueError(f"benchmark(s) {', '.join(code)} execute model-written code; pass "
                         f"allow_code_execution=True (--allow-code-execution) to run them")
    try:
        import lm_eval
    except ImportError as err:  # an optional extra, not installed by make setup
        raise ImportError("benchmarks need lm-eval: pip install 'daar-ops[lm-eval]'") from err
    from daar_ops.models import resolve_model_path

    device = resolve_device(device)
    dtype = resolve_dtype("auto", device)  # bfloat16 where the device has it natively
    if code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=_lm_eval_args(resolve_model_path(model), adapter_dir, dtype),
        tasks=list(tasks), device=device, limit=limit, batch_size=batch_size,
        confirm_run_unsafe_code=bool(code))
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def evaluate_benchmarks(results: Sequence[dict[str, Any]], out_dir: str | Path, model: str,
                        tasks: Sequence[str], device: str = "cuda", limit: int | None = None,
                        batch_size: str | int = "auto", allow_code_execution: bool = False
                        ) -> list[dict[str, Any]]:
    """Adds ``benchmarks`` to every run (from its saved adapter); resumable like the training."""
    out_dir = Path(out_dir)
    for r in results:
        run_dir = out_dir / "runs" / r["method"] / ("base" if r["seed"] is None
                                                   else f"seed-{r['seed']}")
        done = r.get("benchmarks", {})
        todo = [t for t in tasks if t not in done]
        if not todo:
            continue
        adapter = run_dir / "adapter"
        if r["method"] != BASE and not adapter.exists():
            raise FileNotFoundError(f"{adapter} is missing: rerun with --no-resume so the "
                                    "adapter is saved")
        done.update(run_lm_eval(model, adapter if r["method"] != BASE else None, todo, device,
                                limit, batch_size, allow_code_execution))
        r["benchmarks"] = done
        write_json_atomic(run_dir / "result.json", r)
    return list(results)
