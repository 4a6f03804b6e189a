"""Deduplication of documents ({"id": str, "text": str, ...}): exact and near-duplicate (MinHash + LSH).

Exact: documents whose `normalize`d texts are equal (same `exact_key`) are one group.
Near: every document gets a MinHash signature of its word n-gram shingles; two documents are
near-duplicates when they share an LSH band key AND their estimated Jaccard similarity (the
fraction of equal signature entries) is >= threshold. The band collision only proposes candidates;
the threshold check removes the false ones. Groups are the connected components of that relation,
so A~B and B~C put A, B and C in one group even when A and C are far apart.

From every group exactly one document is kept: the one with the smallest id (string order). The
others are removed, each as a copy of itself with "duplicate_of" set to the kept id. Everything is a
function of the documents and the settings only (stable hashes, no Python `hash()`, no order
dependence), so the kept set is the same on every runner, worker count and input order.

`near_duplicate_groups` / `exact_duplicate_groups` / `deduplicate` are the pure-Python reference;
`ExactDedup` / `NearDedup` are the Beam transforms with the same semantics (tests check equality).
Both Beam transforms map PCollection[doc] to {"kept": PCollection[doc], "removed": PCollection[doc]}.

Connected components in Beam (N documents, D of them near-duplicates):
  1. (id, signature): O(N) minhash work, fully parallel.
  2. (band key, id) -> GroupByKey -> buckets of >= 2 members, each named by a hash of its member
     list, so a pair colliding in several bands is verified once.
  3. (id, bucket names) joined with (id, signature) -> GroupByKey by bucket -> every pair in the
     bucket is checked (vectorised; identical signatures are joined first). A bucket's components
     leave as star edges (member, smallest member): O(members) edges, not O(members^2). Exact; the
     cost is quadratic in one bucket's size, small unless thousands of near-identical documents
     with differing signatures collide.
  4. all edges -> one key -> union-find (smallest id is the root) on one worker: O(E alpha(E)) time,
     O(D) memory there (~100-200 bytes per near-duplicate document, ~10^7 per GiB). Exact in one
     pass with no round limit; the price is that the duplicate graph (not the corpus) must fit one
     worker. Beyond that, replace this step by large-star / small-star min-label propagation
     rounds (Kiveris et al., 2014).
  5. (id, doc) joined with (id, kept id) -> kept or removed.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import sys
import unicodedata
from typing import Iterable, Mapping

import apache_beam as beam
import numpy as np

DEFAULT_DEDUP = dict(
    exact=True,  # drop documents whose normalised texts are equal
    near=True,  # drop near-duplicates (MinHash + LSH)
    ngram=5,  # words per shingle
    num_perm=128,  # MinHash signature length
    bands=0,  # LSH bands (must divide num_perm); 0 = choose_bands(num_perm, threshold)
    threshold=0.8,  # estimated Jaccard similarity at or above which two candidates are duplicates
    seed=1,  # of the MinHash hash functions
)
PRIME = (1 << 61) - 1  # Mersenne prime of the universal hash family
_U32 = np.uint64(0xFFFFFFFF)
_P61 = np.uint64(PRIME)
_S61 = np.uint64(61)
_BLOCK = 1 << 20  # signature-matrix elements per numpy step (bounds memory on long documents)


@dataclasses.dataclass(frozen=True)
class Settings:
    """DEFAULT_DEDUP's fields, validated, with bands resolved and rows = num_perm // bands."""
    exact: bool
    near: bool
    ngram: int
    num_perm: int
    bands: int
    rows: int
    threshold: float
    seed: int

    @property
    def needed(self) -> int:
        """Equal signature entries needed: estimated Jaccard >= threshold, in exact integers."""
        return math.ceil(self.threshold * self.num_perm - 1e-9)


def settings(d: Mapping | None = None) -> Settings:
    """Validated settings from a mapping / ConfigDict of DEFAULT_DEDUP's fields (missing = default)."""
    d = dict(d or {})
    unknown = sorted(set(d) - set(DEFAULT_DEDUP))
    if unknown:
        raise ValueError(f"dedup has unknown fields {unknown}; valid: {sorted(DEFAULT_DEDUP)}")
    d = {**DEFAULT_DEDUP, **d}
    for field in ("ngram", "num_perm"):
        if not isinstance(d[field], int) or d[field] < 1:
            raise ValueError(f"dedup.{field}={d[field]!r} must be an integer >= 1")
    if not 0 < d["threshold"] <= 1:
        raise ValueError(f"dedup.threshold={d['threshold']} must be in (0, 1]")
    if not isinstance(d["seed"], int):
        raise ValueError(f"dedup.seed={d['seed']!r} must be an integer")
    num_perm, bands = d["num_perm"], d["bands"]
    if bands == 0:
        bands, rows = choose_bands(num_perm, d["threshold"])
    elif isinstance(bands, int) and 0 < bands <= num_perm and num_perm % bands == 0:
        rows = num_perm // bands
    else:
        raise ValueError(f"dedup.bands={bands!r} must be 0 (choose from the threshold) or divide "
                         f"dedup.num_perm={num_perm}")
    return Settings(bool(d["exact"]), bool(d["near"]), d["ngram"], num_perm, bands, rows,
                    float(d["threshold"]), d["seed"])


@functools.cache
def _punctuation() -> dict:
    return {c: " " for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}


def normalize(text: str) -> str:
    """NFKC, case-folded, Unicode punctuation (categories P*) replaced by spaces, whitespace collapsed.

    Punctuation goes so that "Hello, world!" and "hello world" are one exact key; symbols (+ = $),
    digits and accents stay: texts merge only when they differ in nothing but punctuation, case,
    whitespace and Unicode compatibility forms. Stable for a given Python's Unicode tables.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_punctuation()).split())


def exact_key(text: str) -> str:
    """sha256 hex of the normalised text."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, n: int) -> set[str]:
    """The word n-grams of the normalised text; a text shorter than n words is one shingle (all of it)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=16)
def _hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """a in [1, 2^32), b in [0, PRIME), from blake2b (numpy's generators do not promise stable streams)."""
    a = [1 + _stable_int("minhash-a", seed, i) % ((1 << 32) - 1) for i in range(num_perm)]
    b = [_stable_int("minhash-b", seed, i) % PRIME for i in range(num_perm)]
    return np.array(a, np.uint64), np.array(b, np.uint64)


def base_hashes(shingle_set: Iterable[str]) -> np.ndarray:
    """A stable 32-bit hash (blake2b) of each shingle, as uint64."""
    blake = hashlib.blake2b
    data = b"".join([blake(s.encode("utf-8"), digest_size=4).digest() for s in shingle_set])
    return np.frombuffer(data, "<u4").astype(np.uint64)


def minhash(shingle_set: Iterable[str], num_perm: int, seed: int) -> np.ndarray:
    """uint32[num_perm]: per hash function h_i(x) = (a_i x + b_i) mod (2^61 - 1) over the shingles'
    32-bit base hashes x, the minimum over the shingles (low 32 bits kept). a_i, x < 2^32 keep
    a_i x + b_i < 2^64, so the arithmetic is exact in uint64 (no silent overflow) and the family is
    universal. An empty set gives all 0xFFFFFFFF."""
    a, b = _hash_params(num_perm, seed)
    x = base_hashes(shingle_set)
    out = np.full(num_perm, np.iinfo(np.uint64).max, np.uint64)
    step = max(1, _BLOCK // num_perm)
    for start in range(0, len(x), step):
        v = x[start:start + step, None] * a + b
        v = (v & _P61) + (v >> _S61)  # mod 2^61 - 1 by folding: < 2^61 + 8
        v = np.minimum(v, v - _P61)  # v - p wraps around (is larger) unless v >= p
        np.minimum(out, v.min(axis=0), out=out)
    return (out & _U32).astype(np.uint32)


def signature(text: str, s: Settings) -> np.ndarray:
    return minhash(shingles(text, s.ngram), s.num_perm, s.seed)


def lsh_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: the band index (2 bytes) and an 8-byte blake2b of the band's rows."""
    raw = np.ascontiguousarray(sig, "<u4")
    return [i.to_bytes(2, "big") + hashlib.blake2b(raw[i * rows:(i + 1) * rows].tobytes(), digest_size=8).digest()
            for i in range(bands)]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def jaccard(set_a: set, set_b: set) -> float:
    """Exact Jaccard similarity; two empty sets are identical (1.0)."""
    union = len(set_a | set_b)
    return len(set_a & set_b) / union if union else 1.0


@functools.lru_cache(maxsize=64)
def choose_bands(num_perm: int, threshold: float, false_negative_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimising the weighted areas under the LSH S-curve
    P(candidate | s) = 1 - (1 - s^rows)^bands: false positives over s < threshold, false negatives over
    s >= threshold (datasketch's optimal-parameter criterion). Missed pairs weigh 0.9 and spurious ones
    0.1 (datasketch: 0.5 / 0.5) because every candidate is verified against the threshold anyway: a
    spurious candidate costs one signature comparison, a miss keeps a duplicate. 128 / 0.8 -> (14, 9)."""
    s = np.linspace(0.0, 1.0, 4001)
    below, above = s < threshold, s >= threshold
    best = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s ** rows) ** bands
            # Riemann sums on a fixed grid: only relative sizes matter; rounding keeps ties stable
            err = ((1 - false_negative_weight) * p[below].sum() + false_negative_weight * (1 - p[above]).sum()) / len(s)
            key = (round(float(err), 9), bands)
            if best is None or key < best[0]:
                best = (key, (bands, rows))
    return best[1]


def _bucket_edges(members: Iterable[tuple[str, np.ndarray]], needed: int) -> list[tuple[str, str]]:
    """(member, smallest member of its component) for the other members of each component of the
    'at least `needed` equal entries' graph inside one LSH bucket. Members with identical signatures
    are joined first (they are all connected); the distinct signatures are compared in blocks."""
    uf, first = _UnionFind(), {}
    for doc_id, sig in sorted(members, key=lambda m: m[0]):
        raw = np.ascontiguousarray(sig).tobytes()
        if raw in first:
            uf.union(first[raw][0], doc_id)
        else:
            first[raw] = (doc_id, sig)
    if len(first) > 1:
        ids = [doc_id for doc_id, _ in first.values()]
        matrix = np.stack([sig for _, sig in first.values()])
        step = max(1, _BLOCK // matrix.size)
        for start in range(0, len(ids), step):
            equal = (matrix[start:start + step, None, :] == matrix[None, :, :]).sum(axis=-1)
            for i, j in zip(*np.nonzero(np.triu(equal >= needed, k=start + 1))):  # pairs j > i only
                uf.union(ids[start + i], ids[j])
    return sorted(uf.roots().items())


class _UnionFind:
    """Union-find over string ids whose root is always the smallest id of the component."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: str, b: str):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)

    def roots(self) -> dict[str, str]:
        """{member: smallest id of its component} for every member that is not the smallest."""
        return {x: r for x in sorted(self.parent) if (r := self.find(x)) != x}


def _roots(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    uf = _UnionFind()
    for a, b in edges:
        uf.union(a, b)
    return uf.roots()


def _groups(roots: Mapping[str, str]) -> list[list[str]]:
    groups = collections.defaultdict(list)
    for member, root in roots.items():
        groups[root].append(member)
    return sorted([root, *sorted(members)] for root, members in groups.items())


def _bucket_name(members: list[str]) -> bytes:
    return hashlib.blake2b("\0".join(members).encode("utf-8"), digest_size=16).digest()


def _unique_ids(docs: list[dict]) -> list[dict]:
    seen = collections.Counter(d["id"] for d in docs)
    repeated = sorted(i for i, c in seen.items() if c > 1)
    if repeated:
        raise ValueError(f"dedup needs unique document ids; repeated: {repeated[:5]}")
    return docs


def exact_duplicate_groups(docs: Iterable[dict]) -> list[list[str]]:
    """Pure reference: the ids of each group of >= 2 documents with one exact_key, smallest first."""
    by_key = collections.defaultdict(list)
    for doc in _unique_ids(list(docs)):
        by_key[exact_key(doc["text"])].append(doc["id"])
    return sorted(sorted(ids) for ids in by_key.values() if len(ids) > 1)


def near_duplicate_groups(docs: Iterable[dict], d: Mapping | None = None) -> list[list[str]]:
    """Pure reference: the ids of each near-duplicate component of >= 2 documents, smallest first."""
    s = settings(d)
    sigs = {doc["id"]: signature(doc["text"], s) for doc in _unique_ids(list(docs))}
    buckets = collections.defaultdict(list)
    for doc_id in sorted(sigs):
        for key in lsh_keys(sigs[doc_id], s.bands, s.rows):
            buckets[key].append(doc_id)
    distinct = {tuple(ids) for ids in buckets.values() if len(ids) > 1}
    edges = [e for ids in sorted(distinct) for e in _bucket_edges([(i, sigs[i]) for i in ids], s.needed)]
    return _groups(_roots(edges))


def _drop(docs: list[dict], groups: list[list[str]]) -> tuple[list[dict], list[dict]]:
    kept_of = {member: g[0] for g in groups for member in g[1:]}
    kept = [doc for doc in docs if doc["id"] not in kept_of]
    removed = [{**doc, "duplicate_of": kept_of[doc["id"]]} for doc in docs if doc["id"] in kept_of]
    return kept, removed


def deduplicate(docs: Iterable[dict], d: Mapping | None = None) -> tuple[list[dict], list[dict]]:
    """Pure reference of ExactDedup then NearDedup (each if enabled): (kept, removed), sorted by id."""
    s = settings(d)
    kept, removed = sorted(_unique_ids(list(docs)), key=lambda doc: doc["id"]), []
    if s.exact:
        kept, gone = _drop(kept, exact_duplicate_groups(kept))
        removed += gone
    if s.near:
        kept, gone = _drop(kept, near_duplicate_groups(kept, d))
        removed += gone
    return kept, sorted(removed, key=lambda doc: doc["id"])


def _split_exact(item):
    _, docs = item
    docs = sorted(docs, key=lambda doc: doc["id"])
    _unique_ids(docs)
    yield docs[0]
    for doc in docs[1:]:
        yield beam.pvalue.TaggedOutput("removed", {**doc, "duplicate_of": docs[0]["id"]})


class ExactDedup(beam.PTransform):
    """PCollection[doc] -> {"kept", "removed"}: one document (smallest id) per exact_key."""

    def expand(self, docs):
        out = (docs | "ByExactKey" >> beam.Map(lambda doc: (exact_key(doc["text"]), doc))
               | "Group" >> beam.GroupByKey()
               | "Split" >> beam.FlatMap(_split_exact).with_outputs("removed", main="kept"))
        return {"kept": out.kept, "removed": out.removed}


def _band_keys(item, s: Settings):
    doc_id, sig = item
    return [(key, doc_id) for key in lsh_keys(sig, s.bands, s.rows)]


def _memberships(item):
    _, ids = item
    ids = sorted(ids)
    if len(ids) > 1:
        name = _bucket_name(ids)
        yield from ((doc_id, name) for doc_id in ids)


def _to_buckets(item):
    doc_id, joined = item
    for sig in joined["sig"]:  # exactly one
        for name in sorted(set(joined["bucket"])):  # a bucket met in several bands is verified once
            yield name, (doc_id, sig)


def _union_find(item):
    _, edges = item
    yield from _roots(edges).items()


def _split_near(item):
    doc_id, joined = item
    docs, kept_id = list(joined["doc"]), list(joined["kept"])
    if len(docs) != 1:
        raise ValueError(f"dedup needs unique document ids; {doc_id!r} appears {len(docs)} times")
    if kept_id:
        yield beam.pvalue.TaggedOutput("removed", {**docs[0], "duplicate_of": kept_id[0]})
    else:
        yield docs[0]


class NearDedup(beam.PTransform):
    """PCollection[doc] -> {"kept", "removed"}: one document (smallest id) per near-duplicate component.

    `d` is a mapping / ConfigDict of DEFAULT_DEDUP's fields (validated here, at pipeline construction)."""

    def __init__(self, d: Mapping | None = None, label: str | None = None):
        super().__init__(label)
        self._s = settings(d)

    def expand(self, docs):
        s = self._s
        sigs = docs | "Signature" >> beam.Map(lambda doc: (doc["id"], signature(doc["text"], s)))
        memberships = (sigs | "BandKeys" >> beam.FlatMap(_band_keys, s)
                       | "GroupBands" >> beam.GroupByKey()
                       | "Buckets" >> beam.FlatMap(_memberships))
        edges = ({"bucket": memberships, "sig": sigs} | "JoinSignatures" >> beam.CoGroupByKey()
                 | "ToBuckets" >> beam.FlatMap(_to_buckets)
                 | "GroupBuckets" >> beam.GroupByKey()
                 | "Verify" >> beam.FlatMap(lambda item: _bucket_edges(item[1], s.needed)))
        kept_of = (edges | "OneKey" >> beam.Map(lambda edge: (None, edge))
                   | "AllEdges" >> beam.GroupByKey()
                   | "Components" >> beam.FlatMap(_union_find))
        by_id = docs | "ById" >> beam.Map(lambda doc: (doc["id"], doc))
        out = ({"doc": by_id, "kept": kept_of} | "JoinDocs" >> beam.CoGroupByKey()
               | "Split" >> beam.FlatMap(_split_near).with_outputs("removed", main="kept"))
        return {"kept": out.kept, "removed": out.removed}
