"""Text generation backends behind one interface. No Data-Juicer import at module level.

:func:`load_generator` returns a :class:`TextGenerator` whose :meth:`~TextGenerator.generate` takes
chat conversations (``[[{"role": "user", "content": ...}], ...]``) and returns one completion per
conversation, in order. Backends:

* ``"hf"`` (default): a local Hugging Face causal LM (a short name such as
  :data:`daar_ops.models.SMOLLM2`, a local folder or a hub id resolved by
  :func:`daar_ops.models.resolve_model_path`), loaded by :func:`daar_ops.causal_lm.load_causal_lm`.
  The tokenizer's chat template is applied with the generation prompt; conversations are
  generated in batches of ``batch_size`` with left padding.
* ``"api"``: Data-Juicer's OpenAI-compatible API model
  (:func:`data_juicer.utils.model_utils.prepare_api_model`); ``backend_kwargs`` such as
  ``base_url`` and ``endpoint`` are passed to it. The key comes from ``OPENAI_API_KEY`` (and the
  server from ``OPENAI_BASE_URL``) in the environment: an ``api_key`` written in a recipe is
  echoed in Data-Juicer's config table and its recipe backup (a warning says so). One request per
  conversation; the ``seed`` is sent with each request (servers that honour it are reproducible).
* ``"vllm"`` (optional, GPU): :class:`vllm.LLM` with ``llm.chat``; needs the ``vllm`` package.

Seeding: the HF backend calls ``torch.manual_seed(seed + b)`` before batch ``b`` of a call, so the
same conversations, batch size, seed and model give the same outputs. vLLM and API requests get
``seed + i`` for conversation ``i``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from loguru import logger
from tqdm.auto import tqdm

from daar_ops.models import SMOLLM2

Conversation = list[dict[str, str]]
StopRule = Callable[[int, str], bool]

BACKENDS = ("hf", "api", "vllm")


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _check_conversations(conversations: Sequence[Conversation]) -> list[Conversation]:
    out = []
    for i, conv in enumerate(conversations):
        if isinstance(conv, str):  # a bare prompt is a one-turn user conversation
            conv = [{"role": "user", "content": conv}]
        if not isinstance(conv, (list, tuple)) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in conv):
            raise ValueError(f"conversation {i} must be a list of {{'role', 'content'}} dicts")
        out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in conv])
    return out


class TextGenerator(ABC):
    """Chat completion for a batch of conversations."""

    backend: str = "?"

    @abstractmethod
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 256,
                 temperature: float = 0.9, top_p: float = 0.95, do_sample: bool = True,
                 seed: int = 0, progress: bool = False,
                 stop: StopRule | None = None) -> list[str]:
        """One completion (assistant text only, special tokens removed) per conversation;
        ``progress``: a bar per generation batch.

        ``stop(i, text) -> bool``: called with conversation ``i``'s text generated so far; once it
        returns True that conversation is finished (the HF backend stops decoding it, and a batch
        ends when all its rows are finished). Only a speed hint: the API and vLLM backends ignore
        it, so a caller must not rely on the text ending where ``stop`` first said True."""

    def describe(self) -> dict[str, Any]:
        """Provenance to store with anything generated."""
        return {"backend": self.backend}


class HFGenerator(TextGenerator):
    """Local causal LM with the tokenizer's chat template; batched, left-padded generation.

    :param model: short name, local folder or hub id.
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    :param dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16 where the device
        has it natively; :func:`daar_ops.causal_lm.load_causal_lm`).
    :param batch_size: conversations per ``model.generate`` call.
    :param max_prompt_tokens: longer prompts keep their last tokens (the generation prompt).
    """

    backend = "hf"

    def __init__(self, model: str = SMOLLM2, device: str | None = "cpu",
                 dtype: str = "float32", batch_size: int = 8, max_prompt_tokens: int = 2048):
        import torch

        from daar_ops.causal_lm import load_causal_lm
        from daar_ops.core import resolve_device
        from daar_ops.models import model_fingerprint, resolve_model_path

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model_name = str(model)
        self.model_path = resolve_model_path(model)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.fingerprint = model_fingerprint(self.model_path)
        self.model, self.tokenizer = load_causal_lm(
            model, self.device, dtype, padding_side="left",
            chat_template_for="chat generation")
        self._torch = torch
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self._eos_ids = sorted(e for e in eos if e is not None)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name, "model_path": self.model_path,
                "model_fingerprint": self.fingerprint, "batch_size": self.batch_size}

    def _prompts(self, conversations: list[Conversation]) -> list[list[int]]:
        ids = []
        for conv in conversations:
            # A conversation ending with an assistant turn is a prefill: the model continues it.
            prefill = conv[-1]["role"] == "assistant"
            text = self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=not prefill,
                continue_final_message=prefill)
            row = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.append(row[-self.max_prompt_tokens:])
        return ids

    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 256,
                 temperature: float = 0.9, top_p: float = 0.95, do_sample: bool = True,
                 seed: int = 0, progress: bool = False,
                 stop: StopRule | None = None) -> list[str]:
        torch = self._torch
        _check_sampling(max_new_tokens, temperature, top_p)
        convs = _check_conversations(conversations)
        prompts = self._prompts(convs)
        outputs: list[str] = []
        pad = self.tokenizer.pad_token_id
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) \
            if do_sample and temperature > 0 else dict(do_sample=False)
        starts = range(0, len(prompts), self.batch_size)
        for b, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
            batch = prompts[start:start + self.batch_size]
            width = max(len(r) for r in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            torch.manual_seed(seed + b)
            criteria = None if stop is None else [_RowStop(self.tokenizer, stop, start, width)]
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=self._eos_ids,
                    stopping_criteria=criteria, **sampling)
            new = out[:, width:].cpu()
            outputs.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return outputs


class _RowStop:
    """A ``transformers`` stopping criterion that finishes each row once ``stop`` says so.

    ``generate`` still samples a token for finished rows (and replaces it by padding), so the
    random stream, and with it every other row's text, is the same as without the rule.
    """

    def __init__(self, tokenizer: Any, stop: StopRule, first: int, width: int):
        self.tokenizer, self.stop, self.first, self.width = tokenizer, stop, first, width
        self.done: list[bool] | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.width:]
        if self.done is None:
            self.done = [False] * new.shape[0]
        for row in range(new.shape[0]):
            if not self.done[row]:
                text = self.tokenizer.decode(new[row], skip_special_tokens=True)
                self.done[row] = bool(self.stop(self.first + row, text))
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class APIGenerator(TextGenerator):
    """Data-Juicer's OpenAI-compatible chat API model; one request per conversation.

    Failed requests return "" (Data-Juicer logs them); callers treat that as a malformed answer.
    """

    backend = "api"

    def __init__(self, model: str, endpoint: str | None = None, num_threads: int = 1,
                 client: Any = None, **model_params: Any):
        """:param client: a ready callable ``client(messages, **params) -> str`` (tests, custom
        clients); default: ``prepare_api_model(model, endpoint=endpoint, **model_params)``."""
        if not model:
            raise ValueError("the api backend needs a model name")
        self.model_name = model
        self.num_threads = max(1, int(num_threads))
        if client is None:
            import importlib.util

            # Data-Juicer would pip-install a missing openai at run time; refuse instead.
            if importlib.util.find_spec("openai") is None:
                raise ImportError("the api backend needs the 'openai' package: "
                                  "pip install openai")
            from data_juicer.utils.model_utils import prepare_api_model

            client = prepare_api_model(model, endpoint=endpoint, **model_params)
        self.client = client

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name}

    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 256,
                 temperature: float = 0.9, top_p: float = 0.95, do_sample: bool = True,
                 seed: int = 0, progress: bool = False,
                 stop: StopRule | None = None) -> list[str]:
        _check_sampling(max_new_tokens, temperature, top_p)
        convs = _check_conversations(conversations)

        def one(i: int) -> str:
            params = dict(max_tokens=max_new_tokens, seed=seed + i,
                          temperature=temperature if do_sample else 0.0)
            if do_sample:
                params["top_p"] = top_p
            try:
                return str(self.client(convs[i], **params) or "")
            except Exception as err:  # a failed request is one bad answer, not a failed run
                logger.warning(f"api generation {i} failed: {err}")
                return ""

        if self.num_threads == 1:
            return [one(i) for i in tqdm(range(len(convs)), desc="generate",
                                         disable=not progress)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.num_threads) as pool:
            return list(pool.map(one, range(len(convs))))


class VLLMGenerator(TextGenerator):
    """vLLM offline engine (GPU). Needs ``pip install vllm``."""

    backend = "vllm"

    def __init__(self, model: str = SMOLLM2, dtype: str = "float32",
                 **llm_kwargs: Any):
        try:
            import vllm
        except ImportError as err:
            raise ImportError("the vllm backend needs the 'vllm' package (GPU only); "
                              "use backend='hf' otherwise") from err
        from daar_ops.models import resolve_model_path

        self.model_name = str(model)
        self.model_path = resolve_model_path(model)
        self._vllm = vllm
        self.llm = vllm.LLM(model=self.model_path, dtype=dtype, **llm_kwargs)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name, "model_path": self.model_path}

    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 256,
                 temperature: float = 0.9, top_p: float = 0.95, do_sample: bool = True,
                 seed: int = 0, progress: bool = False,
                 stop: StopRule | None = None) -> list[str]:
        _check_sampling(max_new_tokens, temperature, top_p)
        convs = _check_conversations(conversations)
        params = [self._vllm.SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0, seed=seed + i) for i in range(len(convs))]
        results = self.llm.chat(convs, params, use_tqdm=progress)
        return [r.outputs[0].text if r.outputs else "" for r in results]


def load_generator(backend: str = "hf", model: str = SMOLLM2,
                   device: str | None = "cpu", dtype: str = "float32", batch_size: int = 8,
                   **backend_kwargs: Any) -> TextGenerator:
    """Build a generator. ``backend_kwargs`` go to the backend (e.g. ``base_url`` for ``api``)."""
    if backend == "hf":
        return HFGenerator(model=model, device=device, dtype=dtype, batch_size=batch_size,
                           **backend_kwargs)
    if backend == "api":
        if "api_key" in backend_kwargs:
            logger.warning("an api_key given as a parameter is echoed in Data-Juicer's config "
                           "table and in the recipe backup of its work folder; leave it out and "
                           "export OPENAI_API_KEY (and OPENAI_BASE_URL) instead")
        return APIGenerator(model=model, **backend_kwargs)
    if backend == "vllm":
        return VLLMGenerator(model=model, dtype=dtype, **backend_kwargs)
    raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")
