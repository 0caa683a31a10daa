"""DaaR stage 1: model-aware domain centroids and nearest-centroid pseudo-labels.

No Data-Juicer import. Everything here is plain Python / numpy:

* prompts of the paper's seed and augmentation phases (:func:`seed_prompt`, :func:`augment_prompt`),
* tolerant parsing of "Instruction / Input / Output" pairs from free text (:func:`parse_pairs`),
* the synthesis loop with novelty acceptance (max cosine similarity to the domain's accepted pairs
  below ``tau``) (:func:`synthesize`),
* centroids (:func:`compute_centroids`), nearest-centroid assignment with cosine or euclidean
  similarity (:func:`assign_nearest`) and k-means refinement initialised at the synthetic
  centroids (:func:`kmeans_refine`, the reference code's behaviour).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.text import to_text

METRICS = ("cosine", "euclidean")


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


def _tau_for(tau: float | Mapping[str, float], name: str, default: float = 0.85) -> float:
    if isinstance(tau, Mapping):
        return float(tau.get(name, tau.get("default", default)))
    return float(tau)


def _cosine_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def synthesize(
    generator: Any,
    domains: Sequence[DomainSpec],
    embed: Callable[[list[str]], np.ndarray],
    samples_per_domain: int = 30,
    max_attempts: int = 100,
    tau: float | Mapping[str, float] = 0.85,
    n_seed_pairs: int = 5,
    n_counterexamples: int = 3,
    candidates_per_round: int = 4,
    seed: int = 0,
    max_new_tokens: int = 512,
    temperature: float = 0.9,
    top_p: float = 0.95,
    response_prefix: str | None = "Instruction:",
    progress: bool = True,
) -> SynthesisResult:
    """Seed + augmentation synthesis for every domain, batched across domains.

    Each round, every unfinished domain gets up to ``candidates_per_round`` conversations: seed
    prompts (asking ``n_seed_pairs`` pairs) while it has no accepted pair, otherwise augmentation
    prompts (one pair, ``n_counterexamples`` random accepted pairs shown). All conversations of a
    round go to ``generator.generate`` together. Parsed candidates are embedded with ``embed``
    (texts -> [n, d]) and accepted in a fixed order if their max cosine similarity to the domain's
    accepted pairs is below ``tau`` (a float or ``{domain: tau, "default": tau}``). A domain stops
    at ``samples_per_domain`` accepted pairs or ``max_attempts`` generations. Deterministic for a
    deterministic generator and seed.

    ``response_prefix`` (default ``"Instruction:"``) is sent as the start of the assistant's
    answer (a prefill the model continues) and prepended to the answer before parsing: small
    models then keep the format far more often. ``None`` or "" disables it.
    """
    domains = list(domains)
    if samples_per_domain < 1 or max_attempts < 1 or candidates_per_round < 1 or n_seed_pairs < 1:
        raise ValueError("samples_per_domain, max_attempts, candidates_per_round and n_seed_pairs "
                         "must be >= 1")
    samples: dict[str, list[InstructionPair]] = {d.name: [] for d in domains}
    vectors: dict[str, list[np.ndarray]] = {d.name: [] for d in domains}
    stats = {d.name: DomainStats() for d in domains}
    taus = {d.name: _tau_for(tau, d.name) for d in domains}
    total = samples_per_domain * len(domains)
    bar = tqdm(total=total, desc="synthesize", unit="pair", disable=not progress)
    round_no = 0
    while True:
        active = [d for d in domains if len(samples[d.name]) < samples_per_domain
                  and stats[d.name].attempts < max_attempts]
        if not active:
            break
        jobs: list[tuple[DomainSpec, bool]] = []  # (domain, is_seed)
        convs = []
        for k, d in enumerate(domains):
            if d not in active:
                continue
            rng = np.random.default_rng([seed, round_no, k])
            n_jobs = min(candidates_per_round, max_attempts - stats[d.name].attempts)
            accepted = samples[d.name]
            for _ in range(n_jobs):
                if not accepted:
                    prompt, is_seed = seed_prompt(d, domains, n_seed_pairs), True
                else:
                    pick = rng.choice(len(accepted), size=min(n_counterexamples, len(accepted)),
                                      replace=False)
                    prompt = augment_prompt(d, domains, [accepted[i] for i in sorted(pick)])
                    is_seed = False
                jobs.append((d, is_seed))
                conv = [{"role": "user", "content": prompt}]
                if response_prefix:
                    conv.append({"role": "assistant", "content": response_prefix})
                convs.append(conv)
            stats[d.name].attempts += n_jobs
        try:
            # progress: the generator's own bar moves per generation batch, so a long round is
            # visible (the synthesis bar counts accepted pairs, which arrive per round)
            wanted = [n_seed_pairs if is_seed else 1 for _, is_seed in jobs]
            prefix = (response_prefix + " ") if response_prefix else ""
            outputs = generator.generate(convs, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, do_sample=True,
                                         seed=seed * 1_000_003 + round_no * 7919,
                                         progress=progress,
                                         stop=lambda i, out: pairs_settled(prefix + out,
                                                                           wanted[i]))
        except Exception as err:  # a failed batch counts as malformed; attempts still advance
            logger.warning(f"generation failed in round {round_no}: {err}")
            outputs = [""] * len(convs)
        candidates: list[tuple[DomainSpec, InstructionPair]] = []
        for (d, is_seed), out in zip(jobs, outputs):
            text = prefix + to_text(out)
            pairs = parse_pairs(text, max_pairs=n_seed_pairs if is_seed else 1)
            if not pairs:
                stats[d.name].malformed += 1
            candidates.extend((d, p) for p in pairs)
        if candidates:
            vecs = _cosine_rows(np.asarray(embed([p.text() for _, p in candidates])))
            for (d, pair), v in zip(candidates, vecs):
                st = stats[d.name]
                if len(samples[d.name]) >= samples_per_domain:
                    continue  # this domain is full; later candidates may belong to others
                st.candidates += 1
                acc = vectors[d.name]
                if acc and float(np.max(np.stack(acc) @ v)) >= taus[d.name]:
                    st.rejected_similar += 1
                    continue
                acc.append(v)
                samples[d.name].append(pair)
                st.accepted += 1
                bar.update(1)
        bar.set_postfix(generations=sum(st.attempts for st in stats.values()))
        round_no += 1
    bar.close()
    for d in domains:
        st = stats[d.name]
        line = (f"domain '{d.name}': {st.accepted}/{samples_per_domain} accepted after "
                f"{st.attempts} generations ({st.malformed} malformed, {st.rejected_similar} too "
                f"similar, tau={taus[d.name]})")
        if st.accepted < samples_per_domain:
            logger.warning("synthesis shortfall: " + line)
        else:
            logger.info(line)
    settings = dict(samples_per_domain=samples_per_domain, max_attempts=max_attempts, tau=taus,
                    n_seed_pairs=n_seed_pairs, n_counterexamples=n_counterexamples,
                    candidates_per_round=candidates_per_round, seed=seed,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    response_prefix=response_prefix, rounds=round_no)
    return SynthesisResult(domains, samples, stats, settings)


# ----------------------------------------------------------------------- centroids and labelling

def compute_centroids(features: np.ndarray, labels: Sequence[Any],
                      names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature per name (order of ``names``): (centroids [K, d] float32, counts [K]).

    Raises ValueError when a name has no row (a centroid cannot be made up).
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray([str(x) for x in labels])
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [N, d] with N = len(labels) = {len(labels)}, "
                         f"got {features.shape}")
    cents, counts = [], []
    for name in names:
        rows = features[labels == str(name)]
        if len(rows) == 0:
            raise ValueError(f"no sample for domain '{name}': cannot compute its centroid")
        cents.append(rows.mean(0))
        counts.append(len(rows))
    return np.stack(cents).astype(np.float32), np.asarray(counts, dtype=np.int64)


def similarities(features: np.ndarray, centroids: np.ndarray,
                 metric: str = "cosine") -> np.ndarray:
    """[N, K] similarity: cosine, or the negative euclidean distance. Non-finite rows -> -inf."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"feature dim {x.shape} does not match centroids {c.shape}")
    bad = ~np.isfinite(x).all(1)
    x = np.where(bad[:, None], 0.0, x)
    if metric == "cosine":
        sims = _cosine_rows(x) @ _cosine_rows(c).T
    else:
        sq = (x ** 2).sum(1, keepdims=True) - 2 * x @ c.T + (c ** 2).sum(1)[None, :]
        sims = -np.sqrt(np.maximum(sq, 0.0))
    sims[bad] = -np.inf
    return sims


def assign_nearest(features: np.ndarray, centroids: np.ndarray,
                   metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64 = argmax similarity, first index on ties; similarities [N, K] float32)."""
    sims = similarities(features, centroids, metric)
    return np.argmax(sims, axis=1).astype(np.int64), sims.astype(np.float32)


def kmeans_refine(features: np.ndarray, centroids: np.ndarray, iters: int,
                  metric: str = "cosine", tol: float = 0.0) -> np.ndarray:
    """Lloyd iterations initialised at ``centroids``: assign with ``metric``, move each centroid
    to the mean of its members (a centroid with no member stays). Cluster k keeps the meaning of
    domain k. ``iters=0`` returns the input. Deterministic."""
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = np.asarray(features, dtype=np.float64)
    x = x[np.isfinite(x).all(1)]
    c = np.asarray(centroids, dtype=np.float64).copy()
    for _ in range(iters):
        labels, _ = assign_nearest(x, c, metric)
        new = c.copy()
        for k in range(len(c)):
            members = x[labels == k]
            if len(members):
                new[k] = members.mean(0)
        shift = float(np.abs(new - c).max()) if len(c) else 0.0
        c = new
        if shift <= tol:
            break
    return c.astype(np.float32)


# ------------------------------------------------------------------------ features and files

FEATURES = ("embedding", "layer")
CENTROID_KIND = "daar_centroids"


def check_feature(feature: str, layer: int) -> int:
    """Validate a feature definition; return the extractor layer to load (0 for embedding)."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if feature == "layer" and (not isinstance(layer, int) or layer < 1):
        raise ValueError(f"feature='layer' needs layer >= 1, got {layer!r}")
    return 0 if feature == "embedding" else layer


def embed_texts(extractor: Any, texts: Sequence[Any], feature: str = "embedding",
                progress: bool = False) -> np.ndarray:
    """[N, d] float32 features of ``texts`` from a :class:`LayerFeatureExtractor`."""
    if len(texts) == 0:
        return np.zeros((0, int(extractor.hidden_size)), dtype=np.float32)
    feats = extractor.encode(list(texts), progress=progress)
    return feats.embedding if feature == "embedding" else feats.layer


def compatibility_keys(feature: str) -> tuple[str, ...]:
    """Manifest keys that must match the live extractor (embedding features do not depend on
    the extractor's layer)."""
    base = ("model_fingerprint", "feature_dim", "feature")
    return base + (("layer",) if feature == "layer" else ())


def feature_description(describe: Mapping[str, Any], feature: str) -> dict[str, Any]:
    """The extractor's ``describe()`` plus the feature kind (what a centroid file records)."""
    out = dict(describe)
    out["feature"] = feature
    if feature == "embedding":
        out["layer"] = 0
    return out


def save_centroids(directory: Any, centroids: np.ndarray, domains: Sequence[DomainSpec],
                   describe: Mapping[str, Any], feature: str, template: str,
                   counts: Sequence[int], extra: Mapping[str, Any] | None = None) -> Any:
    """Write a ``daar_centroids`` artifact: tensor ``centroids`` [K, d] + manifest."""
    from daar_ops.artifacts import save_artifact

    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.shape[0] != len(domains):
        raise ValueError(f"{centroids.shape[0]} centroids for {len(domains)} domains")
    manifest = feature_description(describe, feature)
    manifest.update(domains=[d.name for d in domains],
                    descriptions={d.name: d.description for d in domains},
                    template=template, counts=[int(c) for c in counts])
    if extra:
        manifest.update(extra)
    return save_artifact(directory, {"centroids": centroids}, manifest, kind=CENTROID_KIND)


def load_centroids(directory: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """(centroids [K, d] float32, manifest) of a verified ``daar_centroids`` artifact."""
    from daar_ops.artifacts import ArtifactError, load_artifact

    tensors, manifest = load_artifact(directory, kind=CENTROID_KIND)
    cents = tensors.get("centroids")
    domains = manifest.get("domains")
    if cents is None or cents.ndim != 2 or not isinstance(domains, list) \
            or len(domains) != cents.shape[0]:
        raise ArtifactError(f"{directory}: a centroid file needs a [K, d] 'centroids' tensor and "
                            f"K domain names")
    if not np.isfinite(cents).all():
        raise ArtifactError(f"{directory}: centroids contain NaN/inf")
    return cents.astype(np.float32), manifest
