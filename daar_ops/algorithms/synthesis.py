"""DaaR stage 1, synthesis: the model writes instruction pairs for each domain.

No Data-Juicer import, no model loaded, no file written. Everything here is plain Python / numpy:

* domains (:class:`DomainSpec`, the paper's :data:`DEFAULT_DOMAINS`, :func:`parse_domains`),
* prompts of the paper's seed and augmentation phases (:func:`seed_prompt`, :func:`augment_prompt`),
* tolerant parsing of "Instruction / Input / Output" pairs from free text (:func:`parse_pairs`,
  :func:`pairs_settled`),
* the synthesis loop with novelty acceptance (max cosine similarity to the domain's accepted pairs
  below ``tau``) (:func:`synthesize`, settings :class:`SynthesisConfig`).

The centroids made from the accepted pairs are :mod:`daar_ops.algorithms.centroids`; their file is
:mod:`daar_ops.centroid_file`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.algorithms.centroids import unit_rows
from daar_ops.core import is_number
from daar_ops.text import to_text


@dataclass(frozen=True)
class DomainSpec:
    """A domain: ``name`` (also the pseudo-label) and a one-sentence ``description``."""

    name: str
    description: str = ""

    @property
    def display(self) -> str:
        return self.name.replace("_", " ")


# The paper's four domains with its descriptions (Prompt 3); names match common label spellings.
DEFAULT_DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec("common_sense", "knowledge question and answer about everyday facts and general "
                               "knowledge, answered directly without reasoning steps"),
    DomainSpec("reasoning", "think logically, draw conclusions step by step and apply knowledge "
                            "to new situations"),
    DomainSpec("mathematics", "calculations, mathematical concepts and hard professional math "
                              "problems with numbers and equations"),
    DomainSpec("coding", "design and generate code, algorithms and data structures; the Output "
                         "contains code"),
)


def parse_domains(domains: Any) -> list[DomainSpec]:
    """Domains from names, ``{"name"/"domain", "description"}`` dicts, or a name -> description
    mapping. Raises ValueError for fewer than 2 or duplicate names."""
    if domains is None:
        return list(DEFAULT_DOMAINS)
    if isinstance(domains, Mapping):
        items = [DomainSpec(str(k), to_text(v)) for k, v in domains.items()]
    else:
        items = []
        for d in domains:
            if isinstance(d, DomainSpec):
                items.append(d)
            elif isinstance(d, str):
                items.append(DomainSpec(d))
            elif isinstance(d, Mapping):
                name = d.get("name", d.get("domain"))
                if not to_text(name).strip():
                    raise ValueError(f"domain entry without a name: {d!r}")
                items.append(DomainSpec(to_text(name).strip(), to_text(d.get("description"))))
            else:
                raise ValueError(f"cannot read a domain from {d!r}")
    names = [d.name for d in items]
    if len(items) < 2:
        raise ValueError(f"need at least 2 domains, got {names}")
    if len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise ValueError(f"domain names must be unique and non-empty, got {names}")
    return items


@dataclass(frozen=True)
class InstructionPair:
    instruction: str
    input: str
    output: str

    def record(self, domain: str | None = None) -> dict[str, str]:
        rec = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if domain is not None:
            rec["domain"] = domain
        return rec

    def text(self) -> str:
        """The text that is embedded: ``"{instruction} {input} {output}"`` (stripped)."""
        return " ".join(p for p in (self.instruction, self.input, self.output) if p).strip()


# ---------------------------------------------------------------------------------------- prompts

def _others(domain: DomainSpec, all_domains: Sequence[DomainSpec]) -> str:
    return ", ".join(d.display for d in all_domains if d.name != domain.name)


def _describe(domain: DomainSpec) -> str:
    return f" Here is a brief description of this domain: {domain.description}." \
        if domain.description else ""


def seed_prompt(domain: DomainSpec, all_domains: Sequence[DomainSpec], n_pairs: int = 5) -> str:
    """Zero-shot prompt of the seed phase (paper: 5 pairs)."""
    return (
        f"You are an AI model with expertise in {domain.display}.{_describe(domain)}\n"
        f"Generate {n_pairs} different instruction pairs related to {domain.display}, of various "
        f"lengths. Each pair has three parts, written exactly like this:\n"
        f"Instruction: <a task or question>\nInput: <optional context, may be empty>\n"
        f"Output: <the answer>\n"
        f"Keep the generated content focused on {domain.display}. "
        f"Do not involve {_others(domain, all_domains)} related knowledge."
    )


def augment_prompt(domain: DomainSpec, all_domains: Sequence[DomainSpec],
                   counterexamples: Sequence[InstructionPair]) -> str:
    """Augmentation prompt: ONE new pair, steering away from the shown accepted pairs."""
    shown = "".join(
        f"Counterexample {i}:\nInstruction: {p.instruction}\nInput: {p.input}\n"
        f"Output: {p.output}\n\n" for i, p in enumerate(counterexamples, 1))
    intro = ("Here are some counterexamples; your new pair must be different from them in topic "
             "and wording:\n\n" + shown) if shown else ""
    return (
        f"You are an AI model with expertise in {domain.display}.{_describe(domain)}\n"
        f"{intro}"
        f"Generate 1 new instruction pair related to {domain.display}, written exactly like "
        f"this:\nInstruction: <a task or question>\nInput: <optional context, may be empty>\n"
        f"Output: <the answer>\n"
        f"Keep the generated content focused on {domain.display}. "
        f"Do not involve {_others(domain, all_domains)} related knowledge."
    )


# ---------------------------------------------------------------------------------------- parsing

_LABELS = {"instruction": "instruction", "instructions": "instruction", "question": "instruction",
           "task": "instruction", "input": "input", "context": "input", "output": "output",
           "response": "output", "answer": "output", "solution": "output"}
# A label at a line start (optionally numbered / bulleted / bold / a markdown heading; any synonym,
# any case), e.g. "Instruction:", "**Instruction 2:**", "1. Input:", "### Output [3]:", or in the
# middle of a line only as the exact words "Instruction" / "Input" / "Output" followed by ":"
# (so "the answer: 42" inside an output stays text).
_LABEL_RE = re.compile(
    r"(?:^[ \t#>*\-]*(?:\d+[.)][ \t]*)?[*_]*"
    r"(?i:(instructions?|question|task|input|context|output|response|answer|solution))"
    r"|(?<=\s)[*_]*(Instruction|Input|Output))"
    r"[*_]*[ \t]*(?:[\[(#]?[ \t]*\d+[ \t]*[\])]?)?[ \t]*[*_]*[ \t]*(?:[:：]|[ \t][\-–][ \t])"
    r"\s*[*_]*",
    re.MULTILINE)
_HEADING_RE = re.compile(r"(?im)^\s*[#*_\s]*(?:instruction\s+)?(?:pair|example|counterexample|"
                         r"sample)\s*\d*\s*[:.]?[*_\s]*$")
_EMPTY_INPUT = {"", "none", "n/a", "na", "-", "noinput", "no input", "empty", "null",
                "optional context, may be empty"}


def _clean(part: str) -> str:
    part = _HEADING_RE.sub("", part)
    part = part.strip().strip("*_").strip()
    return re.sub(r"\n{3,}", "\n\n", part)


def parse_pairs(text: Any, max_pairs: int | None = None) -> list[InstructionPair]:
    """Instruction pairs found in free text; ``[]`` when none. Never raises.

    Tolerates numbering, markdown bold/headings, synonyms (Question/Answer/Response), a missing
    Input (-> ""), text before the first label and trailing chatter. A pair needs a non-empty
    instruction (>= 2 words) and a non-empty output; exact duplicates are dropped.
    """
    try:
        text = to_text(text)
        marks = list(_LABEL_RE.finditer(text))
        pairs: list[InstructionPair] = []
        current: dict[str, str] | None = None

        def close(cur: dict[str, str] | None) -> None:
            if not cur:
                return
            ins, out = cur.get("instruction", ""), cur.get("output", "")
            inp = cur.get("input", "")
            if inp.strip().lower().strip("<>()[]. ") in _EMPTY_INPUT:
                inp = ""
            placeholder = "<a task or question>" in ins or "<the answer>" in out
            if len(ins.split()) >= 2 and out.strip() and not placeholder:
                pair = InstructionPair(ins, inp, out)
                if pair not in pairs:
                    pairs.append(pair)

        for i, m in enumerate(marks):
            kind = _LABELS[(m.group(1) or m.group(2)).lower()]
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            body = _clean(text[m.end():end])
            if kind == "instruction" or current is None or current.get(kind, "").strip():
                close(current)
                current = {}
                if kind != "instruction":
                    continue  # an Input/Output without its Instruction: skip it
            current[kind] = body
        close(current)
        return pairs[:max_pairs] if max_pairs else pairs
    except Exception as err:  # parsing must never take a run down
        logger.debug(f"parse_pairs failed on a generation: {err}")
        return []


# ------------------------------------------------------------------------------------- synthesis

def pairs_settled(text: Any, max_pairs: int) -> bool:
    """True once more text cannot change ``parse_pairs(text, max_pairs)``: generation may stop.

    That is when the text before its last ``Instruction``-kind label already holds ``max_pairs``
    pairs: that label closes the pair before it (every field of it is bounded by a later label),
    and whatever follows can only append pairs after the first ``max_pairs``. Any other label
    (``Input:`` after an ``Output:``) could still add a field to the open pair, so it never
    settles the text. Synthesis uses it to stop decoding a conversation once its pairs are written
    (small models keep writing pairs nobody asked for until ``max_new_tokens``).
    """
    text = to_text(text)
    for m in reversed(list(_LABEL_RE.finditer(text))):
        if _LABELS[(m.group(1) or m.group(2)).lower()] == "instruction":
            return m.start() > 0 and len(parse_pairs(text[:m.start()], max_pairs)) >= max_pairs
    return False


@dataclass
class DomainStats:
    """Provenance of one domain's synthesis."""

    attempts: int = 0  # generations requested
    malformed: int = 0  # generations with no parseable pair
    rejected_similar: int = 0  # parsed pairs rejected by the novelty test
    accepted: int = 0
    candidates: int = 0  # parsed pairs tested

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.attempts if self.attempts else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": round(self.acceptance_rate, 4)}


@dataclass
class SynthesisResult:
    domains: list[DomainSpec]
    samples: dict[str, list[InstructionPair]]
    stats: dict[str, DomainStats]
    settings: dict[str, Any] = field(default_factory=dict)

    def records(self) -> list[dict[str, str]]:
        return [p.record(d.name) for d in self.domains for p in self.samples[d.name]]

    def shortfall(self, target: int) -> dict[str, int]:
        return {d.name: target - len(self.samples[d.name]) for d in self.domains
                if len(self.samples[d.name]) < target}


# The paper's tau: the threshold of a domain that a tau mapping names neither directly nor through
# its "default" key.
FALLBACK_TAU = 0.85


@dataclass(frozen=True)
class SynthesisConfig:
    """Settings of :func:`synthesize`, checked once when built (a ValueError names the field).

    The defaults are the package's (``centroid_synthesis_mapper``, ``daar-ops select`` and the
    recipes read them through :data:`daar_ops.defaults.SYNTHESIS_DEFAULTS`); the paper uses 30
    samples per domain, ``tau`` 0.85 and 2048 new tokens (docs/daar_stage1.md).

    :param samples_per_domain: accepted pairs wanted per domain (the paper's 30 give centroids
        with cosine > 0.96 to 10's).
    :param max_attempts: generations per domain at most (seed + augmentation).
    :param tau: novelty threshold in (0, 1]: a candidate is accepted if its max cosine similarity
        to the domain's accepted pairs is below it. A float, or ``{domain: tau, "default": tau}``
        (a domain named by neither uses :data:`FALLBACK_TAU`). Pool texts of one domain already
        have median cosine 0.77-0.87 on SmolLM2 embedding features, so the paper's 0.85 rejects
        many on-topic samples (docs/daar_stage1.md).
    :param n_seed_pairs: pairs asked for by a seed prompt (paper: 5).
    :param n_counterexamples: accepted pairs shown in an augmentation prompt (paper: 3).
    :param candidates_per_round: generations per domain generated together per round.
    :param seed: generation and counterexample seed.
    :param max_new_tokens: generation budget per conversation (paper: 2048).
    :param temperature: sampling temperature (paper: 0.9), >= 0.
    :param top_p: nucleus sampling (paper: 0.95), in (0, 1].
    :param response_prefix: start of the assistant's answer that the model continues (a prefill,
        prepended to the answer before parsing: small models keep the format far more often);
        ``None`` or "" disables it (stored as ``None``).
    """

    samples_per_domain: int = 10
    max_attempts: int = 40
    tau: float | Mapping[str, float] = 0.95
    n_seed_pairs: int = 5
    n_counterexamples: int = 3
    candidates_per_round: int = 4
    seed: int = 0
    max_new_tokens: int = 256
    temperature: float = 0.9
    top_p: float = 0.95
    response_prefix: str | None = "Instruction:"

    def __post_init__(self) -> None:
        for name in ("samples_per_domain", "max_attempts", "n_seed_pairs", "candidates_per_round",
                     "max_new_tokens", "n_counterexamples", "seed"):
            value, low = getattr(self, name), 0 if name in ("n_counterexamples", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        taus = list(self.tau.values()) if isinstance(self.tau, Mapping) else [self.tau]
        if not all(is_number(t) and 0 < t <= 1 for t in taus):
            raise ValueError(f"tau must be in (0, 1] (or a mapping of such values), got "
                             f"{self.tau!r}")
        if not (is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        tau = ({str(k): float(v) for k, v in self.tau.items()} if isinstance(self.tau, Mapping)
               else float(self.tau))
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "response_prefix", self.response_prefix or None)

    def tau_for(self, domain: str) -> float:
        """The novelty threshold of ``domain``."""
        if isinstance(self.tau, Mapping):
            return self.tau.get(domain, self.tau.get("default", FALLBACK_TAU))
        return self.tau

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def synthesize(generator: Any, domains: Sequence[DomainSpec],
               embed: Callable[[list[str]], np.ndarray], config: SynthesisConfig | None = None,
               progress: bool = True) -> SynthesisResult:
    """Seed + augmentation synthesis for every domain, batched across domains.

    Each round, every unfinished domain gets up to ``candidates_per_round`` conversations: seed
    prompts (asking ``n_seed_pairs`` pairs) while it has no accepted pair, otherwise augmentation
    prompts (one pair, ``n_counterexamples`` random accepted pairs shown). All conversations of a
    round go to ``generator.generate`` together. Parsed candidates are embedded with ``embed``
    (texts -> [n, d]) and accepted in a fixed order if their max cosine similarity to the domain's
    accepted pairs is below the domain's ``tau``. A domain stops at ``samples_per_domain``
    accepted pairs or ``max_attempts`` generations. Deterministic for a deterministic generator
    and seed. Settings: :class:`SynthesisConfig` (default: its defaults).
    """
    run = _Synthesis(list(domains), config or SynthesisConfig())
    bar = tqdm(total=run.cfg.samples_per_domain * len(run.domains), desc="synthesize",
               unit="pair", disable=not progress)
    round_no = 0
    while any(run.unfinished(d) for d in run.domains):
        jobs = run.jobs(round_no)
        outputs = _generate(generator, jobs, run.cfg, round_no, progress)
        bar.update(run.accept(run.candidates(jobs, outputs), embed))
        bar.set_postfix(generations=sum(st.attempts for st in run.stats.values()))
        round_no += 1
    bar.close()
    run.log_outcome()
    settings = {**run.cfg.to_dict(), "tau": run.taus, "rounds": round_no}
    return SynthesisResult(run.domains, run.samples, run.stats, settings)


# A round's job: (domain, whether it is a seed prompt, the prompt).
Job = tuple[DomainSpec, bool, str]


class _Synthesis:
    """What one :func:`synthesize` call has accepted so far, per domain, and its steps."""

    def __init__(self, domains: list[DomainSpec], cfg: SynthesisConfig):
        self.domains, self.cfg = domains, cfg
        self.samples: dict[str, list[InstructionPair]] = {d.name: [] for d in domains}
        self.vectors: dict[str, list[np.ndarray]] = {d.name: [] for d in domains}
        self.stats = {d.name: DomainStats() for d in domains}
        self.taus = {d.name: cfg.tau_for(d.name) for d in domains}

    def unfinished(self, domain: DomainSpec) -> bool:
        return (len(self.samples[domain.name]) < self.cfg.samples_per_domain
                and self.stats[domain.name].attempts < self.cfg.max_attempts)

    def jobs(self, round_no: int) -> list[Job]:
        """This round's prompts, domain by domain; counts them as attempts."""
        cfg, jobs = self.cfg, []
        for k, d in enumerate(self.domains):
            if not self.unfinished(d):
                continue
            rng = np.random.default_rng([cfg.seed, round_no, k])
            n_jobs = min(cfg.candidates_per_round, cfg.max_attempts - self.stats[d.name].attempts)
            accepted = self.samples[d.name]
            for _ in range(n_jobs):
                if not accepted:
                    jobs.append((d, True, seed_prompt(d, self.domains, cfg.n_seed_pairs)))
                    continue
                pick = rng.choice(len(accepted), size=min(cfg.n_counterexamples, len(accepted)),
                                  replace=False)
                shown = [accepted[i] for i in sorted(pick)]
                jobs.append((d, False, augment_prompt(d, self.domains, shown)))
            self.stats[d.name].attempts += n_jobs
        return jobs

    def candidates(self, jobs: list[Job], outputs: Sequence[Any]
                   ) -> list[tuple[DomainSpec, InstructionPair]]:
        """The pairs parsed from the round's answers; an answer without one is malformed."""
        prefix = _prefix(self.cfg)
        found: list[tuple[DomainSpec, InstructionPair]] = []
        for (d, is_seed, _), out in zip(jobs, outputs):
            pairs = parse_pairs(prefix + to_text(out),
                                max_pairs=self.cfg.n_seed_pairs if is_seed else 1)
            if not pairs:
                self.stats[d.name].malformed += 1
            found.extend((d, p) for p in pairs)
        return found

    def accept(self, candidates: list[tuple[DomainSpec, InstructionPair]],
               embed: Callable[[list[str]], np.ndarray]) -> int:
        """Accept the novel candidates in order; returns how many were accepted."""
        if not candidates:
            return 0
        n = 0
        vecs = unit_rows(np.asarray(embed([p.text() for _, p in candidates])))
        for (d, pair), v in zip(candidates, vecs):
            st, acc = self.stats[d.name], self.vectors[d.name]
            if len(self.samples[d.name]) >= self.cfg.samples_per_domain:
                continue  # this domain is full; later candidates may belong to others
            st.candidates += 1
            if acc and float(np.max(np.stack(acc) @ v)) >= self.taus[d.name]:
                st.rejected_similar += 1
                continue
            acc.append(v)
            self.samples[d.name].append(pair)
            st.accepted += 1
            n += 1
        return n

    def log_outcome(self) -> None:
        target = self.cfg.samples_per_domain
        for d in self.domains:
            st = self.stats[d.name]
            line = (f"domain '{d.name}': {st.accepted}/{target} accepted after {st.attempts} "
                    f"generations ({st.malformed} malformed, {st.rejected_similar} too similar, "
                    f"tau={self.taus[d.name]})")
            if st.accepted < target:
                logger.warning("synthesis shortfall: " + line)
            else:
                logger.info(line)


def _prefix(cfg: SynthesisConfig) -> str:
    """What is prepended to an answer before parsing: the prefill the model continued."""
    return (cfg.response_prefix + " ") if cfg.response_prefix else ""


def _generate(generator: Any, jobs: list[Job], cfg: SynthesisConfig, round_no: int,
              progress: bool) -> list[Any]:
    """One answer per job, all of a round in one ``generate`` call; a failed call answers ""
    for every job (counted as malformed; the attempts still count)."""
    convs = []
    for _, _, prompt in jobs:
        conv = [{"role": "user", "content": prompt}]
        if cfg.response_prefix:
            conv.append({"role": "assistant", "content": cfg.response_prefix})
        convs.append(conv)
    wanted = [cfg.n_seed_pairs if is_seed else 1 for _, is_seed, _ in jobs]
    prefix = _prefix(cfg)
    try:
        # progress: the generator's own bar moves per generation batch, so a long round is
        # visible (the synthesis bar counts accepted pairs, which arrive per round)
        return generator.generate(convs, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, do_sample=True,
                                  seed=cfg.seed * 1_000_003 + round_no * 7919, progress=progress,
                                  stop=lambda i, out: pairs_settled(prefix + out, wanted[i]))
    except Exception as err:
        logger.warning(f"generation failed in round {round_no}: {err}")
        return [""] * len(convs)
