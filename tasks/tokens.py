"""Token nodes (SPEC §8): Tokenization, Detokenization, BatchDetokenization,
TokenCounter_v2.

Token lists are Arrow ``list<int32>`` end to end: they are built from flat
NumPy buffers + offsets and read back through Arrow offsets, never through
per-row Python type checks (Ray may hand rows over as NumPy arrays, which an
``isinstance(x, list)`` test does not recognise).

Tokenizers are fast Hugging Face tokenizers (the ``tokenizers`` library, the
``tokenizers`` extra) loaded from a local directory holding ``tokenizer.json``
(as ``save_pretrained`` writes it), that file itself, a ``.zip`` of the
directory or an object-store URI; once per actor.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tasks._models import ModelNode, require_text_field, schema_with, text_column, with_column
from tasks.base import BatchNode, NodeParams, Observation, Observe, Report, RunContext, Stream, register
from tasks.checks import require_column

TOKENS_TYPE = pa.list_(pa.int32())


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no tokenizer.json in {path!r} (a fast Hugging Face tokenizer saved with save_pretrained is expected)"
        )
    tok = Tokenizer.from_file(file)
    tok.no_truncation()
    tok.no_padding()
    return tok


def encode(tok, texts: list[str]) -> pa.Array:
    """Token ids of each text (special tokens added) as list<int32>."""
    fast = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    encodings = fast(texts, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def token_lists(node, column) -> tuple[list[list[int] | None], int]:
    """Rows of a list-of-integers column (``checks.is_token_ids``) as Python
    int lists (None for null rows), read through Arrow offsets."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        arr = arr.cast(pa.list_(t.value_type))
    values = arr.flatten()
    if values.null_count:
        raise node.error("input_col holds null token ids")
    flat = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False).tolist()
    offs = arr.offsets.to_numpy()
    offs = offs - offs[0]
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    rows = [flat[offs[i] : offs[i + 1]] if valid[i] else None for i in range(len(arr))]
    return rows, len(flat)


_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop spaces before punctuation
    and English contractions."""
    for a, b in _CLEANUPS:
        text = text.replace(a, b)
    return text


class TokenizationParams(NodeParams):
    tokenizer_name_or_path: str
    input_col: str = "text"
    output_col: str = "text_tokenized"
    batch_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    storage_options: dict[str, Any] | None = None


@register
class Tokenization(ModelNode):
    """``output_col`` = token ids of ``input_col`` (special tokens added, no
    truncation, null -> "")."""

    type_name = "Tokenization"
    Params = TokenizationParams
    requires = ("tokenizers",)
    extra = "tokenizers"

    def model_uri(self) -> str:
        return self.params.tokenizer_name_or_path

    def check(self, ctx: RunContext) -> None:
        uri = self.model_uri()
        if "://" not in uri and not uri.endswith(".zip") and not os.path.exists(uri):
            raise self.error(
                f"tokenizer {uri!r} is not a local path: tokenizers are never downloaded from a model hub at run time; "
                "give a local directory, a .zip or an object-store URI (the sample tokenizer is built by `python -m samples.data`)"
            )
        super().check(ctx)

    def load_model(self, ctx: RunContext):
        try:
            return load_tokenizer(self.local_model(ctx))
        except FileNotFoundError as exc:
            raise self.error(str(exc)) from None

    def transform_with(self, tok, batch: pa.Table) -> pa.Table:
        texts = text_column(self, batch, self.params.input_col)
        return with_column(batch, self.params.output_col, encode(tok, texts))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require_text_field(self, schema, self.params.input_col)
        return schema_with(schema, self.params.output_col, TOKENS_TYPE)


class DetokenizationParams(NodeParams):
    tokenizer_name_or_path: str
    input_col: str = "text_tokenized"
    output_col: str = "text_decoded"
    skip_special_tokens: bool = True
    clean_up_tokenization_spaces: bool = True
    batch_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    storage_options: dict[str, Any] | None = None


class BatchDetokenizationParams(DetokenizationParams):
    batch_size: int | None = Field(1000, ge=1)


@register
class Detokenization(Tokenization):
    """``output_col`` = text decoded from the token-id list in ``input_col``
    (null list -> null)."""

    type_name = "Detokenization"
    Params = DetokenizationParams

    def transform_with(self, tok, batch: pa.Table) -> pa.Table:
        p = self.params
        require_column(self, batch.schema, p.input_col, param="input_col", kind="token ids")
        rows, _ = token_lists(self, batch.column(p.input_col))
        present = [r for r in rows if r is not None]
        try:
            decoded = iter(tok.decode_batch(present, skip_special_tokens=p.skip_special_tokens))
        except Exception as exc:  # ids out of the vocabulary, ...
            raise self.error(f"cannot decode token ids: {exc}") from exc
        out = []
        for r in rows:
            if r is None:
                out.append(None)
                continue
            text = next(decoded)
            out.append(clean_up_tokenization(text) if p.clean_up_tokenization_spaces else text)
        return with_column(batch, p.output_col, pa.array(out, pa.string()))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require_column(self, schema, p.input_col, param="input_col", kind="token ids")
        return schema_with(schema, p.output_col, pa.string())


@register
class BatchDetokenization(Detokenization):
    """Detokenization with a default batch of 1000 rows."""

    type_name = "BatchDetokenization"
    Params = BatchDetokenizationParams


class TokenCounterParams(NodeParams):
    input_col: str = "text_tokenized"
    count_col: str = "token_count"
    with_duplicate_count: bool = False
    duplicate_count_col: str = "duplicate_count"
    summary: bool = True
    drop_intermediate: bool = False
    task_name: str | None = None


@register
class TokenCounter_v2(BatchNode):
    """``count_col`` = number of tokens in ``input_col`` (times
    ``duplicate_count`` if asked). With ``summary`` the flow reports task
    name, total tokens, rows and average, from sums observed as the rows flow
    by (no extra pass). ``drop_intermediate`` drops ``count_col`` from the
    output after it has been summed."""

    type_name = "TokenCounter_v2"
    Params = TokenCounterParams

    @property
    def observe(self) -> Observe | None:  # type: ignore[override]
        return Observe(sum_columns=(self.params.count_col,)) if self.params.summary else None

    def _lengths(self, batch: pa.Table) -> pa.Array:
        p = self.params
        t = require_column(self, batch.schema, p.input_col, param="input_col").type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            raise self.error(f"input_col {p.input_col!r} holds text, not token ids (tokenize it first)")
        require_column(self, batch.schema, p.input_col, param="input_col", kind="list")
        counts = pc.fill_null(pc.list_value_length(batch.column(p.input_col)), 0).cast(pa.int64())
        if p.with_duplicate_count:
            require_column(self, batch.schema, p.duplicate_count_col, param="duplicate_count_col", kind="numeric")
            dup = pc.fill_null(batch.column(p.duplicate_count_col).cast(pa.float64()), 1.0)
            counts = pc.round(pc.multiply(counts.cast(pa.float64()), dup)).cast(pa.int64())
        return counts

    def transform(self, batch: pa.Table) -> pa.Table:
        return with_column(batch, self.params.count_col, self._lengths(batch))

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        stream = super().apply(inputs, ctx)
        if not self.params.drop_intermediate:
            return stream
        col = self.params.count_col
        ds = stream.ds.map_batches(
            lambda b: b.drop_columns([col]), batch_format="pyarrow", batch_size=None, zero_copy_batch=True
        )
        return Stream(ds, stream.schema.remove(stream.schema.get_field_index(col)))

    def report(self, obs: Observation) -> Report | None:
        if not self.params.summary:
            return None
        total = int(obs.sums.get(self.params.count_col, 0))
        rows = int(obs.rows_out or 0)
        avg = total / rows if rows else 0.0
        name = self.params.task_name or self.path
        table = [{"task_name": name, "total_tokens": total, "rows": rows, "avg_tokens_per_row": round(avg, 3)}]
        md = (
            f"**task:** {name}\n\n**total tokens:** {total:,}\n\n**rows:** {rows:,}\n\n"
            f"**average tokens per row:** {avg:,.2f}"
        )
        return Report(title="Token count", markdown=md, table=table)


__all__ = ["Tokenization", "Detokenization", "BatchDetokenization", "TokenCounter_v2", "TOKENS_TYPE"]
