"""Tests for fmjax.data.prepare.dedup: a pile of real pydoc paragraphs with planted exact duplicates,
near-duplicates (single groups and chains whose ends are far apart) and clearly different rewrites;
every planted case is caught with exact counts and the documented kept document, the Beam transforms
(in-process and multi-process DirectRunner, shuffled input) equal the pure reference, and hashing is
stable across processes."""
import hashlib
import os
import random
import re
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from pydoc_data import topics

from fmjax.data.prepare import dedup

FILLER = "zephyr quokka marzipan obsidian tundra lantern walrus saffron cobalt meadow harpoon ember".split()
CFG = dict(dedup.DEFAULT_DEDUP)  # ngram 5, 128 permutations, threshold 0.8 -> 14 bands of 9 rows


def doc_id(label: str) -> str:  # arbitrary order: the kept document is sometimes a variant
    return hashlib.sha256(label.encode()).hexdigest()[:12]


def base_paragraphs(n=180) -> list[str]:
    """n pydoc paragraphs of >= 60 words, no two with 5-shingle Jaccard >= 0.5."""
    paras = [p for name in sorted(topics.topics) for p in re.split(r"\n\s*\n", topics.topics[name])
             if len(p.split()) >= 60]
    out, sets = [], []
    for p in paras:
        s = dedup.shingles(p, 5)
        if all(dedup.jaccard(s, t) < 0.5 for t in sets):
            out.append(p)
            sets.append(s)
    assert len(out) >= n, len(out)
    return out[:n]


def edit(words: list[str], rng: random.Random) -> list[str]:
    """One random word replaced, inserted, deleted or given a typo."""
    words, i = list(words), rng.randrange(len(words))
    op = rng.choice(["replace", "insert", "delete", "typo"])
    if op == "replace":
        words[i] = rng.choice(FILLER)
    elif op == "insert":
        words.insert(i, rng.choice(FILLER))
    elif op == "delete":
        del words[i]
    else:
        words[i] = words[i][::-1] + "x"
    return words


def variant(text: str, rng: random.Random, lo: float, hi: float, edits: int = 1, avoid=()) -> str:
    """A copy with `edits` random edits whose exact 5-shingle Jaccard to `text` is in [lo, hi], not
    normalising to any text in `avoid`."""
    base = dedup.shingles(text, 5)
    for _ in range(1000):
        words = text.split()
        for _ in range(edits):
            words = edit(words, rng)
        out = " ".join(words)
        if lo <= dedup.jaccard(base, dedup.shingles(out, 5)) <= hi and dedup.normalize(out) not in avoid:
            return out
    raise AssertionError(f"no variant with Jaccard in [{lo}, {hi}]")


def rewrite(text: str, rng: random.Random) -> str:
    """A block of consecutive words replaced: Jaccard 0.2-0.6, clearly below the threshold."""
    base = dedup.shingles(text, 5)
    for _ in range(1000):
        words = text.split()
        n = rng.randrange(len(words) // 5, len(words) // 2)
        i = rng.randrange(len(words) - n)
        words[i:i + n] = [rng.choice(FILLER) for _ in range(n)]
        out = " ".join(words)
        if 0.2 <= dedup.jaccard(base, dedup.shingles(out, 5)) <= 0.6:
            return out
    raise AssertionError("no rewrite")


def case_and_space(text: str, rng: random.Random) -> str:
    return "  \n".join(w.upper() if rng.random() < 0.3 else w for w in text.split()) + "\n"


def build_pile():
    """(docs, planted clusters as sorted id lists with the kind of each removal, far pairs)."""
    rng = random.Random(0)
    bases = base_paragraphs()
    docs = [{"id": doc_id(f"base{i}"), "text": t} for i, t in enumerate(bases)]
    clusters, far = [], []  # clusters: (ids, exact removals, near removals)

    def add(label, text):
        docs.append({"id": doc_id(label), "text": text})
        return doc_id(label)

    order = list(range(len(bases)))
    rng.shuffle(order)
    long = [i for i in order if 120 <= len(bases[i].split()) <= 200][:6]
    rest = iter(i for i in order if i not in long)
    for i in [next(rest) for _ in range(10)]:  # exact: case and whitespace only; one base twice
        ids = [doc_id(f"base{i}"), add(f"exact{i}", case_and_space(bases[i], rng))]
        if len(clusters) == 0:
            ids.append(add(f"exact{i}b", case_and_space(bases[i], rng)))
        clusters.append((ids, len(ids) - 1, 0))
    for k, i in enumerate([next(rest) for _ in range(40)]):  # near: 1-3 edits, Jaccard 0.92-0.995
        edits = min(1 + k % 3, 1 + len(bases[i].split()) // 100)  # short paragraphs: one, near an end
        ids = [doc_id(f"base{i}"), add(f"near{i}", variant(bases[i], rng, 0.92, 0.995, edits))]
        if k < 5:  # a group of four: three different variants of one paragraph
            for j in range(2):
                seen = {dedup.normalize(d["text"]) for d in docs if d["id"] in ids}
                ids.append(add(f"near{i}-{j}", variant(bases[i], rng, 0.92, 0.995, avoid=seen)))
        clusters.append((ids, 0, len(ids) - 1))
    for i in [next(rest) for _ in range(3)]:  # an exact and a near copy of one paragraph
        ids = [doc_id(f"base{i}"), add(f"both{i}", case_and_space(bases[i], rng)),
               add(f"both{i}n", variant(bases[i], rng, 0.92, 0.995))]
        clusters.append((ids, 1, 1))
    chains = []
    for i in long:  # chains: each link one edit (Jaccard 0.92-0.97), the ends below 0.7
        links, first = [bases[i]], dedup.shingles(bases[i], 5)
        while dedup.jaccard(first, dedup.shingles(links[-1], 5)) > 0.7:
            links.append(variant(links[-1], rng, 0.92, 0.97))
            assert len(links) < 12
        ids = [doc_id(f"base{i}")] + [add(f"chain{i}-{j}", t) for j, t in enumerate(links[1:])]
        chains.append((links, ids))
        clusters.append((ids, 0, len(ids) - 1))
    for i in [next(rest) for _ in range(20)]:  # far: half or so rewritten, must stay
        far.append((doc_id(f"base{i}"), add(f"far{i}", rewrite(bases[i], rng))))
    assert len({d["id"] for d in docs}) == len(docs)
    return docs, [(sorted(ids), e, n) for ids, e, n in clusters], chains, far


DOCS, CLUSTERS, CHAINS, FAR = build_pile()
N_EXACT = sum(e for _, e, _ in CLUSTERS)
N_NEAR = sum(n for _, _, n in CLUSTERS)


def test_pile_is_what_the_tests_assume():
    chain_links = sum(len(ids) - 1 for _, ids in CHAINS)
    assert (N_EXACT, N_NEAR, len(CHAINS), len(FAR)) == (14, 53 + chain_links, 6, 20)
    assert all(len(ids) >= 4 for _, ids in CHAINS)
    assert dedup.near_duplicate_groups(DOCS[:180], CFG) == []  # the bases are distinct


def test_normalize_and_exact_key():
    assert dedup.normalize("  Hello,\tWORLD!\n\n ﬁne  Straße ") == "hello world fine strasse"
    assert dedup.exact_key("A  b\nC.") == dedup.exact_key("a b c")
    assert dedup.exact_key("a b c") != dedup.exact_key("a b d")
    assert dedup.normalize("x + y = 2") == "x + y = 2"  # symbols and digits stay


def test_shingles():
    assert dedup.shingles("One two, THREE four five six", 5) == {"one two three four five", "two three four five six"}
    assert dedup.shingles("Too short.", 5) == {"too short"}
    assert dedup.shingles("", 5) == {""}


def test_minhash_is_the_documented_universal_hash():
    s = {"a b c", "b c d", "c d e"}
    a, b = dedup._hash_params(16, 3)
    x = [int(v) for v in dedup.base_hashes(sorted(s))]
    want = [min((int(a[i]) * xi + int(b[i])) % dedup.PRIME for xi in x) & 0xFFFFFFFF for i in range(16)]
    got = dedup.minhash(s, 16, 3)
    assert got.dtype == np.uint32 and got.tolist() == want
    assert dedup.minhash(s, 16, 4).tolist() != want  # the seed matters


def test_minhash_is_stable_across_processes():
    code = ("from fmjax.data.prepare import dedup; "
            "print(dedup.minhash(dedup.shingles('the quick brown fox jumps over the lazy dog', 3), 8, 1).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    here = dedup.minhash(dedup.shingles("the quick brown fox jumps over the lazy dog", 3), 8, 1).tolist()
    assert out.strip() == str(here)


def test_estimated_jaccard_tracks_exact():
    s = dedup.settings(CFG)
    errors = []
    for links, _ in CHAINS:
        for a, b in zip(links, links[1:]):
            exact = dedup.jaccard(dedup.shingles(a, 5), dedup.shingles(b, 5))
            errors.append(dedup.estimated_jaccard(dedup.signature(a, s), dedup.signature(b, s)) - exact)
    assert np.max(np.abs(errors)) < 0.12 and abs(np.mean(errors)) < 0.03  # std ~0.02 at 128 permutations


def test_settings():
    s = dedup.settings(CFG)
    assert (s.bands, s.rows, s.needed) == (14, 9, 103)
    assert dedup.settings({**CFG, "bands": 32}).rows == 4
    for bad, field in (({"bands": 3}, "dedup.bands"), ({"threshold": 0}, "dedup.threshold"),
                       ({"num_perm": 0}, "dedup.num_perm"), ({"shingle": 5}, "unknown fields ['shingle']")):
        with pytest.raises(ValueError, match=re.escape(field)):
            dedup.settings({**CFG, **bad})
    bands, rows = dedup.choose_bands(256, 0.7)
    assert bands * rows <= 256


def test_planted_duplicates_are_caught_exactly():
    kept, removed = dedup.deduplicate(DOCS, CFG)
    assert len(removed) == N_EXACT + N_NEAR and len(kept) == len(DOCS) - N_EXACT - N_NEAR
    assert sum(len(g) - 1 for g in dedup.exact_duplicate_groups(DOCS)) == N_EXACT
    want = {member: ids[0] for ids, _, _ in CLUSTERS for member in ids[1:]}  # smallest id kept
    assert {d["id"]: d["duplicate_of"] for d in removed} == want
    kept_ids = {d["id"] for d in kept}
    assert all(a in kept_ids and b in kept_ids for a, b in FAR)


def test_chains_are_one_group_though_their_ends_are_far_apart():
    s = dedup.settings(CFG)
    groups = dedup.near_duplicate_groups(DOCS, CFG)
    for links, ids in CHAINS:
        first, last = dedup.signature(links[0], s), dedup.signature(links[-1], s)
        assert dedup.estimated_jaccard(first, last) < s.threshold  # not directly linked
        assert sorted(ids) in groups


def test_bucket_components_go_through_any_member():
    """a~b and b~c hold (8 of 10 entries equal), a~c does not (6 of 10), d = c: one component."""
    a = np.zeros(10, np.uint32)
    b, c = a.copy(), a.copy()
    b[:2] = 1
    c[:2], c[8:] = 1, 2
    members = [("d", c), ("b", b), ("a", a), ("c", c)]
    assert dedup._bucket_edges(members, needed=8) == [("b", "a"), ("c", "a"), ("d", "a")]
    assert dedup._bucket_edges([("d", c), ("a", a)], needed=8) == []


def test_reference_equals_the_relation_by_brute_force():
    """Components of 'some band key shared and estimated Jaccard >= threshold' over all pairs."""
    s = dedup.settings(CFG)
    sigs = np.stack([dedup.signature(d["text"], s) for d in DOCS])
    keys = [set(dedup.lsh_keys(sig, s.bands, s.rows)) for sig in sigs]
    uf = dedup._UnionFind()
    for i in range(len(DOCS)):
        for j in np.nonzero((sigs[i + 1:] == sigs[i]).mean(axis=1) >= s.threshold)[0] + i + 1:
            if keys[i] & keys[j]:
                uf.union(DOCS[i]["id"], DOCS[j]["id"])
    assert dedup.near_duplicate_groups(DOCS, CFG) == dedup._groups(uf.roots())


def test_reference_is_order_independent():
    shuffled = random.Random(1).sample(DOCS, len(DOCS))
    assert dedup.deduplicate(shuffled, CFG) == dedup.deduplicate(DOCS, CFG)


def test_repeated_ids_are_an_error():
    with pytest.raises(ValueError, match="unique document ids"):
        dedup.deduplicate(DOCS + DOCS[:1], CFG)


def run_beam(docs, options: PipelineOptions):
    kept, removed = dedup.deduplicate(DOCS, CFG)
    with beam.Pipeline(runner="DirectRunner", options=options) as p:
        exact = p | beam.Create(docs) | "Exact" >> dedup.ExactDedup()
        near = exact["kept"] | "Near" >> dedup.NearDedup(CFG)
        gone = (exact["removed"], near["removed"]) | beam.Flatten()
        assert_that(near["kept"] | "KeptIds" >> beam.Map(lambda d: d["id"]), equal_to([d["id"] for d in kept]),
                    label="Kept")
        assert_that(gone | "Pairs" >> beam.Map(lambda d: (d["id"], d["duplicate_of"], d["text"])),
                    equal_to([(d["id"], d["duplicate_of"], d["text"]) for d in removed]), label="Removed")


def test_beam_equals_reference_on_shuffled_input():
    run_beam(random.Random(2).sample(DOCS, len(DOCS)), PipelineOptions(direct_running_mode="in_memory"))


def test_beam_multi_process_equals_reference():
    run_beam(random.Random(3).sample(DOCS, len(DOCS)),
             PipelineOptions(direct_running_mode="multi_processing", direct_num_workers=2))
