"""Row and value hashing: the one place nodes get 64-bit hashes from.

Two row keys live here, built on the same SplitMix64 mix. Each is pinned by
what nodes output, so neither can stand in for the other without changing
results:

* ``row_hash`` (with ``hash_array``): a row's content, independent of block
  layout and of column order, nested lists and structs hashed structurally.
  Sampling, shuffling, selection and ordering draw their per-row randomness
  from it (``seeded``, ``uniform``), so their outputs depend on its values.
* ``content_keys`` (with ``hash_values``): MinHash's document key, faster on
  text (one numba pass over the Arrow buffers), columns in schema order,
  nested values through their repr. The survivor of a duplicate cluster is
  the row with the smallest key, so MinHash's output depends on its values.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

U64 = np.uint64
INTERNAL_PREFIX = "__kf_"
_GOLDEN = U64(0x9E3779B97F4A7C15)
_NULL_H = U64(0x6A09E667F3BCC908)  # row_hash's value for a null
_NULL_KEY = U64(0x5BD1E9955BD1E995)  # content_keys' value for a null


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=U64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
        return z ^ (z >> U64(31))


def to_array(col) -> pa.Array:
    """One contiguous Arrow array for an array or a chunked array."""
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 0:
            return pa.array([], type=col.type)
        return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    return col


def _is_binary_like(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_list_like(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t)


# ---------------------------------------------------------------------------
# row_hash: structural, layout- and column-order-independent


def _hash_lists(arr: pa.Array, n: int) -> np.ndarray:
    """Each list's elements mixed with their positions, summed, then mixed
    with the list's length."""
    t = arr.type
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    child = arr.flatten()
    if pa.types.is_map(t) and not isinstance(child, pa.StructArray) and hasattr(arr, "items"):
        child = pa.StructArray.from_arrays([arr.keys, arr.items], ["key", "value"])
    ch = hash_array(child)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pos = (np.arange(len(ch), dtype=np.int64) - np.repeat(offsets[:-1], lengths)).astype(U64)
    contrib = splitmix64(ch ^ splitmix64(pos))
    cs = np.zeros(len(ch) + 1, dtype=U64)
    np.cumsum(contrib, out=cs[1:])
    with np.errstate(over="ignore"):
        seg = cs[offsets[1:]] - cs[offsets[:-1]]
    return splitmix64(seg ^ splitmix64(lengths.astype(U64) + U64(7)))


def _hash_scalars(arr: pa.Array) -> np.ndarray:
    """Strings, binaries, booleans, numbers, temporals and (through their
    text) every other scalar type."""
    import pandas as pd

    t = arr.type
    if _is_binary_like(t):
        filled = pc.fill_null(arr, "" if pa.types.is_string(t) or pa.types.is_large_string(t) else b"")
        return pd.util.hash_array(filled.to_numpy(zero_copy_only=False), categorize=False).astype(U64)
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        # The fill value must have the column's type: Arrow will not make a
        # boolean scalar from 0. Nulls are re-hashed by the caller anyway.
        values = pc.fill_null(arr, False if pa.types.is_boolean(t) else 0).to_numpy(zero_copy_only=False)
        if pa.types.is_floating(t):
            values = values.astype(np.float64) + 0.0  # -0.0 -> 0.0
        return pd.util.hash_array(values, categorize=False).astype(U64)
    if pa.types.is_temporal(t):
        narrow = pa.types.is_date32(t) or pa.types.is_time32(t)
        return hash_array(arr.cast(pa.int32()) if narrow else arr.cast(pa.int64()))
    return hash_array(arr.cast(pa.string()))  # decimals and other scalars


def hash_array(col) -> np.ndarray:
    """A uint64 hash per element of an Arrow array of any type (nested lists
    and structs included); nulls hash to a fixed value."""
    arr = to_array(col)
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=U64)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_null(t):
        return np.full(n, _NULL_H, dtype=U64)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
    if _is_list_like(t):
        h = _hash_lists(arr, n)
    elif pa.types.is_struct(t):
        h = np.full(n, U64(0x3C6EF372FE94F82B), dtype=U64)
        for i, field in enumerate(arr.flatten()):
            h = splitmix64(h ^ hash_array(field) ^ U64(i + 1))
    else:
        h = _hash_scalars(arr)
    if valid is not None:
        h = np.where(valid, h, _NULL_H)
    return h


def row_hash(table: pa.Table, columns: list[str] | None = None) -> np.ndarray:
    """A uint64 content hash per row: independent of block layout and of the
    column order (columns are combined in name order). Internal ``__kf_``
    columns are left out."""
    names = sorted(columns if columns is not None else [c for c in table.column_names if not c.startswith(INTERNAL_PREFIX)])
    h = np.full(table.num_rows, U64(0xBB67AE8584CAA73B), dtype=U64)
    for name in names:
        name_h = U64(int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") ^ len(name))
        h = splitmix64(h ^ splitmix64(hash_array(table.column(name)) ^ name_h))
    return h


def seeded(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Seeded uint64 per row from stable keys."""
    mix = splitmix64(np.array([(int(seed) * 0x100000001B3 + int(salt) * 0x9E3779B1) % (1 << 64)], dtype=U64))[0]
    return splitmix64(np.asarray(keys, dtype=U64) ^ mix)


def uniform(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Seeded U[0,1) per row from stable keys (53 random bits)."""
    return (seeded(keys, seed, salt) >> U64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------
# content_keys: MinHash's document keys


def binary_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, uint8 data) of a string/binary array, zero-copy where
    possible: what the numba kernels read."""
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        arr = arr.cast(pa.large_binary())
    elif pa.types.is_large_string(arr.type):
        arr = arr.view(pa.large_binary())
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(1, np.uint8)
    return offsets, data


def hash_binary(arr) -> np.ndarray:
    """A uint64 hash of each string or binary value (FNV-1a 64 + SplitMix64, numba)."""
    from tasks._minhash_kernels import KERNELS

    arr = to_array(arr)
    out = np.empty(len(arr), dtype=U64)
    if len(arr):
        offsets, data = binary_buffers(arr)
        KERNELS["hash_bytes"](offsets, data, out)
    return out


def hash_values(col) -> np.ndarray:
    """A uint64 hash per value, vectorised for strings, binaries and numbers;
    nested or exotic types hash their Python repr (slow but rare)."""
    arr = to_array(col)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    n = len(arr)
    if _is_binary_like(t):
        h = hash_binary(arr)
    elif pa.types.is_floating(t):
        vals = arr.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        h = splitmix64(np.ascontiguousarray(vals).view(U64))
    elif pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        if pa.types.is_temporal(t):
            arr = arr.view(pa.int64()) if t.bit_width == 64 else arr.view(pa.int32())
        vals = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        h = splitmix64(np.ascontiguousarray(vals).view(U64))
    else:
        h = hash_binary(pa.array([repr(v).encode() for v in arr.to_pylist()], pa.large_binary()))
    if arr.null_count:
        h = np.where(arr.is_null().to_numpy(zero_copy_only=False), _NULL_KEY, h)
    return h.astype(U64, copy=False) if n else np.empty(0, U64)


def content_keys(table: pa.Table) -> np.ndarray:
    """MinHash's content key of every row: all columns, in schema order, hashed."""
    h = np.full(table.num_rows, U64(len(table.column_names)), dtype=U64)
    with np.errstate(over="ignore"):
        for i, name in enumerate(table.column_names):
            h = splitmix64(h * U64(0x100000001B3) ^ hash_values(table.column(name)) ^ U64(i + 1))
    return h
