"""numba kernels of the MinHash node (tasks/minhash.py): token and shingle
hashing, universal permutations modulo 2^61-1, band hashes and byte hashing.

Compiled on first use and cached on disk: in ``KAIYUAN_KERNEL_CACHE`` when
set (a writable directory; the image compiles them there at build time with
``python -m tasks._minhash_kernels``), else where numba puts them (next to
this file, or ~/.cache when the install is read-only). Compiling takes about
20 s per process here; a cache hit, well under one."""

import os

if os.environ.get("KAIYUAN_KERNEL_CACHE"):
    # Read by numba when it is first imported; reloaded if it already was.
    os.environ["NUMBA_CACHE_DIR"] = os.environ["KAIYUAN_KERNEL_CACHE"]
    import sys

    if "numba" in sys.modules:
        sys.modules["numba"].core.config.reload_config()

import numba as nb  # noqa: E402
import numpy as np  # noqa: E402


U = np.uint64
P = U((1 << 61) - 1)
M32 = U(0xFFFFFFFF)
M29 = U((1 << 29) - 1)
FNV_OFF = U(0xCBF29CE484222325)
FNV_PRIME = U(0x100000001B3)
GOLD = U(0x9E3779B97F4A7C15)
C1 = U(0xBF58476D1CE4E5B9)
C2 = U(0x94D049BB133111EB)
S30, S27, S31, S32, S61, S3 = U(30), U(27), U(31), U(32), U(61), U(3)

@nb.njit(inline="always")
def mix(z):
    z = z + GOLD
    z = (z ^ (z >> S30)) * C1
    z = (z ^ (z >> S27)) * C2
    return z ^ (z >> S31)

@nb.njit(inline="always")
def mod61(x):
    x = (x & P) + (x >> S61)
    if x >= P:
        x -= P
    return x

@nb.njit(inline="always")
def mulmod61(a, x):
    # a, x < 2^61: a*x = hi*2^64 + mid*2^32 + lo, with 2^61 == 1 (mod p)
    a_lo = a & M32
    a_hi = a >> S32
    x_lo = x & M32
    x_hi = x >> S32
    lo = a_lo * x_lo
    mid = a_hi * x_lo + a_lo * x_hi
    hi = a_hi * x_hi
    r = (hi << S3) + (mid >> U(29)) + ((mid & M29) << S32) + (lo >> S61) + (lo & P)
    return mod61(r)

# One 76-line kernel on purpose: MinHash's hot loop, its speed measured as a whole (bench/minhash_bench.py).
@nb.njit(cache=True, nogil=True)
def signatures(offsets, data, ngram, min_len, pa_, pb_, sig, ntok_out):
    """Per document (UTF-8 bytes): tokenise, hash tokens (FNV-1a 64 + mix),
    combine ngram_size consecutive token hashes into a shingle hash, and take
    the min of every permutation (a*x + b) mod 2^61-1.

    Tokeniser on bytes: ASCII letters, digits and '_' are word bytes (letters
    lowercased, a run of digits counts as one '0'); every byte >= 0x80 is a
    word byte; every other ASCII byte separates tokens. For ASCII text this is
    exactly SPEC normalisation + splitting on non-word characters; non-ASCII
    text is normalised by Arrow kernels first (tokens separated by spaces).
    """
    n = offsets.shape[0] - 1
    nperm = pa_.shape[0]
    maxlen = 1
    for d in range(n):
        ln = offsets[d + 1] - offsets[d]
        if ln > maxlen:
            maxlen = ln
    tok = np.empty(maxlen // 2 + 2, dtype=np.uint64)
    xs = np.empty(maxlen // 2 + 2, dtype=np.uint64)
    for d in range(n):
        s = offsets[d]
        e = offsets[d + 1]
        nt = 0
        h = FNV_OFF
        in_tok = False
        prev_digit = False
        for i in range(s, e):
            c = data[i]
            if c >= 128 or (c >= 97 and c <= 122) or c == 95:
                h = (h ^ U(c)) * FNV_PRIME
                in_tok = True
                prev_digit = False
            elif c >= 65 and c <= 90:
                h = (h ^ U(c + 32)) * FNV_PRIME
                in_tok = True
                prev_digit = False
            elif c >= 48 and c <= 57:
                if not prev_digit:
                    h = (h ^ U(48)) * FNV_PRIME
                in_tok = True
                prev_digit = True
            else:
                if in_tok:
                    tok[nt] = mix(h)
                    nt += 1
                    in_tok = False
                    h = FNV_OFF
                prev_digit = False
        if in_tok:
            tok[nt] = mix(h)
            nt += 1
        ntok_out[d] = nt
        if nt == 0 or nt < min_len:
            for j in range(nperm):
                sig[d, j] = P
            continue
        nsh = nt - ngram + 1
        if nsh < 1:
            nsh = 1
        for si in range(nsh):
            x = U(ngram)
            stop = si + ngram
            if stop > nt:
                stop = nt
            for t in range(si, stop):
                x = mix(x ^ tok[t])
            xs[si] = mod61(x)
        for j in range(nperm):
            aj = pa_[j]
            bj = pb_[j]
            m = P
            for si in range(nsh):
                v = mod61(mulmod61(aj, xs[si]) + bj)
                m = min(m, v)
            sig[d, j] = m


@nb.njit(cache=True, nogil=True)
def bands(sig, nb_, r, out):
    n = sig.shape[0]
    for d in range(n):
        for i in range(nb_):
            h = mix(U(i + 1) * C2)
            for j in range(i * r, (i + 1) * r):
                h = mix(h ^ sig[d, j])
            out[d, i] = h

@nb.njit(cache=True, nogil=True)
def hash_bytes(offsets, data, out):
    n = offsets.shape[0] - 1
    for d in range(n):
        h = FNV_OFF
        for i in range(offsets[d], offsets[d + 1]):
            h = (h ^ U(data[i])) * FNV_PRIME
        out[d] = mix(h ^ U(offsets[d + 1] - offsets[d]))


KERNELS = {"signatures": signatures, "bands": bands, "hash_bytes": hash_bytes}


def compile_all() -> None:
    """Compile every kernel for the argument types the nodes pass (string and
    large_string offsets), writing them to the cache."""
    import pyarrow as pa

    from tasks.hashing import hash_binary
    from tasks.minhash import band_hashes, permutations, signature_matrix

    a, b = permutations(8, 0)
    for kind in (pa.string(), pa.large_string()):
        texts = pa.array(["the quick brown fox jumps", "over the lazy dog"], kind)
        for language in ("en", "zh"):
            sig, _ = signature_matrix(texts, language, 3, 1, a, b)
        band_hashes(sig, 2, 4)
    for kind in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
        hash_binary(pa.array([b"x", b"yz"], kind) if "binary" in str(kind) else pa.array(["x", "yz"], kind))


if __name__ == "__main__":
    compile_all()
    print(f"MinHash kernels compiled into {nb.config.CACHE_DIR or 'the default numba cache'}")
