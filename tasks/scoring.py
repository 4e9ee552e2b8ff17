"""Scoring nodes (SPEC §8): fastText scorers/filters and a Hugging Face
sequence classifier.

Models load once per actor of a Ray Data actor pool (see ``tasks/_models.py``)
and score whole batches at a time. Model paths may be local, ``.zip`` or
object-store URIs. fastText needs the ``fasttext`` extra (``fasttext-numpy2``);
SeqClassifierScorer needs the ``models`` extra (torch + transformers).

Each model node's actor pool takes ``num_gpus``, ``min_actors`` and
``max_actors`` besides ``concurrency`` (see ``tasks/_models.py``). fastText
runs on CPU only (the library has no GPU code), so its nodes accept only
``num_gpus: 0``; SeqClassifierScorer reserves one GPU per actor where the
cluster has GPUs, and each actor uses CUDA when torch sees a device. The
node's report says where its actors ran.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tasks._models import MaxActors, MinActors, ModelNode, NumGpus, require_text_field, schema_with, text_column, with_column
from tasks.base import NodeParams, Observation, Report, RunContext, Stream, register
from tasks.reports import DIST, bin_holding, bin_index, bin_sums, coarsen, fixed_edges, histogram_report, metrics_context, read_bins, share


def _label(name: str) -> str:
    return name[len("__label__") :] if name.startswith("__label__") else name


def fasttext_clean(texts: list[str]) -> list[str]:
    """SPEC: newlines to spaces, strip, lowercase."""
    return [t.replace("\r", " ").replace("\n", " ").strip().lower() for t in texts]


def fasttext_scores(model, texts: list[str], num_labels: int, selected_label: str) -> np.ndarray:
    """Probability of ``selected_label`` among the top ``num_labels``
    predictions (0.0 when absent or when the text is empty)."""
    cleaned = fasttext_clean(texts)
    out = np.zeros(len(cleaned), dtype=np.float64)
    idx = [i for i, t in enumerate(cleaned) if t]
    if not idx:
        return out
    want = _label(selected_label)
    labels, probs = model.predict([cleaned[i] for i in idx], k=num_labels)
    for i, row_labels, row_probs in zip(idx, labels, probs):
        for lab, p in zip(row_labels, row_probs):
            if _label(lab) == want:
                out[i] = min(float(p), 1.0)
                break
    return out


def load_fasttext(path: str):
    import fasttext

    try:
        fasttext.FastText.eprint = lambda *a, **k: None  # silence the load warning
    except AttributeError:
        pass
    return fasttext.load_model(path)


class _ScoreDistribution:
    """Scorers report their score's distribution as they score: every batch
    function call sends its batch's histogram (counts, so the run's totals
    are exact) through ``report_metrics``, with the context the model was
    loaded with (``load_model`` runs in each actor of the pool before any
    batch). Used directly (``transform``), there is no run and nothing is
    sent."""

    _metrics_ctx: RunContext | None = None

    def _bind_metrics(self, ctx: RunContext) -> None:
        self._metrics_ctx = metrics_context(ctx)

    def _send(self, sums: dict[str, float]) -> None:
        if self._metrics_ctx is not None and self._metrics_ctx.stats_actor is not None:
            self.report_metrics(self._metrics_ctx, sums)

    def _with_model_lines(self, obs: Observation, report: Report) -> Report:
        model = ModelNode.report(self, obs)
        if model is not None:
            report.markdown = f"{model.markdown}\n\n{report.markdown}"
        return report


# fastText probabilities are in [0, 1]: fixed bins, the same in every batch.
FASTTEXT_BINS = 20
FASTTEXT_EDGES = fixed_edges(0.0, 1.0, FASTTEXT_BINS)


def fasttext_sums(scores: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """One batch's share of the histogram: rows per bin, rows scored, and
    with a filter's ``threshold``, rows kept (score > threshold) per bin."""
    idx = bin_index(FASTTEXT_EDGES, scores)
    sums = {f"{DIST}scored": float(len(scores)), **bin_sums(np.bincount(idx, minlength=FASTTEXT_BINS))}
    if threshold is not None:
        keep = scores > threshold
        sums[f"{DIST}kept"] = float(keep.sum())
        sums.update(bin_sums(np.bincount(idx[keep], minlength=FASTTEXT_BINS), "kept"))
    return sums


class FastTextScorerParams(NodeParams):
    model_path: str
    num_labels: int = 2
    selected_label: str = "__label__hq"
    output_col: str = "fasttext_score"
    input_col: str = "text"
    batch_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    # Extensions to SPEC §8 (tasks/_models.py): the actor pool's resources.
    num_gpus: NumGpus = None
    min_actors: MinActors = None
    max_actors: MaxActors = None
    storage_options: dict[str, Any] | None = None


@register
class FastTextScorer(_ScoreDistribution, ModelNode):
    """Add ``output_col``: the fastText probability of ``selected_label``.
    Its report: the scores' histogram (20 bins over [0, 1])."""

    type_name = "FastTextScorer"
    Params = FastTextScorerParams
    requires = ("fasttext",)
    extra = "fasttext"

    @classmethod
    def validate_params(cls, p) -> list[str]:
        # A sentence, not a Field bound: tests/test_scoring.py pins this wording.
        own = [] if p.num_labels >= 1 else [f"num_labels must be >= 1, got {p.num_labels}"]
        return own + super().validate_params(p)

    def model_uri(self) -> str:
        return self.params.model_path

    def load_model(self, ctx: RunContext):
        self._bind_metrics(ctx)
        return load_fasttext(self.local_model(ctx))

    def scores(self, model, batch: pa.Table) -> np.ndarray:
        p = self.params
        texts = text_column(self, batch, p.input_col)
        return fasttext_scores(model, texts, p.num_labels, p.selected_label)

    def score(self, model, batch: pa.Table) -> pa.Array:
        return pa.array(self.scores(model, batch), pa.float64())

    def transform_with(self, model, batch: pa.Table) -> pa.Table:
        scores = self.scores(model, batch)
        self._send(fasttext_sums(scores))
        return with_column(batch, self.params.output_col, pa.array(scores, pa.float64()))

    def _threshold(self) -> float | None:
        return None

    def report(self, obs: Observation) -> Report | None:
        sums = obs.sums
        if f"{DIST}scored" not in sums:
            return ModelNode.report(self, obs)
        p, t = self.params, self._threshold()
        counts = read_bins(sums, FASTTEXT_BINS)
        lines = [f"**score:** probability of `{p.selected_label}` ({int(sums[DIST + 'scored']):,} rows scored)"]
        kept = None
        if t is not None:
            kept = read_bins(sums, FASTTEXT_BINS, "kept")
            rows_in = obs.rows_in if obs.rows_in is not None else int(sums[DIST + "scored"])
            lines += [f"**threshold:** {t:g} (rows scoring > it kept)", f"**kept:** {share(int(sums.get(DIST + 'kept', 0)), rows_in)}"]
        mark = None if t is None else bin_holding(FASTTEXT_EDGES, t)
        title = "Distribution of the fastText score" if t is not None else f"Distribution of {p.output_col}"
        rep = histogram_report(title, FASTTEXT_EDGES, counts, kept=kept, mark=mark,
                               lines=[line + "  " for line in lines])
        return self._with_model_lines(obs, rep)

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require_text_field(self, schema, self.params.input_col)
        return schema_with(schema, self.params.output_col, pa.float64())


class FastTextFilterParams(NodeParams):
    model_path: str
    num_labels: int = 2
    selected_label: str = "__label__hq"
    input_col: str = "text"
    temp_col: str = "filter_score"
    threshold: float = 0.5
    batch_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    # Extensions to SPEC §8 (tasks/_models.py): the actor pool's resources.
    num_gpus: NumGpus = None
    min_actors: MinActors = None
    max_actors: MaxActors = None
    storage_options: dict[str, Any] | None = None


@register
class FastTextFilter(FastTextScorer):
    """Keep rows whose fastText score is > ``threshold`` (score not kept)."""

    type_name = "FastTextFilter"
    Params = FastTextFilterParams

    def transform_with(self, model, batch: pa.Table) -> pa.Table:
        scores = self.scores(model, batch)
        self._send(fasttext_sums(scores, self.params.threshold))
        return batch.filter(pc.greater(pa.array(scores, pa.float64()), self.params.threshold))

    def _threshold(self) -> float | None:
        return self.params.threshold

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require_text_field(self, schema, self.params.input_col)
        return schema


class SeqClassifierScorerParams(NodeParams):
    model_path: str
    output_col: str = "seq_score"
    selected_index: int = Field(0, ge=0)
    input_col: str = "text"
    batch_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    # Extensions to SPEC §8 (tasks/_models.py): the actor pool's resources.
    num_gpus: NumGpus = None
    min_actors: MinActors = None
    max_actors: MaxActors = None
    max_length: int = 512
    storage_options: dict[str, Any] | None = None


class _SeqModel:
    def __init__(self, path: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.num_labels = int(self.model.config.num_labels)


# Logits are unbounded: each batch counts its scores in fine bins of a fixed
# width, keyed by bin number (only the bins it fills), so every batch's bins
# line up; the report merges them into display bins over the range seen.
LOGIT_BIN_WIDTH = 1 / 32
LOGIT_CLIP = 1e6  # keeps bin numbers bounded (a logit beyond it is counted at it)


def logit_sums(scores: np.ndarray) -> dict[str, float]:
    nan = np.isnan(scores)
    idx = np.floor(np.clip(scores[~nan], -LOGIT_CLIP, LOGIT_CLIP) / LOGIT_BIN_WIDTH).astype(np.int64)
    keys, counts = np.unique(idx, return_counts=True)
    sums = {f"{DIST}scored": float(len(scores)), **{f"{DIST}f:{k}": float(c) for k, c in zip(keys, counts)}}
    if nan.any():
        sums[f"{DIST}nan"] = float(nan.sum())
    return sums


def logit_histogram(sums: dict[str, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """(edges, counts) in display bins from ``logit_sums``' fine bins."""
    prefix = f"{DIST}f:"
    fine = {int(k[len(prefix):]): int(round(v)) for k, v in sums.items() if k.startswith(prefix)}
    if not fine:
        return None
    lo, hi = min(fine), max(fine)
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for k, c in fine.items():
        counts[k - lo] = c
    return coarsen(np.arange(lo, hi + 2) * LOGIT_BIN_WIDTH, counts)


@register
class SeqClassifierScorer(_ScoreDistribution, ModelNode):
    """Raw logit at ``selected_index`` of a Hugging Face sequence classifier
    (truncation at 512 tokens, empty text -> 0). ``num_gpus`` per actor:
    by default one where the Ray cluster has GPUs (on any node), else CPU.
    Its report: the logits' histogram over the range seen and where the
    actors ran."""

    type_name = "SeqClassifierScorer"
    Params = SeqClassifierScorerParams
    requires = ("torch", "transformers")
    extra = "models"
    wants_gpu = True
    default_batch_size = 32

    @classmethod
    def validate_params(cls, p) -> list[str]:
        # A sentence, not a Field bound: tests/test_spec_conformance.py pins
        # this wording (and builds the params with max_length out of range).
        problems = super().validate_params(p)
        if not 1 <= p.max_length <= 512 * 64:
            problems.append(f"max_length must be in [1, {512 * 64}], got {p.max_length}")
        return problems

    def model_uri(self) -> str:
        return self.params.model_path

    def load_model(self, ctx: RunContext):
        self._bind_metrics(ctx)
        m = _SeqModel(self.local_model(ctx))
        if self.params.selected_index >= m.num_labels:
            raise self.error(f"selected_index {self.params.selected_index} is out of range: the model has {m.num_labels} labels")
        return m

    def device(self, m: _SeqModel) -> tuple[str, str]:
        # Asked in the actor: Ray sets CUDA_VISIBLE_DEVICES to its reserved GPUs.
        return ("GPU", m.torch.cuda.get_device_name(0)) if m.device == "cuda" else ("CPU", "")

    def transform_with(self, m: _SeqModel, batch: pa.Table) -> pa.Table:
        p = self.params
        texts = text_column(self, batch, p.input_col)
        out = np.zeros(len(texts), dtype=np.float64)
        idx = [i for i, t in enumerate(texts) if t.strip()]
        torch = m.torch
        # Sort by length inside the batch so padding is small.
        idx.sort(key=lambda i: len(texts[i]))
        step = p.batch_size or self.default_batch_size
        with torch.inference_mode():
            for s in range(0, len(idx), step):
                part = idx[s : s + step]
                enc = m.tokenizer(
                    [texts[i] for i in part],
                    padding=True,
                    truncation=True,
                    max_length=p.max_length,
                    return_tensors="pt",
                )
                enc = {k: v.to(m.device) for k, v in enc.items()}
                logits = m.model(**enc).logits[:, p.selected_index]
                out[part] = logits.float().cpu().numpy()
        self._send(logit_sums(out))
        return with_column(batch, p.output_col, pa.array(out, pa.float64()))

    def report(self, obs: Observation) -> Report | None:
        sums = obs.sums
        hist = logit_histogram(sums)
        if hist is None:
            return ModelNode.report(self, obs)
        p = self.params
        lines = [f"**score:** logit {p.selected_index} ({int(sums.get(DIST + 'scored', 0)):,} rows scored)"]
        if sums.get(f"{DIST}nan"):
            lines.append(f"**NaN scores:** {int(sums[DIST + 'nan']):,} (not in the histogram)")
        rep = histogram_report(f"Distribution of {p.output_col}", *hist, lines=[line + "  " for line in lines])
        return self._with_model_lines(obs, rep)

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require_text_field(self, schema, self.params.input_col)
        return schema_with(schema, self.params.output_col, pa.float64())


__all__ = ["FastTextScorer", "FastTextFilter", "SeqClassifierScorer", "Stream"]
