"""mode=prepare end to end: planted duplicates, near-duplicates, PII, blocklisted, foreign-language
and unlicensed documents are each caught with exact counts; clean text passes unchanged; the same
inputs and config give the same version and byte-identical shards (in-process and multi-process);
the tiny LM trains from the pile by name@version and its model card names that version."""
import json
import pathlib
import random

import pytest
from pydoc_data import topics

from configs.lm import tiny
from fmjax import config_lib
from fmjax.data.prepare import dedup, filters, pile, pipeline
from fmjax.eval import model_card
from fmjax.train import loop

FRENCH = ("Le chat dort sur le canapé pendant que la pluie tombe doucement sur la ville. Les enfants "
          "jouent dans la maison et la mère prépare le dîner pour toute la famille. Demain, nous irons "
          "au marché pour acheter des légumes frais, du pain et du fromage. Le soir, nous lisons des "
          "livres et nous parlons de nos projets pour les vacances d'été à la mer avec nos amis.")
GERMAN = ("Der Hund schläft im Garten, während die Sonne langsam hinter den Bergen untergeht. Die Kinder "
          "spielen im Haus und der Vater kocht das Abendessen für die ganze Familie. Morgen gehen wir auf "
          "den Markt, um frisches Gemüse, Brot und Käse zu kaufen. Am Abend lesen wir Bücher und sprechen "
          "über unsere Pläne für die Ferien am Meer mit unseren Freunden und Nachbarn.")


def clean_paragraphs(n=60):
    """Real English prose: pydoc paragraphs of 50+ words without code, URLs or addresses that pass
    the quality filters and have no duplicate or near-duplicate among them (pydoc repeats some)."""
    found = []
    for name in sorted(topics.topics):
        for p in topics.topics[name].split("\n\n"):
            words = p.split()
            if len(words) >= 50 and not p.startswith(" ") and all(c not in p for c in "@>{}|#"):
                found.append(" ".join(words))
    found = [p for p in dict.fromkeys(found) if not filters.quality_problems(p, filters.DEFAULT_QUALITY)]
    kept, _ = dedup.deduplicate([{"id": f"{i:05d}", "text": p} for i, p in enumerate(found)])
    return [doc["text"] for doc in kept][:n]


def near_copy(text, rng):
    words = text.split()
    i = rng.randrange(5, len(words) - 5)
    return " ".join(words[:i] + ["indeed"] + words[i + 1:])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("raw")
    clean = clean_paragraphs()
    (root / "clean.txt").write_text("\n\n".join(clean[:50]) + "\n")
    rows = ([{"text": near_copy(clean[i], rng)} for i in range(5)]  # 5 near-duplicates
            + [{"text": "  " + clean[10 + i].upper() + "  "} for i in range(3)]  # 3 exact (normalised) duplicates
            + [{"text": clean[50 + i] + " blockword1 appears here."} for i in range(3)]  # 3 blocklisted
            + [{"text": clean[53] + " Write to jane.doe@example.org or call +1 415 555 0123."},
               {"text": clean[54] + " The server at 192.168.10.7 answers, and so does 2001:db8::ff00:42:8329."},
               {"text": FRENCH}, {"text": GERMAN}])
    (root / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "private.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in clean[55:57]))
    return root, clean


def prepare_config(root, piles_dir, **overrides):
    c = config_lib.base_config()
    c.mode = "prepare"
    c.data.piles_dir = str(piles_dir)
    p = c.data.prepare = pile.default_prepare_config()
    p.name = "planted"
    p.sources = {"docs": dict(format="text", path=str(root / "clean.txt"), domain="docs", licence="PSF-2.0"),
                 "planted": dict(format="jsonl", path=str(root / "planted.jsonl"), domain="planted",
                                 licence="PSF-2.0"),
                 "private": dict(format="jsonl", path=str(root / "private.jsonl"), domain="secret",
                                 licence="proprietary")}
    p.licences = ("PSF-2.0",)
    p.blocklist = ("blockword1",)
    p.validation_fraction = 0.1
    p.tokenizer.vocab_size = 512
    p.update(overrides)
    return c


@pytest.fixture(scope="module")
def built(planted, tmp_path_factory):
    root, _ = planted
    config = prepare_config(root, tmp_path_factory.mktemp("piles"))
    pile.validate(config)
    return config, pile.prepare(config)


def test_every_planted_case_is_caught_with_exact_counts(built, planted):
    _, path = built
    m = pile.manifest(path)
    removed = {k: v["documents"] for k, v in m["removed"].items()}
    assert removed == {"licence:proprietary": 2, "blocklist": 3, "exact_duplicate": 3, "near_duplicate": 5}
    by_source = {name: {k: v["documents"] for k, v in stages.items()} for name, stages in m["removed_by_source"].items()}
    assert by_source == {"docs": {}, "planted": {"blocklist": 3, "exact_duplicate": 3, "near_duplicate": 5},
                         "private": {"licence:proprietary": 2}}
    assert m["pii_replaced"] == {"email": 1, "phone": 1, "ip_address": 2}
    assert m["input"]["documents"] == 50 + 15 + 2 and m["output"]["documents"] == 50 + 4
    assert {k: v["documents"] for k, v in m["languages"].items()} == {"en": 52, "fr": 1, "de": 1}
    assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == 54
    assert (path / "REPORT.md").read_text().count("|") > 20 and (path / "length_histogram.png").stat().st_size > 5000
    assert m["tokenizer"]["sha256"] and (path / "tokenizer.model").is_file()


def test_clean_text_passes_unchanged_and_pii_is_replaced(built, planted):
    config, path = built
    _, clean = planted
    texts = {r["text"] for split in ("train", "validation") for r in map(dict, pile.load_split(path, split))}
    texts = {t.decode() if isinstance(t, bytes) else t for t in texts}
    assert set(clean[:50]) <= texts  # kept (the earlier source wins a duplicate), byte for byte
    scrubbed = [t for t in texts if "<EMAIL>" in t or "<IP_ADDRESS>" in t]
    assert len(scrubbed) == 2 and not any("jane.doe@example.org" in t or "192.168.10.7" in t for t in texts)


def test_same_inputs_same_version_and_bytes_any_change_a_new_version(built, planted, tmp_path):
    config, path = built
    root, _ = planted
    again = prepare_config(root, tmp_path / "piles", num_workers=2)  # multi-process DirectRunner
    second = pile.prepare(again)
    assert second.name == path.name
    first_manifest, second_manifest = pile.manifest(path), pile.manifest(second)
    assert first_manifest["shards_sha256"] == second_manifest["shards_sha256"]
    assert first_manifest["tokenizer"]["sha256"] == second_manifest["tokenizer"]["sha256"]
    changed = prepare_config(root, tmp_path / "piles", blocklist=("blockword2",))
    records = [pile.source_record(s) for s in pipeline.configured_sources(changed.data.prepare)]
    assert pile.version_id(changed.data.prepare, records) != path.name
    edited = tmp_path / "raw"  # the same files elsewhere: the same version; one byte changed: a new one
    edited.mkdir()
    for name in ("clean.txt", "planted.jsonl", "private.jsonl"):
        (edited / name).write_bytes((root / name).read_bytes())
    moved = prepare_config(edited, tmp_path / "piles").data.prepare
    assert pile.version_id(moved, [pile.source_record(s) for s in pipeline.configured_sources(moved)]) == path.name
    (edited / "clean.txt").write_text((root / "clean.txt").read_text().replace("the", "The", 1))
    assert pile.version_id(moved, [pile.source_record(s) for s in pipeline.configured_sources(moved)]) != path.name


def test_the_tiny_lm_trains_from_the_pile_by_name_and_version(built, tmp_path):
    config, path = built
    c = tiny.get_config()
    c.model.update(vocab_size=512, width=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
    c.data.update(source="pile", pile=f"planted@{path.name}", piles_dir=config.data.piles_dir,
                  tokenizer=str(path / "tokenizer.model"), seq_len=32, cache_dir=str(tmp_path / "cache"))
    c.train.update(steps=2, batch_size=8, eval_batches=1, progress_bar=False)
    c.task.sample_prompts = []
    c.eval.update(tasks=(), datasets=())
    run = loop.setup(c, str(tmp_path / "run"))
    assert loop.train(run)["loss"] > 0
    card = json.loads((tmp_path / "run" / model_card.JSON).read_text())
    assert card["training_data"]["pile"]["id"] == f"planted@{path.name}"
    assert f"planted@{path.name}" in (tmp_path / "run" / model_card.MARKDOWN).read_text()


SHARED_TEXT = pathlib.Path(__file__).resolve().parents[3].parent / "shared" / "data" / "text"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason=f"{SHARED_TEXT} is absent (../shared/data not beside the repo)")
def test_the_shared_corpora_with_planted_cases(tmp_path):
    """configs/data/shared_text.py's sources plus a last source of planted cases: each is caught."""
    from configs.data import shared_text
    config = shared_text.get_config()
    config.data.piles_dir = str(tmp_path / "piles")
    config.data.prepare.tokenizer.vocab_size = 0
    paragraphs = [" ".join(p.split()) for p in (SHARED_TEXT / "war_and_peace.txt").read_text().split("\n\n")]
    paragraphs = [p for p in dict.fromkeys(paragraphs)
                  if len(p.split()) >= 80 and not filters.quality_problems(p, filters.DEFAULT_QUALITY)][:12]
    rng = random.Random(1)
    rows = ([{"text": near_copy(p, rng)} for p in paragraphs[:5]] + [{"text": p.upper()} for p in paragraphs[5:8]]
            + [{"text": p + " Then blockword1 was said."} for p in paragraphs[8:10]]
            + [{"text": "Mail anna.k@example.com or +44 20 7946 0958 from 10.0.0.1. " + clean_paragraphs(1)[0]},
               {"text": FRENCH}])  # the PII document's text is not in the corpora (a near copy would go)
    planted_file = tmp_path / "planted.jsonl"
    planted_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config.data.prepare.sources.planted = dict(format="jsonl", path=str(planted_file), domain="planted",
                                               licence="public-domain")
    config.data.prepare.blocklist = ("blockword1",)
    m = pile.manifest(pile.prepare(config))
    planted = {k: v["documents"] for k, v in m["removed_by_source"]["planted"].items()}
    assert planted == {"near_duplicate": 5, "exact_duplicate": 3, "blocklist": 2}
    assert m["pii_replaced"] == {"email": 1, "phone": 1, "ip_address": 1}  # the clean corpora have none
    assert m["languages"]["fr"]["documents"] == 1 and m["languages"]["en"]["documents"] > 5000
    assert {s["name"] for s in m["sources"]} == {"plays", "novel", "stories", "wikipedia", "planted"}
