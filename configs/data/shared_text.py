"""A data pile from the offline corpora in ../shared/data/text (mode=prepare).

  python -m fmjax.main --config configs/data/shared_text.py
  python -m fmjax.main --config configs/lm/tiny.py --workdir runs/pile \\
      --config.data.source=pile --config.data.pile=shared_text@latest --config.data.tokenizer=...

writes piles/shared_text/<version>/ (TFDS array_record splits, manifest.json, REPORT.md, a
tokenizer); the version is a hash of the input files and these settings. Sources are a ConfigDict
(name -> fields), so each field can be overridden: --config.data.prepare.sources.plays.licence=x.
"""
import pathlib

import ml_collections

from fmjax import config_lib
from fmjax.data.prepare import pile

TEXT = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "text"


def get_config():
    c = config_lib.base_config()
    c.mode = "prepare"
    c.data.piles_dir = "piles"
    p = c.data.prepare = pile.default_prepare_config()
    p.name = "shared_text"
    p.tags = ("offline", "english", "demo")
    sources = {
        "plays": dict(path=str(TEXT / "tinyshakespeare.txt"), domain="plays", licence="public-domain"),
        "novel": dict(path=str(TEXT / "war_and_peace.txt"), domain="books", licence="public-domain"),
        "stories": dict(path=str(TEXT / "tinystories_sample.txt"), separator="<|endoftext|>", domain="stories",
                        licence="CDLA-Sharing-1.0"),
        "wikipedia": dict(path=str(TEXT / "wikitext2_valid.tokens.txt"), domain="encyclopedia",
                          licence="CC-BY-SA-3.0"),
    }
    p.sources = ml_collections.ConfigDict({name: dict(format="text", **s) for name, s in sources.items()})
    p.licences = ("public-domain", "CDLA-Sharing-1.0", "CC-BY-SA-3.0")
    p.tokenizer.vocab_size = 1024
    return c
